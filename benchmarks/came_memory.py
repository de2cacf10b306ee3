"""Optimizer-state memory of CAME-8bit vs CAME (fp32) vs AdamW on the real SANA model shapes.

    python benchmarks/came_memory.py --presets 0.6b 1.6b 4.8b

The states are really created by one optimizer step on meta tensors (no memory is allocated), then their bytes
are summed (optimizer_state_bytes): this counts exactly what the optimizers keep, for the full (unsharded)
model; under FSDP2 every rank holds 1/world of it (the CAME column statistics of 2-D weights are replicated,
O(columns) per weight). AdamW is torch.optim.AdamW (exp_avg + exp_avg_sq in fp32).
"""
from __future__ import annotations

import argparse

import torch


def state_bytes(preset: str, optim: str) -> tuple[int, int]:
    from scaleforge.models.sana.model import SanaTransformer, preset_arch
    from scaleforge.platform.optim.came import CAME, optimizer_state_bytes

    with torch.device("meta"):
        model = SanaTransformer(preset_arch(preset))
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.empty_like(p)
    if optim == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    else:
        opt = CAME(params, lr=1e-4, quantize_first_moment=optim == "came8bit")
    opt.step()
    n = sum(p.numel() for p in params)
    return n, optimizer_state_bytes(opt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["0.6b", "1.6b", "4.8b"])
    args = ap.parse_args()
    print("| model | params | AdamW GiB | CAME fp32 GiB | CAME-8bit GiB | 8bit / AdamW | bytes/param (8bit) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        n, adam = state_bytes(preset, "adamw")
        _, came = state_bytes(preset, "came")
        _, came8 = state_bytes(preset, "came8bit")
        gib = 2 ** 30
        print(f"| {preset} | {n / 1e9:.2f}B | {adam / gib:.2f} | {came / gib:.2f} | {came8 / gib:.2f} | "
              f"{came8 / adam:.3f} | {came8 / n:.2f} |")


if __name__ == "__main__":
    main()
