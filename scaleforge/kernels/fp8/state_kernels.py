"""Triton kernels of the COAT optimizer-state codec with dynamic range expansion (coat.md §2)."""

from __future__ import annotations

import triton
import triton.language as tl

# The state codec is partly compute bound. Per fp32 element the quantizer runs a log2 and an exp2 (each a
# MUFU op, 16 per clock per SM against 128 FMA-pipe ops) plus ~15 other instructions (abs, max/min
# folds and compare-select for the group reductions, the fma into exp2, sign select, clamp, fp8 pack);
# the dequantizer likewise one log2 + one exp2 + ~10. On an H200 (132 SMs, ~1.98 GHz) a 16.8M-element
# state costs ~8 us of MUFU issue and ~8 us of other issue against ~20 us of DRAM time at copy
# bandwidth (5 B/element), and each group also runs a serial chain (two reductions, then log2, a
# division, floor, two sqrt, exp2) before its first store. Only warps at other stages of that chain hide
# it, so smaller tiles (more resident programs) were faster: 2048 w4 at 50%/58% of copy bandwidth,
# 4096 w8 at 48%/53%, 16384 w16 at 36%/51% (tune_fp8.py on an H200).
@triton.jit
def _state_encode(x, qmax, target_log, expand_min):
    """Groups x [BG, GS] (fp32) -> (codes before the FP8 cast, scale, k, c) [BG] (coat.md §2)."""
    a = tl.abs(x)
    amax = tl.max(a, axis=1) + 1e-30  # RANGE_EPS
    amin = tl.min(tl.where(a > 0, a, float("inf")), axis=1)
    amin = tl.where(amin == float("inf"), 0.0, amin) + 1e-30
    log_range = tl.log2(amax / amin)
    pos = log_range > 0
    k = tl.floor(target_log / tl.where(pos, log_range, 1.0) * expand_min) / expand_min
    k = tl.where(pos, tl.maximum(k, 1.0), 1.0)
    c = tl.sqrt(amax) * tl.sqrt(amin)  # sqrt(max*min) underflows fp32 for all-zero groups
    scale = tl.exp2(k * tl.log2(amax / c)) / qmax
    # y / scale = (a/c)^k / ((amax/c)^k / qmax) = qmax (a/amax)^k: per element one log2 of a ratio <= 1
    # (a log2 of a itself would cancel catastrophically for large k) and one exp2, no divisions
    qa = tl.exp2(k[:, None] * tl.log2(a * (1.0 / amax)[:, None]) + tl.log2(qmax))
    q = tl.clamp(tl.where(x < 0, -qa, qa), -qmax, qmax)
    return q, scale, k, c


@triton.jit
def _state_decode(q, scale, k, c):
    """Codes q [BG, GS] (as fp32) and their group's scale, k, c [BG] -> the fp32 values."""
    yq = q * scale[:, None]
    x = tl.exp2(tl.log2(tl.abs(yq)) * (1.0 / k)[:, None]) * c[:, None]
    return tl.where(yq < 0, -x, x)


@triton.jit
def _state_quant_kernel(
    X, Q, SCALE, EXPAND, CENTRE, n, G, qmax, target_log, expand_min,
    GS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    qmax = tl.cast(qmax, tl.float32)  # Inductor passes Python floats as fp64
    target_log = tl.cast(target_log, tl.float32)  # Inductor passes Python floats as fp64
    expand_min = tl.cast(expand_min, tl.float32)  # Inductor passes Python floats as fp64
    BG: tl.constexpr = BLOCK // GS if BLOCK > GS else 1
    groups = tl.program_id(0).to(tl.int64) * BG + tl.arange(0, BG)
    offs = groups[:, None] * GS + tl.arange(0, GS)[None, :]
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    q, scale, k, c = _state_encode(x, qmax, target_log, expand_min)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=(groups < G)[:, None])
    gm = groups < G
    tl.store(SCALE + groups, scale, mask=gm)
    tl.store(EXPAND + groups, k, mask=gm)
    tl.store(CENTRE + groups, c, mask=gm)


@triton.jit
def _state_dequant_kernel(Q, SCALE, EXPAND, CENTRE, Y, n, G, GS: tl.constexpr, BLOCK: tl.constexpr):
    BG: tl.constexpr = BLOCK // GS if BLOCK > GS else 1
    groups = tl.program_id(0).to(tl.int64) * BG + tl.arange(0, BG)
    gm = groups < G
    offs = groups[:, None] * GS + tl.arange(0, GS)[None, :]
    m = offs < n
    q = tl.load(Q + offs, mask=m, other=0.0).to(tl.float32)
    x = _state_decode(q, tl.load(SCALE + groups, mask=gm, other=1.0), tl.load(EXPAND + groups, mask=gm, other=1.0),
                      tl.load(CENTRE + groups, mask=gm, other=1.0))
    tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _load_state(Q, SCALE, EXPAND, CENTRE, groups, offs, gm):
    q = tl.load(Q + offs, mask=gm[:, None], other=0.0).to(tl.float32)
    return _state_decode(q, tl.load(SCALE + groups, mask=gm, other=1.0), tl.load(EXPAND + groups, mask=gm, other=1.0),
                         tl.load(CENTRE + groups, mask=gm, other=1.0))


@triton.jit
def _store_state(x, Q, SCALE, EXPAND, CENTRE, groups, offs, gm, qmax, target_log, expand_min):
    q, scale, k, c = _state_encode(x, qmax, target_log, expand_min)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=gm[:, None])
    tl.store(SCALE + groups, scale, mask=gm)
    tl.store(EXPAND + groups, k, mask=gm)
    tl.store(CENTRE + groups, c, mask=gm)


@triton.jit
def _adamw_fp8_kernel(
    P, G, MQ, MS, MK, MC, VQ, VS, VK, VC, n_groups, groups_per_row, cols,
    decay, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps, qmax, target_log, expand_min,
    GS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One AdamW step of a (rows, cols) fp32 parameter whose moments are COAT FP8 states in (rows,
    groups_per_row * GS) layout: decode both moments, torch's AdamW arithmetic in fp32, encode both, in one
    pass (COAT's fused optimizer kernel): per element 4 B of parameter read and written, 4 B of gradient and
    2 x (1 + 1) B of codes, where the per-op path moves ~30 passes of fp32 temporaries."""
    BG: tl.constexpr = BLOCK // GS if BLOCK > GS else 1
    groups = tl.program_id(0).to(tl.int64) * BG + tl.arange(0, BG)
    gm = groups < n_groups
    row = groups // groups_per_row
    col = (groups % groups_per_row) * GS
    j = tl.arange(0, GS)
    pcol = col[:, None] + j[None, :]
    pmask = gm[:, None] & (pcol < cols)
    poffs = row[:, None] * cols + pcol
    soffs = groups[:, None] * GS + j[None, :]
    p = tl.load(P + poffs, mask=pmask, other=0.0).to(tl.float32)
    g = tl.load(G + poffs, mask=pmask, other=0.0).to(tl.float32)
    m = _load_state(MQ, MS, MK, MC, groups, soffs, gm)
    v = _load_state(VQ, VS, VK, VC, groups, soffs, gm)
    # torch's single-tensor AdamW: p *= 1 - lr wd; m.lerp_(g, 1 - b1) (weight < 0.5: m + w (g - m));
    # v = v b2 + (1 - b2) g g; p -= step_size m / (sqrt(v) / sqrt(bc2) + eps); the padding (g = 0, codes 0)
    # stays 0, as the per-op path's zero padding
    p = p * decay
    m = m + one_minus_b1 * (g - m)
    v = v * b2 + one_minus_b2 * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    tl.store(P + poffs, p, mask=pmask)
    _store_state(m, MQ, MS, MK, MC, groups, soffs, gm, qmax, target_log, expand_min)
    _store_state(v, VQ, VS, VK, VC, groups, soffs, gm, qmax, target_log, expand_min)
