"""Sparse attention for inference (kernels.md §2.4-2.5; docs/inference.md).

SVG2 (video DiTs): per head, k-means on Q and on K, the permutation that makes every cluster contiguous, a
top-p budget over key clusters from the centroid scores, then variable-block-sparse flash attention over the
selected (query cluster, key cluster) blocks and the inverse permutation of the output
(:func:`svg2_attention`, :class:`SVG2AttnProcessor` for diffusers' ``WanTransformer3DModel``).

Twilight (LLM decode): keys estimated in INT4 (per-token min-max), the top-p token set of the estimated
attention found by binary search (no sort), attention over the selected tokens only
(:class:`TwilightDecode`, used by ``scaleforge nvila generate --sparse-attention twilight``).

Files: this module is the public API; ``triton_kernels.py`` the Triton kernels; ``op.py`` their torch.library
ops; ``svg2.py`` / ``twilight.py`` the two methods; ``processor.py`` the diffusers processor. Reference:
``reference/sparse_attention.py``.
"""

from __future__ import annotations

import math

import torch

from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference import sparse_attention as ref

__all__ = [
    "SVG2AttnProcessor",
    "SVG2Config",
    "SVG2State",
    "TwilightDecode",
    "apply_svg2",
    "block_sparse_attention",
    "cluster_permutation",
    "kmeans",
    "quantize_int4",
    "sparse_decode_attention",
    "svg2_attention",
    "topp_budget",
    "topp_mask",
    "twilight_select",
]

if HAS_TRITON:
    from scaleforge.kernels.sparse_attention import op as _op


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"block_sparse_attention: q, k, v must be (B, H, S, D) with the same B, H, D and k, v of "
                         f"one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip


def block_sparse_attention(q, k, v, q_sizes, k_sizes, block_map, *, causal: bool = False,
                           scale: float | None = None, q_perm: torch.Tensor | None = None,
                           k_perm: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """Variable-block-sparse attention: q (B, H, Sq, D) in contiguous query clusters of ``q_sizes`` (B, H, Cq)
    tokens, k / v (B, H, Sk, D) in key clusters of ``k_sizes`` (B, H, Ck); ``block_map`` (B, H, Cq, Ck) bool
    selects the key clusters each query cluster attends to. With ``q_perm`` (B, H, Sq) and ``k_perm``
    (B, H, Sk) (both or neither; e.g. from :func:`cluster_permutation`), q, k, v and the output stay in token
    order and the clusters are contiguous in the permuted order: the same result as permuting the inputs
    and un-permuting the output, without moving them in memory. ``causal``: also j <= i (positions in the
    cluster order). Rows that see no key give 0. -> (B, H, Sq, D) in q's dtype."""
    _check_qkv(q, k, v)
    b, h = q.shape[:2]
    if block_map.shape[:2] != (b, h) or q_sizes.shape != (b, h, block_map.shape[2]) or \
            k_sizes.shape != (b, h, block_map.shape[3]):  # fmt: skip
        raise ValueError(f"block_sparse_attention: block_map {tuple(block_map.shape)} must be (B, H, Cq, Ck) with "
                         f"q_sizes (B, H, Cq) {tuple(q_sizes.shape)} and k_sizes (B, H, Ck) {tuple(k_sizes.shape)}")
    if (q_perm is None) != (k_perm is None) or (q_perm is not None and (
            q_perm.shape != q.shape[:3] or k_perm.shape != k.shape[:3])):  # fmt: skip
        raise ValueError(f"block_sparse_attention: q_perm / k_perm must be given together, shaped (B, H, Sq) = "
                         f"{tuple(q.shape[:3])} and (B, H, Sk) = {tuple(k.shape[:3])}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve(backend) == "torch":
        if q_perm is None:
            return ref.block_sparse_attention_ref(q, k, v, q_sizes, k_sizes, block_map, causal, scale)
        out = ref.block_sparse_attention_ref(permute(q, q_perm), permute(k, k_perm), permute(v, k_perm), q_sizes,
                                             k_sizes, block_map, causal, scale)  # fmt: skip
        return unpermute(out, q_perm)
    check_triton_device(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _op.block_sparse_attention_op(q, k, v, q_sizes.contiguous(), k_sizes.contiguous(),
                                         block_map.to(torch.bool).contiguous(), bool(causal), scale, q_perm,
                                         k_perm)  # fmt: skip


def kmeans(x: torch.Tensor, num_clusters: int, *, init: torch.Tensor | None = None, iters: int = 50,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Batched k-means per (batch, head) on x (B, H, S, D): ``iters`` Lloyd rounds (assign, then update) from
    ``init`` (B, H, C, D) centroids (a warm start, e.g. the previous denoising step's) or, without it, from C
    evenly spaced tokens. -> (labels (B, H, S) int64 of the last assignment, centroids (B, H, C, D) fp32: the
    means of those clusters, an empty one keeping its centroid; with iters 0, the assignment to ``init``).
    Ending on the update gives the budget the exact means of the clusters it weighs, at one assignment per
    round (flash-kmeans' convention). Triton: one kernel per round, the assignment (argmin over centroid
    tiles) adding each token into its cluster's sums by atomics."""
    b, h, s, d = x.shape
    if init is None:
        c = min(num_clusters, s)
        init = x[:, :, torch.linspace(0, s - 1, c, device=x.device).round().long()].float()
    elif init.shape != (b, h, init.shape[2], d):
        raise ValueError(f"kmeans: init must be (B, H, C, D) = ({b}, {h}, C, {d}), got {tuple(init.shape)}")
    if resolve(backend) == "torch":
        return ref.kmeans_ref(x, init, iters)
    check_triton_device(x)
    xc = x.contiguous()
    c = init.float()
    if iters == 0:
        return _op.kmeans_assign_op(xc, c).long(), c
    for _ in range(iters):
        labels, c = _op.kmeans_round_op(xc, c)
    return labels.long(), c


def cluster_permutation(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, H, S) -> (perm (B, H, S) int64: token order with every cluster contiguous, in cluster order;
    sizes (B, H, C) int32). ``x.gather(2, perm)`` permutes, :func:`unpermute` inverts."""
    perm = torch.argsort(labels, dim=-1, stable=True)
    sizes = torch.zeros(*labels.shape[:2], num_clusters, dtype=torch.int32, device=labels.device)
    sizes.scatter_add_(2, labels, torch.ones_like(labels, dtype=torch.int32))
    return perm, sizes


def permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.gather(2, perm[..., None].expand(*perm.shape, x.shape[-1]))


def unpermute(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(y)
    return out.scatter_(2, perm[..., None].expand(*perm.shape, y.shape[-1]), y)


def topp_mask(w: torch.Tensor, p: float, min_keep: int = 0, *, backend: str | None = None) -> torch.Tensor:
    """Rows of probabilities w (..., N) -> bool mask of the top-p set: the largest entries whose sum first
    reaches p (at least ``min_keep`` entries). Triton: binary search on the threshold (Twilight), no sort;
    ties at the threshold are all kept. p >= 1 keeps everything."""
    if p >= 1.0:
        return torch.ones_like(w, dtype=torch.bool)
    if resolve(backend) == "torch":
        keep = ref.topp_threshold_mask_ref(w, p)
        if min_keep > 0:
            kth = w.float().topk(min(min_keep, w.shape[-1]), dim=-1).values[..., -1:]
            keep |= w.float() >= kth
        return keep
    check_triton_device(w)
    wf = w.float().reshape(-1, w.shape[-1]).contiguous()
    thr = _op.topp_threshold_op(wf, float(p), int(min_keep))
    return (wf >= thr[:, None]).reshape(w.shape)


def topp_budget(q_centroids, k_centroids, k_sizes, p: float, min_key_fraction: float = 0.0, *,
                backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """SVG2's block map (B, H, Cq, Ck): per query cluster, the key clusters holding top-p of the estimated
    attention mass (softmax of centroid scores q_c·k_cᵀ/√D weighted by key-cluster sizes), and always the top
    ceil(min_key_fraction · Ck) clusters."""
    w = ref.cluster_weights(q_centroids, k_centroids, k_sizes)
    return topp_mask(w, p, math.ceil(min_key_fraction * w.shape[-1]), backend=backend)


def quantize_int4(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token min-max INT4 keys (..., D) -> (codes (..., D/2) uint8, scale, minimum) (torch; written once
    per cached token)."""
    if k.shape[-1] % 2:
        raise ValueError(f"quantize_int4: head dim must be even, got {k.shape[-1]}")
    return ref.quantize_int4_ref(k)


def twilight_select(q, packed, scale, lo, p: float, length: int | None = None, *,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Twilight's pruner: q (B, Hq, D) against INT4 keys (B, Hkv, S, D/2) -> (mask (B, Hq, S) of the top-p
    tokens of the estimated attention over the first ``length`` keys, estimated probabilities fp32)."""
    s_len = packed.shape[2]
    length = s_len if length is None else int(length)
    if resolve(backend) == "torch":
        w = ref.twilight_mask_ref(q, packed, scale, lo, 1.0, length)[1]
    else:
        check_triton_device(q)
        scores = _op.int4_scores_op(q.contiguous(), packed.contiguous(), scale.float().contiguous(),
                                    lo.float().contiguous(), length, q.shape[-1] ** -0.5)  # fmt: skip
        w = torch.softmax(scores, dim=-1)
    mask = topp_mask(w, p, backend=backend)
    return (mask if length == s_len else mask & _prefix(q, s_len, length)), w


def _prefix(q, s_len, length):
    return (torch.arange(s_len, device=q.device) < length).expand(q.shape[0], q.shape[1], s_len)


def sparse_decode_attention(q, k, v, mask, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Decode attention of q (B, Hq, D) over the cached k, v (B, Hkv, S, D) tokens that mask (B, Hq, S)
    selects; GQA when Hq > Hkv. The Triton path reads only the selected rows. -> (B, Hq, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve(backend) == "torch":
        return ref.sparse_decode_ref(q, k, v, mask, scale)
    check_triton_device(q, k, v)
    mask = mask.to(torch.bool).expand(q.shape[0], q.shape[1], k.shape[2]).contiguous()
    return _op.sparse_decode_op(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale)


from scaleforge.kernels.sparse_attention.svg2 import SVG2Config, SVG2State, svg2_attention  # noqa: E402
from scaleforge.kernels.sparse_attention.twilight import TwilightDecode  # noqa: E402
from scaleforge.kernels.sparse_attention.processor import SVG2AttnProcessor, apply_svg2  # noqa: E402
