"""Triton kernels of the fused norms: the forward (norm, adaLN modulation, gated residual, optional amax) and
the backward (dx, dresidual and per-program partials of the reduced gradients)."""

from __future__ import annotations

import triton
import triton.language as tl


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

