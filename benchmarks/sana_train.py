"""SANA training throughput: images/s, MFU and peak memory of the Linear DiT training step.

    python benchmarks/sana_train.py --preset 1.6b --image-size 1024 --batch 8 --kernels triton
    torchrun --nproc-per-node 2 benchmarks/sana_train.py --preset 1.6b --kernels torch
    python benchmarks/sana_train.py --preset tiny --image-size 256 --device cpu   # smoke run

One process: the plain model. Under torchrun: FSDP2 (``fully_shard`` per block, then the root), bf16 compute with
fp32 parameters and reductions, like the trainer's default. Synthetic latents (B, 32, s/32, s/32) and text
embeddings (B, 300, 2304); the step is forward + flow-matching loss + backward + optimizer step.

MFU = flops_per_sample x images/s / (peak FLOP/s x GPUs); flops_per_sample is the recipe's written-down formula
(scaleforge/models/sana/recipe.py: per block 27NC^2 + 4LC^2 + 4NLC + 4NC(d+1) + 90NC, plus embeddings and the
final layer, times 3 for forward + backward). Peak: 989 TFLOP/s dense BF16 (H100/H200 SXM) unless --peak-tflops.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1.6b")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--kernels", choices=("torch", "triton"), default="torch")
    ap.add_argument("--optim", choices=("came8bit", "came", "adamw"), default="came8bit")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--compile", action="store_true", help="torch.compile per block")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from scaleforge.models.sana import flow
    from scaleforge.models.sana.model import SanaTransformer, preset_arch
    from scaleforge.models.sana.recipe import flops_per_sample
    from scaleforge.platform.optim.came import CAME, optimizer_state_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    arch = preset_arch(args.preset, depth=args.depth)
    arch.sample_size = args.image_size // 32
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SanaTransformer(arch)
    model.set_kernels(args.kernels)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.ac:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, blk in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(blk)
    if args.compile:
        for blk in model.blocks:
            blk.compile()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.to_empty(device=device)
    model.init_weights()
    if args.optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    else:
        opt = CAME(model.parameters(), lr=1e-4, quantize_first_moment=args.optim == "came8bit")

    h = w = args.image_size // 32
    B, L = args.batch, arch.text_len
    g = torch.Generator(device=device).manual_seed(rank)
    x0 = torch.randn(B, arch.in_channels, h, w, device=device, generator=g)
    text = torch.randn(B, L, arch.caption_channels, device=device, generator=g)
    mask = torch.ones(B, L, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=(world == 1 and dtype != torch.float32))

    def step() -> float:
        noise = torch.randn_like(x0)
        sig = torch.rand(B, device=device)
        with autocast:
            pred = model(flow.add_noise(x0, noise, sig), sig * 1000, text, mask)
        loss = flow.flow_loss(pred, x0, noise).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    imgs = B * world / dt
    fps = flops_per_sample(arch, h * w, L)
    mfu = fps * imgs / (args.peak_tflops * 1e12 * world) if device.type == "cuda" else float("nan")
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    state_gb = optimizer_state_bytes(opt) / 2 ** 30
    if world > 1:
        t = torch.tensor([peak_mem, state_gb], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak_mem, state_gb = t.tolist()
    if rank == 0:
        print("| preset | px | GPUs | micro-batch | kernels | optim | AC | step s | images/s | TFLOP/img | MFU | "
              "peak mem GiB | optim state GiB/rank |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.preset} (depth {arch.depth}) | {args.image_size} | {world} | {B} | {args.kernels} | "
              f"{args.optim} | {'full' if args.ac else 'none'} | {dt:.3f} | {imgs:.2f} | {fps / 1e12:.2f} | "
              f"{mfu:.1%} | {peak_mem:.1f} | {state_gb:.2f} |")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
