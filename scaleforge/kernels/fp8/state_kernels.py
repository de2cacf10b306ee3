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
    yq = tl.load(Q + offs, mask=m, other=0.0).to(tl.float32) * tl.load(SCALE + groups, mask=gm, other=1.0)[:, None]
    inv_k = 1.0 / tl.load(EXPAND + groups, mask=gm, other=1.0)
    c = tl.load(CENTRE + groups, mask=gm, other=1.0)
    x = tl.exp2(tl.log2(tl.abs(yq)) * inv_k[:, None]) * c[:, None]
    x = tl.where(yq < 0, -x, x)
    tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=m)

