"""End-to-end runs of the tiny LM with 2 gloo processes: metrics, checkpoints, exact resume (also
after SIGKILL), interrupted saves, resharding 2->1, NaN handling, preemption, two nodes, export.

The spine's engine-dependent tests run with both engines (``parallel.engine``): resume after SIGKILL
(FSDP2, DeepSpeed ZeRO-2), preemption -> checkpoint -> resume (FSDP2, ZeRO-3) and export (FSDP2, ZeRO-3).
DeepSpeed's NaN-step skip is checked by tests/platform/test_deepspeed.py's parity runs (a NaN step in
each, skipped like FSDP2's); the rest (interrupted saves, damaged checkpoints, non-finite stop, the loop's
two step paths) is engine-independent code."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
COMMON = ["trainer.max_steps=12", "checkpoint.interval=4", "metrics.wandb.mode=disabled", "metrics.plot=false"]
_needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
ENGINES = {"fsdp2": [], "zero2": ["parallel.engine=deepspeed", "parallel.deepspeed.zero_stage=2"],
           "zero3": ["parallel.engine=deepspeed", "parallel.deepspeed.zero_stage=3"]}


def engines(*names):
    """``engine`` parameters: the DeepSpeed ones skip where deepspeed is not installed."""
    return pytest.mark.parametrize("engine", [pytest.param(n, marks=_needs_deepspeed) if n != "fsdp2" else n
                                              for n in names])


def launch(run_env, out, name, *extra, nproc=2, env=None, check=True, timeout=240, config="lm_tiny.yaml"):
    cmd = [str(BIN / "launch"), "--config", config, "--nproc", str(nproc),
           f"run.output_dir={out}", f"run.name={name}", *COMMON, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**run_env, **(env or {})}, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def losses(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """references(engine): the uninterrupted 12-step run of that engine every resume is compared with,
    made on first use."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env = {k: v for k, v in env.items() if not k.startswith("SCALEFORGE_FAULT_")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".torch_extensions"))
    made = {}

    def get(engine):
        if engine not in made:
            out = tmp_path_factory.mktemp(f"ref_{engine}")
            launch(env, out, "ref", *ENGINES[engine])
            made[engine] = out / "ref"
        return made[engine]
    return get


@pytest.fixture(scope="module")
def reference(references):
    return references("fsdp2")


def test_run_leaves_metrics_checkpoints_config(reference):
    recs = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s", "sync_wait_s"):
        assert all(key in r for r in recs), key
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5  # it learns
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000012"]
    assert all((p / "COMPLETE").is_file() for p in ckpts.glob("step_*"))
    assert "recipe: llm" in (reference / "config.yaml").read_text()


def test_exact_resume_is_bit_identical(reference, tmp_path, run_env):
    r = launch(run_env, tmp_path, "r", "trainer.exit_after_steps=8")
    run = tmp_path / "r"
    assert sorted(losses(run)) == list(range(1, 9)) and "step_00000008" in (run / "checkpoints" / "latest").read_text()
    r = launch(run_env, tmp_path, "r")
    assert "resumed from" in r.stdout and "at step 8" in r.stdout
    assert losses(run) == losses(reference)  # bit-identical floats, every step once


@engines("fsdp2", "zero2")
def test_resume_after_sigkill_is_bit_identical(references, engine, tmp_path, run_env):
    r = launch(run_env, tmp_path, "k", *ENGINES[engine], env={"SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT": "8"},
               check=False)
    assert r.returncode != 0
    run = tmp_path / "k"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    r = launch(run_env, tmp_path, "k", *ENGINES[engine])
    assert "resumed from" in r.stdout and "at step 8" in r.stdout
    assert losses(run) == losses(references(engine))  # bit-identical floats, every step once


def test_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, run_env):
    """A complete checkpoint whose shard was later truncated: --resume PATH to it is a one-line error naming
    the file; --resume auto names it and resumes from the previous complete checkpoint, bit-identically."""
    launch(run_env, tmp_path, "d", "trainer.exit_after_steps=8")  # checkpoints of steps 4 and 8
    run = tmp_path / "d"
    step8 = run / "checkpoints" / "step_00000008"
    shard = sorted(step8.glob("*.distcp"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    r = launch(run_env, tmp_path, "d", "--resume", str(step8), check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --resume {step8}: checkpoint is damaged: {shard} has "
                                             f"{size // 2} bytes, {size} when it was saved"]
    r = launch(run_env, tmp_path, "d")
    assert str(shard) in r.stderr and "resumed from" in r.stdout and "at step 4" in r.stdout
    assert losses(run) == losses(reference)


def test_interrupted_save_is_never_used(reference, tmp_path, run_env):
    r = launch(run_env, tmp_path, "i", env={"SCALEFORGE_FAULT_KILL_DURING_SAVE": "8"}, check=False)
    assert r.returncode != 0
    ckpts = tmp_path / "i" / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and not (ckpts / "step_00000008").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    r = launch(run_env, tmp_path, "i")
    assert "resumed from" in r.stdout and "step_00000004 at step 4" in r.stdout
    assert losses(tmp_path / "i") == losses(reference)
    assert not (ckpts / "step_00000008.tmp").exists()


@engines("fsdp2", "zero3")
def test_preempt_file_checkpoints_and_resumes_exactly(references, engine, tmp_path, run_env):
    run = tmp_path / "p"
    run.mkdir(parents=True)
    cmd = [str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "2", f"run.output_dir={tmp_path}",
           "run.name=p", *COMMON, "checkpoint.interval=0", *ENGINES[engine]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    (run / "PREEMPT").touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested (PREEMPT)" in out
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < 12
    launch(run_env, tmp_path, "p", "checkpoint.interval=0", *ENGINES[engine])
    assert losses(run) == losses(references(engine))


def test_nan_step_is_skipped_and_too_many_stop(tmp_path, run_env):
    r = launch(run_env, tmp_path, "n1", "trainer.max_steps=6", "metrics.profile_start_step=4",
               "metrics.profile_steps=2", env={"SCALEFORGE_FAULT_NAN_STEPS": "3"})
    recs = [json.loads(l) for l in (tmp_path / "n1" / "metrics.jsonl").read_text().splitlines()]
    assert [r_["skipped"] for r_ in recs] == [False, False, True, False, False, False]
    assert "step 3: non-finite loss" in r.stdout
    # the profiler (steps 4-5 here) leaves a trace and its tables, with the model's matmuls in them
    prof = tmp_path / "n1" / "profile"
    assert (prof / "trace_rank0_steps4-5.json").is_file()
    for table in ("top_ops.txt", "top_ops_host.txt", "top_ops_by_shape.txt"):
        assert "aten::mm" in (prof / table).read_text(), table
    r = launch(run_env, tmp_path, "n2", "trainer.max_steps=10", "trainer.max_nonfinite_steps=3",
               env={"SCALEFORGE_FAULT_NAN_STEPS": "5,6,7"}, check=False)
    assert r.returncode != 0
    assert "stopping at step 7: 3 consecutive steps with a non-finite loss" in r.stderr
    # the first error shown is the failing rank's own, before the elastic agent's summary
    import re

    first = re.search(r"(\w+\.)*\w+(Error|Exception): .*", r.stderr).group(0)
    assert first.startswith("scaleforge.platform.trainer.TrainingError: stopping at step 7"), r.stderr[:3000]
    assert "error: worker rank" in r.stderr


def test_device_step_matches_host_step(tmp_path, run_env):
    """The fused optimizer's device-side step (factor and skip flag computed on the device, the update
    enqueued before the host reads the statistics; lm_tiny's default) and the host path (plain AdamW:
    read, then scale, then step) train the same model, a NaN step skipped by both."""
    nan = {"SCALEFORGE_FAULT_NAN_STEPS": "3"}
    launch(run_env, tmp_path, "dev", "trainer.max_steps=6", "checkpoint.interval=0", env=nan)
    launch(run_env, tmp_path, "host", "trainer.max_steps=6", "checkpoint.interval=0", "optim.fused=false", env=nan)
    dev, host = losses(tmp_path / "dev"), losses(tmp_path / "host")
    assert sorted(dev) == sorted(host) == list(range(1, 7))
    assert dev[3] != dev[3] and host[3] != host[3]  # the NaN step, skipped by both
    for s in (1, 2, 4, 5, 6):
        assert abs(dev[s] - host[s]) / host[s] < 1e-6, (s, dev[s], host[s])
    assert dev[6] < dev[1] - 0.5  # and it learns after the skipped step


def test_came_device_step_matches_host_step(tmp_path, run_env):
    """SANA's CAME-8bit with an EMA: optim.fused=true takes the device-side step (the update divides by the
    device's gradient scale and keeps every state where the device's skip flag is set, the EMA likewise) and
    trains the same model as the host path, a NaN step skipped by both."""
    nan = {"SCALEFORGE_FAULT_NAN_STEPS": "3"}
    args = ["trainer.max_steps=5", "checkpoint.interval=0", "checkpoint.save_final=false", "optim.ema_decay=0.9",
            "trainer.global_batch_size=2", "trainer.micro_batch_size=2"]
    for name, fused in (("dev", "true"), ("host", "false")):
        launch(run_env, tmp_path, name, *args, f"optim.fused={fused}", nproc=1, env=nan, config="sana_tiny.yaml")
    dev, host = losses(tmp_path / "dev"), losses(tmp_path / "host")
    assert sorted(dev) == sorted(host) == list(range(1, 6))
    assert dev[3] != dev[3] and host[3] != host[3]
    for s in (1, 2, 4, 5):
        assert abs(dev[s] - host[s]) / host[s] < 1e-5, (s, dev[s], host[s])
    assert dev[5] != dev[4]  # it trains on after the skipped step


def test_reshard_two_to_one(reference, tmp_path, run_env):
    import shutil

    shutil.copytree(reference, tmp_path / "rs")
    ck = tmp_path / "rs" / "checkpoints"
    shutil.rmtree(ck / "step_00000012")
    (ck / "latest").write_text("step_00000008\n")
    r = launch(run_env, tmp_path, "rs", nproc=1, env={"OMP_NUM_THREADS": "2"})
    assert "resharded from 2 to 1 processes" in r.stdout
    ref, got = losses(reference), losses(tmp_path / "rs")
    assert all(got[s] == ref[s] for s in range(1, 9))
    # same samples per step at any world size: only reduction order differs
    for s in range(9, 13):
        assert abs(got[s] - ref[s]) / ref[s] < 1e-4, (s, got[s], ref[s])


def test_two_nodes_on_localhost(tmp_path, run_env):
    from scaleforge.platform.dist import _free_port

    port = _free_port()
    cmds = [[str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "1", "--nnodes", "2", "--node-rank",
             str(r), "--master", f"127.0.0.1:{port}", f"run.output_dir={tmp_path}", "run.name=two",
             "trainer.max_steps=4", "metrics.wandb.mode=disabled", "metrics.plot=false"] for r in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env)
             for c in cmds]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "world size 2" in outs[0]
    assert len(losses(tmp_path / "two")) == 4


@engines("fsdp2", "zero3")
def test_export_hf_from_run_loads_in_transformers(references, engine, tmp_path):
    """`scaleforge export` writes the same HF layout from either engine's checkpoint (DeepSpeed's
    partitions merged by its zero_to_fp32); transformers loads it and its logits are our model's."""
    import torch
    import transformers

    out = tmp_path / "hf"
    r = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(references(engine)), "--format", "hf",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    from scaleforge.models.llm import from_pretrained

    ours = from_pretrained(str(out))
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert (a - b).norm() / a.norm() < 1e-5


def test_hsdp_mesh_matches_fsdp(reference, tmp_path, run_env):
    """dp_replicate=2 x dp_shard=1 (HSDP's 2-D mesh) trains the same samples as FSDP over 2 ranks."""
    launch(run_env, tmp_path, "h", "parallel.dp_replicate=2", "trainer.max_steps=12")
    ref, got = losses(reference), losses(tmp_path / "h")
    for s in range(1, 13):
        assert abs(got[s] - ref[s]) / ref[s] < 1e-4, (s, got[s], ref[s])


def test_async_save_resume_exact_with_default_metrics(reference, tmp_path, run_env):
    """A checkpoint written asynchronously (the periodic save of step 8, in the background while steps 9+
    run; the workers are then SIGKILLed) resumes bit-identically; the default metrics (offline wandb,
    plot) are written."""
    env = {k: v for k, v in run_env.items() if k != "WANDB_MODE"}
    common = ["checkpoint.async_save=true", "metrics.wandb.mode=offline", "metrics.plot=true"]
    r = launch(env, tmp_path, "a", *common, check=False,
               env={"WANDB_MODE": "offline", "SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT": "8"})
    assert r.returncode != 0
    run = tmp_path / "a"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    r = launch(env, tmp_path, "a", *common, env={"WANDB_MODE": "offline"})
    assert "at step 8" in r.stdout
    assert losses(run) == losses(reference)
    assert (run / "metrics.png").stat().st_size > 10_000
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run"
    out = subprocess.run([str(BIN / "scaleforge"), "plot", str(run)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("metrics.png")


def test_fsdp_groups_train_the_same_model(reference, tmp_path, run_env):
    """parallel.fsdp_group_size=2 (two consecutive units per fully_shard group: one all-gather and one
    reduce-scatter per pair) computes the same steps as one group per unit, also with activation
    checkpointing (recomputed forwards inside a group)."""
    r = launch(run_env, tmp_path, "g", "parallel.fsdp_group_size=2", "parallel.activation_checkpointing=full",
               "trainer.max_steps=12")
    ref, got = losses(reference), losses(tmp_path / "g")
    for s in range(1, 13):
        assert abs(got[s] - ref[s]) / ref[s] < 1e-6, (s, got[s], ref[s])


def test_kernel_library_path_trains_the_same_model(tmp_path, run_env):
    """model.kernels=triton routes the loss through the output projection called with labels (the fused head's
    path; an FSDP unit of its own in lm_tiny). On CPU the layers compute their torch functions, so this checks
    the FSDP wiring of that path: the same steps as model.kernels=torch (the logits path) under 2-process FSDP2,
    up to fp32 rounding. The Triton kernels themselves are checked against torch in tests/kernels/test_llm_kernels.py."""
    for k in ("torch", "triton"):
        # TRITON_INTERPRET off (tests/conftest.py sets it): the interpreter would run the kernels, far too slowly
        launch(run_env, tmp_path, k, f"model.kernels={k}", "trainer.max_steps=3", "checkpoint.interval=0",
               env={"TRITON_INTERPRET": "0"})
    ref, got = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert sorted(got) == [1, 2, 3]
    for s in range(1, 4):
        assert abs(got[s] - ref[s]) / ref[s] < 1e-5, (s, got[s], ref[s])
