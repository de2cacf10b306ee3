"""Helpers for the Slurm tests: configs, job polling, preemption (fixtures are in conftest.py)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from scaleforge.launch import slurm
from scaleforge.platform.config import JobConfig, ModelConfig

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def make_cfg(name: str, output_dir: Path, **cluster) -> JobConfig:
    cfg = JobConfig(model=ModelConfig(recipe="llm"))
    cfg.run.name = name
    cfg.run.output_dir = str(output_dir)
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    return cfg


@dataclass
class JobHistory:
    job_id: str
    states: list[tuple[float, str, int]]  # (seconds since submit, JobState, Restarts)
    fields: dict[str, str]


def job_log(run_dir: Path, job_id: str) -> str:
    path = Path(run_dir) / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else f"(no log at {path})"


def watch_job(job_id: str, run_dir: Path, until, timeout_s: float, poll_s: float = 0.3) -> JobHistory:
    """Poll scontrol until ``until(fields)`` is true; fail with the job log on timeout or a final state
    that ``until`` did not accept."""
    t0 = time.monotonic()
    states: list[tuple[float, str, int]] = []
    while True:
        fields = slurm.job_fields(job_id)
        state, restarts = fields.get("JobState", "?"), int(fields.get("Restarts", "0"))
        if not states or states[-1][1:] != (state, restarts):
            states.append((round(time.monotonic() - t0, 1), state, restarts))
        if until(fields):
            return JobHistory(job_id, states, fields)
        if state in FINAL_STATES:
            pytest.fail(f"job {job_id} ended {state} (ExitCode={fields.get('ExitCode')}) before the expected "
                        f"condition; states {states}\nlog:\n{job_log(run_dir, job_id)}")
        if time.monotonic() - t0 > timeout_s:
            subprocess.run(["scancel", job_id], capture_output=True)
            pytest.fail(f"job {job_id}: condition not reached within {timeout_s}s; states {states}\n"
                        f"log:\n{job_log(run_dir, job_id)}")
        time.sleep(poll_s)


def wait_for_file_lines(path: Path, n: int, timeout_s: float, job_id: str, run_dir: Path) -> list[str]:
    t0 = time.monotonic()
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        if time.monotonic() - t0 > timeout_s:
            subprocess.run(["scancel", job_id], capture_output=True)
            pytest.fail(f"{path}: {len(lines)} lines after {timeout_s}s, wanted {n}; "
                        f"job {slurm.job_fields(job_id).get('JobState')}\nlog:\n{job_log(run_dir, job_id)}")
        time.sleep(0.2)


def send_preemption(job_id: str) -> None:
    """What Slurm does preempt_grace_s before the time limit: USR1 to the batch shell only."""
    r = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"scancel --batch --signal=USR1 {job_id} failed (job {slurm.job_fields(job_id).get('JobState')}):"
                    f" {r.stderr.strip()}")
