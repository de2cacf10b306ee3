"""PS3 end to end on CPU through the console scripts: ``launch --config ps3_tiny.yaml --nproc 2`` trains
with a falling loss, ``scaleforge export --format hf`` writes the ps3-torch layout that
``scaleforge.models.ps3.from_pretrained`` loads; the 2-rank loss (negatives gathered across ranks)
equals the single-process loss on the same global batch; the 4K plan prints memory per GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleforge.platform.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _launch(nproc, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(BIN / "launch"), "--config", "configs/ps3_tiny.yaml", "--nproc", str(nproc), *args,
                        "metrics.progress_bar=false", "metrics.plot=false", "metrics.wandb.mode=disabled"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_trains_and_exports(tmp_path):
    from scaleforge.models.ps3 import from_pretrained

    _launch(2, f"run.output_dir={tmp_path}", "trainer.max_steps=10")
    losses = _losses(tmp_path / "ps3_tiny")
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    out = tmp_path / "export"
    p = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(tmp_path / "ps3_tiny"), "--format", "hf",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from scaleforge.launch.export import load_model_state

    cfg, _, state = load_model_state(tmp_path / "ps3_tiny")
    model = from_pretrained(str(out), base=cfg.model)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if k not in ("logit_scale", "logit_bias"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    common = ["trainer.max_steps=1", "trainer.global_batch_size=16", "checkpoint.save_final=false"]
    _launch(1, f"run.output_dir={tmp_path / 'one'}", "trainer.micro_batch_size=16", *common)
    _launch(2, f"run.output_dir={tmp_path / 'two'}", "trainer.micro_batch_size=8", *common)
    one, two = _losses(tmp_path / "one" / "ps3_tiny"), _losses(tmp_path / "two" / "ps3_tiny")
    assert abs(one[0] - two[0]) <= 1e-5 * abs(one[0]), (one, two)


def test_4k_slurm_dry_run_plan(tmp_path):
    # the dry run checks the shards: 100 image-boxes shards of one sample under $PS3_DATA
    res = subprocess.run([str(BIN / "scaleforge"), "data", "synth", "--kind", "image-boxes", "--out",
                          str(tmp_path), "--n", "100", "--per-shard", "1", "--size", "32"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    p = subprocess.run([str(BIN / "launch"), "--config", "configs/ps3_4k.yaml", "--slurm", "--nodes", "16",
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PS3_DATA=str(tmp_path)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size        128" in p.stdout and "memory / device" in p.stdout
    assert "[85, 341, 2133]" in p.stdout and "35 rounds" in p.stdout


def _losses_by_step(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_resume_with_grad_accum(tmp_path):
    """2 ranks x 2 accumulation steps (each micro-batch's negatives: its 4 + the other rank's 4 texts);
    stopped after 2 of 4 steps and resumed, the losses equal the uninterrupted run's bit for bit."""
    common = [f"run.output_dir={tmp_path}", "trainer.max_steps=4", "trainer.micro_batch_size=4",
              "trainer.global_batch_size=16"]
    _launch(2, *common, "run.name=ref")
    _launch(2, *common, "run.name=r", "trainer.exit_after_steps=2")
    assert sorted(_losses_by_step(tmp_path / "r")) == [1, 2]
    p = _launch(2, *common, "run.name=r")
    assert "resumed from" in p.stdout
    ref, got = _losses_by_step(tmp_path / "ref"), _losses_by_step(tmp_path / "r")
    assert sorted(ref) == list(range(1, 5)) and got == ref
