"""The sparse-attention torch.library ops and their launches. Index tables (query tiles of each cluster, the
selected key clusters of each query cluster, the selected tokens of each decode row) are built with torch ops
from tensor shapes only, so no launch needs a host sync and torch.compile traces through."""

from __future__ import annotations

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import triton_interpreting
from scaleforge.kernels._triton_utils import cdiv, dot_precision, kernel_op, next_pow2
from scaleforge.kernels.sparse_attention.triton_kernels import (
    _block_sparse_fwd_kernel,
    _int4_scores_kernel,
    _kmeans_assign_kernel,
    _sparse_decode_kernel,
    _topp_threshold_kernel,
)


def _attention_blocks(d: int, sk: int, ck: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Key tiles never span two key clusters, so a tile much wider than the
    mean key cluster (Sk / Ck: 33 tokens for SVG2's 1000 clusters at Wan's 32,760) is mostly masked: BLOCK_N
    is 32 there, 64 for larger clusters. Small tiles in the interpreter (fewer masked lanes to emulate)."""
    if triton_interpreting():
        return 16, 16, 1
    if d > 128:
        return 32, 32, 4
    return 64, (32 if sk < 48 * ck else 64), 4


def _offsets(sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, C) sizes -> (B, H, C + 1) int32 start offsets of the contiguous clusters."""
    return torch.nn.functional.pad(sizes.to(torch.int64).cumsum(-1), (1, 0)).to(torch.int32)


def _query_tiles(q_sizes: torch.Tensor, s: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tile cluster (B*H, T) int32, -1 = unused; tile first row (B*H, T) int32; T): the BLOCK_M-row tiles of
    every query cluster. T = S // BLOCK_M + C + 1 bounds sum(ceil(size / BLOCK_M)) for any sizes."""
    bh, c = q_sizes.shape[0] * q_sizes.shape[1], q_sizes.shape[2]
    sizes = q_sizes.reshape(bh, c).to(torch.int64)
    n_tiles = (sizes + block_m - 1) // block_m
    ends = n_tiles.cumsum(-1)
    t_max = s // block_m + c + 1
    t = torch.arange(t_max, device=q_sizes.device).expand(bh, t_max).contiguous()
    cl = torch.searchsorted(ends, t, right=True)
    valid = cl < c
    clc = cl.clamp(max=c - 1)
    first = ends.gather(1, clc) - n_tiles.gather(1, clc)
    offs = _offsets(q_sizes).reshape(bh, c + 1).to(torch.int64)
    start = offs.gather(1, clc) + (t - first) * block_m
    return torch.where(valid, clc, -1).to(torch.int32), start.to(torch.int32), t_max


@kernel_op("scaleforge::block_sparse_attention")
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sizes: torch.Tensor,
                              k_sizes: torch.Tensor, block_map: torch.Tensor, causal: bool,
                              scale: float) -> torch.Tensor:  # fmt: skip
    b, h, sq, d = q.shape
    cq, ck = block_map.shape[-2:]
    block_m, block_n, warps = _attention_blocks(d, k.shape[2], ck)
    tile_cl, tile_start, t_max = _query_tiles(q_sizes, sq, block_m)
    # the selected key clusters of each query cluster first, in cluster order (a stable sort of the map)
    kidx = torch.argsort(block_map.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    kcnt = block_map.sum(-1, dtype=torch.int32)
    out = _backend.new_output(q.shape, q.dtype, q.device)
    torch.library.wrap_triton(_block_sparse_fwd_kernel)[(t_max, b * h)](
        q, k, v, out, tile_cl, tile_start, _offsets(q_sizes), _offsets(k_sizes), kidx, kcnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, d, cq, ck, t_max, scale,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(d), PREC=dot_precision(),
        num_warps=warps,
    )  # fmt: skip
    return out


@kernel_op("scaleforge::kmeans_assign")
def kmeans_assign_op(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D), centroids (B, H, C, D) -> labels (B, H, S) int32."""
    b, h, s, d = x.shape
    nc = centroids.shape[2]
    c = centroids.to(x.dtype).contiguous()
    cn = c.float().square().sum(-1).contiguous()
    labels = torch.full((b, h, s), -1, dtype=torch.int32, device=x.device)  # -1: an unwritten label shows
    block_s = 16 if triton_interpreting() else 64
    block_c = 16 if triton_interpreting() else 64
    torch.library.wrap_triton(_kmeans_assign_kernel)[(cdiv(s, block_s), b * h)](
        x, c, cn, labels, s, nc, d, BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_D=next_pow2(d), PREC=dot_precision(),
    )  # fmt: skip
    return labels


@kernel_op("scaleforge::topp_threshold")
def topp_threshold_op(w: torch.Tensor, p: float, n_min: int) -> torch.Tensor:
    """Rows of probabilities (R, N) fp32 -> (R,) thresholds: w >= thr keeps mass >= p and >= n_min entries."""
    r, n = w.shape
    thr = _backend.new_output((r,), torch.float32, w.device)
    torch.library.wrap_triton(_topp_threshold_kernel)[(r,)](
        w, thr, n, p, n_min, ITERS=40, BLOCK=min(next_pow2(n), 4096), num_warps=4,
    )  # fmt: skip
    return thr


@kernel_op("scaleforge::int4_scores")
def int4_scores_op(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                   length: int, softmax_scale: float) -> torch.Tensor:  # fmt: skip
    """q (B, Hq, D), packed INT4 keys (B, Hkv, S, D/2) -> scores (B, Hq, S) fp32, -inf past length."""
    b, hq, d = q.shape
    hkv, s = packed.shape[1], packed.shape[2]
    out = _backend.new_output((b, hq, s), torch.float32, q.device)
    block_s = 32 if triton_interpreting() else 128
    torch.library.wrap_triton(_int4_scores_kernel)[(cdiv(s, block_s), b * hq)](
        q, packed, scale, lo, out, hq, hkv, s, d, length, softmax_scale, BLOCK_S=block_s, HALF_D=next_pow2(d // 2),
    )  # fmt: skip
    return out


@kernel_op("scaleforge::sparse_decode")
def sparse_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """q (B, Hq, D); k, v (B, Hkv, S, D) contiguous; idx (B, Hq, S) int32 selected token indices first, cnt
    (B, Hq) their number -> (B, Hq, D) in q's dtype."""
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    block_n = 16 if triton_interpreting() else 64
    splits = max(1, min(64, cdiv(s, 1024)))
    chunk = cdiv(cdiv(s, splits), block_n) * block_n
    po = _backend.new_output((b * hq, splits, d), torch.float32, q.device)
    pm = _backend.new_output((b * hq, splits), torch.float32, q.device)
    pl = _backend.new_output((b * hq, splits), torch.float32, q.device)
    torch.library.wrap_triton(_sparse_decode_kernel)[(splits, b * hq)](
        q, k, v, idx, cnt, po, pm, pl, hq, hkv, s, d, splits, chunk, scale, BLOCK_N=block_n, BLOCK_D=next_pow2(d),
    )  # fmt: skip
    m = pm.amax(-1, keepdim=True)
    wgt = torch.exp(pm - torch.where(torch.isinf(m), 0.0, m)).nan_to_num(0.0)  # splits with no token: weight 0
    num = (po * wgt[..., None]).sum(1)
    den = (pl * wgt).sum(1)
    out = num / torch.where(den > 0, den, 1.0)[:, None]
    return out.reshape(b, hq, d).to(q.dtype)
