"""Triton kernels of the FP8 quantizers: the per-tensor amax pass, the per-tensor and per-group quantize and
dequantize kernels, and the correctly rounded division they share with fp8_linear."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale_from_amax(amax, qmax, inv_qmax, RECIP: tl.constexpr):
    """(amax + AMAX_EPS) / qmax rounded as the torch reference rounds it on this device."""
    if RECIP:
        s = (amax + 1e-10) * inv_qmax
    else:
        s = tl.math.div_rn(amax + 1e-10, qmax)
    return s


@triton.jit
def _div_rn(x, s, y):
    """x / s correctly rounded (as torch divides), given y = 1/s correctly rounded: x * y is within 1.5
    ulp; each step q - (s*q - x) * y (exact fma residual) shrinks the error, the first to under one ulp,
    the second (Markstein's theorem) to the correctly rounded quotient. Five FMAs instead of a per-element
    IEEE division (reciprocal + slow-path branch); Triton's plain `/` is div.full.f32 (2 ulp) and would
    change a few FP8 codes. The residual's sign convention keeps -0.0 negative: for x = -0.0 the residual
    is +0.0, and q + (+0.0 * -y) = -0.0 + -0.0. (Negating the residual instead needs -(+0.0) = -0.0,
    which Triton 3.6 computes as 0 - r = +0.0: every -0.0 came out +0.0.) Needs |x / s| in the fp32
    normal range wherever the FP8 rounding depends on it (true for |x / s| >= 2^-17)."""
    ny = -y  # a scale's (per tensor or per group), not per element
    q = x * y
    q = tl.fma(tl.fma(s, q, -x), ny, q)
    return tl.fma(tl.fma(s, q, -x), ny, q)

# The streaming kernels below loop `for t in range(pid, tiles, nprog)`: with one program per tile (WAVES
# 0) that is a single trip, with a persistent grid each program walks its share of the tiles.


@triton.jit
def _amax_kernel(X, AMAX, n, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVICT_FIRST: tl.constexpr):
    EVICT: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    step = nprog.to(tl.int64) * BLOCK
    # |x| and max are exact in the input dtype: half the instructions of fp32 for bf16/fp16 (packed x2)
    acc = tl.zeros([BLOCK], dtype=X.dtype.element_ty)
    if PREFETCH:
        offs0 = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x_next = tl.load(X + offs0, mask=offs0 < n, other=0.0, eviction_policy=EVICT)
    for t in range(pid, tl.cdiv(n, BLOCK), nprog):
        offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if PREFETCH:
            x = x_next
            x_next = tl.load(X + offs + step, mask=offs + step < n, other=0.0, eviction_policy=EVICT)
        else:
            x = tl.load(X + offs, mask=offs < n, other=0.0, eviction_policy=EVICT)
        # (Triton 3.6 computes bf16 max in fp32; the cast back is exact and keeps the loop type)
        acc = tl.maximum(acc, tl.abs(x)).to(acc.dtype)
    # AMAX is int32 zeros: a max over the bit patterns of non-negative floats is their float max
    amax = tl.max(acc, axis=0).to(tl.float32)
    tl.atomic_max(AMAX, amax.to(tl.int32, bitcast=True), sem="relaxed")

# Compile-time variants of the per-tensor quantizer (launch-config keys, see _cfg; tune_fp8.py times them):
# * SATFINITE: no clamp of x / s to ±qmax before the FP8 conversion (one instruction per element less),
#   as for the group quantizer: the sm_89+ conversion saturates (cvt.rn.satfinite). With the scale from
#   the amax, |x / s| <= qmax (1 + 2^-22), which rounds to ±qmax anyway (the interpreter's conversion
#   does that too). A given scale keeps the clamp of x to ±2 qmax |s| before the division (_div_rn's
#   residual of an overflowing x / s would be inf - inf: NaN), then the conversion saturates |x / s| up
#   to 2 qmax; the interpreter's does not (1.5 qmax gives 352 in E4M3, NaN in E5M2), so only a GPU
#   checks those codes. Same codes, except that a NaN element's code is NaN (as torch's) where the
#   clamps made it ±qmax: the clamp of x propagates NaN in this variant (same instruction count);
# * REVERSE: the tiles in reverse order (trip t of the tile loop takes tile tiles-1-t, for the one-tile
#   grid and the persistent one, prefetch included). The dynamic scale's amax pass reads x front to back
#   just before, so the tiles this pass reads first are the last ones the amax pass read: up to the 50
#   MB L2's worth of x (of 128 MiB for 8192^2 bf16) may still be there instead of in HBM. Needs an amax
#   config without EVICT_FIRST; pointless (and harmless) with a given scale.
@triton.jit
def _quant_tensor_kernel(
    X, Q, SRC, SCALE, n, qmax, inv_qmax, FROM_AMAX: tl.constexpr, RECIP: tl.constexpr,
    BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVICT_FIRST: tl.constexpr,
    SATFINITE: tl.constexpr = False, REVERSE: tl.constexpr = False, GIVEN_AMAX: tl.constexpr = False,
):  # fmt: skip
    # GIVEN_AMAX: SRC is an amax from x's producer, not from the amax pass over this x, so |x / s| <= qmax is
    # not guaranteed and x is clamped as for a given scale
    EVICT: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    qmax = tl.cast(qmax, tl.float32)  # Inductor passes Python floats as fp64
    inv_qmax = tl.cast(inv_qmax, tl.float32)
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    if FROM_AMAX:  # SRC: the amax pass's int32 bits, or a given fp32 amax
        s = _scale_from_amax(tl.load(SRC).to(tl.float32, bitcast=True), qmax, inv_qmax, RECIP)
    else:  # SRC: the given scale, any float dtype
        s = tl.load(SRC).to(tl.float32)
    tl.store(SCALE, s, mask=pid == 0)
    y = tl.math.div_rn(1.0, s)
    bound = 2 * qmax * tl.abs(s)
    tiles = tl.cdiv(n, BLOCK)
    # the next trip's tile is nprog tiles on (REVERSE: back); only the first one visited, the last
    # tile, can be partial, and a prefetch past either end is masked
    step = nprog.to(tl.int64) * BLOCK
    if REVERSE:
        step = -step
    if PREFETCH:
        offs0 = tl.cast(tiles - 1 - pid if REVERSE else pid, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m0 = (offs0 >= 0) & (offs0 < n) if REVERSE else offs0 < n
        x_next = tl.load(X + offs0, mask=m0, other=0.0, eviction_policy=EVICT)
    for t in range(pid, tiles, nprog):
        offs = tl.cast(tiles - 1 - t if REVERSE else t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        if PREFETCH:
            x = x_next.to(tl.float32)
            offs_n = offs + step
            m_n = offs_n >= 0 if REVERSE else offs_n < n
            x_next = tl.load(X + offs_n, mask=m_n, other=0.0, eviction_policy=EVICT)
        else:
            x = tl.load(X + offs, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
        if not FROM_AMAX or GIVEN_AMAX:  # a given scale may overflow x / s: beyond 2 qmax the code is ±qmax
            if SATFINITE:
                x = tl.clamp(x, -bound, bound, propagate_nan=tl.PropagateNan.ALL)
            else:
                x = tl.clamp(x, -bound, bound)
        q = _div_rn(x, s, y)
        if not SATFINITE:
            q = tl.clamp(q, -qmax, qmax)
        tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=m)


@triton.jit
def _dequant_tensor_kernel(Q, SCALE, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = tl.load(Q + offs, mask=m, other=0.0).to(tl.float32) * tl.load(SCALE)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _group_tile(t, G, NG, K, GS: tl.constexpr, BG: tl.constexpr, EVEN: tl.constexpr):
    """Groups g of tile t (BG of them, G in all, NG per row of length K) and their element offsets."""
    g = tl.cast(t, tl.int64) * BG + tl.arange(0, BG)
    j = tl.arange(0, GS)
    if EVEN:  # K % GS == 0: group g is elements [g*GS, (g+1)*GS), contiguous 16-byte vectors
        offs = g[:, None] * GS + j[None, :]
        m = (g < G)[:, None]
    else:  # the last group of each row is partial
        row = g // NG
        cols = ((g - row * NG) * GS)[:, None] + j[None, :]
        offs = row[:, None] * K + cols
        m = (g < G)[:, None] & (cols < K)
    return g, offs, m


@triton.jit
def _group_tile_t(t, G, NG, K, GS: tl.constexpr, BG: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    """_group_tile's groups as a [GS/C, BG, C] tile (element (a, i, c): element a*C + c of group i). The
    compiler gives threads to the last two dims (C elements each: 16 B of FP8), so with BG = 32 x warps
    every thread holds one whole group: its max is in-thread and its scale sits where the scale store
    wants it (no shuffles, no shared-memory round trip, no barrier)."""
    g = tl.cast(t, tl.int64) * BG + tl.arange(0, BG)
    j = tl.arange(0, GS // C)[:, None, None] * C + tl.arange(0, C)[None, None, :]
    if EVEN:
        offs = g[None, :, None] * GS + j
        m = (g < G)[None, :, None]
    else:
        row = g // NG
        cols = ((g - row * NG) * GS)[None, :, None] + j
        offs = row[None, :, None] * K + cols
        m = (g < G)[None, :, None] & (cols < K)
    return g, offs, m


@triton.jit
def _quant_group_tile(
    t, G, NG, K, GS: tl.constexpr, BG: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr,
    GROUP_PER_THREAD: tl.constexpr,
):  # fmt: skip
    if GROUP_PER_THREAD:
        return _group_tile_t(t, G, NG, K, GS, BG, C, EVEN)
    else:
        return _group_tile(t, G, NG, K, GS, BG, EVEN)

# Compile-time variants of the group quantizer (launch-config keys, see _cfg; tune_fp8.py times them).
# The default's sm_90 SASS for bf16, group 128, at 4096 w8: a group spans 8 lanes of 16 elements, so
# its max ends in 3 shuffle rounds, each lane computes 1/s, and the scale store takes the reduced
# values through shared memory (two barriers per tile, the layout of `S + g` is not the reduction's);
# ~15 issued instructions per element (~12 with 128 elements per thread, at 233 registers), of which
# per element proper: bf16 -> fp32 1.5, |x| max 1, the division 5, clamp 1, FP8 pack 0.5. Group 16
# at 4096 w8 (88% of copy) has one group per thread: no shuffles, no barrier.
# * GROUP_PER_THREAD: the [GS/16, BG, 16] tile of _group_tile_t, one group per thread when BLOCK =
#   32 x num_warps x GS (group 128: 4096 w1, 8192 w2, 16384 w4): ~10 instructions per element, no
#   shuffles, no shared memory, 161 registers; each warp access spans 32 lines of 128 B (group 16's,
#   8). Other BLOCKs stay correct: larger ones give a thread several groups (the scale store goes
#   through shared memory again), smaller ones split groups over lanes and warps. For group 16 the
#   default tile at BLOCK = 512 x num_warps already is this one;
# * SATFINITE: no clamp to ±qmax before the FP8 conversion (one instruction per element less): with
#   s from the group's amax, |x / s| <= qmax (1 + 2^-22), which rounds to ±qmax anyway, and the sm_89+
#   conversion saturates (cvt.rn.satfinite; the interpreter's also rounds such values to qmax). Same
#   codes, except that a NaN element's code is NaN (as torch's) where the clamp made it ±qmax.
# (The 1/s per group and the one-lane scale store are already what the default compiles to, and a
# [BG, GS/8, 8] reshape of the loaded tile with a two-step max compiles to the default's SASS: the
# reduction is in-thread first anyway. A [BG, GS/8, 8] load tile gives 8-byte FP8 stores.)
@triton.jit
def _quant_group_kernel(
    X, Q, S, G, NG, K, qmax, inv_qmax, GS: tl.constexpr, EVEN: tl.constexpr, RECIP: tl.constexpr,
    BLOCK: tl.constexpr, PREFETCH: tl.constexpr, EVICT_FIRST: tl.constexpr,
    GROUP_PER_THREAD: tl.constexpr = False, SATFINITE: tl.constexpr = False,
):  # fmt: skip
    EVICT: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    qmax = tl.cast(qmax, tl.float32)  # Inductor passes Python floats as fp64
    inv_qmax = tl.cast(inv_qmax, tl.float32)
    BG: tl.constexpr = BLOCK // GS if BLOCK > GS else 1
    C: tl.constexpr = 16 if GS > 16 else GS
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    if PREFETCH:
        _, offs0, m0 = _quant_group_tile(pid, G, NG, K, GS, BG, C, EVEN, GROUP_PER_THREAD)
        x_next = tl.load(X + offs0, mask=m0, other=0.0, eviction_policy=EVICT)
    for t in range(pid, tl.cdiv(G, BG), nprog):
        g, offs, m = _quant_group_tile(t, G, NG, K, GS, BG, C, EVEN, GROUP_PER_THREAD)
        if PREFETCH:
            x = x_next.to(tl.float32)
            _, offs_n, m_n = _quant_group_tile(t + nprog, G, NG, K, GS, BG, C, EVEN, GROUP_PER_THREAD)
            x_next = tl.load(X + offs_n, mask=m_n, other=0.0, eviction_policy=EVICT)
        else:
            x = tl.load(X + offs, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
        a = tl.abs(x)
        if GROUP_PER_THREAD:
            amax = tl.max(tl.max(a, axis=2), axis=0)
        else:
            amax = tl.max(a, axis=1)
        s = _scale_from_amax(amax.to(tl.float32), qmax, inv_qmax, RECIP)
        y = tl.math.div_rn(1.0, s)
        if GROUP_PER_THREAD:
            q = _div_rn(x, s[None, :, None], y[None, :, None])
        else:
            q = _div_rn(x, s[:, None], y[:, None])
        if not SATFINITE:
            q = tl.clamp(q, -qmax, qmax)
        tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=m)
        tl.store(S + g, s, mask=g < G)


@triton.jit
def _dequant_group_kernel(Q, S, Y, G, NG, K, GS: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    BG: tl.constexpr = BLOCK // GS if BLOCK > GS else 1
    g, offs, m = _group_tile(tl.program_id(0), G, NG, K, GS, BG, EVEN)
    s = tl.load(S + g, mask=g < G, other=0.0)
    y = tl.load(Q + offs, mask=m, other=0.0).to(tl.float32) * s[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)

