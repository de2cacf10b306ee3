"""``launch --slurm`` with the real trainer: dry run, and a two-node job on the local cluster that is
preempted (USR1 to the batch shell, as Slurm sends it preempt_grace_s before the time limit),
checkpoints, requeues itself and completes with every optimizer step logged exactly once."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _slurm_testing import REPO, job_log, send_preemption, wait_for_file_lines, watch_job
from scaleforge.launch.cli import launch_main, launch_parser

BIN = Path(sys.executable).parent
COMMON = ["metrics.wandb.mode=disabled", "metrics.plot=false", "metrics.progress_bar=false"]

if not any("--from-slurm" in a.option_strings for a in launch_parser()._actions):
    pytest.skip("scaleforge.launch.cli has no --from-slurm yet", allow_module_level=True)


def test_dry_run_prints_script_and_plan_without_submitting(tmp_path, capsys):
    rc = launch_main(["--config", "lm_tiny.yaml", "--slurm", "--nodes", "2", "--dry-run",
                      f"run.output_dir={tmp_path}", "run.name=dry", "cluster.partition=debug", *COMMON])
    assert rc == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=debug" in out
    assert "#SBATCH --signal=B:USR1@120" in out and "#SBATCH --requeue" in out
    assert re.search(r"-m scaleforge\.launch\.cli --config \S*/dry/config\.yaml --from-slurm", out)
    assert re.search(r"world size\s+4\b", out), out  # 2 nodes x procs_per_node 2 (lm_tiny.yaml)
    assert "dp_shard=4" in out and "parameters" in out and "memory" in out
    assert not list(tmp_path.rglob("slurm-*.out")) and not list(tmp_path.rglob("*.sbatch"))


@pytest.mark.slow
@pytest.mark.slurm
def test_launch_slurm_two_nodes_preempt_requeue_completes(slurm_cluster, tmp_path, run_env):
    """The sbatch script, rendezvous and requeue do not depend on the engine (DeepSpeed's checkpoint on a
    preemption signal and its exact resume: test_train_e2e.py's preempt tests, per engine)."""
    max_steps = 20
    cmd = [str(BIN / "launch"), "--config", "lm_tiny.yaml", "--slurm", "--nodes", "2", "--nproc", "1",
           f"run.output_dir={tmp_path}", "run.name=pre", f"trainer.max_steps={max_steps}",
           "checkpoint.interval=0", "cluster.time_limit=10", "cluster.max_requeues=2", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Slurm job (\d+)", r.stdout, re.IGNORECASE)
    assert m, r.stdout
    job_id, run_dir = m.group(1), tmp_path / "pre"
    assert str(run_dir / f"slurm-{job_id}.out") in r.stdout

    # Preempt once the trainer is stepping (well before max_steps).
    wait_for_file_lines(run_dir / "metrics.jsonl", 2, timeout_s=150, job_id=job_id, run_dir=run_dir)
    send_preemption(job_id)
    hist = watch_job(job_id, run_dir, lambda f: f["JobState"] == "COMPLETED" and f["Restarts"] == "1",
                     timeout_s=200)
    log = job_log(run_dir, job_id)
    assert hist.fields["ExitCode"] == "0:0", log
    assert hist.fields["NodeList"] == "n[1-2]"
    assert "world size 2" in log  # 2 nodes x 1 process, one rendezvous
    m = re.search(r"stop requested \(PREEMPT\): checkpoint written at step (\d+)", log)
    assert m, log
    stopped_at = int(m.group(1))
    assert 1 <= stopped_at < max_steps
    assert f"requeueing job {job_id} (restart 1)" in log
    assert "resumed from" in log and f"at step {stopped_at}" in log
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert steps == list(range(1, max_steps + 1)), f"steps lost or repeated around {stopped_at}: {steps}"
