"""Process-group set-up: gloo on CPU, NCCL on GPU, chosen automatically; timeouts from the config."""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join the job that ``torch.distributed.run`` started (or a world of one without it)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python` run: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank, world, local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_scalar(value: float, op=dist.ReduceOp.SUM, device: torch.device | None = None) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or _default_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_tensor(values: list[float], op=dist.ReduceOp.SUM, device: torch.device | None = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device or _default_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End a worker process that has finished its work (outputs written and closed, process group destroyed)
    without Python's interpreter finalization. torch's gloo backend can abort a process there, after a clean
    run: "terminate called without an active exception", SIGABRT (exit -6), from C++ threads and work objects
    torn down with the interpreter (pytorch/pytorch#179291 describes the mechanism). We saw it now and then in
    spawned test workers and in trainer ranks on CPU, after destroy_process_group and a final barrier; torchrun
    or Slurm would then report a finished run as failed. Flushes stdio and logging first."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to flush
            pass
    os._exit(code)
