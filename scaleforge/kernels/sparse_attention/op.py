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
    _decode_combine_kernel,
    _int4_scores_kernel,
    _kmeans_assign_kernel,
    _sparse_decode_kernel,
    _topp_threshold_kernel,
)


def _attention_blocks(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Key tiles are full (they span key clusters), so the tiles of
    dense flash attention on H100 serve: 128 x 64 with 8 warps at D = 128, 4 warps below; 3 stages of
    software pipelining. Small tiles in the interpreter (fewer lanes to emulate)."""
    if triton_interpreting():
        return 16, 16, 1, 1
    if d > 128:
        return 64, 32, 4, 2
    return 128, 64, (8 if d > 64 else 4), 3


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


def _key_tables(k_sizes: torch.Tensor, block_map: torch.Tensor, block_n: int, sk: int):
    """The selected key clusters of each query cluster laid end to end (a virtual key sequence; empty clusters
    left out so each selected one holds >= 1 key), as (B*H*Cq, ·) int32 tables: KCUM (Ck + 1) the virtual
    start of the i-th selected cluster (its last entry the total, repeated past the selected ones); KDELTA
    (Ck) key position minus virtual position inside it; KTILE_C0 (cdiv(Sk, BLOCK_N)) the selected cluster of
    each key tile's first lane. Torch ops on shapes only: no host sync."""
    b, h, cq, ck = block_map.shape
    sizes = k_sizes.to(torch.int32)[:, :, None, :]
    sel = block_map & (sizes > 0)
    # the selected clusters first, in cluster order: each one's rank among them is its slot (no sort); the
    # others go to a spill slot, dropped
    rank = torch.arange(ck, device=block_map.device)
    slot = torch.where(sel, sel.cumsum(-1) - 1, ck)
    kidx = torch.zeros(b, h, cq, ck + 1, dtype=torch.int64, device=block_map.device)
    kidx = kidx.scatter_(-1, slot, rank.expand(b, h, cq, ck).contiguous())[..., :ck]
    kcnt = sel.sum(-1, keepdim=True)
    sel_sizes = torch.where(rank < kcnt, sizes.expand(b, h, cq, ck).gather(-1, kidx), 0)
    cum = torch.nn.functional.pad(sel_sizes.cumsum(-1, dtype=torch.int32), (1, 0)).reshape(-1, ck + 1)
    k_off = _offsets(k_sizes)[:, :, None, :ck].expand(b, h, cq, ck)
    delta = (k_off.gather(-1, kidx).reshape(-1, ck) - cum[:, :ck]).to(torch.int32)
    tile_v = torch.arange(0, sk, block_n, device=block_map.device, dtype=torch.int32)
    c0 = torch.searchsorted(cum, tile_v.expand(cum.shape[0], -1).contiguous(), right=True) - 1
    return cum.contiguous(), delta.contiguous(), c0.clamp(0, ck - 1).to(torch.int32).contiguous()


@kernel_op("scaleforge::block_sparse_attention")
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sizes: torch.Tensor,
                              k_sizes: torch.Tensor, block_map: torch.Tensor, causal: bool,
                              scale: float) -> torch.Tensor:  # fmt: skip
    b, h, sq, d = q.shape
    cq, ck = block_map.shape[-2:]
    block_m, block_n, warps, stages = _attention_blocks(d)
    tile_cl, tile_start, t_max = _query_tiles(q_sizes, sq, block_m)
    kcum, kdelta, ktile_c0 = _key_tables(k_sizes, block_map, block_n, k.shape[2])
    out = _backend.new_output(q.shape, q.dtype, q.device)
    torch.library.wrap_triton(_block_sparse_fwd_kernel)[(t_max, b * h)](
        q, k, v, out, tile_cl, tile_start, _offsets(q_sizes), kcum, kdelta, ktile_c0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, d, cq, ck, t_max, ktile_c0.shape[1], scale,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(d), PREC=dot_precision(),
        STAGES=stages, num_warps=warps,
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
        w, thr, n, p, n_min, PASSES=10, WAYS=16, HAS_MIN=n_min > 0, BLOCK=min(next_pow2(n), 2048),
        num_warps=16,
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
    torch.library.wrap_triton(_int4_scores_kernel)[(cdiv(s, block_s), b * hkv)](
        q, packed, scale, lo, out, hq, hkv, s, d, length, softmax_scale, GROUP=hq // hkv, BLOCK_S=block_s,
        HALF_D=next_pow2(d // 2),
    )  # fmt: skip
    return out


@kernel_op("scaleforge::sparse_decode")
def sparse_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """q (B, Hq, D); k, v (B, Hkv, S, D) contiguous; mask (B, Hq, S) bool, the tokens each q head attends to
    -> (B, Hq, D) in q's dtype."""
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    block_n = 16 if triton_interpreting() else 64
    # a power of 2 (the combine holds all splits in one tile); ~1,800 programs at 28 heads and >= 32k tokens
    splits = min(64, max(2, next_pow2(cdiv(s, 512))))
    chunk = cdiv(cdiv(s, splits), block_n) * block_n
    po = _backend.new_output((b * hq, splits, d), torch.float32, q.device)
    pm = _backend.new_output((b * hq, splits), torch.float32, q.device)
    pl = _backend.new_output((b * hq, splits), torch.float32, q.device)
    torch.library.wrap_triton(_sparse_decode_kernel)[(splits, b * hq)](
        q, k, v, mask.view(torch.uint8), po, pm, pl, hq, hkv, s, d, splits, chunk, scale,
        BLOCK_N=block_n, BLOCK_D=next_pow2(d),
    )  # fmt: skip
    out = _backend.new_output((b, hq, d), q.dtype, q.device)
    torch.library.wrap_triton(_decode_combine_kernel)[(b * hq,)](po, pm, pl, out, d, SPLITS=splits,
                                                                 BLOCK_D=next_pow2(d))  # fmt: skip
    return out
