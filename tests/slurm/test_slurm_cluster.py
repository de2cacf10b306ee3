"""Real Slurm jobs on the local two-node cluster (slurm/local-cluster.sh), independent of the trainer.

- A two-node sbatch job rendered from slurm/sbatch.sh.j2 runs torch.distributed.run on each node with
  the endpoint from ``rendezvous_from_env``; 2 nodes x 2 processes all-reduce their ranks over gloo.
- The batch script's half of the preemption protocol: USR1 -> PREEMPT file -> the per-node program
  checkpoints and exits 0 -> ``scontrol requeue`` -> the requeued job resumes and completes, every step
  exactly once; a USR1 during start-up is not lost; with ``cluster.max_requeues`` used up the job
  stops instead of requeueing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _slurm_testing import job_log, make_cfg, send_preemption, wait_for_file_lines, watch_job
from scaleforge.launch import slurm

HERE = Path(__file__).resolve().parent
NPROC = 2  # processes per node in the all-reduce job
MAX_STEPS = 24  # steps of the preemption job
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def submit(out: Path, name: str, command: list[str], **cluster) -> tuple[str, Path]:
    cfg = make_cfg(name, out, nodes=2, time_limit="10", preempt_grace_s=60, **cluster)
    run_dir = out / name
    job = slurm.write_and_submit(cfg, run_dir, run_dir / "config.yaml", command=command)
    assert job.log_path == run_dir / f"slurm-{job.job_id}.out"
    return job.job_id, run_dir


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """All of this module's jobs, submitted at once so that their waits (process start-up, the requeue
    delay) overlap; each test then drives and checks its own job. The preemption tests come first in
    this file: their jobs must still be running when the signal is sent."""
    out = tmp_path_factory.mktemp("slurm_jobs")
    contract = [sys.executable, str(HERE / "preempt_contract_job.py")]
    submitted = {
        "allreduce": submit(out, "allreduce", [sys.executable, str(HERE / "allreduce_job.py"),
                                               str(out / "allreduce"), str(NPROC)], env={"OMP_NUM_THREADS": "1"}),
        "preempt": submit(out, "preempt", contract + [str(out / "preempt"), str(MAX_STEPS), "0.25", "nogate"],
                          max_requeues=1),
        "norequeue": submit(out, "norequeue", contract + [str(out / "norequeue"), "1000", "0.25", "gate"],
                            max_requeues=0),
    }
    yield submitted
    subprocess.run(["scancel", *(job_id for job_id, _ in submitted.values())], capture_output=True)


def read_steps(run_dir: Path, node: int) -> list[dict]:
    return [json.loads(l) for l in (run_dir / f"steps-{node}.jsonl").read_text().splitlines()]


def test_preemption_checkpoint_requeue_resume(jobs):
    max_steps = MAX_STEPS
    job_id, run_dir = jobs["preempt"]
    wait_for_file_lines(run_dir / "steps-0.jsonl", 3, timeout_s=90, job_id=job_id, run_dir=run_dir)
    send_preemption(job_id)
    hist = watch_job(job_id, run_dir, lambda f: f["JobState"] == "COMPLETED" and f["Restarts"] == "1",
                     timeout_s=150)
    assert hist.fields["ExitCode"] == "0:0"
    # It went through a requeue: running, back to pending, running again under the same job id.
    seen = [s for _, s, _ in hist.states]
    assert "PENDING" in seen[seen.index("RUNNING"):], hist.states

    log = job_log(run_dir, job_id)
    assert "USR1: asking the trainer to checkpoint" in log
    assert f"requeueing job {job_id} (restart 1)" in log
    assert "restart 1 of at most 1" in log  # the same log file, appended by the requeued run
    assert not (run_dir / "PREEMPT").exists()
    assert (run_dir / "DONE").exists()
    for node in (0, 1):
        steps = read_steps(run_dir, node)
        assert [s["step"] for s in steps] == list(range(max_steps)), f"node {node}: lost or repeated steps"
        restarts = [s["restart"] for s in steps]
        cut = restarts.index(1)
        assert 3 <= cut < max_steps and set(restarts[:cut]) == {0} and set(restarts[cut:]) == {1}


def test_preemption_during_startup_and_no_requeues_left(jobs):
    """USR1 while the program is still starting: it then clears PREEMPT as stale (as the trainer does),
    the batch script restores it, the program checkpoints; with max_requeues=0 the job then ends
    (exit 3) instead of requeueing."""
    job_id, run_dir = jobs["norequeue"]
    t0 = time.monotonic()
    while not (run_dir / "started-0-0").exists():
        assert time.monotonic() - t0 < 90, job_log(run_dir, job_id)
        time.sleep(0.1)
    send_preemption(job_id)
    t0 = time.monotonic()
    while not (run_dir / "PREEMPT").exists():  # the trap has run
        assert time.monotonic() - t0 < 30, job_log(run_dir, job_id)
        time.sleep(0.1)
    (run_dir / "GO").touch()  # start-up ends: node 0 deletes PREEMPT
    hist = watch_job(job_id, run_dir, lambda f: f["JobState"] == "FAILED", timeout_s=60)
    assert hist.fields["ExitCode"] == "3:0" and hist.fields["Restarts"] == "0"
    log = job_log(run_dir, job_id)
    assert "PREEMPT was cleared by a starting trainer; restoring it" in log
    assert "max_requeues=0 reached, not requeueing" in log
    # The checkpoint is there to resubmit from, at the step where each node stopped.
    for node in (0, 1):
        ckpt = json.loads((run_dir / f"ckpt-{node}.json").read_text())
        assert ckpt["next_step"] == len(read_steps(run_dir, node)) >= 1


def test_two_node_job_all_reduce(jobs):
    nproc = NPROC
    job_id, run_dir = jobs["allreduce"]
    hist = watch_job(job_id, run_dir, lambda f: f["JobState"] == "COMPLETED", timeout_s=120)
    assert hist.fields["ExitCode"] == "0:0", job_log(run_dir, job_id)
    assert hist.fields["NodeList"] == "n[1-2]"

    nodes = [json.loads((run_dir / f"node-{r}.json").read_text()) for r in range(2)]
    port = 20000 + int(job_id) % 20000
    assert nodes == [{"nnodes": 2, "node_rank": r, "master_addr": "n1", "master_port": port} for r in range(2)]

    world = 2 * nproc
    ranks = [json.loads((run_dir / f"rank-{r}.json").read_text()) for r in range(world)]
    for r, rec in enumerate(ranks):
        assert rec["rank"] == r and rec["world_size"] == world
        assert rec["rank_sum"] == sum(range(world))  # 0+1+2+3 over the two "nodes"
        assert (rec["master_addr"], rec["master_port"]) == ("n1", port)
    # Ranks 0-1 ran in node n1's srun task, 2-3 in n2's: the group really spans both slurmd "nodes".
    assert ranks[0]["nodes_by_rank"] == ["n1", "n1", "n2", "n2"]
