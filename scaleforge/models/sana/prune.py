"""SANA-1.5 block-importance depth pruning (sana.md §10).

Upstream code is not released (Sana#344) and the paper's exact metric is unverified. **Our choice**: the
importance of block i is BI_i = 1 - E[cos(X_i, X_{i+1})], the cosine similarity between the block's input
and output token vectors, averaged over tokens, over noise levels and over a calibration set of
(latent, text) pairs. A block that barely changes its input scores low and is dropped first. The metric is
pluggable: ``block_importance(..., metric=fn)`` takes any ``fn(x_in, x_out) -> (B,)`` per-sample score.

Pruning keeps the ``keep`` highest-scoring blocks in their original order, re-indexed 0..keep-1; all other
parameters are kept. The pruned model then needs a short fine-tune (~100 steps in the paper).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from scaleforge.models.sana import flow
from scaleforge.models.sana.diffusers_io import depth_of

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def one_minus_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 - mean over tokens of cos(x_in_token, x_out_token)."""
    return 1.0 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean(dim=-1)


METRICS: dict[str, Metric] = {"1-cos": one_minus_cosine}


@torch.no_grad()
def block_importance(model, calibration: Iterable[Mapping[str, torch.Tensor]],
                     sigmas: Iterable[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                     metric: Metric = one_minus_cosine, seed: int = 0) -> torch.Tensor:
    """Mean importance per block (depth,) over calibration batches x noise levels.

    ``calibration`` yields dicts with ``latents`` (B, 32, h, w), ``text_embeddings`` and ``text_mask``.
    """
    model.eval()
    depth = len(model.blocks)
    total = torch.zeros(depth, dtype=torch.float64)
    count = 0
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for batch in calibration:
        x0 = batch["latents"].float()
        for s in sigmas:
            noise = torch.randn(x0.shape, generator=g)
            sig = torch.full((x0.shape[0],), float(s))
            xt = flow.add_noise(x0, noise, sig).to(device)
            x, t, t0, y, mask_bias, hw = model.embed(xt, (sig * flow.NUM_TRAIN_TIMESTEPS).to(device),
                                                     batch["text_embeddings"].to(device),
                                                     batch["text_mask"].to(device))
            for i, blk in enumerate(model.blocks):
                out = blk(x, t0, y, mask_bias, hw)
                total[i] += metric(x, out).double().sum().cpu()
                x = out
            count += x0.shape[0]
    if count == 0:
        raise ValueError("block importance: the calibration set is empty")
    return (total / count).float()


def select_blocks(importance: torch.Tensor, keep: int) -> list[int]:
    depth = importance.numel()
    if not 1 <= keep <= depth:
        raise ValueError(f"--keep {keep}: must be between 1 and the model depth {depth}")
    top = torch.argsort(importance, descending=True, stable=True)[:keep]
    return sorted(top.tolist())


def prune_state_dict(sd: Mapping[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    depth = depth_of(sd)
    if any(not 0 <= k < depth for k in kept):
        raise ValueError(f"kept blocks {kept} out of range for depth {depth}")
    remap = {old: new for new, old in enumerate(kept)}
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, idx, rest = k.split(".", 2)
            if int(idx) in remap:
                out[f"blocks.{remap[int(idx)]}.{rest}"] = v
        else:
            out[k] = v
    return out


def write_report(out_dir: str | Path, importance: torch.Tensor, kept: list[int], metric_name: str,
                 sigmas: Iterable[float], n_calib: int) -> dict[str, Path]:
    """report.md (table), importance.json and importance.png (bar chart, kept blocks highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    imp = importance.tolist()
    order = torch.argsort(importance, descending=True, stable=True).tolist()
    rank = {b: r + 1 for r, b in enumerate(order)}
    lines = [
        "# SANA block-importance pruning report", "",
        f"Metric: BI = {metric_name} between each block's input and output, averaged over tokens, noise levels "
        f"{list(sigmas)} and {n_calib} calibration samples (our choice; the paper's exact metric is unverified).",
        f"Kept {len(kept)} of {len(imp)} blocks: {kept}", "",
        "| block | importance | rank | kept |", "|---:|---:|---:|:---:|",
    ]
    lines += [f"| {i} | {v:.6f} | {rank[i]} | {'yes' if i in kept else 'no'} |" for i, v in enumerate(imp)]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    js = out_dir / "importance.json"
    js.write_text(json.dumps({"metric": metric_name, "importance": imp, "kept": kept,
                              "sigmas": list(sigmas), "calibration_samples": n_calib}, indent=2))
    fig, ax = plt.subplots(figsize=(max(6, len(imp) * 0.25), 3.5))
    ax.bar(range(len(imp)), imp, color=["tab:blue" if i in kept else "tab:gray" for i in range(len(imp))])
    ax.set_xlabel("block")
    ax.set_ylabel(f"importance ({metric_name})")
    ax.set_title(f"SANA block importance (kept {len(kept)}/{len(imp)} in blue)")
    fig.tight_layout()
    png = out_dir / "importance.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"report": md, "json": js, "png": png}
