"""Fused RMSNorm / LayerNorm with adaLN modulation and a gated residual add, forward and backward.

One read of each row computes (all math fp32, I/O in the input dtype)::

    h = residual + gate * x          (only with residual; h is also returned: the new residual stream)
    y = norm(h) * weight + bias      (norm over the last dim C; RMS or mean/variance)
    y = y * (1 + scale) + shift      (adaLN modulation, sana.md §2)

``shift``/``scale``/``gate`` are per channel, per sample (B, 1, C) or per token. The backward pass
recomputes x̂ from the saved (mean, rstd) and reduces the parameter/modulation gradients with per-program
fp32 partials (summed afterwards, deterministic). Programs walk contiguous runs of [block_r, C] row tiles
inside one modulation group, so modulation/affine rows are read once per program, not once per row (see
``NormConfig``); ``benchmarks/kernels/tune_norms.py`` sweeps the launch shapes and prints the defaults table.
Reference: ``reference/norms.py``.
"""

from __future__ import annotations

import functools

import math
from typing import NamedTuple

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

__all__ = ["layer_norm", "rms_norm"]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import cached_call, cdiv, kernel_op, next_pow2, num_sms

    class NormConfig(NamedTuple):
        """Launch shape. Programs hold [block_r, C] tiles and walk a contiguous run of rows inside one modulation
        group (modulation, weight and bias rows are loaded once per program): about progs_per_sm * #SMs
        programs, or one tile per program with progs_per_sm=0 (forward only). ``split`` (forward only) holds a
        row as two power-of-two column pieces, BLOCK_A = the largest power of two <= C plus BLOCK_B = the next
        power of two >= the rest (C=2240: 2048 + 256, 2.8% of lanes masked instead of 45% with one 4096 block),
        for block_r == 1 only (row statistics are then scalars, free of register layout); the backward always
        uses one next_power_of_2(C) block (split ran 1.5-2x slower there in round 1).
        ``evict_first`` streams the read-once tensors (x, residual, dy, h) past L2.
        To keep more than one row tile's loads in flight per program: ``stages`` > 0 hands the row loop to
        Triton's software pipeliner (tl.range num_stages: the loads of later tiles go through shared memory
        as async copies); ``prefetch`` (backward only) issues the loads of the next tile (dy, h, dh, x,
        mean/rstd) before computing the current one (register double buffer)."""

        block_r: int
        num_warps: int
        split: bool = False
        progs_per_sm: int = 4
        evict_first: bool = False
        prefetch: bool = False
        stages: int = 0

    def _blocks(c: int, split: bool) -> tuple[int, int]:
        if not split or c & (c - 1) == 0:
            return next_pow2(c), 0
        a = next_pow2(c) // 2
        return a, next_pow2(c - a)

    # Defaults per case and C class: (largest C of the class, case) -> (forward, backward), the best checked
    # configs of the round-3 sweep on an H200 (benchmarks/kernels/tune_norms.py, 2026-11-29; CUDA-graph timings
    # at 8x4096x1152, 16x4096x2240 and 4x8192x4096 bf16). The pipelined row loop (stages, last field) is what
    # round 3 added: at C=2240 the backward went from 0.409 / 0.354 / 0.745 ms (layer / rms / gated residual,
    # 51-59% of copy) to 0.276 / 0.282 / 0.539 ms (74-77%), the layer_norm forward from 0.193 to 0.159 ms
    # (87%). docs/benchmarks.md has the table. Session 6 (tune_norms.py --configs, split x stages): the gated
    # residual forward at C=2240 went from r2 w8 pow2 (0.348 ms, 79%) to r1 w2 split s3 (0.302 ms, 92%).
    _DEFAULTS: dict[tuple[int, str], tuple[NormConfig, NormConfig]] = {
        (1536, "layer"): (NormConfig(1, 1, True, 16, False), NormConfig(1, 2, False, 4, False, False, 4)),
        (1536, "res"): (NormConfig(2, 4, False, 16, False, False, 3), NormConfig(1, 4, False, 4, False, False, 4)),
        (1536, "rms"): (NormConfig(1, 1, True, 16, False, False, 2), NormConfig(1, 4, False, 4, False, False, 3)),
        (3072, "layer"): (NormConfig(1, 2, True, 16, False, False, 3), NormConfig(1, 4, False, 4, False, False, 4)),
        (3072, "res"): (NormConfig(1, 2, True, 16, False, False, 3), NormConfig(1, 8, False, 4, False, False, 4)),
        (3072, "rms"): (NormConfig(1, 2, True, 16, False, False, 4), NormConfig(1, 8, False, 4, False, False, 3)),
        (4096, "layer"): (NormConfig(1, 4, False, 16, False, False, 4), NormConfig(1, 4, False, 2, False, False, 3)),
        (4096, "res"): (NormConfig(2, 8, False, 0, False), NormConfig(1, 8, False, 2, False, False, 3)),
        (4096, "rms"): (NormConfig(2, 8, False, 0, False), NormConfig(4, 16, False, 1, False, False, 2)),
    }

    @functools.lru_cache(maxsize=None)
    def _smem_budget(device_index: int) -> int:
        props = torch.cuda.get_device_properties(device_index)
        return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024

    def _fit_stages(cfg: NormConfig, tile_elems: int, streamed: list, device: torch.device) -> NormConfig:
        """cfg with no more pipeline stages than shared memory holds. The pipeliner keeps stages - 1 copies of
        every tile the row loop loads (sm_90: 4 rows x 4096 x four bf16 tensors at stages 3 asked for 262,464
        bytes of the 232,448), so the tuned bf16 defaults can overflow with fp32 inputs, per-token modulation
        or a GPU with less shared memory; those get fewer stages (none below 2). 16 KiB stay for the
        reductions' scratch."""
        if cfg.stages < 2 or device.type != "cuda":
            return cfg
        per_stage = tile_elems * sum(t.itemsize for t in streamed if t is not None) + 8 * cfg.block_r
        fit = 1 + (_smem_budget(device.index if device.index is not None else torch.cuda.current_device())
                   - 16 * 1024) // per_stage
        stages = min(cfg.stages, fit)
        return cfg._replace(stages=stages if stages >= 2 else 0)

    def _case(is_rms: bool, residual: bool) -> str:
        return "res" if residual else ("rms" if is_rms else "layer")

    def _default_config(c: int, backward: bool, case: str = "layer") -> NormConfig:
        for (c_max, name), cfgs in _DEFAULTS.items():
            if c <= c_max and name == case:
                return cfgs[backward]
        # beyond the measured classes: one row of ~16 elements per thread (up to 16 warps)
        return NormConfig(1, min(16, max(4, next_pow2(c) // 512)), False, 0 if not backward else 4)

    def _segments(m: int, cfg: NormConfig, device, grouped: list[int], backward: bool) -> tuple[int, int, int, int]:
        """(p0, nseg, chunk, s): rows form nseg segments of p0 rows inside which every per-sample modulation is
        constant; each segment is cut into s chunks of chunk rows (whole row tiles), one program per chunk."""
        if len(set(grouped)) > 1:
            raise ValueError(f"modulation tensors with different per-sample groupings {grouped} are not supported")
        p0 = grouped[0] if grouped else m
        nseg = m // p0
        if cfg.progs_per_sm == 0:
            if backward:
                raise ValueError("the backward needs progs_per_sm > 0 (it reduces per-program partials)")
            s = cdiv(p0, cfg.block_r)
        else:
            s = max(1, min(cdiv(p0, cfg.block_r), cdiv(cfg.progs_per_sm * num_sms(device), nseg)))
        chunk = cdiv(cdiv(p0, s), cfg.block_r) * cfg.block_r
        return p0, nseg, chunk, cdiv(p0, chunk)

    @triton.jit
    def _ld_raw(PTR, offs, mask, EVICT_FIRST: tl.constexpr):
        """A tile in its stored dtype; EVICT_FIRST for tensors read once (x, residual, dy, h). (A prefetched
        bf16 tile held this way takes half the registers of an fp32 one.)"""
        if EVICT_FIRST:
            v = tl.load(PTR + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            v = tl.load(PTR + offs, mask=mask, other=0.0)
        return v

    @triton.jit
    def _ld(PTR, offs, mask, EVICT_FIRST: tl.constexpr):
        """_ld_raw in fp32."""
        return _ld_raw(PTR, offs, mask, EVICT_FIRST).to(tl.float32)

    @triton.jit
    def _row_const(PTR, off, cols, C, ON: tl.constexpr, FILL: tl.constexpr):
        """A per-program row (weight, bias, per-sample modulation) as a [1, BLOCK] fp32 tile, FILL if absent."""
        if ON:
            v = tl.load(PTR + off + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        else:
            v = tl.full((1, cols.shape[0]), FILL, dtype=tl.float32)
        return v

    @triton.jit
    def _tile(rows, rmask, cols, C, FULL: tl.constexpr):
        """Offsets and mask of a [BLOCK_R, BLOCK] tile; FULL: every column is < C, so only rows are masked."""
        offs = (rows.to(tl.int64) * C)[:, None] + cols[None, :]
        if FULL:
            mask = rmask[:, None]
        else:
            mask = rmask[:, None] & (cols < C)[None, :]
        return offs, mask

    @triton.jit
    def _rsum(t, BLOCK_R: tl.constexpr):
        """Row sums of a [BLOCK_R, BLOCK] tile; one row gives a scalar. The two column pieces of a split row
        have different register layouts: [BLOCK_R] sums of both would be converted through shared memory
        (seen in the TTGIR: the compiler moved the whole 2048-column piece), a scalar has no layout."""
        if BLOCK_R == 1:
            v = tl.sum(t)
        else:
            v = tl.sum(t, axis=1)
        return v

    @triton.jit
    def _col(v, BLOCK_R: tl.constexpr):
        """A row statistic from _rsum, broadcastable against a tile."""
        if BLOCK_R == 1:
            r = v
        else:
            r = v[:, None]
        return r

    @triton.jit
    def _bwd_loads(DY, DHO, HIN, X, MEAN, RSTD, row0, i, end, cols, C,
                   HAS_DHO: tl.constexpr, HAS_X: tl.constexpr, IS_RMS: tl.constexpr, EVICT_FIRST: tl.constexpr,
                   BLOCK_R: tl.constexpr, FULL: tl.constexpr):  # fmt: skip
        """The streamed inputs of the backward tile at local row i (all masked past end): rstd, mean, h, dy,
        dh, x. Absent ones are placeholders (jit functions cannot return None), never read."""
        local = i + tl.arange(0, BLOCK_R)
        rmask = local < end
        rows = row0 + local
        offs, mask = _tile(rows, rmask, cols, C, FULL)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        mean = rstd
        if not IS_RMS:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        h = _ld_raw(HIN, offs, mask, EVICT_FIRST)
        dy = _ld_raw(DY, offs, mask, EVICT_FIRST)
        dho = h
        if HAS_DHO:
            dho = _ld_raw(DHO, offs, mask, EVICT_FIRST)
        x = h
        if HAS_X:
            x = _ld_raw(X, offs, mask, EVICT_FIRST)
        return rstd, mean, h, dy, dho, x

    @triton.jit
    def _fwd_consts(G, W, B, SH, SC, g_off, sh_off, sc_off, cols, C,
                    G_MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SH_MODE: tl.constexpr,
                    SC_MODE: tl.constexpr):  # fmt: skip
        """Per-program rows: the gate and y = x_hat * a + b with weight, bias and per-sample scale/shift folded
        in (a per-token scale comes after them, so then the per-sample shift stays apart, in sh)."""
        g = _row_const(G, g_off, cols, C, G_MODE == 2, 1.0)
        a = _row_const(W, 0, cols, C, HAS_W, 1.0)
        b = _row_const(B, 0, cols, C, HAS_B, 0.0)
        if SC_MODE == 2:
            s1 = 1.0 + _row_const(SC, sc_off, cols, C, True, 0.0)
            a = a * s1
            b = b * s1
        sh = _row_const(SH, sh_off, cols, C, SH_MODE == 2, 0.0)
        if SC_MODE != 1:
            b = b + sh
        return g, a, b, sh

    @triton.jit
    def _fwd_h(X, R, G, H, offs, mask, g, HAS_RES: tl.constexpr, G_MODE: tl.constexpr, EF: tl.constexpr):
        h = _ld(X, offs, mask, EF)
        if HAS_RES:
            if G_MODE == 1:
                h = h * _ld(G, offs, mask, False)
            if G_MODE == 2:
                h = h * g
            h = h + _ld(R, offs, mask, EF)
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        return h

    @triton.jit
    def _fwd_y(h, mean, rstd, Y, SH, SC, offs, mask, a, b, sh,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, SH_MODE: tl.constexpr, SC_MODE: tl.constexpr,
               IS_RMS: tl.constexpr):  # fmt: skip
        if IS_RMS:
            y = h * rstd
        else:
            y = (h - mean) * rstd
        if HAS_W or SC_MODE == 2:
            y = y * a
        if HAS_B or (SH_MODE == 2 and SC_MODE != 1):
            y = y + b
        if SC_MODE == 1:
            y = y * (1.0 + _ld(SC, offs, mask, False))
            if SH_MODE == 2:
                y = y + sh
        if SH_MODE == 1:
            y = y + _ld(SH, offs, mask, False)
        y = y.to(Y.dtype.element_ty)
        tl.store(Y + offs, y, mask=mask)
        return y

    @triton.jit
    def _tile_amax(acc, y, mask):
        """acc folded with max|y| over the tile's unmasked elements (masked lanes hold values computed from
        zeros, not zeros); y as stored, so the maximum is the stored tensor's. (A running max tile reduced
        once per program instead ran slower on the H200: 0.177 against 0.169 ms at 16x4096x2240, its
        registers cost more than the per-tile reduction.)"""
        return tl.maximum(acc, tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0)))

    @triton.jit(do_not_specialize=["P0", "CHUNK", "P_G", "P_SH", "P_SC"])
    def _norm_fwd_kernel(
        X, R, G, W, B, SH, SC, Y, H, MEAN, RSTD, AMAX,
        C, P0, CHUNK, P_G, P_SH, P_SC, eps,
        HAS_AMAX: tl.constexpr, HAS_RES: tl.constexpr, G_MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        SH_MODE: tl.constexpr, SC_MODE: tl.constexpr, IS_RMS: tl.constexpr, EVICT_FIRST: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, FULL_A: tl.constexpr,
        STAGES: tl.constexpr,
    ):  # fmt: skip
        # Program (sp, seg) owns rows [sp*CHUNK, (sp+1)*CHUNK) of segment seg (P0 rows inside which every
        # per-sample modulation is constant) and walks them BLOCK_R at a time.
        # modulation modes: 0 absent, 1 per token (loaded like x), 2 one row per program
        # HAS_AMAX: max|y| of the whole output into AMAX (int32 zeros; non-negative floats order as their bits),
        # one atomic per program: the amax a per-tensor FP8 quantizer of y needs, without its own pass over y
        eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64
        sp = tl.program_id(0)
        seg = tl.program_id(1).to(tl.int64)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, P0)
        g_off = (seg * P0 // P_G) * C
        sh_off = (seg * P0 // P_SH) * C
        sc_off = (seg * P0 // P_SC) * C
        cols_a = tl.arange(0, BLOCK_A)
        g_a, a_a, b_a, sh_a = _fwd_consts(G, W, B, SH, SC, g_off, sh_off, sc_off, cols_a, C,
                                          G_MODE, HAS_W, HAS_B, SH_MODE, SC_MODE)  # fmt: skip
        if BLOCK_B > 0:
            cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
            g_b, a_b, b_b, sh_b = _fwd_consts(G, W, B, SH, SC, g_off, sh_off, sc_off, cols_b, C,
                                              G_MODE, HAS_W, HAS_B, SH_MODE, SC_MODE)  # fmt: skip
        amax = tl.max(tl.zeros([BLOCK_R], dtype=tl.float32))  # an fp32 scalar 0
        # STAGES == 0 (None): no tt.num_stages attribute, the same loop as the builtin range
        for i in tl.range(start, end, BLOCK_R, num_stages=STAGES if STAGES > 0 else None):
            local = i + tl.arange(0, BLOCK_R)
            rmask = local < end
            rows = seg * P0 + local
            offs_a, mask_a = _tile(rows, rmask, cols_a, C, FULL_A)
            h_a = _fwd_h(X, R, G, H, offs_a, mask_a, g_a, HAS_RES, G_MODE, EVICT_FIRST)
            if BLOCK_B > 0:
                offs_b, mask_b = _tile(rows, rmask, cols_b, C, False)
                h_b = _fwd_h(X, R, G, H, offs_b, mask_b, g_b, HAS_RES, G_MODE, EVICT_FIRST)
            # two-pass variance from the registers (no E[h^2] - mean^2 cancellation); masked lanes hold 0
            if IS_RMS:
                ss = _rsum(h_a * h_a, BLOCK_R)
                if BLOCK_B > 0:
                    ss += _rsum(h_b * h_b, BLOCK_R)
                mean = tl.zeros_like(ss)
            else:
                s1 = _rsum(h_a, BLOCK_R)
                if BLOCK_B > 0:
                    s1 += _rsum(h_b, BLOCK_R)
                mean = s1 / C
                d_a = h_a - _col(mean, BLOCK_R)
                if not FULL_A:
                    d_a = tl.where((cols_a < C)[None, :], d_a, 0.0)
                ss = _rsum(d_a * d_a, BLOCK_R)
                if BLOCK_B > 0:
                    d_b = tl.where((cols_b < C)[None, :], h_b - _col(mean, BLOCK_R), 0.0)
                    ss += _rsum(d_b * d_b, BLOCK_R)
            rstd = 1.0 / tl.sqrt(ss / C + eps)
            y_a = _fwd_y(h_a, _col(mean, BLOCK_R), _col(rstd, BLOCK_R), Y, SH, SC, offs_a, mask_a, a_a, b_a, sh_a,
                         HAS_W, HAS_B, SH_MODE, SC_MODE, IS_RMS)  # fmt: skip
            if HAS_AMAX:
                amax = _tile_amax(amax, y_a, mask_a)
            if BLOCK_B > 0:
                y_b = _fwd_y(h_b, _col(mean, BLOCK_R), _col(rstd, BLOCK_R), Y, SH, SC, offs_b, mask_b, a_b, b_b,
                             sh_b, HAS_W, HAS_B, SH_MODE, SC_MODE, IS_RMS)  # fmt: skip
                if HAS_AMAX:
                    amax = _tile_amax(amax, y_b, mask_b)
            if BLOCK_R == 1:
                tl.store(MEAN + seg * P0 + i, mean)
                tl.store(RSTD + seg * P0 + i, rstd)
            else:
                tl.store(MEAN + rows, mean, mask=rmask)
                tl.store(RSTD + rows, rstd, mask=rmask)
        if HAS_AMAX:
            tl.atomic_max(AMAX, amax.to(tl.int32, bitcast=True), sem="relaxed")

    @triton.jit(do_not_specialize=["P0", "CHUNK", "S", "P_G", "P_SC"])
    def _norm_bwd_kernel(
        DY, DHO, HIN, X, G, W, B, SC, MEAN, RSTD,
        DX, DR, DG, DW, DB, DSH, DSC,
        C, P0, CHUNK, S, P_G, P_SC,
        HAS_DHO: tl.constexpr, HAS_RES: tl.constexpr, G_MODE: tl.constexpr, HAS_W: tl.constexpr,
        HAS_B: tl.constexpr, SH_MODE: tl.constexpr, SC_MODE: tl.constexpr, IS_RMS: tl.constexpr,
        EVICT_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
        PREFETCH: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        # Program (sp, seg) owns rows [sp*CHUNK, (sp+1)*CHUNK) of segment seg (as in the forward), walks them
        # BLOCK_R at a time and writes one fp32 partial row per reduced gradient (summed afterwards:
        # deterministic, no atomics). The partials are summed over the tile's rows every step: each thread
        # holds all BLOCK_R rows of its columns, so that is register adds, and the accumulators stay [BLOCK].
        # modes: 0 absent, 1 per-row gradient stored directly, 2 reduced into per-program partials.
        # Masked lanes: dy = 0 there, so g, the sums and every partial are 0 whatever x_hat holds.
        sp = tl.program_id(0)
        seg = tl.program_id(1).to(tl.int64)
        part = (seg * S + sp) * C
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, P0)
        cols = tl.arange(0, BLOCK)
        w = _row_const(W, 0, cols, C, HAS_W, 1.0)
        bias = _row_const(B, 0, cols, C, HAS_B, 0.0)
        s1 = 1.0 + _row_const(SC, (seg * P0 // P_SC) * C, cols, C, SC_MODE == 2, 0.0)
        gate = _row_const(G, (seg * P0 // P_G) * C, cols, C, G_MODE == 2, 1.0)
        acc_w = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_sh = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_sc = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
        # PREFETCH: one row tile is load -> two cross-warp reductions -> store, so with a single tile in flight
        # the loads' latency is exposed; the n_* tiles are loaded one iteration ahead (register double buffer).
        if PREFETCH:
            n_rstd, n_mean, n_h, n_dy, n_dho, n_x = _bwd_loads(
                DY, DHO, HIN, X, MEAN, RSTD, seg * P0, start, end, cols, C,
                HAS_DHO, G_MODE != 0, IS_RMS, EVICT_FIRST, BLOCK_R, FULL)  # fmt: skip
        # STAGES == 0 (None): no tt.num_stages attribute, the same loop as the builtin range
        for i in tl.range(start, end, BLOCK_R, num_stages=STAGES if STAGES > 0 else None):
            local = i + tl.arange(0, BLOCK_R)
            rmask = local < end
            rows = seg * P0 + local
            offs, mask = _tile(rows, rmask, cols, C, FULL)
            if PREFETCH:
                rstd, mean, h_t, dy_t, dho_t, x_t = n_rstd, n_mean, n_h, n_dy, n_dho, n_x
                n_rstd, n_mean, n_h, n_dy, n_dho, n_x = _bwd_loads(
                    DY, DHO, HIN, X, MEAN, RSTD, seg * P0, i + BLOCK_R, end, cols, C,
                    HAS_DHO, G_MODE != 0, IS_RMS, EVICT_FIRST, BLOCK_R, FULL)  # fmt: skip
                if IS_RMS:
                    xhat = h_t.to(tl.float32) * rstd[:, None]
                else:
                    xhat = (h_t.to(tl.float32) - mean[:, None]) * rstd[:, None]
                dy = dy_t.to(tl.float32)
            else:
                rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
                if IS_RMS:
                    xhat = _ld(HIN, offs, mask, EVICT_FIRST) * rstd[:, None]
                else:
                    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
                    xhat = (_ld(HIN, offs, mask, EVICT_FIRST) - mean[:, None]) * rstd[:, None]
                dy = _ld(DY, offs, mask, EVICT_FIRST)
            if SH_MODE == 1:
                tl.store(DSH + offs, dy, mask=mask)
            if SH_MODE == 2:
                acc_sh += tl.sum(dy, axis=0)
            g = dy  # becomes dL/dx_hat
            if SC_MODE != 0:
                y0 = xhat
                if HAS_W:
                    y0 = y0 * w
                if HAS_B:
                    y0 = y0 + bias
                if SC_MODE == 1:
                    tl.store(DSC + offs, dy * y0, mask=mask)
                    g = g * (1.0 + _ld(SC, offs, mask, False))
                else:
                    acc_sc += tl.sum(dy * y0, axis=0)
                    g = g * s1
            if HAS_B:
                acc_b += tl.sum(g, axis=0)
            if HAS_W:
                acc_w += tl.sum(g * xhat, axis=0)
                g = g * w
            c1 = tl.sum(xhat * g, axis=1) / C
            if IS_RMS:
                dh = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / C
                dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DHO:
                if PREFETCH:
                    dh += dho_t.to(tl.float32)
                else:
                    dh += _ld(DHO, offs, mask, EVICT_FIRST)
            if HAS_RES:
                tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=mask)
            if G_MODE != 0:
                if PREFETCH:
                    x = x_t.to(tl.float32)
                else:
                    x = _ld(X, offs, mask, EVICT_FIRST)
                if G_MODE == 1:
                    tl.store(DG + offs, dh * x, mask=mask)
                    dh = dh * _ld(G, offs, mask, False)
                else:
                    acc_g += tl.sum(dh * x, axis=0)
                    dh = dh * gate
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        cmask = cols < C
        if HAS_W:
            tl.store(DW + part + cols, acc_w, mask=cmask)
        if HAS_B:
            tl.store(DB + part + cols, acc_b, mask=cmask)
        if SH_MODE == 2:
            tl.store(DSH + part + cols, acc_sh, mask=cmask)
        if SC_MODE == 2:
            tl.store(DSC + part + cols, acc_sc, mask=cmask)
        if G_MODE == 2:
            tl.store(DG + part + cols, acc_g, mask=cmask)

    def _empty(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)

    def _mode(p: int, present: bool) -> int:
        return 0 if not present else (1 if p == 1 else 2)

    def _grouped(m: int, *mods: tuple[int, bool]) -> list[int]:
        return [p for p, on in mods if on and 1 < p < m]

    # The launch plans (grid, scalar arguments, compile-time flags) depend only on shapes, dtypes, the
    # modulation layout, the device and the config, so they are cached: the eager path runs per call only
    # the allocations and the launch (computed per call they were ~40 us of host time, mostly triton.cdiv).
    @functools.lru_cache(maxsize=1024)
    def _fwd_plan(m, c, cfg: NormConfig, is_rms, has_res, p_gate, p_shift, p_scale, dtypes, device):
        """dtypes: x, residual, gate, weight, bias, shift, scale (None where absent)."""
        x_dt, r_dt, g_dt, w_dt, b_dt, sh_dt, sc_dt = dtypes
        grouped = _grouped(m, (p_gate, g_dt is not None), (p_shift, sh_dt is not None), (p_scale, sc_dt is not None))
        p0, nseg, chunk, s = _segments(m, cfg, device, grouped, backward=False)
        if cfg.split and cfg.block_r > 1:
            raise ValueError("split needs block_r == 1: the two column pieces of a multi-row tile have different "
                             "register layouts, and the compiler converts a whole piece through shared memory")
        block_a, block_b = _blocks(c, cfg.split)
        per_token = [dt for dt, p in ((g_dt, p_gate), (sh_dt, p_shift), (sc_dt, p_scale)) if dt is not None and p == 1]
        cfg = _fit_stages(cfg, cfg.block_r * (block_a + block_b), [x_dt, r_dt, *per_token], device)
        meta = dict(
            C=c, P0=p0, CHUNK=chunk, P_G=max(p_gate, 1), P_SH=max(p_shift, 1), P_SC=max(p_scale, 1),
            HAS_RES=has_res, G_MODE=_mode(p_gate, g_dt is not None), HAS_W=w_dt is not None,
            HAS_B=b_dt is not None, SH_MODE=_mode(p_shift, sh_dt is not None),
            SC_MODE=_mode(p_scale, sc_dt is not None), IS_RMS=is_rms, EVICT_FIRST=cfg.evict_first,
            BLOCK_R=cfg.block_r, BLOCK_A=block_a, BLOCK_B=block_b, FULL_A=block_a <= c, STAGES=cfg.stages,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return (s, nseg), meta

    def _dtype(t: torch.Tensor | None):
        return None if t is None else t.dtype

    def norm_fwd_impl(x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms,
                      want_amax=False, cfg: NormConfig | None = None):  # fmt: skip
        """The forward launch (also called directly, with explicit configs, by benchmarks/kernels/tune_norms.py)
        -> y, h, mean, rstd, amax (want_amax: max|y| as the int32 bits of an fp32 0-d tensor, else empty)."""
        c = x.shape[-1]
        m = x.numel() // c
        cfg = cfg or _default_config(c, False, _case(is_rms, residual is not None))
        dtypes = tuple(map(_dtype, (x, residual, gate, weight, bias, shift, scale)))
        grid, meta = cached_call(_fwd_plan, m, c, cfg, is_rms, residual is not None, p_gate, p_shift, p_scale, dtypes,
                                 x.device)  # fmt: skip
        y = _backend.new_output(x.shape, x.dtype, x.device)
        h = _backend.new_output(x.shape, x.dtype, x.device) if residual is not None else _empty(x)
        mean = _backend.new_output((m,), torch.float32, x.device)
        rstd = _backend.new_output((m,), torch.float32, x.device)
        amax = torch.zeros((), dtype=torch.int32, device=x.device) if want_amax else _empty(mean)
        dummy = x
        torch.library.wrap_triton(_norm_fwd_kernel)[grid](
            x, dummy if residual is None else residual, dummy if gate is None else gate,
            dummy if weight is None else weight, dummy if bias is None else bias,
            dummy if shift is None else shift, dummy if scale is None else scale,
            y, dummy if residual is None else h, mean, rstd, amax if want_amax else mean, eps=eps,
            HAS_AMAX=want_amax, **meta,
        )  # fmt: skip
        return y, h, mean, rstd, amax

    @kernel_op("scaleforge::norm_fwd")
    def _norm_fwd(
        x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
        bias: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None,
        p_gate: int, p_shift: int, p_scale: int, eps: float, is_rms: bool, want_amax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return norm_fwd_impl(x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms,
                             want_amax)  # fmt: skip

    @functools.lru_cache(maxsize=1024)
    def _bwd_plan(m, c, cfg: NormConfig, is_rms, has_res, has_dho, p_gate, p_shift, p_scale, dtypes, device):
        """dtypes: dy, dh_out, h_in, x, gate, weight, bias, scale (None where absent; has_shift via p_shift)."""
        dy_dt, dho_dt, h_dt, x_dt, g_dt, w_dt, b_dt, sc_dt = dtypes
        if cfg.split:
            raise ValueError("the backward has no split column layout")
        has_shift = p_shift > 0
        grouped = _grouped(m, (p_gate, g_dt is not None), (p_shift, has_shift), (p_scale, sc_dt is not None))
        p0, nseg, chunk, s = _segments(m, cfg, device, grouped, backward=True)
        g_mode, sh_mode, sc_mode = _mode(p_gate, g_dt is not None), _mode(p_shift, has_shift), _mode(p_scale, sc_dt is not None)
        block = next_pow2(c)
        per_token = [dt for dt, mode in ((g_dt, g_mode), (sc_dt, sc_mode)) if dt is not None and mode == 1]
        cfg = _fit_stages(cfg, cfg.block_r * block, [dy_dt, dho_dt, h_dt, x_dt if g_dt is not None else None, *per_token],
                          device)  # fmt: skip
        meta = dict(
            C=c, P0=p0, CHUNK=chunk, S=s, P_G=max(p_gate, 1), P_SC=max(p_scale, 1),
            HAS_DHO=has_dho, HAS_RES=has_res, G_MODE=g_mode, HAS_W=w_dt is not None,
            HAS_B=b_dt is not None, SH_MODE=sh_mode, SC_MODE=sc_mode, IS_RMS=is_rms, EVICT_FIRST=cfg.evict_first,
            BLOCK_R=cfg.block_r, BLOCK=block, FULL=block == c, PREFETCH=cfg.prefetch, STAGES=cfg.stages,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return (s, nseg), meta

    def _bwd_launch(dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd,
                    has_res, has_shift, p_gate, p_shift, p_scale, is_rms, cfg: NormConfig | None = None):  # fmt: skip
        """The backward kernel. Tensors are contiguous, any shape with C = the last dim (the kernel reads rows of
        C). -> dx, dr (dy's dtype), the (per-sample, per-channel) fp32 partial stacks, their names, the per-token
        gradients (each in its tensor's dtype, shift's in dy's), and the segment count and programs per segment.

        The reduced gradients' per-program partials go into one stack per reduction, so each takes one torch
        sum, not one per gradient: per-sample modulation (summed over the programs of each segment) and
        per-channel parameters / modulation (summed over all programs)."""
        c = h_in.shape[-1]
        m = h_in.numel() // c
        cfg = cfg or _default_config(c, True, _case(is_rms, has_res))
        p_shift = p_shift if has_shift else 0
        dtypes = tuple(map(_dtype, (dy, dh_out, h_in, x, gate, weight, bias, scale)))
        grid, meta = cached_call(_bwd_plan, m, c, cfg, is_rms, has_res, dh_out is not None, p_gate, p_shift, p_scale,
                                 dtypes, h_in.device)  # fmt: skip
        s, nseg = grid
        modes = {"gate": (meta["G_MODE"], gate), "shift": (meta["SH_MODE"], dy), "scale": (meta["SC_MODE"], scale)}
        present = dict(gate=gate is not None, shift=has_shift, scale=scale is not None, weight=weight is not None,
                       bias=bias is not None)  # fmt: skip
        per_sample, per_channel = _stack_names(m, present, dict(gate=p_gate, shift=p_shift, scale=p_scale))
        parts = [_backend.new_output((len(names), nseg * s, c), torch.float32, dy.device) if names else None
                 for names in (per_sample, per_channel)]  # fmt: skip
        dx = _backend.new_output(h_in.shape, dy.dtype, dy.device)
        out = {"dr": _backend.new_output(h_in.shape, dy.dtype, dy.device) if has_res else dx}
        for names, stack in zip((per_sample, per_channel), parts):
            out.update({k: stack[i] for i, k in enumerate(names)})
        # per-token gradients are stored by the kernel in their tensor's dtype (shift: dy's, it is not passed)
        per_token = {k: _backend.new_output(h_in.shape, like.dtype, dy.device) for k, (mode, like) in modes.items()
                     if mode == 1}  # fmt: skip
        out.update(per_token)
        torch.library.wrap_triton(_norm_bwd_kernel)[grid](
            dy, dy if dh_out is None else dh_out, h_in, h_in if x is None else x, h_in if gate is None else gate,
            h_in if weight is None else weight, h_in if bias is None else bias, h_in if scale is None else scale,
            mean, rstd, dx, out["dr"], *(out.get(k, dx) for k in ("gate", "weight", "bias", "shift", "scale")),
            **meta,
        )  # fmt: skip
        return dx, out["dr"] if has_res else None, parts, (per_sample, per_channel), per_token, nseg, s

    def _reduce_partials(parts, nseg, s, c):
        """(per-sample stack (k, P, C), per-channel stack (k, P, C)) -> (k, nseg, C) and (k, C) fp32 sums."""
        ps, pc = parts
        return (None if ps is None else ps.view(-1, nseg, s, c).sum(2), None if pc is None else pc.sum(1))

    def norm_bwd_impl(dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd,
                      has_res, has_shift, p_gate, p_shift, p_scale, is_rms, cfg: NormConfig | None = None):  # fmt: skip
        """The backward launch plus the sums of the partials: [dx, dr, dg, dw, db, dsh, dsc] (empty where absent;
        dx, dr in dy's dtype, per-token gradients in their tensor's dtype, reduced ones fp32: (nseg, C) per
        sample, (1, C) per channel, weight and bias (C,)); called with explicit configs by
        benchmarks/kernels/tune_norms.py and the tests."""
        c = h_in.shape[-1]
        dx, dr, parts, (ps_names, pc_names), per_token, nseg, s = _bwd_launch(
            dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd, has_res, has_shift, p_gate, p_shift, p_scale,
            is_rms, cfg)  # fmt: skip
        sums = _reduce_partials(parts, nseg, s, c)
        got = dict(per_token)
        for names, total in zip((ps_names, pc_names), sums):
            got.update({k: total[i] for i, k in enumerate(names)})
        got = {k: (v.unsqueeze(0) if v.ndim == 1 and k not in ("weight", "bias") else v) for k, v in got.items()}
        outs = [dx, dr] + [got.get(k) for k in ("gate", "weight", "bias", "shift", "scale")]
        return [_empty(dy) if t is None else t for t in outs]

    @kernel_op("scaleforge::norm_bwd")
    def _norm_bwd(
        dy: torch.Tensor, dh_out: torch.Tensor | None, h_in: torch.Tensor, x: torch.Tensor | None,
        gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
        scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
        has_res: bool, has_shift: bool, p_gate: int, p_shift: int, p_scale: int, is_rms: bool,
    ) -> list[torch.Tensor]:  # fmt: skip
        """-> [dx, dr, per-sample sums (k, nseg, C), per-channel sums (k, C), per-token dgate, dshift, dscale]
        (empty where absent; separate tensors: a custom op's outputs may not alias each other). The order of the
        stacked gradients is _stack_names'."""
        c = h_in.shape[-1]
        dx, dr, parts, _, per_token, nseg, s = _bwd_launch(
            dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd, has_res, has_shift, p_gate, p_shift, p_scale,
            is_rms)  # fmt: skip
        ps, pc = _reduce_partials(parts, nseg, s, c)
        outs = [dx, dr, ps, pc] + [per_token.get(k) for k in ("gate", "shift", "scale")]
        return [_empty(dy) if t is None else t for t in outs]  # distinct empties: no aliasing outputs

    def _stack_names(m, present, p):
        """Names of the per-sample and the per-channel partial stacks, in stack order (_bwd_launch allocates them,
        _norm_backward unpacks the op's sums). present: dict over gate, shift, scale, weight, bias; p: rows of x
        per modulation row, dict over gate, shift, scale (1: per token, not stacked)."""
        mods = [k for k in ("gate", "shift", "scale") if present[k] and p[k] != 1]
        return ([k for k in mods if p[k] < m],
                [k for k in ("weight", "bias") if present[k]] + [k for k in mods if p[k] >= m])

    def _norm_setup_context(ctx, inputs, output):
        x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms, _ = inputs
        _, h, mean, rstd, _ = output
        has_res = residual is not None
        ctx.save_for_backward(h if has_res else x, x if gate is not None else None, gate, weight, bias, scale, mean, rstd)
        ctx.meta = (has_res, shift is not None, p_gate, p_shift, p_scale, is_rms)
        ctx.shapes = {k: None if t is None else (t.shape, t.dtype) for k, t in
                      (("gate", gate), ("weight", weight), ("bias", bias), ("shift", shift), ("scale", scale))}

    def _norm_backward(ctx, dy, dh, _dmean, _drstd, _damax):
        h_in, x, gate, weight, bias, scale, mean, rstd = ctx.saved_tensors
        has_res, has_shift, p_gate, p_shift, p_scale, is_rms = ctx.meta
        if dy is None:  # only h was used (the eager path does not materialize unused gradients)
            dy = torch.zeros_like(h_in)
        # gradients may arrive as views with zero strides (the backward of .sum() expands a scalar); the
        # kernel reads rows contiguously
        dh2 = dh.contiguous() if (has_res and dh is not None) else None
        dx, dr, ps, pc, *per_token = _norm_bwd(
            dy.contiguous(), dh2, h_in, x, gate, weight, bias, scale, mean, rstd,
            has_res, has_shift, p_gate, p_shift, p_scale, is_rms,
        )  # fmt: skip
        shapes = ctx.shapes
        grads = dict(zip(("gate", "shift", "scale"), per_token))
        m = h_in.numel() // h_in.shape[-1]
        present = {k: v is not None for k, v in shapes.items()}
        ps_names, pc_names = _stack_names(m, present, dict(gate=p_gate, shift=p_shift, scale=p_scale))
        for names, total in zip((ps_names, pc_names), (ps, pc)):
            if not names:
                continue
            dts = {shapes[k][1] for k in names}
            if len(dts) == 1:  # one cast for the stack
                total = total.to(dts.pop())
            # the gradients of one stack are views of one buffer (the autograd engine keeps them as .grad): no
            # copy per gradient, which is what the stacks save
            grads.update({k: total[i] for i, k in enumerate(names)})
        out = [None if shapes[k] is None else grads[k].reshape(shapes[k][0]).to(shapes[k][1])
               for k in ("gate", "weight", "bias", "shift", "scale")]
        dgate, dw, db, dshift, dscale = out
        return dx, dr if has_res else None, dgate, dw, db, dshift, dscale, None, None, None, None, None, None

    # mean and rstd are saved for backward, amax is a statistic: not differentiable outputs
    _norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context, non_differentiable=(2, 3, 4))


@functools.lru_cache(maxsize=1024)
def _mod_layout(t_shape: tuple, x_shape: tuple, name: str) -> int:
    """Rows of x (viewed as (M, C)) per row of a modulation tensor of shape t_shape: M for per channel (C,),
    N for per sample (B, 1, C) / (B, C), 1 per token; a ValueError naming the tensor otherwise."""
    c = x_shape[-1]
    m = math.prod(x_shape) // c
    if t_shape[-1] != c:
        raise ValueError(f"{name} has shape {t_shape}; its last dim must be C = {c}")
    if math.prod(t_shape) == c:
        return m
    shape = t_shape
    if len(shape) == 2 and len(x_shape) == 3:
        if shape[0] != x_shape[0]:
            raise ValueError(f"2-D {name} {shape} for x {x_shape} must be (B, C) per sample")
        shape = (shape[0], 1, c)  # (B, C) modulation for (B, N, C) tokens
    shape = (1,) * (len(x_shape) - len(shape)) + shape
    for j in range(len(x_shape) - 1, -1, -1):
        if shape[:j] == x_shape[:j] and all(s == 1 for s in shape[j:-1]):
            return m // math.prod(x_shape[:j])
    raise ValueError(
        f"{name} of shape {t_shape} does not broadcast against x {x_shape} as a per-channel "
        "(C,), per-sample (B, 1, C) / (B, C) or per-token tensor"
    )


def _mod_rows(t: torch.Tensor | None, x: torch.Tensor, name: str) -> int:
    if t is None:
        return 0
    return cached_call(_mod_layout, tuple(t.shape), tuple(x.shape), name)


def _with_amax(out, return_amax: bool, amax: torch.Tensor | None = None):
    """The public return: y or (y, h), with max|y| (an fp32 0-d tensor) appended when asked for: the kernel's
    amax, or computed here from y (the torch reference path)."""
    if not return_amax:
        return out
    if amax is None:
        y = (out[0] if isinstance(out, tuple) else out).detach()
        amax = y.abs().amax().float() if y.numel() else y.new_zeros((), dtype=torch.float32)
    return (*out, amax) if isinstance(out, tuple) else (out, amax)


def _norm(x, weight, bias, eps, shift, scale, residual, gate, is_rms, return_amax):
    c = x.shape[-1]
    if weight is not None and weight.shape != (c,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({c},)")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({c},)")
    if gate is not None and residual is None:
        raise ValueError("gate is only used with residual (h = residual + gate * x)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_triton_device(x)
    p_gate, p_shift, p_scale = _mod_rows(gate, x, "gate"), _mod_rows(shift, x, "shift"), _mod_rows(scale, x, "scale")
    if x.numel() == 0:  # no rows to launch over (the launch plan divides by the row count)
        ref = rms_norm_ref(x, weight, eps, shift=shift, scale=scale, residual=residual, gate=gate) if is_rms else \
            layer_norm_ref(x, weight, bias, eps, shift=shift, scale=scale, residual=residual, gate=gate)  # fmt: skip
        return _with_amax(ref, return_amax)
    # the kernels read every tensor as rows of C through its pointer, so the tensors go in with their own
    # shapes (a reshape here would add a view node per tensor to the autograd graph; outputs come back shaped
    # like x); per-sample modulation (B, 1, C) is the same memory as (B, C)
    y, h, _, _, amax = _norm_fwd(
        x.contiguous(), _contig(residual), _contig(gate), _contig(weight), _contig(bias),
        _contig(shift), _contig(scale), p_gate, p_shift, p_scale, float(eps), is_rms, bool(return_amax),
    )  # fmt: skip
    # amax: the kernel's int32 bits of max|y| (empty unless asked for)
    return _with_amax(y if residual is None else (y, h), return_amax, amax.view(torch.float32))


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    return_amax: bool = False,
    backend: str | None = None,
):
    """RMSNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given; ``return_amax`` appends max|y| as an fp32 0-d tensor,
    computed by the kernel as it writes y (no pass of its own): the amax that ``quantize_fp8(y, "tensor",
    amax=...)`` and ``fp8_linear(y, w, x_amax=...)`` take to quantize y per tensor in one pass (COAT's
    producer-fused scaling, coat.md §3)."""
    if resolve(backend) == "torch":
        ref = rms_norm_ref(x, weight, eps, shift=shift, scale=scale, residual=residual, gate=gate)
        return _with_amax(ref, return_amax)
    return _norm(x, weight, None, eps, shift, scale, residual, gate, True, return_amax)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    return_amax: bool = False,
    backend: str | None = None,
):
    """LayerNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given; ``return_amax`` appends max|y| as an fp32 0-d tensor,
    computed by the kernel as it writes y (no pass of its own): the amax that ``quantize_fp8(y, "tensor",
    amax=...)`` and ``fp8_linear(y, w, x_amax=...)`` take to quantize y per tensor in one pass (COAT's
    producer-fused scaling, coat.md §3)."""
    if resolve(backend) == "torch":
        ref = layer_norm_ref(x, weight, bias, eps, shift=shift, scale=scale, residual=residual, gate=gate)
        return _with_amax(ref, return_amax)
    return _norm(x, weight, bias, eps, shift, scale, residual, gate, False, return_amax)
