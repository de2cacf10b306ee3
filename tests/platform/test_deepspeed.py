"""The DeepSpeed ZeRO engine (parallel.engine=deepspeed) through ``launch --nproc 2`` on CPU: per-step
losses against FSDP2 (lm_tiny, nvila_tiny, sana_tiny; ZeRO-2 and ZeRO-3), exact resume after SIGKILL and
after a preemption signal, a skipped NaN step, export to HF from a ZeRO-3 run, the launcher's checks and
the dry-run plan."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.platform.metrics import read_metrics

pytest.importorskip("deepspeed")
BIN = Path(sys.executable).parent
STEPS = 20
# Every run skips a NaN step (3) and checkpoints at step 10, so one run covers parity, the skip and saving.
COMMON = [f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "metrics.wandb.mode=disabled", "metrics.plot=false"]
RECIPES = {
    "lm": ("lm_tiny.yaml", ["trainer.global_batch_size=8", "trainer.micro_batch_size=2"]),
    "nvila": ("nvila_tiny.yaml", []),
    # SANA's CAME-8bit is not an optimizer DeepSpeed's ZeRO drives: both engines use AdamW here
    "sana": ("sana_tiny.yaml", ["optim.name=adamw", "optim.betas=[0.9,0.999]", "trainer.global_batch_size=8",
                                "trainer.micro_batch_size=2"]),
}
ZERO = {"fsdp2": [], "zero2": ["parallel.engine=deepspeed", "parallel.deepspeed.zero_stage=2"],
        "zero3": ["parallel.engine=deepspeed", "parallel.deepspeed.zero_stage=3"]}


@pytest.fixture(scope="module")
def ds_env(tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               SCALEFORGE_FAULT_NAN_STEPS="3")
    env = {k: v for k, v in env.items() if not k.startswith("SCALEFORGE_FAULT_") or k.endswith("NAN_STEPS")}
    # DeepSpeed JIT-compiles its CPU communication op once; keep it where `make test` caches it
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".torch_extensions"))
    return env


def launch(env, out, recipe, engine, name, *extra, check=True, fault=None, timeout=600):
    config, overrides = RECIPES[recipe]
    cmd = [str(BIN / "launch"), "--config", config, "--nproc", "2", f"run.output_dir={out}", f"run.name={name}",
           *COMMON, *overrides, *ZERO[engine], *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, **(fault or {})}, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def records(run_dir):
    return read_metrics(run_dir)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir)}


@pytest.fixture(scope="module")
def runs(ds_env, tmp_path_factory):
    """{(recipe, engine): run dir} of the uninterrupted runs, made on first use."""
    out, made = tmp_path_factory.mktemp("ds"), {}

    def get(recipe, engine):
        if (recipe, engine) not in made:
            launch(ds_env, out, recipe, engine, f"{recipe}_{engine}")
            made[recipe, engine] = out / f"{recipe}_{engine}"
        return made[recipe, engine]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lm", "nvila", "sana"])
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_per_step_losses_match_fsdp2(runs, recipe, engine):
    """Same config, FSDP2 against DeepSpeed: per-step losses within 1e-3 relative over 20 steps, the NaN
    step skipped by both, and checkpoints in our layout."""
    ref, got = records(runs(recipe, "fsdp2")), records(runs(recipe, engine))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in got] == [r["skipped"] for r in ref] == [s == 3 for s in range(1, STEPS + 1)]
    for a, b in zip(ref, got):
        if not a["skipped"]:
            assert abs(b["loss"] - a["loss"]) / abs(a["loss"]) < 1e-3, (a["step"], a["loss"], b["loss"])
            assert abs(b["grad_norm"] - a["grad_norm"]) / a["grad_norm"] < 1e-2, (a["step"], a["grad_norm"], b["grad_norm"])
    ckpts = runs(recipe, engine) / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    trainer = json.loads((ckpts / f"step_{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["format"] == "deepspeed" and trainer["step"] == STEPS


@pytest.mark.slow
def test_zero2_resume_after_sigkill_is_bit_identical(runs, ds_env, tmp_path):
    ref = losses(runs("lm", "zero2"))
    r = launch(ds_env, tmp_path, "lm", "zero2", "k", check=False,
               fault={"SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT": "10"})
    assert r.returncode != 0
    assert (tmp_path / "k" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    r = launch(ds_env, tmp_path, "lm", "zero2", "k")
    assert "resumed from" in r.stdout and "at step 10" in r.stdout
    assert losses(tmp_path / "k") == ref  # bit-identical floats, every step once


@pytest.mark.slow
def test_zero3_preemption_signal_checkpoints_and_resumes_exactly(runs, ds_env, tmp_path):
    ref = losses(runs("lm", "zero3"))
    r = launch(ds_env, tmp_path, "lm", "zero3", "s", fault={"SCALEFORGE_FAULT_SIGTERM_STEPS": "6"})
    assert "stop requested (SIGTERM)" in r.stdout
    assert (tmp_path / "s" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    r = launch(ds_env, tmp_path, "lm", "zero3", "s")
    assert "at step 6" in r.stdout
    assert losses(tmp_path / "s") == ref


@pytest.mark.slow
def test_export_hf_from_zero3_run(runs, tmp_path):
    """`scaleforge export` reads DeepSpeed's partitions into the same HF layout as from an FSDP2 run: it
    loads in transformers, and its logits match our model on the exported weights and stay close to the
    FSDP2 run's export (the two trained the same steps within rounding)."""
    import torch
    import transformers

    from scaleforge.models.llm import from_pretrained

    outs = {}
    for engine in ("fsdp2", "zero3"):
        outs[engine] = tmp_path / engine
        r = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(runs("lm", engine)), "--format", "hf",
                            "--out", str(outs[engine])], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(outs["zero3"], torch_dtype=torch.float32)
        a, b = hf(ids).logits, from_pretrained(str(outs["zero3"]))(ids)
        c = transformers.AutoModelForCausalLM.from_pretrained(outs["fsdp2"], torch_dtype=torch.float32)(ids).logits
    assert (a - b).norm() / a.norm() < 1e-5
    assert (a - c).norm() / c.norm() < 1e-2


@pytest.mark.parametrize("override,message", [
    ("parallel.dp_replicate=2", "parallel.dp_replicate > 1 (HSDP) is FSDP2's"),
    ("optim.name=sgd", "optim.name=sgd: DeepSpeed's ZeRO optimizer drives adamw"),
    ("checkpoint.async_save=true", "checkpoint.async_save=true"),
    ("parallel.deepspeed.zero_stage=4", "zero_stage must be 1, 2 or 3"),
])
def test_launcher_rejects_unsupported_combinations(ds_env, tmp_path, override, message):
    r = launch(ds_env, tmp_path, "lm", "zero3", "x", override, check=False, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: parallel.engine=deepspeed: ") and message in lines[-1], r.stderr
    assert not (tmp_path / "x" / "config.yaml").exists()  # before any worker started


def test_dry_run_prints_deepspeed_plan(ds_env):
    r = subprocess.run([str(BIN / "launch"), "--config", "lm_tiny.yaml", "--dry-run", "parallel.engine=deepspeed",
                        "parallel.deepspeed.zero_stage=2"], capture_output=True, text=True, env=ds_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model states (ZeRO-2)" in r.stdout and "DeepSpeed ZeRO-2" in r.stdout
    assert "params (fp32)" not in r.stdout  # not FSDP2's memory model


@pytest.mark.slow
def test_zero3_text_only_micro_batch_on_one_rank_does_not_hang(ds_env, tmp_path):
    """NVILA's dummy-forward rule under ZeRO-3: a rank whose micro-batch has no image still runs the vision
    tower and projector (on a zero tile, 0 x their output added to the loss), so both ranks gather the same
    partitioned parameters. With one sample per micro-batch and images in 30% of them, 16 micro-batch pairs
    hold pairs where one rank has an image and the other none (each pair with probability 0.42); a
    mismatched module-call sequence would stall the gathers until the timeout."""
    r = launch(ds_env, tmp_path, "nvila", "zero3", "t", "trainer.max_steps=4", "trainer.global_batch_size=8",
               "trainer.micro_batch_size=1", "model.synthetic.image_prob=0.3", "trainer.collective_timeout_s=120",
               timeout=400)
    assert [rec["step"] for rec in records(tmp_path / "t")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_at_another_world_size_is_a_clear_error(runs, ds_env, tmp_path):
    """DeepSpeed's partitions are per rank: resuming a 2-process ZeRO checkpoint with 1 process stops with a
    message that says what to do, and writes nothing into the run."""
    import shutil

    run = tmp_path / "lm_zero2"
    shutil.copytree(runs("lm", "zero2"), run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    config, overrides = RECIPES["lm"]
    r = subprocess.run([str(BIN / "launch"), "--config", config, "--nproc", "1", f"run.output_dir={tmp_path}",
                        "run.name=lm_zero2", *COMMON, *overrides, *ZERO["zero2"], "trainer.max_steps=25"],
                       capture_output=True, text=True, env=ds_env, timeout=300)
    assert r.returncode != 0
    assert "a DeepSpeed checkpoint of 2 processes cannot be resumed with 1" in r.stderr
    assert "giving 2 processes" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
