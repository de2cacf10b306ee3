"""The full trainer (tiny LM, 2 gloo processes) reading token shards through the webdataset loader
with 2 workers per rank: bit-identical losses after SIGKILL and resume; then the 2-rank checkpoint
continues on 1 rank (the data loader re-splits the rest of the epoch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.platform.data.tools import synth

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def launch(env, out, name, shards, *extra, nproc=2, check=True, timeout=300):
    cmd = [str(BIN / "launch"), "--config", "lm_tiny.yaml", "--nproc", str(nproc),
           f"run.output_dir={out}", f"run.name={name}", "trainer.max_steps=8", "checkpoint.interval=4",
           "metrics.wandb.mode=disabled", "metrics.plot=false", "model.seq_len=64",
           "data.kind=webdataset", f"data.sources=[{{name: tok, shards: ['{shards}']}}]", "data.num_workers=2",
           "data.shuffle_buffer=16", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs}, recs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_shards")
    synth("tokens", str(out), 384, per_shard=24, seq_len=32, vocab=256)  # 2 samples per packed row of 64
    return str(out / "shard-{000000..000015}.tar")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEFORGE_FAULT_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    out = tmp_path_factory.mktemp("ref")
    launch(env, out, "ref", shards)
    return out / "ref"


def test_reference_run_reads_the_shards(reference):
    by_step, recs = losses(reference)
    assert sorted(by_step) == list(range(1, 9))
    # rank 0 reads 8 steps x 8 rows x 2 samples per row (plus what its batcher holds back)
    assert recs[-1]["data/tok/samples"] >= 8 * 8 * 2
    assert recs[-1].get("data/tok/bad", 0) == 0
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_resume_after_sigkill_is_bit_identical_then_reshard(reference, shards, tmp_path, run_env):
    env = {**run_env, "SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT": "4"}
    r = launch(env, tmp_path, "k", shards, check=False)
    assert r.returncode != 0
    r = launch(run_env, tmp_path, "k", shards)
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert losses(tmp_path / "k")[0] == losses(reference)[0]  # bit-identical floats, every step once
    # the step-8 checkpoint of 2 ranks x 2 workers continues on 1 rank: the data is re-split
    r = launch(run_env, tmp_path, "k", shards, "trainer.max_steps=10", nproc=1)
    assert "re-split the unconsumed rest" in r.stdout and "from 2x2 to 1x2 readers" in r.stdout
    assert sorted(losses(tmp_path / "k")[0]) == list(range(1, 11))
