"""NVILA-8B-shaped image-SFT training step under FSDP2: tokens/s/GPU, MFU, peak memory, and the
effect of scale-then-compress (Dynamic-S2 tiles, then 2x2 or 3x3 spatial token compression) against the
same model without compression (plain S2 tokens) on visual tokens per sample and step time at the same images.

    torchrun --nproc-per-node 8 benchmarks/nvila_step.py                      # NVILA-8B shapes
    torchrun --nproc-per-node 1 benchmarks/nvila_step.py --micro-batch 1 \
        model.llm.n_layers=4                                                  # cut to one GPU (4 of 28 LLM layers)
    torchrun --nproc-per-node 2 benchmarks/nvila_step.py --config nvila_tiny.yaml --image 120x90 \
        --steps 3 --warmup 1                                                  # CPU smoke run

Random weights (the recipe's init), the same FSDP2 engine, mixed precision and activation
checkpointing as `launch` (``scaleforge.platform.engine``), one optimizer step per measured step
(micro-batch = ``--micro-batch`` samples packed in one row, no accumulation). Each sample: the same
synthetic image (``--image WxH``, default 1344x1008: Dynamic-S2 picks a 3x4 grid -> 17 tiles) and a
conversation of about ``--text-tokens`` tokens. Projectors: ``mlp2x_gelu`` (no compression: 1024 tokens per
448 px tile), ``mlp_downsample`` (2x2: 256) and ``mlp_downsample_3x3_fix`` (3x3: 121); the ratios are printed
against the uncompressed one, beside NVILA's headline claim (4.5x lower training cost, reference nvila.md),
which is for its whole recipe, not for one step. MFU = recipe.flops_per_sample(batch) x samples / step time / peak
(H100/H200 dense BF16 989 TFLOP/s, from scaleforge.platform.metrics), counting the ViT, projector and
LLM (formula in scaleforge/models/nvila/recipe.py). Figures are medians over the steps after warm-up.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.distributed as dist


def build(config: str, projector: str, mbs: int, world: int, extra: list[str]):
    from omegaconf import OmegaConf

    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config, validate

    overrides = [f"model.projector={projector}", "model.tokenizer=byte", "model.init_from=null",
                 "model.init_from_run=null", "model.vision_init_from=null", "model.llm.init_from=null",
                 # room for an uncompressed 17-tile image (17 x 1024 visual tokens) per sample
                 "model.max_length=32768", "model.llm.seq_len=32768", "model.llm.max_seq_len=32768",
                 f"trainer.micro_batch_size={mbs}", f"trainer.global_batch_size={mbs * world}",
                 "data.kind=synthetic", "data.sources=[]", *extra]
    cfg = load_config(config, overrides, recipe_config=recipe_config_class)
    raw = OmegaConf.structured(cfg)
    raw.cluster.kind = "local"
    cfg = validate(raw, recipe_config_class)
    layout = derive_layout(cfg, world)
    return cfg, layout, get_recipe_class("nvila")(cfg.model, cfg)


def make_batch(recipe, image_wh: tuple[int, int], text_tokens: int, mbs: int, seed: int = 0):
    from scaleforge.models.nvila.data import collate_packed, process_sample

    g = torch.Generator().manual_seed(seed)
    w, h = image_wh
    image = torch.rand(3, h, w, generator=g)
    words = " ".join(f"w{i % 97}" for i in range(max(text_tokens // 4, 1)))
    samples = []
    for _ in range(mbs):
        convs = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                 {"from": "gpt", "value": words}]
        samples.append(process_sample({"images": [image], "conversations": convs}, recipe.cfg, recipe.tokenizer))
    return collate_packed(samples, recipe.tokenizer.pad_id)


def run_variant(args, projector: str, info, world: int) -> dict:
    from scaleforge.platform.engine import build_engine, clip_coefficient
    from scaleforge.platform.metrics import device_peak_flops
    from scaleforge.platform.trainer import _to_device

    cfg, layout, recipe = build(args.config, projector, args.micro_batch, world, args.override)
    engine = build_engine(cfg, layout, info, recipe)
    model = engine.model
    model.train()
    batch = make_batch(recipe, args.image, args.text_tokens, args.micro_batch)
    flops = recipe.flops_per_sample(batch) * args.micro_batch
    visual = int((batch["input_ids"] == recipe.tokenizer.image_id).sum()) // args.micro_batch
    tokens = int(batch["input_ids"].numel())
    batch = _to_device(batch, info.device)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = recipe.forward_loss(model, batch)
        n = torch.tensor(float(out.num_items), device=info.device)
        dist.all_reduce(n)
        (out.loss * world / n).backward()  # the trainer's global token-count normalization
        sq = engine.grad_sq_norm_local()
        dist.all_reduce(sq)
        norm = float(sq.sqrt())
        engine.step(clip_coefficient(norm, cfg.optim.grad_clip))
        engine.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    peak = device_peak_flops()
    res = {
        "projector": projector,
        "visual_tokens_per_sample": visual,
        "row_tokens": tokens,
        "step_time_s": dt,
        "tokens_per_s_per_gpu": tokens / dt,
        "mfu": flops / dt / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": float(out.loss.detach()) / float(out.num_items),
    }
    del engine, model, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/nvila_8b.yaml")
    ap.add_argument("--projectors", nargs="+", default=["mlp2x_gelu", "mlp_downsample", "mlp_downsample_3x3_fix"],
                    help="mlp2x_gelu = no compression (the first is the baseline of the ratios); "
                         "mlp_downsample = 2x2 STC; mlp_downsample_3x3_fix = 3x3")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples per GPU per step (packed in one row)")
    ap.add_argument("--image", default="1344x1008", help="WxH of every sample's image")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("override", nargs="*", help="config overrides, e.g. parallel.activation_checkpointing=none")
    args = ap.parse_args()
    args.image = tuple(int(x) for x in args.image.lower().split("x"))

    from scaleforge.platform.dist import init_distributed

    info = init_distributed(1800)
    world = dist.get_world_size()
    results = [run_variant(args, p, info, world) for p in args.projectors]
    if info.rank == 0:
        dev = torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"
        print(f"\nNVILA step benchmark: {args.config}, {world} x {dev}, micro-batch {args.micro_batch} "
              f"(one packed row), image {args.image[0]}x{args.image[1]}, ~{args.text_tokens} text tokens/sample")
        hdr = f"{'projector':<24}{'visual tok/sample':>18}{'row tokens':>12}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}{'peak GiB':>10}"
        print(hdr)
        print("-" * len(hdr))
        for r in results:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
            print(f"{r['projector']:<24}{r['visual_tokens_per_sample']:>18}{r['row_tokens']:>12}"
                  f"{r['step_time_s']:>9.3f}{r['tokens_per_s_per_gpu']:>11.0f}{mfu:>7}{mem:>10}")
        base = results[0]
        for r in results[1:]:
            print(f"{base['projector']} / {r['projector']}: {base['visual_tokens_per_sample'] / r['visual_tokens_per_sample']:.2f}x "
                  f"visual tokens, {base['step_time_s'] / r['step_time_s']:.2f}x step time "
                  f"(NVILA's claim: 4.5x lower training cost for its whole recipe)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
