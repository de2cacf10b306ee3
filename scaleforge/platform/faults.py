"""Fault injection for drills and tests, driven by environment variables so that production configs
never carry it. Each variable holds comma-separated optimizer steps (1-based).

- ``SCALEFORGE_FAULT_NAN_STEPS``: the loss of these steps becomes NaN (tests the skip / stop logic).
- ``SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT``: every worker SIGKILLs itself right after the checkpoint
  of this step is complete (a node lost between checkpoints).
- ``SCALEFORGE_FAULT_KILL_DURING_SAVE``: every worker SIGKILLs itself after writing its shards of this
  step's checkpoint but before it is marked complete (a checkpoint interrupted mid-write).
- ``SCALEFORGE_FAULT_SIGTERM_STEPS``: rank 0 sends itself SIGTERM during these steps, before the step's
  statistics are reduced (a preemption notice reaching one rank at a known step).
"""
from __future__ import annotations

import os
import signal


def steps(var: str) -> set[int]:
    return {int(s) for s in os.environ.get(var, "").split(",") if s.strip()}


NAN_STEPS = "SCALEFORGE_FAULT_NAN_STEPS"
KILL_AFTER_CHECKPOINT = "SCALEFORGE_FAULT_KILL_AFTER_CHECKPOINT"
KILL_DURING_SAVE = "SCALEFORGE_FAULT_KILL_DURING_SAVE"
SIGTERM_STEPS = "SCALEFORGE_FAULT_SIGTERM_STEPS"


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sigterm_self() -> None:
    signal.raise_signal(signal.SIGTERM)
