"""The sparse-attention torch.library ops and their launches. Index tables (query tiles of each cluster, the
selected key clusters of each query cluster and their per-token key index, the selected tokens of each decode
row) are built with torch ops and small Triton kernels from tensor shapes only, so no launch needs a host sync
and torch.compile traces through."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import triton_interpreting
from scaleforge.kernels._triton_utils import cdiv, dot_precision, kernel_op, next_pow2
from scaleforge.kernels.sparse_attention.triton_kernels import (
    _block_sparse_fwd_kernel,
    _compact_mask_kernel,
    _decode_combine_kernel,
    _int4_scores_kernel,
    _key_index_kernel,
    _kmeans_assign_kernel,
    _sparse_decode_compact_kernel,
    _sparse_decode_kernel,
    _topp_threshold_kernel,
)


class BlockSparseConfig(NamedTuple):
    """A launch configuration of the block-sparse forward: query / key tile rows, warps, pipeline depth of the
    key loop, and how a key lane finds its cluster (a bitmap of cluster starts with a prefix sum, or
    BLOCK_N² compares against the next cluster starts). ``rest_m`` > 0: a second launch with rest_m-row
    tiles covers the rows past each cluster's last full BLOCK_M tile (less padding than one partial
    BLOCK_M tile per cluster). ``prefetch``: the full-tile loop loads the next tile's K / V before this
    tile's math (register double buffering) instead of relying on the compiler's pipelining. ``index_table``:
    a key tile reads its token positions from a per-row key index table (:func:`_key_index_table`) with one
    contiguous load instead of the lane lookup (``lookup_bits`` then unused)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    lookup_bits: bool
    rest_m: int = 0
    prefetch: bool = False
    index_table: bool = False


# The GPU configurations the autotuner times (per head dim, causal flag, query tile and lookup); BLOCK_M and
# the lookup are fixed on the host because the query-tile table and the bitmap are built for them.
_FWD_TUNE = [
    triton.Config({"BLOCK_N": n, "STAGES": st}, num_warps=w)
    for n, w, st in ((64, 4, 3), (64, 8, 2), (64, 8, 3), (64, 8, 4), (128, 8, 2), (128, 8, 3), (32, 4, 3))
]
_block_sparse_fwd_tuned = triton.autotune(
    _FWD_TUNE, key=["BLOCK_D", "CAUSAL", "BLOCK_M", "LOOKUP_BITS", "PREFETCH", "PERM", "KIDX_TABLE"])(
    _block_sparse_fwd_kernel)


def _query_block(d: int) -> tuple[int, bool, int, bool, bool]:
    """(BLOCK_M, lookup_bits, rest_m, prefetch, index_table) on GPU: 128-row query tiles (the tile of dense
    flash attention on H100) up to head dim 128, 64 above (registers); keys through the bitmap lookup, the
    configuration measured on the GPU (docs/benchmarks.md); the index table is selectable until the sweep
    has timed it there."""
    return (128 if d <= 128 else 64), True, 0, False, False


def _interpreter_config() -> BlockSparseConfig:
    """Small tiles in the interpreter (fewer lanes to emulate; it cannot autotune); the GPU default's key
    index table."""
    return BlockSparseConfig(16, 16, 1, 1, False, index_table=True)


def _offsets(sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, C) sizes -> (B, H, C + 1) int32 start offsets of the contiguous clusters."""
    return torch.nn.functional.pad(sizes.to(torch.int64).cumsum(-1), (1, 0)).to(torch.int32)


def _query_tiles(q_sizes: torch.Tensor, s: int, block_m: int, split_m: int = 0,
                 rest: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """(tile cluster (B*H, T) int32, -1 = unused; tile first row (B*H, T) int32; T): the BLOCK_M-row tiles of
    every query cluster; with ``split_m``, of its first split_m·floor(size / split_m) rows (rest False; then
    block_m = split_m) or of the rows after them (rest True). T = S // BLOCK_M + C + 1 bounds the tile count."""
    bh, c = q_sizes.shape[0] * q_sizes.shape[1], q_sizes.shape[2]
    sizes = q_sizes.reshape(bh, c).to(torch.int64)
    skip = (sizes // split_m) * split_m if split_m else torch.zeros_like(sizes)
    rows = sizes - skip if rest or not split_m else skip
    n_tiles = (rows + block_m - 1) // block_m
    ends = n_tiles.cumsum(-1)
    t_max = s // block_m + c + 1
    t = torch.arange(t_max, device=q_sizes.device).expand(bh, t_max).contiguous()
    cl = torch.searchsorted(ends, t, right=True)
    valid = cl < c
    clc = cl.clamp(max=c - 1)
    first = ends.gather(1, clc) - n_tiles.gather(1, clc)
    offs = _offsets(q_sizes).reshape(bh, c + 1).to(torch.int64)[:, :c] + (skip if rest else 0)
    start = offs.gather(1, clc) + (t - first) * block_m
    return torch.where(valid, clc, -1).to(torch.int32), start.to(torch.int32), t_max


def _key_tables(k_sizes: torch.Tensor, block_map: torch.Tensor, sk: int, bits: bool):
    """The selected key clusters of each query cluster laid end to end (a virtual key sequence; empty clusters
    left out so each selected one holds >= 1 key), as (B*H*Cq, ·) int32 tables: KCUM (Ck + 1) the virtual
    start of the i-th selected cluster (its last entry the total, repeated past the selected ones); KDELTA
    (Ck) key position minus virtual position inside it; KTILE_C0 (cdiv(Sk, 16)) the selected cluster of
    every 16th virtual position; with ``bits``, BITS (cdiv(Sk, 32)) the bitmap of virtual positions where a
    selected cluster starts (else a placeholder). Torch ops on shapes only: no host sync."""
    b, h, cq, ck = block_map.shape
    dev = block_map.device
    sizes = k_sizes.to(torch.int32)[:, :, None, :]
    sel = block_map & (sizes > 0)
    # the selected clusters first, in cluster order: each one's rank among them is its slot (no sort); the
    # others go to a spill slot, dropped
    rank = torch.arange(ck, device=dev)
    slot = torch.where(sel, sel.cumsum(-1) - 1, ck)
    kidx = torch.zeros(b, h, cq, ck + 1, dtype=torch.int64, device=dev)
    kidx = kidx.scatter_(-1, slot, rank.expand(b, h, cq, ck).contiguous())[..., :ck]
    kcnt = sel.sum(-1, keepdim=True)
    sel_sizes = torch.where(rank < kcnt, sizes.expand(b, h, cq, ck).gather(-1, kidx), 0)
    cum = torch.nn.functional.pad(sel_sizes.cumsum(-1, dtype=torch.int32), (1, 0)).reshape(-1, ck + 1)
    k_off = _offsets(k_sizes)[:, :, None, :ck].expand(b, h, cq, ck)
    delta = (k_off.gather(-1, kidx).reshape(-1, ck) - cum[:, :ck]).to(torch.int32)
    v16 = torch.arange(0, sk, 16, device=dev, dtype=torch.int32)
    c0 = torch.searchsorted(cum, v16.expand(cum.shape[0], -1).contiguous(), right=True) - 1
    c0 = c0.clamp(0, ck - 1).to(torch.int32).contiguous()
    if not bits:
        return cum.contiguous(), delta.contiguous(), c0, torch.zeros(1, dtype=torch.int32, device=dev)
    starts = cum[:, :ck].to(torch.int64)
    words = torch.zeros(cum.shape[0], cdiv(sk, 32) + 1, dtype=torch.int64, device=dev)  # + a spill word
    used = (rank < kcnt.reshape(-1, 1)) & (starts < sk)
    bit = torch.where(used, torch.ones_like(starts) << (starts % 32), 0)
    words.scatter_add_(1, torch.where(used, starts // 32, words.shape[1] - 1), bit)  # distinct bits: add = or
    words = torch.where(words >= 2**31, words - 2**32, words)[:, :-1].to(torch.int32)  # bit 31: the sign bit
    return cum.contiguous(), delta.contiguous(), c0, words.contiguous()


def _key_index_table(kcum: torch.Tensor, kdelta: torch.Tensor, ktile_c0: torch.Tensor, k_perm: torch.Tensor | None,
                     cq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """The per-token key index of every merged query-cluster row, as FlashInfer builds from a block map (page
    size 1): KIDX (B*H*Cq, Sk) int32, KIDX[row, v] the key of virtual position v in :func:`_key_tables`' order
    (a token position, through ``k_perm`` (B*H, Sk) int32 when given); only the first KCUM[row, Ck] entries
    of a row are written. Memory: 4 bytes x B*H*Cq x Sk, an upper bound fixed by the shapes so that no host
    sync is needed (472 MB at 12 heads x 300 clusters x 32,760 keys). A row that selects every key is not
    written: the attention kernel reads KFULL for it. -> (KIDX, KFULL, KFULL's row stride): KFULL is
    ``k_perm`` (stride Sk) or arange(Sk) (stride 0). One Triton program per (row, 1,024 virtual positions)."""
    rows = kcum.shape[0]
    dev = kcum.device
    kidx = torch.empty(rows, sk, dtype=torch.int32, device=dev)
    perm = k_perm is not None
    block = 1024 if not triton_interpreting() else min(1024, next_pow2(sk))
    torch.library.wrap_triton(_key_index_kernel)[(rows, cdiv(sk, block))](
        kcum, kdelta, ktile_c0, k_perm if perm else kcum, kidx, cq, kcum.shape[1] - 1, ktile_c0.shape[1], sk,
        BLOCK=block, PERM=perm, num_warps=4,
    )  # fmt: skip
    if perm:
        return kidx, k_perm, sk
    return kidx, torch.arange(sk, dtype=torch.int32, device=dev), 0


def _merge_equal_rows(q_sizes: torch.Tensor, block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive query clusters that select the same key clusters merged into one (their rows are
    contiguous): a query tile holds one cluster, so each cluster's last, partial tile wastes rows (half a tile
    per cluster on average); merged clusters share tiles (all blocks: one cluster per head). -> (sizes
    (B, H, Cq), map (B, H, Cq, Ck)) with the G merged clusters first and empty ones after. No host sync."""
    new = torch.ones_like(block_map[..., 0])
    new[..., 1:] = (block_map[..., 1:, :] != block_map[..., :-1, :]).any(-1)
    group = new.cumsum(-1) - 1  # (B, H, Cq) the merged cluster of each cluster
    sizes = torch.zeros_like(q_sizes, dtype=torch.int32).scatter_add_(-1, group, q_sizes.to(torch.int32))
    rows = torch.zeros_like(block_map).scatter_(-2, group[..., None].expand_as(block_map), block_map)
    return sizes, rows


def launch_block_sparse(q, k, v, q_sizes, k_sizes, block_map, causal: bool, scale: float,
                        config: BlockSparseConfig | None = None, q_perm=None, k_perm=None) -> torch.Tensor:  # fmt: skip
    """The forward launch: with ``config`` None the interpreter's fixed configuration, or on GPU the host's
    BLOCK_M, lookup and key index table with the autotuned rest; an explicit ``config`` runs the plain kernel
    with it (benchmarks/kernels/sparse_attention_sweep.py times each). ``q_perm`` / ``k_perm`` (B, H, S): q, k,
    v and the output in token order, the clusters in the order the permutations give (both or neither). The
    index table holds token positions (composed with ``k_perm``), except causal with permutations: then
    positions in the cluster order, which the causal test compares, mapped through ``k_perm`` at the loads."""
    b, h, sq, d = q.shape
    cq, ck = block_map.shape[-2:]
    if config is None and triton_interpreting():
        config = _interpreter_config()
    if config is not None:
        block_m, bits, rest_m, prefetch = config.block_m, config.lookup_bits, config.rest_m, config.prefetch
        table = config.index_table
    else:
        block_m, bits, rest_m, prefetch, table = _query_block(d)
    bits = bits and not table
    q_sizes, block_map = _merge_equal_rows(q_sizes, block_map)
    kcum, kdelta, ktile_c0, words = _key_tables(k_sizes, block_map, k.shape[2], bits)
    out = _backend.new_output(q.shape, q.dtype, q.device)
    idx64 = max(t.shape[2] * t.stride(2) for t in (q, k, v, out)) >= 2**31
    q_off = _offsets(q_sizes)
    perm = q_perm is not None
    qp, kp = (q_perm.to(torch.int32).contiguous(), k_perm.to(torch.int32).contiguous()) if perm else (q_off, q_off)
    kidx, kfull, sfull = kcum, kcum, 0  # placeholders: not read without the table
    if table:
        kidx, kfull, sfull = _key_index_table(kcum, kdelta, ktile_c0, kp.reshape(b * h, -1) if perm and not causal
                                              else None, cq, k.shape[2])  # fmt: skip
    parts = [(block_m, False)] if not rest_m else [(block_m, False), (rest_m, True)]
    for tile_m, rest in parts:
        tile_cl, tile_start, t_max = _query_tiles(q_sizes, sq, tile_m, block_m if rest_m else 0, rest)
        args = (q, k, v, out, tile_cl, tile_start, q_off, kcum, kdelta, ktile_c0, words, qp, kp, kidx, kfull,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                h, d, cq, ck, t_max, ktile_c0.shape[1], words.shape[-1], sq, k.shape[2], sfull, scale)  # fmt: skip
        common = dict(CAUSAL=causal, BLOCK_M=tile_m, BLOCK_D=next_pow2(d), PREC=dot_precision(), LOOKUP_BITS=bits,
                      IDX64=idx64, HEAD_PAD=next_pow2(d) != d, PREFETCH=prefetch, PERM=perm,
                      KIDX_TABLE=table)  # fmt: skip
        if config is None:
            torch.library.wrap_triton(_block_sparse_fwd_tuned)[(t_max, b * h)](*args, **common)
        else:
            torch.library.wrap_triton(_block_sparse_fwd_kernel)[(t_max, b * h)](
                *args, **common, BLOCK_N=config.block_n, STAGES=config.num_stages, num_warps=config.num_warps)
    return out


@kernel_op("scaleforge::block_sparse_attention")
def block_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sizes: torch.Tensor,
                              k_sizes: torch.Tensor, block_map: torch.Tensor, causal: bool, scale: float,
                              q_perm: torch.Tensor | None = None,
                              k_perm: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    return launch_block_sparse(q, k, v, q_sizes, k_sizes, block_map, causal, scale, None, q_perm, k_perm)


class KMeansConfig(NamedTuple):
    """A launch configuration of the k-means assignment: tokens and centroids per tile, warps, pipeline depth
    of the centroid loop."""

    block_s: int
    block_c: int
    num_warps: int
    num_stages: int


def _kmeans_config(d: int) -> KMeansConfig:
    if triton_interpreting():
        return KMeansConfig(16, 16, 1, 1)
    return KMeansConfig(64, 64, 4, 2)


def launch_kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, config: KMeansConfig | None = None,
                         accumulate: bool = False):  # fmt: skip
    """labels (B, H, S) int32; with ``accumulate`` also (sums (B, H, C, D) fp32, counts (B, H, C) fp32) of the
    tokens of every cluster (the update step's sums, by atomics in the same kernel)."""
    b, h, s, d = x.shape
    nc = centroids.shape[2]
    cfg = _kmeans_config(d) if config is None else config
    c = centroids.to(x.dtype).contiguous()
    cn = c.float().square().sum(-1).contiguous()
    labels = torch.full((b, h, s), -1, dtype=torch.int32, device=x.device)  # -1: an unwritten label shows
    if accumulate:
        sums = torch.zeros((b, h, nc, d), dtype=torch.float32, device=x.device)
        counts = torch.zeros((b, h, nc), dtype=torch.float32, device=x.device)
    else:
        sums = counts = cn  # not touched
    torch.library.wrap_triton(_kmeans_assign_kernel)[(cdiv(s, cfg.block_s), b * h)](
        x, c, cn, labels, sums, counts, s, nc, d, BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, BLOCK_D=next_pow2(d),
        PREC=dot_precision(), STAGES=cfg.num_stages, ACCUM=accumulate, num_warps=cfg.num_warps,
    )  # fmt: skip
    return (labels, sums, counts) if accumulate else labels


@kernel_op("scaleforge::kmeans_assign")
def kmeans_assign_op(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D), centroids (B, H, C, D) -> labels (B, H, S) int32."""
    return launch_kmeans_assign(x, centroids)


@kernel_op("scaleforge::kmeans_round")
def kmeans_round_op(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd round: x (B, H, S, D), centroids (B, H, C, D) -> (labels (B, H, S) int32, the means of those
    clusters (B, H, C, D) fp32, an empty cluster keeping its centroid)."""
    labels, sums, counts = launch_kmeans_assign(x, centroids, accumulate=True)
    means = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], centroids.float())
    return labels, means


class ThresholdConfig(NamedTuple):
    """A launch configuration of the top-p threshold search: candidates per pass, most passes, row tile,
    warps."""

    ways: int
    passes: int
    block: int
    num_warps: int


def _threshold_config(n: int) -> ThresholdConfig:
    return ThresholdConfig(16, 12, min(next_pow2(n), 1024), 16)


def launch_topp_threshold(w: torch.Tensor, p: float, n_min: int, config: ThresholdConfig | None = None):
    r, n = w.shape
    cfg = _threshold_config(n) if config is None else config
    thr = _backend.new_output((r,), torch.float32, w.device)
    torch.library.wrap_triton(_topp_threshold_kernel)[(r,)](
        w, thr, n, p, n_min, PASSES=cfg.passes, WAYS=cfg.ways, HAS_MIN=n_min > 0, BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return thr


@kernel_op("scaleforge::topp_threshold")
def topp_threshold_op(w: torch.Tensor, p: float, n_min: int) -> torch.Tensor:
    """Rows of probabilities (R, N) fp32 -> (R,) thresholds: w >= thr keeps mass >= p and >= n_min entries."""
    return launch_topp_threshold(w, p, n_min)


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


class DecodeConfig(NamedTuple):
    """A launch configuration of the sparse decode: ``compact`` gathers an index list of the selected tokens
    first and splits it evenly (else each split scans its share of cache positions and reads the selected
    rows); splits per head (0: from the cache length), tile, pipeline stages (compact only)."""

    compact: bool
    splits: int
    block_n: int
    num_stages: int


def _decode_config() -> DecodeConfig:
    if triton_interpreting():
        return DecodeConfig(True, 0, 16, 1)
    return DecodeConfig(True, 0, 32, 2)


def launch_sparse_decode(q, k, v, mask, scale: float, config: DecodeConfig | None = None) -> torch.Tensor:
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    cfg = _decode_config() if config is None else config
    block_n = cfg.block_n
    # a power of 2 (the combine holds all splits in one tile); ~1,800 programs at 28 heads and >= 32k tokens
    splits = cfg.splits or min(64, max(2, next_pow2(cdiv(s, 512))))
    po = _backend.new_output((b * hq, splits, d), torch.float32, q.device)
    pm = _backend.new_output((b * hq, splits), torch.float32, q.device)
    pl = _backend.new_output((b * hq, splits), torch.float32, q.device)
    mask_u8 = mask.view(torch.uint8)
    if cfg.compact:
        idx = torch.empty((b * hq, s), dtype=torch.int32, device=q.device)
        cnt = torch.empty((b * hq,), dtype=torch.int32, device=q.device)
        torch.library.wrap_triton(_compact_mask_kernel)[(b * hq,)](mask_u8, idx, cnt, s, BLOCK=1024 if s >= 1024 else
                                                                   next_pow2(s), num_warps=4)  # fmt: skip
        torch.library.wrap_triton(_sparse_decode_compact_kernel)[(splits, b * hq)](
            q, k, v, idx, cnt, po, pm, pl, hq, hkv, s, d, splits, scale, BLOCK_N=block_n, BLOCK_D=next_pow2(d),
            STAGES=cfg.num_stages,
        )  # fmt: skip
    else:
        chunk = cdiv(cdiv(s, splits), block_n) * block_n
        torch.library.wrap_triton(_sparse_decode_kernel)[(splits, b * hq)](
            q, k, v, mask_u8, po, pm, pl, hq, hkv, s, d, splits, chunk, scale, BLOCK_N=block_n,
            BLOCK_D=next_pow2(d),
        )  # fmt: skip
    out = _backend.new_output((b, hq, d), q.dtype, q.device)
    torch.library.wrap_triton(_decode_combine_kernel)[(b * hq,)](po, pm, pl, out, d, SPLITS=splits,
                                                                 BLOCK_D=next_pow2(d))  # fmt: skip
    return out


@kernel_op("scaleforge::sparse_decode")
def sparse_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """q (B, Hq, D); k, v (B, Hkv, S, D) contiguous; mask (B, Hq, S) bool, the tokens each q head attends to
    -> (B, Hq, D) in q's dtype."""
    return launch_sparse_decode(q, k, v, mask, scale)
