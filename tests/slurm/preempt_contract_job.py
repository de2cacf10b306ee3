"""Per-node program for the sbatch-side preemption test: follows the trainer's side of the protocol.

The real trainer is exercised by test_launch_slurm.py; this program isolates the batch script's part
(USR1 trap -> PREEMPT file -> wait -> ``scontrol requeue`` -> resume) so a failure there is not
mistaken for a trainer bug.
``python preempt_contract_job.py RUN_DIR MAX_STEPS STEP_S START`` (START: gate | nogate):

- writes ``RUN_DIR/started-<node_rank>-<restart>``; with START=gate it then waits until the test
  creates ``RUN_DIR/GO`` (standing in for a slow model build), and then, like the trainer, node 0
  deletes a ``PREEMPT`` file it takes for a leftover of an earlier run; the batch script must restore
  it when its USR1 came in the meantime;
- resumes from ``RUN_DIR/ckpt-<node_rank>.json`` (written atomically: temp file + rename) if present;
- each step appends ``{"step", "node", "restart"}`` to ``RUN_DIR/steps-<node_rank>.jsonl``;
- polls ``RUN_DIR/PREEMPT`` after every step; when it exists, checkpoints the next step and exits 0;
- at MAX_STEPS writes ``RUN_DIR/DONE`` (node 0) and exits 0.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from scaleforge.launch.slurm import DONE_FILE, PREEMPT_FILE, rendezvous_from_env


def main(run_dir: Path, max_steps: int, step_s: float, gated: bool) -> int:
    rdzv = rendezvous_from_env()
    node = rdzv["node_rank"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    (run_dir / f"started-{node}-{restart}").touch()
    while gated and not (run_dir / "GO").exists():
        time.sleep(0.1)
    if node == 0:
        (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
    ckpt = run_dir / f"ckpt-{node}.json"
    step = json.loads(ckpt.read_text())["next_step"] if ckpt.exists() else 0
    with open(run_dir / f"steps-{node}.jsonl", "a") as log:
        while step < max_steps:
            time.sleep(step_s)
            log.write(json.dumps({"step": step, "node": node, "restart": restart}) + "\n")
            log.flush()
            step += 1
            if (run_dir / PREEMPT_FILE).exists():
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"next_step": step}))
                tmp.replace(ckpt)
                print(f"node {node}: preempted, checkpoint at step {step}", flush=True)
                return 0
    if node == 0:
        (run_dir / DONE_FILE).write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "gate"))
