"""SANA-1.5 depth growth: a state-dict transform from N source blocks to T target blocks (sana.md §9,
upstream ``ModelGrowthInitializer``).

Strategies:

- ``constant`` (paper: Partial Preservation Init, the one SANA-1.5 chose): blocks 0..N-1 are copied; new
  blocks N..T-1 get random weights (std ``noise_scale`` = 0.02, depthwise conv std 0.2, biases 0, q/k norm
  weights 1, modulation table randn/sqrt(C)) except the output projection of the linear attention, the
  output projection of the cross-attention and the Mix-FFN point conv, whose weights (and biases) are 0;
- ``cyclic`` (Cyclic Replication Init): block i = source block i mod N; with ``zero_gate`` the repeats get a
  zero modulation table and zeroed attention / cross-attention output projections and point conv;
- ``block_expand`` (Block Replication Init): each source block is repeated ``expand_ratio`` times in a row
  (T = N * expand_ratio); with ``zero_gate`` every copy after the first is zero-gated as above.

Identity at step 0: every residual branch of a new (or zero-gated) block ends in a zero linear map (the point
conv has no bias), so the block returns its input and the grown model computes exactly what the first N
source blocks compute. All non-block parameters are copied (there is no stored positional embedding).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from scaleforge.models.sana.diffusers_io import depth_of

STRATEGIES = ("constant", "cyclic", "block_expand")
_ZEROED_OUT = ("attn.proj.weight", "attn.proj.bias", "cross_attn.proj.weight", "cross_attn.proj.bias",
               "mlp.point_conv.weight")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class GrowError(ValueError):
    pass


def _block(sd: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    pre = f"blocks.{i}."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def _zero_gate(blk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(blk)
    for k in _ZEROED_OUT + ("scale_shift_table",):
        if k in out:
            out[k] = torch.zeros_like(out[k])
    return out


def _new_block(template: dict[str, torch.Tensor], noise_scale: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Partial-preservation init of a new block (shapes from ``template``)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in template.items():
        if k in _ZEROED_OUT or k.endswith(".bias"):
            v = torch.zeros_like(t)
        elif k.endswith("_norm.weight"):
            v = torch.ones_like(t)
        elif k == "scale_shift_table":
            v = torch.randn(t.shape, generator=g, dtype=torch.float32) / t.shape[-1] ** 0.5
        elif k == "mlp.depth_conv.weight":
            v = torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.2
        else:
            v = torch.randn(t.shape, generator=g, dtype=torch.float32) * noise_scale
        out[k] = v.to(t.dtype)
    return out


def grow_state_dict(sd: Mapping[str, torch.Tensor], target_depth: int, strategy: str = "constant",
                    source_num_layers: int | None = None, expand_ratio: int = 3, zero_gate: bool = True,
                    noise_scale: float = 0.02, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    if strategy not in STRATEGIES:
        raise GrowError(f"grow strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    src_depth = depth_of(sd)
    n = source_num_layers or src_depth
    if not 1 <= n <= src_depth:
        raise GrowError(f"source_num_layers={n} but the source has {src_depth} blocks")
    if target_depth < n:
        raise GrowError(f"target depth {target_depth} is smaller than the {n} source blocks used (use prune)")
    if strategy == "block_expand" and target_depth != n * expand_ratio:
        raise GrowError(f"block_expand: target depth {target_depth} != source_num_layers {n} x expand_ratio "
                        f"{expand_ratio}")
    g = generator or torch.Generator().manual_seed(0)
    out = {k: v.clone() for k, v in sd.items() if not _BLOCK.match(k)}
    src = [_block(sd, i) for i in range(n)]
    for j in range(target_depth):
        if strategy == "constant":
            blk = {k: v.clone() for k, v in src[j].items()} if j < n else _new_block(src[0], noise_scale, g)
        elif strategy == "cyclic":
            blk = {k: v.clone() for k, v in src[j % n].items()}
            if zero_gate and j >= n:
                blk = _zero_gate(blk)
        else:  # block_expand
            blk = {k: v.clone() for k, v in src[j // expand_ratio].items()}
            if zero_gate and j % expand_ratio:
                blk = _zero_gate(blk)
        out.update({f"blocks.{j}.{k}": v for k, v in blk.items()})
    return out


def truncate_state_dict(sd: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` blocks of a model (what ``constant`` growth preserves)."""
    out = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m is None or int(m.group(1)) < n:
            out[k] = v
    return out
