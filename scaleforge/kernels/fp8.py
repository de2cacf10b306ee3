"""FP8 quantizers (COAT activations, kernels.md §2.2) and the COAT optimizer-state codec with dynamic range
expansion (coat.md §2): Triton kernels, torch.library ops and the public functions.

The kernels are memory bound (bf16 quantize: 2 B read + 1 B written per element), so every program streams
tiles of 1k-16k contiguous elements with 16-byte accesses and a few instructions per element; the launch
configs come from a fixed table measured on an H200 (``_LAUNCH``), where the quantizers and the amax pass
can also run as a persistent grid that prefetches its next tile (see ``_cfg``):
* per tensor: one flat pass; a dynamic scale first needs an amax pass (each program's max folded into one
  int32 ``atomic_max`` on the fp32 bits), and the quantize pass turns that amax into the scale on the device
  (no host sync, no torch ops between the passes; 5 B/element move for the 3 logical ones; its own table
  entry, and it can visit the tiles in reverse to find the amax pass's last ones in L2). fp8_linear.py's
  fused quantize+transpose reads the same amax (``_amax_bits``);
* per group (1×G along the last dim, G a power of two): the tensor as rows of G elements, a program takes
  BLOCK/G whole groups, so a group's max is a row reduction; when K % G != 0 the tile indexes (row, column)
  and masks each row's partial last group (compile-time variants of the quantizer: _QUANT_GROUP_OPTS);
* state codec: the same tiling over the flattened tensor, in groups of 128.
FP8 codes equal the torch reference's bit for bit (see ``_div_rn`` and ``_scale_from_amax``).
Reference: ``reference/fp8.py`` (same formulas; COAT ``_quantize.py`` and ``fp8_adamw_expand_cuda_kernel.cu``).
"""

from __future__ import annotations

import math

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.fp8 import (
    AMAX_EPS,
    RANGE_EPS,
    FP8State,
    check_granularity,
    dequantize_fp8_ref,
    dequantize_fp8_state_ref,
    fp8_max,
    quantize_fp8_ref,
    quantize_fp8_state_ref,
)

__all__ = ["FP8State", "dequantize_fp8", "dequantize_fp8_state", "quantize_fp8", "quantize_fp8_state"]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import cdiv, kernel_op, num_sms

    def _cfg(
        block, warps, waves=0, prefetch=False, evict_first=False, *, group_per_thread=False, satfinite=False,
        reverse=False,
    ):  # fmt: skip
        """One launch config. BLOCK: elements per tile (whole groups for the group kernels); WAVES: programs
        per SM of a persistent grid that loops over the tiles (0: one program per tile); PREFETCH: a
        persistent program loads its next tile before it converts and stores the current one (two tiles
        in flight per thread); EVICT_FIRST: loads marked evict_first in L2 (data read once). The keyword
        options are compile-time variants of the quantizers (group: GROUP_PER_THREAD, SATFINITE, see
        _QUANT_GROUP_OPTS; per tensor: SATFINITE, REVERSE, see _QUANT_TENSOR_OPTS), in the dict only when
        set, so the other kernels take the same configs."""
        cfg = dict(BLOCK=block, num_warps=warps, WAVES=waves, PREFETCH=prefetch, EVICT_FIRST=evict_first)
        opts = dict(GROUP_PER_THREAD=group_per_thread, SATFINITE=satfinite, REVERSE=reverse)
        return cfg | {k: True for k, v in opts.items() if v}

    # Fixed launch configs, the fastest of the H200 sweep `benchmarks/kernels/tune_fp8.py` (8192² bf16,
    # GPU round 1; ms and % of a measured 4.22 TB/s copy). Fixed rather than autotuned: the spread between
    # the top configs is a few %, and an autotuner would re-benchmark every new shape inside training.
    # The sweep prints the entries to paste here when a variant beats these.
    _LAUNCH = {
        # per tensor: round 4 (tune_fp8.py --only tensor, CUDA graphs of 10 launches, 2026-11-30, % of a 4.22 TB/s
        # copy); the round-1 figures of the old entries (amax 16384 w16 0.0435 ms, given scale 16384 w8 0.0585 ms,
        # 82%) were eager-timed, host-bound. The dynamic pair end to end: 0.0824 ms, 58% of copy for the logical
        # 3 B/element, 96% of the 5 B it moves (the same quantize pass without REVERSE 0.0844 ms, without
        # REVERSE and SATFINITE 0.0854 ms)
        "amax": _cfg(8192, 8, 4, True),  # persistent, prefetching (alone, with evict_first: 0.0355 ms, 90%)
        # given scale: 0.0494 ms, 96% (SATFINITE at 4096 w8: 0.0486 ms, within noise; not the default, since
        # the interpreter's FP8 conversion does not saturate and the CPU tests could not check its codes)
        "quant_tensor": _cfg(16384, 8),
        # the dynamic scale's quantize pass, after "amax" on the same x: alone 0.0485 ms, 98%
        "quant_tensor_dynamic": _cfg(4096, 8, satfinite=True, reverse=True),
        "dequant_tensor": dict(BLOCK=4096, num_warps=8),  # 0.0511 ms, 93% (round 4; round 1: 0.0549 ms, 87%)
        # group quantizers: round 3 (tune_fp8.py --only quant_group, CUDA graphs): SATFINITE drops the clamp
        "quant_group/128": _cfg(4096, 4, satfinite=True),  # 0.0531 ms, 90% (clamped: 0.0591, 81%)
        "quant_group/16": _cfg(4096, 8, satfinite=True),  # 0.0530 ms, 97% (clamped: 0.0550, 93%)
        "dequant_group/128": dict(BLOCK=4096, num_warps=8),  # 0.0546 ms, 88%
        "dequant_group/16": dict(BLOCK=8192, num_warps=4),  # 0.0583 ms, 89%
        # the state codec is partly compute bound (see _state_quant_kernel): small tiles, more programs
        "state_quant": dict(BLOCK=2048, num_warps=4),  # 0.0407 ms, 50%
        "state_dequant": dict(BLOCK=2048, num_warps=4),  # 0.0350 ms, 58%
    }
    # torch divides by a Python scalar as a multiplication by its fp32 reciprocal on CUDA, exactly on CPU
    _INV_QMAX = {dt: float(torch.tensor(1.0) / fp8_max(dt)) for dt in (torch.float8_e4m3fn, torch.float8_e5m2)}

    def _config(kernel: str, group_size: int | None = None) -> dict:
        """The table's entry; a group size without one takes the 128 entry."""
        if group_size is None:
            return _LAUNCH[kernel]
        return _LAUNCH.get(f"{kernel}/{group_size}", _LAUNCH[f"{kernel}/128"])

    def _launch(kernel, cfg, tiles, device, *args, **constexprs):
        """Launch kernel with cfg over `tiles` tiles of cfg's BLOCK: one program per tile, or for the
        tile-loop kernels a persistent grid of WAVES programs per SM."""
        cfg = dict(cfg)
        waves, warps = cfg.pop("WAVES", 0), cfg.pop("num_warps")
        grid = min(tiles, waves * num_sms(device)) if waves else tiles
        torch.library.wrap_triton(kernel)[(grid,)](*args, **constexprs, **cfg, num_warps=warps)

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
    _QUANT_TENSOR_OPTS = dict(SATFINITE=False, REVERSE=False)

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

    def _group_tiles(groups, gs, block):
        return cdiv(groups, max(block // gs, 1))

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
    _QUANT_GROUP_OPTS = dict(GROUP_PER_THREAD=False, SATFINITE=False)

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

    # The state codec is partly compute bound. Per fp32 element the quantizer runs a log2 and an exp2 (each a
    # MUFU op, 16 per clock per SM against 128 FMA-pipe ops) plus ~15 other instructions (abs, max/min
    # folds and compare-select for the group reductions, the fma into exp2, sign select, clamp, fp8 pack);
    # the dequantizer likewise one log2 + one exp2 + ~10. On an H200 (132 SMs, ~1.98 GHz) a 16.8M-element
    # state costs ~8 us of MUFU issue and ~8 us of other issue against ~20 us of DRAM time at copy
    # bandwidth (5 B/element), and each group also runs a serial chain (two reductions, then log2, a
    # division, floor, two sqrt, exp2) before its first store. Only warps at other stages of that chain hide
    # it, so smaller tiles (more resident programs) were faster: 2048 w4 at 50%/58% of copy bandwidth,
    # 4096 w8 at 48%/53%, 16384 w16 at 36%/51% (round 1 sweep).
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

    def _amax_bits(x: torch.Tensor) -> torch.Tensor:
        """max|x| over the whole tensor as the int32 bits of an fp32, on the device (no host sync); the
        per-tensor quantizers here and in fp8_linear.py read their scale from it."""
        amax = torch.zeros((), dtype=torch.int32, device=x.device)
        n = x.numel()
        cfg = _config("amax")
        _launch(_amax_kernel, cfg, cdiv(n, cfg["BLOCK"]), x.device, x, amax, n)
        return amax

    @kernel_op("scaleforge::quantize_fp8_tensor")
    def _quantize_tensor(
        x: torch.Tensor, scale: torch.Tensor | None, amax: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor with a given scale, a given amax (fp32, one element, e.g. from the norm that wrote x: one
        pass, the given scale's launch config and clamps, so codes saturate should the amax be too small), or
        neither (an amax pass first)."""
        n = x.numel()
        q = _backend.new_output(x.shape, dtype, x.device)
        out_scale = _backend.new_output((), torch.float32, x.device)
        # the kernel reads the one element through the pointer (no reshape: a torch op of host time each) and
        # bitcasts an amax to fp32, which is the identity for a given fp32 amax and decodes the amax pass's bits
        src = scale if scale is not None else (amax if amax is not None else _amax_bits(x))
        dynamic = scale is None and amax is None
        cfg = _QUANT_TENSOR_OPTS | _config("quant_tensor_dynamic" if dynamic else "quant_tensor")
        _launch(
            _quant_tensor_kernel, cfg, cdiv(n, cfg["BLOCK"]), x.device,
            x, q, src, out_scale, n, fp8_max(dtype), _INV_QMAX[dtype],
            FROM_AMAX=scale is None, GIVEN_AMAX=amax is not None, RECIP=x.device.type == "cuda",
        )  # fmt: skip
        return q, out_scale

    @kernel_op("scaleforge::quantize_fp8_group")
    def _quantize_group(x: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k = x.shape[-1]
        ng = cdiv(k, group_size)
        groups = x.numel() // k * ng
        q = _backend.new_output(x.shape, dtype, x.device)
        s = _backend.new_output((*x.shape[:-1], ng), torch.float32, x.device)
        cfg = _QUANT_GROUP_OPTS | _config("quant_group", group_size)  # every option passed, set or not
        _launch(
            _quant_group_kernel, cfg, _group_tiles(groups, group_size, cfg["BLOCK"]), x.device,
            x, q, s, groups, ng, k, fp8_max(dtype), _INV_QMAX[dtype],
            GS=group_size, EVEN=k % group_size == 0, RECIP=x.device.type == "cuda",
        )  # fmt: skip
        return q, s

    @kernel_op("scaleforge::dequantize_fp8")
    def _dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
        y = _backend.new_output(q.shape, out_dtype, q.device)
        n = q.numel()
        if group_size <= 0:
            cfg = _config("dequant_tensor")
            _launch(_dequant_tensor_kernel, cfg, cdiv(n, cfg["BLOCK"]), q.device, q, scale, y, n)
            return y
        k = q.shape[-1]
        ng = scale.shape[-1]
        groups = n // k * ng
        cfg = _config("dequant_group", group_size)
        _launch(
            _dequant_group_kernel, cfg, _group_tiles(groups, group_size, cfg["BLOCK"]), q.device,
            q, scale, y, groups, ng, k, GS=group_size, EVEN=k % group_size == 0,
        )  # fmt: skip
        return y

    @kernel_op("scaleforge::quantize_fp8_state")
    def _quantize_state(
        x: torch.Tensor, group_size: int, dtype: torch.dtype, expand_min: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.numel()
        g = cdiv(n, group_size)
        qmax = fp8_max(dtype)
        q = _backend.new_output((g * group_size,), dtype, x.device)
        scale, expand, centre = (_backend.new_output((g,), torch.float32, x.device) for _ in range(3))
        cfg = _config("state_quant")
        _launch(
            _state_quant_kernel, cfg, _group_tiles(g, group_size, cfg["BLOCK"]), x.device,
            x, q, scale, expand, centre, n, g, qmax, math.log2(qmax * qmax / 2), float(expand_min), GS=group_size,
        )  # fmt: skip
        return q, scale, expand, centre

    @kernel_op("scaleforge::dequantize_fp8_state")
    def _dequantize_state(
        q: torch.Tensor, scale: torch.Tensor, expand: torch.Tensor, centre: torch.Tensor, n: int, out_dtype: torch.dtype
    ) -> torch.Tensor:
        g = scale.numel()
        gs = q.numel() // g
        y = _backend.new_output((n,), out_dtype, q.device)
        cfg = _config("state_dequant")
        _launch(
            _state_dequant_kernel, cfg, _group_tiles(g, gs, cfg["BLOCK"]), q.device,
            q, scale, expand, centre, y, n, g, GS=gs,
        )  # fmt: skip
        return y


def _checked_amax(amax: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """A given max|x| (quantize_fp8's amax, fp8_linear's x_amax), validated and detached: a statistic, no
    gradient through the scale on either backend."""
    if amax.numel() != 1 or amax.dtype != torch.float32 or amax.device != x.device:
        raise ValueError(f"{what} must be a one-element float32 tensor on x's device ({x.device}), "
                         f"got {amax.dtype} of shape {tuple(amax.shape)} on {amax.device}")  # fmt: skip
    return amax.detach()


def _pow2(group_size: int, what: str) -> None:
    if group_size & (group_size - 1):
        raise ValueError(f"{what}: the triton kernels need a power-of-two group_size (got {group_size}); use backend='torch'")


def quantize_fp8(
    x: torch.Tensor,
    granularity: str = "tensor",
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    scale: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization, per tensor or per 1×``group_size`` group along the last dim (docs/kernels.md).
    Returns ``(q, scale)`` with fp32 scales. Per tensor only: ``scale=`` quantizes with a given scale;
    ``amax=`` (an fp32 one-element tensor, max|x| as the kernel that wrote x computed it, e.g.
    ``layer_norm(..., return_amax=True)``) gives the scale ``(amax + 1e-10) / fp8_max`` without a pass over x
    to find it: one read of x instead of two, the same codes as without it when amax is max|x|."""
    check_granularity(granularity, group_size)
    fp8_max(dtype)
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"quantize_fp8: x must be a bf16/fp16/fp32 tensor, got {x.dtype}")
    if (scale is not None or amax is not None) and granularity != "tensor":
        raise ValueError("quantize_fp8: a given scale or amax is only supported for granularity='tensor'")
    if scale is not None and amax is not None:
        raise ValueError("quantize_fp8: pass a scale or an amax, not both")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"quantize_fp8: a given scale must have one element, got shape {tuple(scale.shape)}")
    if amax is not None:
        amax = _checked_amax(amax, x, "quantize_fp8: amax")
    if resolve(backend) == "torch" or x.numel() == 0:
        return quantize_fp8_ref(x, granularity, group_size, dtype, scale, amax=amax)
    check_triton_device(x)
    x = x.contiguous()
    if granularity == "tensor":
        return _quantize_tensor(x, scale, amax, dtype)
    _pow2(group_size, "quantize_fp8")
    return _quantize_group(x, group_size, dtype)


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    granularity: str | None = None,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``q * scale`` in ``out_dtype`` (granularity from scale's shape if None)."""
    if granularity is None:
        granularity = "tensor" if scale.numel() == 1 and scale.ndim <= 1 else "group"
    check_granularity(granularity, group_size)
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"dequantize_fp8: q must be an FP8 tensor, got {q.dtype}")
    if granularity == "group":
        expected = (*q.shape[:-1], -(-q.shape[-1] // group_size))
        if tuple(scale.shape) != expected:
            raise ValueError(f"dequantize_fp8: group scale has shape {tuple(scale.shape)}, expected {expected}")
    if resolve(backend) == "torch" or q.numel() == 0:
        return dequantize_fp8_ref(q, scale, granularity, group_size, out_dtype)
    check_triton_device(q)
    if granularity == "tensor":
        return _dequantize(q.contiguous(), scale.float().reshape(()), 0, out_dtype)
    _pow2(group_size, "dequantize_fp8")
    return _dequantize(q.contiguous(), scale.float().contiguous(), group_size, out_dtype)


def quantize_fp8_state(
    x: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    expand_min: int = 16,
    *,
    backend: str | None = None,
) -> FP8State:
    """COAT optimizer-state quantization with dynamic range expansion (coat.md §2; docs/kernels.md)."""
    fp8_max(dtype)
    if x.numel() == 0:
        raise ValueError("quantize_fp8_state: empty tensor")
    if resolve(backend) == "torch":
        return quantize_fp8_state_ref(x, group_size, dtype, expand_min)
    check_triton_device(x)
    _pow2(group_size, "quantize_fp8_state")
    q, scale, expand, centre = _quantize_state(x.detach().contiguous(), group_size, dtype, expand_min)
    return FP8State(q, scale, expand, centre, x.shape)


def dequantize_fp8_state(state: FP8State, out_dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> torch.Tensor:
    """Exact inverse transform of :func:`quantize_fp8_state` (up to the FP8 rounding)."""
    if resolve(backend) == "torch":
        return dequantize_fp8_state_ref(state, out_dtype)
    check_triton_device(state.q)
    n = math.prod(state.shape)
    y = _dequantize_state(state.q, state.scale, state.expand, state.sqrt_minmax, n, out_dtype)
    return y.reshape(state.shape)


del AMAX_EPS, RANGE_EPS  # documented in the kernels as literals
