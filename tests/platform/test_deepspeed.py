"""The DeepSpeed ZeRO engine (parallel.engine=deepspeed) through ``launch --nproc 2`` on CPU: per-step
losses against FSDP2 (lm_tiny, nvila_tiny with text-only micro-batches on one rank, sana_tiny; ZeRO-2 and
ZeRO-3) with a skipped NaN step, offload and activation checkpointing, the launcher's checks (unsupported
combinations, resuming at another world size or engine), resuming at another world size through DeepSpeed's
universal checkpoint, and the dry-run plan. Resume after SIGKILL and after
preemption and export run for both engines in tests/platform/test_train_e2e.py."""
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
    # One sample per micro-batch, images in 30% of them: the 80 micro-batch pairs of a run hold many where one
    # rank has an image and the other none (each pair with probability 0.42), NVILA's dummy-forward case
    "nvila": ("nvila_tiny.yaml", ["trainer.micro_batch_size=1", "model.synthetic.image_prob=0.3",
                                  "trainer.collective_timeout_s=120"]),
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
# both stages on the LM; the other recipes under ZeRO-3, where their partitioned parameters must be gathered
# in the same module order on every rank (ZeRO-2 adds no recipe-specific path over the LM's)
@pytest.mark.parametrize("recipe, engine", [("lm", "zero2"), ("lm", "zero3"), ("nvila", "zero3"), ("sana", "zero3")])
def test_per_step_losses_match_fsdp2(runs, recipe, engine):
    """Same config, FSDP2 against DeepSpeed: per-step losses within 1e-3 relative over 20 steps, the NaN
    step skipped by both, and checkpoints in our layout. NVILA's runs (see RECIPES) also check its
    dummy-forward rule under ZeRO-3: a rank whose micro-batch has no image still runs the vision tower and
    projector (on a zero tile, 0 x their output added to the loss), so both ranks gather the same
    partitioned parameters; a mismatched module-call sequence would stall the gathers until the timeout."""
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
def test_zero3_offload_and_activation_checkpointing_are_honoured(runs, ds_env, tmp_path):
    """Optimizer and parameter offload and activation checkpointing under ZeRO-3: DeepSpeed's engine reports
    them on (read back from its ZeRO optimizer, not from our config), and the run trains the model of the
    run without them (same losses up to fp32 rounding, the NaN step skipped, checkpoints saved)."""
    r = launch(ds_env, tmp_path, "lm", "zero3", "o", "parallel.deepspeed.offload_optimizer=true",
               "parallel.deepspeed.offload_param=true", "parallel.activation_checkpointing=full")
    assert "DeepSpeed ZeRO-3: optimizer offload cpu, parameter offload cpu, activation checkpointing on 2 units" \
        in r.stdout, r.stdout[-3000:]
    ref, got = records(runs("lm", "zero3")), records(tmp_path / "o")
    assert [g["skipped"] for g in got] == [a["skipped"] for a in ref]
    for a, b in zip(ref, got):
        if not a["skipped"]:
            assert abs(b["loss"] - a["loss"]) / a["loss"] < 1e-6, (a["step"], a["loss"], b["loss"])
    assert (tmp_path / "o" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def test_deepspeed_config_carries_ours():
    """The DeepSpeed config derived from ours: batch triplet from the layout, offload devices, bf16 with
    fp32 accumulation, DeepSpeed's clipping off (the loop applies ours)."""
    from scaleforge.platform.config import JobConfig, ModelConfig, derive_layout
    from scaleforge.platform.deepspeed_engine import ds_config

    cfg = JobConfig(model=ModelConfig(recipe="llm"))
    cfg.parallel.engine, cfg.parallel.mixed_precision, cfg.parallel.reduce_dtype = "deepspeed", "bf16", "fp32"
    cfg.parallel.deepspeed.zero_stage = 3
    cfg.parallel.deepspeed.offload_optimizer = cfg.parallel.deepspeed.offload_param = True
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 32, 2
    ds = ds_config(cfg, derive_layout(cfg, 4))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 2, 4)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["gradient_clipping"] == 0.0


@pytest.mark.parametrize("override,message", [
    ("parallel.dp_replicate=2", "parallel.dp_replicate > 1 (HSDP) is FSDP2's"),
    ("optim.name=sgd", "optim.name=sgd: DeepSpeed's ZeRO optimizer drives adamw"),
    ("checkpoint.async_save=true", "checkpoint.async_save=true"),
    ("parallel.deepspeed.zero_stage=4", "zero_stage must be 1, 2 or 3"),
])
def test_unsupported_combinations_are_named(override, message):
    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import load_config
    from scaleforge.platform.deepspeed_engine import unsupported

    cfg = load_config("lm_tiny.yaml", ["parallel.engine=deepspeed", override], recipe_config=recipe_config_class)
    assert any(message in why for why in unsupported(cfg)), unsupported(cfg)


def test_launcher_rejects_unsupported_combinations(ds_env, tmp_path):
    """The launcher's verdict on the checks above, before any worker starts (each named in one line)."""
    r = launch(ds_env, tmp_path, "lm", "zero2", "x", "parallel.deepspeed.offload_param=true", check=False, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: parallel.engine=deepspeed: parallel.deepspeed.offload_param "
                                             "needs zero_stage=3"], r.stderr
    assert not (tmp_path / "x" / "config.yaml").exists()  # before any worker started


def test_dry_run_prints_deepspeed_plan(ds_env):
    r = subprocess.run([str(BIN / "launch"), "--config", "lm_tiny.yaml", "--dry-run", "parallel.engine=deepspeed",
                        "parallel.deepspeed.zero_stage=2"], capture_output=True, text=True, env=ds_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model states (ZeRO-2)" in r.stdout and "DeepSpeed ZeRO-2" in r.stdout
    assert "params (fp32)" not in r.stdout  # not FSDP2's memory model


@pytest.mark.slow
def test_resume_at_another_world_size_through_the_universal_checkpoint(runs, ds_env, tmp_path):
    """DeepSpeed's partitions are per rank: the launcher refuses to resume a 2-process ZeRO-2 checkpoint with 1
    process (or with the FSDP2 engine) before any worker starts, in one line that says what to do, changing
    nothing; `scaleforge ds-universal` adds DeepSpeed's universal form beside the checkpoint's files, and the
    1-process run then resumes it: the steps after it match the 2-process run up to reduction order."""
    import shutil

    run = tmp_path / "lm_zero2"
    shutil.copytree(runs("lm", "zero2"), run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    ckpt = run / "checkpoints" / "step_00000010"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    config, overrides = RECIPES["lm"]
    cmd = [str(BIN / "launch"), "--config", config, f"run.output_dir={tmp_path}", "run.name=lm_zero2", *COMMON,
           *overrides]
    one = [*cmd, "--nproc", "1", *ZERO["zero2"]]
    r = subprocess.run(one, capture_output=True, text=True, env=ds_env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --resume: {ckpt}: a DeepSpeed checkpoint of 2 processes cannot be resumed with 1 as it is (ZeRO's "
        f"partitions are per rank); convert it once with `scaleforge ds-universal {ckpt}` (DeepSpeed's universal "
        f"checkpoint, added beside its files) and launch again, or resume with 2 processes"], r.stderr
    assert "world size" not in r.stdout  # no worker started
    r = subprocess.run([*cmd, "--nproc", "2"], capture_output=True, text=True, env=ds_env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --resume: {ckpt} was written by the 'deepspeed' "
                                                        f"checkpointing of another engine"), r.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before

    fsdp2 = runs("lm", "fsdp2") / "checkpoints" / f"step_{STEPS:08d}"
    r = subprocess.run([str(BIN / "scaleforge"), "ds-universal", str(fsdp2)], capture_output=True, text=True,
                       env=ds_env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {fsdp2}: not a complete DeepSpeed checkpoint (parallel.engine=deepspeed)"], r.stderr
    r = subprocess.run([str(BIN / "scaleforge"), "ds-universal", str(run)], capture_output=True, text=True,
                       env=ds_env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"{ckpt / 'universal'}"), r.stdout + r.stderr
    r = subprocess.run(one, capture_output=True, text=True, env={**ds_env, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 10, resharded from 2 to 1 processes" in r.stdout
    ref, got = records(runs("lm", "zero2")), records(run)
    assert [g["step"] for g in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref[10:], got[10:]):  # weights and optimizer states carried over: every later step agrees
        assert abs(b["loss"] - a["loss"]) / a["loss"] < 1e-5, (a["step"], a["loss"], b["loss"])
