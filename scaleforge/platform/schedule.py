"""LR schedules: linear warmup, then cosine / linear decay to ``min_lr_ratio`` or constant.

The LR at optimizer step s (0-based) is a pure function of s, so a resumed run matches exactly.
Per-group LR multipliers are applied by LambdaLR to each group's base LR.
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int):
    fn = lambda step: lr_factor(step, optim_cfg.schedule, optim_cfg.warmup_steps, max_steps,  # noqa: E731
                                optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
