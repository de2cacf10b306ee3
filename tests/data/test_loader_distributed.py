"""The loader in real processes: world size 2 over gloo (torch.distributed.run), 2 DataLoader workers
per rank; then the same checkpoint resumed on 3 ranks."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections import Counter

import pytest

from scaleforge.platform.data import build_loader

from loader_helpers import ctx, data_cfg, key_and_epoch

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_gloo_ranks_exact_resume_and_exactly_once(token_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_loader_worker.py"), token_shards, str(tmp_path)]
    # own process group, so that a hang kills the ranks too, not only torchrun
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torch.distributed.run timed out:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    everyone = pickle.loads((tmp_path / "all.pkl").read_bytes())
    assert [r["same"] for r in everyone] == [True, True]  # resumed == uninterrupted on both ranks
    seen = Counter(i for r in everyone for i, e in r["read"] if e == 0)
    assert len(seen) == 96 and max(seen.values()) == 1  # epoch 0: every sample once over ranks x workers

    # the same checkpoint resumed on 3 ranks (one worker each): rest of epoch 0 re-split, no repeats
    saved = [pickle.loads((tmp_path / f"data_rank{r}.pkl").read_bytes()) for r in range(2)]
    consumed = [i for s in saved for i, e in s["consumed"] if e == 0]
    after = []
    for rank in range(3):
        loader = build_loader(data_cfg(("a", token_shards), num_workers=1), ctx(rank, 3), key_and_epoch)
        loader.load_state_dict({"ranks": [s["state"] for s in saved]})
        for _ in range(20):
            b = next(loader)
            after += [i for i, e in zip(b["id"], b["epoch"].tolist()) if e == 0]
        loader.close()
    seen = Counter(consumed + after)
    assert len(seen) == 96 and max(seen.values()) == 1
