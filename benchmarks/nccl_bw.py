"""Collective bandwidth between the GPUs of one node, the ceiling for FSDP's all-gather and
reduce-scatter: bus bandwidth as nccl-tests defines it ((n-1)/n * bytes / time).

    torchrun --nproc-per-node 2 benchmarks/nccl_bw.py
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if rank == 0:
        print("| collective | dtype | MiB (full tensor) | ms | bus GB/s |")
        print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for mib in (32, 128, 512):
            numel = mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
            numel -= numel % world
            full = torch.randn(numel, device="cuda").to(dtype)
            shard = torch.empty(numel // world, device="cuda", dtype=dtype)
            for name, fn in (("all_gather", lambda: dist.all_gather_into_tensor(full, shard)),
                             ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full))):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                iters = 10
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / iters
                bus = (world - 1) / world * full.numel() * full.element_size() / (ms / 1e3) / 1e9
                if rank == 0:
                    print(f"| {name} | {str(dtype).removeprefix('torch.')} | {mib} | {ms:.3f} | {bus:.1f} |",
                          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
