"""Plain-PyTorch references of the sparse-attention family (kernels.md §2.4-2.5): SVG2's variable-size
block-sparse attention, batched k-means with the cluster permutation, the top-p cluster budget, and Twilight's
INT4 key estimate, top-p token mask and sparse decode attention. Everything is computed in fp32.

Shapes: q, k, v are (B, H, S, D); cluster sizes are (B, H, C) integers summing to S per head; a block map is
(B, H, Cq, Ck) bool, True = the query cluster attends to the key cluster.
"""

from __future__ import annotations

import math

import torch


def expand_block_map(block_map: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, Cq, Ck) cluster map -> (B, H, Sq, Sk) token mask, clusters contiguous in the given order."""
    b, h, cq, ck = block_map.shape
    rows = []
    for i in range(b):
        heads = []
        for j in range(h):
            m = block_map[i, j].to(torch.int64)
            m = m.repeat_interleave(q_sizes[i, j].long(), dim=0).repeat_interleave(k_sizes[i, j].long(), dim=1)
            heads.append(m.bool())
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def block_sparse_attention_ref(q, k, v, q_sizes, k_sizes, block_map, causal: bool = False,
                               scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(q kᵀ · scale + mask) v over the blocks the map selects (and j <= i when causal, positions in the
    given order); rows that see no key give 0. Output in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = expand_block_map(block_map, q_sizes, k_sizes)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: 0
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


def kmeans_ref(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd rounds on x (B, H, S, D) from the centroids init (B, H, C, D) -> (labels (B, H, S) int64
    of the last assignment, centroids (B, H, C, D) fp32: the means of those clusters; with iters 0 the
    assignment to init). Assignment: argmin ‖x - c‖² (lowest index on ties); an empty cluster keeps its
    centroid."""
    xf, c = x.float(), init.float().clone()
    labels = assign_ref(xf, c)
    for i in range(iters):
        c = update_ref(xf, labels, c)
        if i + 1 < iters:
            labels = assign_ref(xf, c)
    return labels, c


def assign_ref(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = (c.float() * c.float()).sum(-1)[..., None, :] - 2 * x.float() @ c.float().transpose(-1, -2)
    return d.argmin(-1)


def update_ref(x: torch.Tensor, labels: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    n = c.shape[2]
    sums = torch.zeros(b, h, n, d, dtype=torch.float32, device=x.device).scatter_add_(
        2, labels[..., None].expand(b, h, s, d), x.float())
    counts = torch.zeros(b, h, n, dtype=torch.float32, device=x.device).scatter_add_(
        2, labels, torch.ones_like(labels, dtype=torch.float32))
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c.float())


def topp_budget_ref(q_centroids, k_centroids, k_sizes, p: float, min_frac: float = 0.0) -> torch.Tensor:
    """SVG2's dynamic map by sorting (``identify_dynamic_map``): per query cluster, the softmax of the
    centroid scores q_c·k_cᵀ/√D weighted by the key-cluster sizes; key clusters kept in descending order
    until the cumulative mass first reaches p (the crossing cluster kept), plus the top ceil(min_frac·Ck)
    clusters always. -> (B, H, Cq, Ck) bool."""
    w = cluster_weights(q_centroids, k_centroids, k_sizes)
    srt, idx = w.sort(dim=-1, descending=True)
    before = srt.cumsum(-1) - srt  # mass strictly before each sorted entry
    keep_sorted = before < p
    n_min = math.ceil(min_frac * w.shape[-1])
    keep_sorted[..., :n_min] = True
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def cluster_weights(q_centroids, k_centroids, k_sizes) -> torch.Tensor:
    """Size-weighted softmax of centroid scores: the estimated attention mass of each key cluster, fp32."""
    d = q_centroids.shape[-1]
    s = q_centroids.float() @ k_centroids.float().transpose(-1, -2) / math.sqrt(d)
    s = s + torch.log(k_sizes.float())[..., None, :]  # log-size weighting: sizes·exp(s), empty clusters -inf
    return torch.softmax(s, dim=-1)


def topp_threshold_mask_ref(w: torch.Tensor, p: float) -> torch.Tensor:
    """The top-p set of each row of probabilities w by sorting: the largest entries until their sum first
    reaches p (the crossing entry kept)."""
    srt, idx = w.float().sort(dim=-1, descending=True)
    keep = (srt.cumsum(-1) - srt) < p
    return torch.zeros_like(keep).scatter(-1, idx, keep)


def quantize_int4_ref(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token min-max INT4 of k (..., D), D even -> (codes (..., D/2) uint8, two per byte, low nibble first;
    scale (...,) fp32; minimum (...,) fp32): k ≈ code · scale + minimum."""
    kf = k.float()
    lo, hi = kf.amin(-1), kf.amax(-1)
    scale = (hi - lo).clamp_min(1e-8) / 15.0
    codes = torch.round((kf - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale, lo


def dequantize_int4_ref(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).float()
    return codes * scale[..., None] + lo[..., None]


def twilight_mask_ref(q, packed, scale, lo, p: float, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twilight's pruner for one decode step: q (B, Hq, D), INT4 keys (B, Hkv, S, D/2) -> (mask (B, Hq, S)
    bool, estimated probabilities (B, Hq, S) fp32) from softmax(q·k̃ᵀ/√D) over the first ``length`` keys."""
    b, hq, d = q.shape
    k_est = dequantize_int4_ref(packed, scale, lo)
    k_est = k_est.repeat_interleave(hq // k_est.shape[1], dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), k_est) / math.sqrt(d)
    if length is not None:
        s[..., length:] = float("-inf")
    w = torch.softmax(s, dim=-1)
    return topp_threshold_mask_ref(w, p), w


def sparse_decode_ref(q, k, v, mask, scale: float | None = None) -> torch.Tensor:
    """Decode attention of q (B, Hq, D) over the cached keys/values (B, Hkv, S, D) that mask (B, Hq, S)
    selects (GQA: q head h reads kv head h // (Hq/Hkv)). -> (B, Hq, D) in q's dtype."""
    hq, hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1).nan_to_num(0.0), vf).to(q.dtype)
