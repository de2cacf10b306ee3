"""Run by tests/data/test_loader_distributed.py under ``torch.distributed.run`` (one process per rank, gloo):
uninterrupted vs. interrupted-and-resumed loading with 2 DataLoader workers per rank."""
from __future__ import annotations

import os
import pickle
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loader_helpers import ctx, data_cfg, key_and_epoch  # noqa: E402

from scaleforge.platform.data import build_loader  # noqa: E402

N, CUT = 40, 17


def main(pattern: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = data_cfg(("a", pattern), num_workers=2)
    ref_loader = build_loader(cfg, ctx(rank, world), key_and_epoch)
    ref = [next(ref_loader) for _ in range(N)]
    ref_loader.close()
    first = build_loader(cfg, ctx(rank, world), key_and_epoch)
    head = [next(first) for _ in range(CUT)]
    state = first.state_dict()
    first.close()
    # every rank saves its state, as the trainer does in a checkpoint
    with open(os.path.join(out_dir, f"data_rank{rank}.pkl"), "wb") as f:
        pickle.dump({"state": state, "consumed": [p for b in head for p in zip(b["id"], b["epoch"].tolist())]}, f)
    resumed = build_loader(cfg, ctx(rank, world), key_and_epoch)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(N - CUT)]
    resumed.close()
    same = [b["id"] for b in head + tail] == [b["id"] for b in ref] and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(head + tail, ref))
    mine = {"same": same, "read": [p for b in ref for p in zip(b["id"], b["epoch"].tolist())]}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(os.path.join(out_dir, "all.pkl"), "wb") as f:
            pickle.dump(everyone, f)
    dist.barrier()  # tear gloo down together (see tests/models/test_llm_fsdp.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from scaleforge.platform.dist import exit_process

    exit_process(0)  # done: no interpreter finalization, where gloo can abort the process (see exit_process)
