"""The per-node program of the two-node Slurm test (tests/slurm/test_slurm_cluster.py).

Run by srun, one task per node: ``python allreduce_job.py OUT_DIR NPROC`` finds this node's place
with ``scaleforge.launch.slurm.rendezvous_from_env`` and starts ``torch.distributed.run`` for NPROC
processes; each process (``--worker``) joins the gloo group, all-reduces its rank and its node name
length and writes what it saw to ``OUT_DIR/rank-<r>.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def node_main(out_dir: str, nproc: int) -> None:
    from torch.distributed.run import main as torchrun

    from scaleforge.launch.slurm import rendezvous_from_env, torchrun_args

    rdzv = rendezvous_from_env()
    Path(out_dir, f"node-{rdzv['node_rank']}.json").write_text(json.dumps(rdzv))
    torchrun(torchrun_args(rdzv, nproc) + [__file__, "--worker", out_dir])


def worker_main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, os.environ["SLURMD_NODENAME"])
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank,
        "world_size": world,
        "rank_sum": t.item(),
        "node": os.environ["SLURMD_NODENAME"],
        "nodes_by_rank": gathered,
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        from scaleforge.platform.dist import exit_process

        exit_process(0)  # done: no interpreter finalization, where gloo can abort the process (see exit_process)
    else:
        node_main(sys.argv[1], int(sys.argv[2]))
