"""parallel.fp8=coat end to end through `launch --nproc 2` (gloo, CPU, torch reference kernels): the tiny LM,
NVILA, SANA and PS3 train within 2% of their BF16 runs' losses; the FP8 optimizer states resume bit for bit (also
after SIGKILL) and reshard 2 -> 1; FP8 all-gather changes no loss; unsupported combinations fail in the launcher,
naming the key."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.platform.metrics import read_metrics

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
COMMON = ["metrics.wandb.mode=disabled", "metrics.plot=false", "metrics.progress_bar=false",
          "parallel.mixed_precision=bf16"]
COAT = ["parallel.fp8=coat"]


def launch(env, out, config, name, *extra, nproc=2, fault=None, check=True):
    cmd = [str(BIN / "launch"), "--config", config, "--nproc", str(nproc), f"run.output_dir={out}",
           f"run.name={name}", *COMMON, *extra]
    env = {k: v for k, v in env.items() if not k.startswith("SCALEFORGE_FAULT_")}
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, **(fault or {})}, timeout=300)
    if check:
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


@pytest.fixture(scope="module")
def lm_coat(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("coat")
    r = launch(env, out, "lm_tiny.yaml", "ref", *COAT, "trainer.max_steps=6", "checkpoint.interval=3")
    assert "parallel.fp8=coat: 14 fp8_linears, 1 high_precision_linears, 9 fp8_blocks" in r.stdout
    return out / "ref"


def test_lm_coat_within_2_percent_of_bf16(lm_coat, tmp_path, env):
    launch(env, tmp_path, "lm_tiny.yaml", "bf16", "trainer.max_steps=6", "checkpoint.save_final=false")
    coat, bf16 = losses(lm_coat), losses(tmp_path / "bf16")
    assert bf16[6] < bf16[1] - 0.5  # both learn
    assert abs(coat[6] - bf16[6]) / bf16[6] < 0.02, (coat, bf16)
    assert "name: adamw_fp8" in (lm_coat / "config.yaml").read_text()  # COAT's default optimizer


def test_lm_coat_resume_after_sigkill_is_bit_identical(lm_coat, tmp_path, env):
    common = [*COAT, "trainer.max_steps=6", "checkpoint.interval=3"]
    r = launch(env, tmp_path, "lm_tiny.yaml", "k", *common, fault={"SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT": "3"},
               check=False)
    assert r.returncode != 0 and sorted(losses(tmp_path / "k")) == [1, 2, 3]
    r = launch(env, tmp_path, "lm_tiny.yaml", "k", *common)
    assert "at step 3" in r.stdout
    assert losses(tmp_path / "k") == losses(lm_coat)


def test_lm_coat_reshards_two_to_one(lm_coat, tmp_path, env):
    shutil.copytree(lm_coat, tmp_path / "rs")
    ck = tmp_path / "rs" / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "latest").write_text("step_00000003\n")
    r = launch({**env, "OMP_NUM_THREADS": "2"}, tmp_path, "lm_tiny.yaml", "rs", *COAT, "trainer.max_steps=6",
               "checkpoint.interval=3", nproc=1)
    assert "resharded from 2 to 1 processes" in r.stdout
    ref, got = losses(lm_coat), losses(tmp_path / "rs")
    for s in (4, 5, 6):  # same samples and states; only the reduction order differs
        assert abs(got[s] - ref[s]) / ref[s] < 1e-3, (s, got[s], ref[s])


def test_fp8_all_gather_trains_bit_identically_and_shares_checkpoints(lm_coat, tmp_path, env):
    """parallel.fp8_all_gather=true gathers the FP8 linears' weights as E4M3 codes; their linears requantize the
    dequantized weight to the same codes and scale, so the run is the BF16-gather run bit for bit, and it
    resumes from that run's checkpoint (the shards are saved as plain tensors either way)."""
    ag = [*COAT, "parallel.fp8_all_gather=true", "trainer.max_steps=6", "checkpoint.interval=3"]
    r = launch(env, tmp_path, "lm_tiny.yaml", "ag", *ag)
    assert "14 fp8_linears, 1 high_precision_linears, 9 fp8_blocks, 14 fp8_all_gathered_weights" in r.stdout
    assert losses(tmp_path / "ag") == losses(lm_coat)
    for source, name, extra in ((lm_coat, "to_ag", ag), (tmp_path / "ag", "from_ag", ag[:1] + ag[2:])):
        shutil.copytree(source, tmp_path / name)
        ck = tmp_path / name / "checkpoints"
        shutil.rmtree(ck / "step_00000006")
        (ck / "latest").write_text("step_00000003\n")
        r = launch(env, tmp_path, "lm_tiny.yaml", name, *extra)
        assert "at step 3" in r.stdout and losses(tmp_path / name) == losses(lm_coat), name


@pytest.mark.parametrize("config", ["nvila_tiny.yaml", "sana_tiny.yaml", "ps3_tiny.yaml"])
def test_recipe_coat_within_2_percent_of_bf16(config, tmp_path, env):
    short = ["trainer.max_steps=3", "checkpoint.save_final=false"]
    r = launch(env, tmp_path, config, "coat", *COAT, *short)
    assert "parallel.fp8=coat:" in r.stdout and " 0 fp8_blocks" not in r.stdout
    launch(env, tmp_path, config, "bf16", *short)
    coat, bf16 = losses(tmp_path / "coat"), losses(tmp_path / "bf16")
    assert coat[3] != bf16[3] and abs(coat[3] - bf16[3]) / bf16[3] < 0.02, (coat, bf16)


def test_one_key_on_the_tiny_config_as_it_is(tmp_path, env):
    """lm_tiny as written (fp32 compute, torch's fused AdamW) with only parallel.fp8=coat: adamw_fp8 with its
    fused update, fp32 around the FP8 GEMMs; it learns."""
    cmd = [str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "2", f"run.output_dir={tmp_path}",
           "run.name=one", "metrics.wandb.mode=disabled", "metrics.plot=false", "metrics.progress_bar=false",
           "parallel.fp8=coat", "trainer.max_steps=4", "checkpoint.save_final=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "one")
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1]
    text = (tmp_path / "one" / "config.yaml").read_text()
    assert "name: adamw_fp8" in text and "fused: true" in text and "mixed_precision: fp32" in text


def test_unsupported_combination_fails_in_the_launcher(tmp_path, env):
    """(Every combination check by key: test_adamw_fp8.py; here the launcher's console script.)"""
    cmd = [str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", "2", f"run.output_dir={tmp_path}",
           "parallel.fp8=coat", "parallel.compile=true"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "parallel.compile=true" in r.stderr + r.stdout
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
