"""PS3 training-step throughput and the "near-constant cost" comparison, one GPU, one command.

Table 1 (--variants): PS3-1.5K / PS3-4K pre-training step (forward + backward of the PS3 loss on one
GPU, no data loading): images/s, MFU (model FLOPs from ``pretrain_flops_per_sample`` vs the 989 TFLOP/s
BF16 dense peak), peak memory.
Table 2 (--sides, batch --cost-batch): training-step time (forward + backward) at 378 / 1512 / 3780 px
of the PS3 encoder (low-res pass + one look-close round of 2560 patches from the given side; at 378 px
the round comes from a 756 px resize, PS3 needs one high-res scale; text tower and selection encoder
excluded) against the same ViT encoding every patch of the image (time or OOM), and their ratio
(paper: 79x lower cost at 3780 px).

Usage (H100):  python benchmarks/ps3_step.py --batch 32 --steps 10 --cost-batch 2 --cost-steps 3
CPU smoke:     python benchmarks/ps3_step.py --smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from scaleforge.models.ps3.config import PS3Config, PS3TextConfig, PS3VisionConfig
from scaleforge.models.ps3.model import PS3Model, pretrain_flops_per_sample

PEAK = 989e12


def variant(name: str, smoke: bool) -> PS3Config:
    scales = [378, 756, 1512] if name == "1.5k" else [378, 756, 1512, 3780]
    if smoke:
        scales = [16, 32, 64] if name == "1.5k" else [16, 32, 64, 160]
        return PS3Config(vision=PS3VisionConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, scales=scales,
                                                select_layers=[0, 1], max_select_num=40, highres_hidden=8,
                                                highres_out=8, highres_depth=1, highres_kernel=8, highres_input=64),
                         text=PS3TextConfig(vocab_size=257, context_length=16, width=32, heads=2, layers=1,
                                            mlp_dim=64, output_dim=32))
    return PS3Config(vision=PS3VisionConfig(scales=scales))


def checkpoint_blocks(model):
    """Full activation checkpointing of every ViT and text block (what parallel.activation_checkpointing
    = full does in training)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from scaleforge.models.ps3.text import ResidualAttentionBlock
    from scaleforge.models.ps3.vision import Block

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (Block, ResidualAttentionBlock)))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def batch(cfg: PS3Config, b: int, dev, dtype):
    imgs = [torch.randn(b, 3, s, s, device=dev, dtype=dtype) for s in cfg.vision.scales]
    g = cfg.vision.scale_grids()[-1]
    mask = torch.zeros(b, g, g, device=dev)
    mask[:, g // 4: g // 2, g // 4: g // 2] = 1
    text = torch.randint(1, 257, (b, cfg.text.context_length), device=dev)
    return imgs, text, mask, torch.zeros(b, dtype=torch.bool, device=dev)


def timed(fn, steps: int, dev) -> float:
    fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / steps


def step_table(args, dev, dtype):
    print(f"{'variant':<8} {'batch':>5} {'step s':>8} {'img/s':>8} {'TFLOP/img':>10} {'MFU':>6} {'peak GiB':>9}")
    for name in args.variants:
        cfg = variant(name, args.smoke)
        model = PS3Model(cfg, dev)
        model.init_weights()
        model.to(dtype)
        if args.ac:
            checkpoint_blocks(model)
        inputs = batch(cfg, args.batch, dev, dtype)

        def step():
            loss, _ = model(*inputs)
            loss.backward()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            dt = timed(step, args.steps, dev)
        except torch.OutOfMemoryError:
            print(f"{name:<8} {args.batch:>5} {'OOM':>8}")
            continue
        fl = pretrain_flops_per_sample(cfg)
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(f"{name:<8} {args.batch:>5} {dt:>8.3f} {args.batch / dt:>8.1f} {fl / 1e12:>10.2f} "
              f"{fl * args.batch / dt / PEAK:>6.1%} {mem:>9.1f}")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def cost_table(args, dev, dtype):
    base = variant("4k", args.smoke)
    print(f"\nbatch {args.cost_batch}\n{'side px':>7} {'PS3 step s':>11} {'full-res ViT step s':>20} {'ratio':>7}")
    for side in args.sides:
        s0 = base.vision.scales[0]
        scales = [s0] if side == s0 else [s0, side]
        cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, scales=scales if len(scales) > 1 else [s0, 2 * s0],
                                                                   highres_selection=False))
        enc = PS3Model(cfg, dev).vision_model.to(dtype)
        if args.ac:
            checkpoint_blocks(enc)
        x = torch.randn(args.cost_batch, 3, side, side, device=dev, dtype=dtype)
        gt = torch.zeros(args.cost_batch, 8, 8, device=dev)
        is_g = torch.zeros(args.cost_batch, dtype=torch.bool, device=dev)

        def ps3():
            enc.forward_pretrain(x, None, gt, is_g).pooled_output.float().sum().backward()

        def full():
            t = enc.trunk
            h = t.patch_embed.proj(x).flatten(2).transpose(1, 2)
            for blk in t.blocks:
                h, _ = blk(h)
            enc.pool(h).float().sum().backward()

        res = []
        for fn in (ps3, full):
            try:
                res.append(timed(fn, args.cost_steps, dev))
            except torch.OutOfMemoryError:
                res.append(float("inf"))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        full_s = "OOM" if res[1] == float("inf") else f"{res[1]:.3f}"
        ratio = "-" if res[1] == float("inf") else f"{res[1] / res[0]:.1f}x"
        print(f"{side:>7} {res[0]:>11.3f} {full_s:>20} {ratio:>7}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["1.5k", "4k"])
    ap.add_argument("--sides", nargs="+", type=int, default=[378, 1512, 3780])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cost-batch", type=int, default=2)
    ap.add_argument("--cost-steps", type=int, default=3)
    ap.add_argument("--no-ac", dest="ac", action="store_false", help="no activation checkpointing")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.smoke:
        args.batch, args.steps, args.sides, args.cost_batch, args.cost_steps = 2, 1, [16, 64, 160], 2, 1
    print(f"device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, {dtype}, batch {args.batch}, activation checkpointing {args.ac}")
    step_table(args, dev, dtype)
    cost_table(args, dev, dtype)


if __name__ == "__main__":
    main()
