"""Triton kernels of the sparse-attention family: variable-block-sparse flash attention (forward), the
k-means assignment step, the sort-free top-p threshold (binary search), and Twilight's INT4 score estimate and
sparse decode attention over selected tokens."""

from __future__ import annotations

import triton
import triton.language as tl

from scaleforge.kernels._triton_utils import dot_f32acc


@triton.jit
def _lane_keys(cum, KDELTA, KTILE_C0, BITS, row, v0, lanes, vmask, CK, NKT, NW,
               BLOCK_N: tl.constexpr, LOOKUP_BITS: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    # Key positions of the BLOCK_N lanes of the virtual key tile starting at v0 (a multiple of 16): lane v
    # belongs to selected cluster c = max{i: KCUM[i] <= v}, its key is v + KDELTA[c]. The tile's first
    # cluster comes from KTILE_C0 (one entry per 16 virtual positions). LOOKUP_BITS: the clusters starting
    # inside the tile are read from a bitmap of cluster starts and counted by a prefix sum over the lanes
    # (BLOCK_N work); otherwise each lane counts the next BLOCK_N cluster starts <= v (BLOCK_N² compares;
    # a selected cluster holds >= 1 key, so no tile crosses more). MASKED: lanes past vmask hold no key.
    vs = v0 + lanes
    c0 = tl.load(KTILE_C0 + row * NKT + v0 // 16)
    if LOOKUP_BITS:
        if MASKED:
            word = tl.load(BITS + row * NW + vs // 32, mask=vmask, other=0)
        else:
            word = tl.load(BITS + row * NW + vs // 32)
        start = ((word >> (vs % 32)) & 1) * (lanes > 0)
        c = c0 + tl.cumsum(start, axis=0)
    else:
        nxt = c0 + 1 + lanes
        starts = tl.load(cum + nxt, mask=nxt <= CK, other=2147483647)
        c = c0 + tl.sum((starts[None, :] <= vs[:, None]).to(tl.int32), axis=1)
    if MASKED:
        return vs + tl.load(KDELTA + row * CK + c, mask=vmask, other=0)
    return vs + tl.load(KDELTA + row * CK + c)


@triton.jit
def _token_keys(KPERM, bh, SK, cols, vmask, PERM: tl.constexpr, MASKED: tl.constexpr):
    # positions in the cluster order -> token positions (PERM), or the same positions
    if PERM:
        if MASKED:
            return tl.load(KPERM + bh * SK + cols, mask=vmask, other=0)
        return tl.load(KPERM + bh * SK + cols)
    return cols


@triton.jit
def _tile_keys(src, cum, KDELTA, KTILE_C0, BITS, KPERM, row, bh, v0, lanes, vmask, CK, NKT, NW, SK,
               BLOCK_N: tl.constexpr, LOOKUP_BITS: tl.constexpr, KIDX_TABLE: tl.constexpr, PERM: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    # (positions in the cluster order, token positions) of the lanes of the virtual key tile at v0. KIDX_TABLE:
    # one contiguous load from the row's key index table src, which holds token positions, or, causal with
    # permutations, cluster-order positions (the causal test compares those) mapped through KPERM here;
    # otherwise each lane looks up its cluster. Without CAUSAL the first value is not used.
    if KIDX_TABLE:
        if MASKED:
            cols = tl.load(src + v0 + lanes, mask=vmask, other=0)
        else:
            cols = tl.load(src + v0 + lanes)
        if CAUSAL:
            return cols, _token_keys(KPERM, bh, SK, cols, vmask, PERM, MASKED)
        return cols, cols
    cols = _lane_keys(cum, KDELTA, KTILE_C0, BITS, row, v0, lanes, vmask, CK, NKT, NW, BLOCK_N, LOOKUP_BITS, MASKED)
    return cols, _token_keys(KPERM, bh, SK, cols, vmask, PERM, MASKED)


@triton.jit
def _load_kv(kbase, vbase, cols, sks, svs, dcols, dmask, IDX64: tl.constexpr, HEAD_PAD: tl.constexpr):
    # the K and V rows of one full key tile (every lane a key)
    cols_o = cols.to(tl.int64) if IDX64 else cols
    if HEAD_PAD:
        k = tl.load(kbase + cols_o[:, None] * sks + dcols[None, :], mask=dmask[None, :], other=0.0)
        v = tl.load(vbase + cols_o[:, None] * svs + dcols[None, :], mask=dmask[None, :], other=0.0)
    else:
        k = tl.load(kbase + cols_o[:, None] * sks + dcols[None, :])
        v = tl.load(vbase + cols_o[:, None] * svs + dcols[None, :])
    return k, v


@triton.jit
def _full_tile(q, k, v, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    # one online-softmax step over a full key tile: every score finite, so no masking
    s = dot_f32acc(q, tl.trans(k), PREC) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot_f32acc(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def _key_index_kernel(KCUM, KDELTA, KTILE_C0, KPERM, KIDX, CQ, CK, NKT, SK, BLOCK: tl.constexpr,
                      PERM: tl.constexpr):  # fmt: skip
    # One program per (merged query-cluster row, BLOCK virtual key positions; rows on the grid's first axis,
    # which has no 65,535 limit): KIDX[row, v] = the key of virtual position v, through KPERM with PERM. Only
    # positions below the row's key count are written, and nothing for a row that selects every key (the
    # attention kernel reads the identity or KPERM for it). A lane's cluster: the one at its 16-aligned
    # position (KTILE_C0) plus the starts among the next 15 clusters that are <= v (a selected cluster holds
    # >= 1 key, so 16 positions cross at most 15 starts), by a 4-step binary search on KCUM.
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    cum = KCUM + row * (CK + 1)
    n = tl.load(cum + CK)
    if (pid * BLOCK < n) & (n < SK):
        vs = pid * BLOCK + tl.arange(0, BLOCK)
        vmask = vs < n
        c = tl.load(KTILE_C0 + row * NKT + vs // 16, mask=vmask, other=0)
        for step in tl.static_range(4):
            nxt = c + (8 >> step)
            start = tl.load(cum + nxt, mask=vmask & (nxt <= CK), other=2147483647)
            c = tl.where(start <= vs, nxt, c)
        keys = vs + tl.load(KDELTA + row * CK + c, mask=vmask, other=0)
        if PERM:
            keys = tl.load(KPERM + (row // CQ) * SK + keys, mask=vmask, other=0)
        tl.store(KIDX + row * SK + vs, keys, mask=vmask)


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, TILE_CL, TILE_START, Q_OFF, KCUM, KDELTA, KTILE_C0, BITS, QPERM, KPERM, KIDX, KFULL,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    H, D, CQ, CK, T, NKT, NW, SQ, SK, sfull, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, STAGES: tl.constexpr, LOOKUP_BITS: tl.constexpr, IDX64: tl.constexpr,
    HEAD_PAD: tl.constexpr, PREFETCH: tl.constexpr, PERM: tl.constexpr, KIDX_TABLE: tl.constexpr,
):  # fmt: skip
    # One program per (query tile, batch*head). A query tile is BLOCK_M rows of one query cluster (the tile
    # table maps program -> cluster and first row; -1 marks unused programs of the upper-bound grid). The key
    # clusters the block map selects for that cluster, laid end to end, form one virtual key sequence of
    # KCUM[CK] tokens; it is walked in full BLOCK_N tiles with the online softmax of flash attention, so a
    # tile spans several small clusters instead of being padded to each cluster's end (SVG2's clusters
    # average ~33 keys). The full tiles of a non-causal call need no masking (every lane is a key, every row
    # sees it): only the last, partial tile and causal tiles are masked. Loads do not depend on the previous
    # iteration, so each loop is software-pipelined over STAGES iterations. Rows that see no key give 0.
    # Softmax in base 2 (the scale folded with log2 e), normalized once at the end. HEAD_PAD (D < BLOCK_D)
    # masks the head dim; without it the loads carry no column mask, so they stay 16-byte vectors, which
    # Triton needs to make them asynchronous copies and pipeline them. PERM: q, k, v and the output are in
    # token order and QPERM / KPERM (B*H, S) give the cluster order: a tile reads its rows and keys through
    # them and writes its rows back in place, so nothing is permuted or un-permuted in memory (positions in
    # the cluster order, as the tables and the causal test use, map to token positions only at the loads).
    # KIDX_TABLE: a tile's keys come from the row's slice of the key index table KIDX (B*H*CQ, SK), one
    # contiguous load, instead of the per-lane cluster lookup; a row that selects every key reads KFULL
    # (the identity or KPERM, row stride sfull) instead, which nobody had to write.
    qk_scale = tl.cast(scale, tl.float32) * 1.4426950408889634  # Inductor passes Python floats as fp64
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cl = tl.load(TILE_CL + bh * T + t)
    valid = cl >= 0
    cl = tl.maximum(cl, 0)
    q0 = tl.load(TILE_START + bh * T + t)
    q_end = tl.where(valid, tl.load(Q_OFF + bh * (CQ + 1) + cl + 1), 0)  # an unused program: no rows
    rows = q0 + tl.arange(0, BLOCK_M)
    rmask = rows < q_end
    dcols = tl.arange(0, BLOCK_D)
    dmask = (dcols < D) if HEAD_PAD else dcols >= 0
    # per-element offsets in int32 unless a tensor is too large for them (IDX64); the bases are int64
    if PERM:
        rows_t = tl.load(QPERM + bh * SQ + rows, mask=rmask, other=0)
    else:
        rows_t = rows
    rows_o = rows_t.to(tl.int64) if IDX64 else rows_t
    q = tl.load(Q + b * sqb + h * sqh + rows_o[:, None] * sqs + dcols[None, :],
                mask=(rmask[:, None] & dmask[None, :]) if HEAD_PAD else rmask[:, None], other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = bh * CQ + cl
    cum = KCUM + row * (CK + 1)
    n_keys = tl.where(valid, tl.load(cum + CK), 0)
    src = KIDX
    if KIDX_TABLE:
        src = tl.where(n_keys == SK, KFULL + bh * sfull, KIDX + row * SK)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    lanes = tl.arange(0, BLOCK_N)
    full = lanes < BLOCK_N
    n_full = 0 if CAUSAL else n_keys // BLOCK_N
    if PREFETCH:
        # the next tile's K / V loads issued before this tile's math, so their latency overlaps it (register
        # double buffering, independent of the compiler's pipelining; the last one re-reads the last tile)
        if n_full > 0:
            _, keys = _tile_keys(src, cum, KDELTA, KTILE_C0, BITS, KPERM, row, bh, 0, lanes, full, CK, NKT, NW, SK,
                                 BLOCK_N, LOOKUP_BITS, KIDX_TABLE, PERM, CAUSAL, False)  # fmt: skip
            k, v = _load_kv(kbase, vbase, keys, sks, svs, dcols, dmask, IDX64, HEAD_PAD)
            for it in range(0, n_full):
                nxt = tl.minimum(it + 1, n_full - 1) * BLOCK_N
                _, keys = _tile_keys(src, cum, KDELTA, KTILE_C0, BITS, KPERM, row, bh, nxt, lanes, full, CK, NKT,
                                     NW, SK, BLOCK_N, LOOKUP_BITS, KIDX_TABLE, PERM, CAUSAL, False)  # fmt: skip
                k_next, v_next = _load_kv(kbase, vbase, keys, sks, svs, dcols, dmask, IDX64, HEAD_PAD)
                m_i, l_i, acc = _full_tile(q, k, v, m_i, l_i, acc, qk_scale, PREC)
                k, v = k_next, v_next
    else:
        for it in tl.range(0, n_full, num_stages=STAGES):
            _, keys = _tile_keys(src, cum, KDELTA, KTILE_C0, BITS, KPERM, row, bh, it * BLOCK_N, lanes, full, CK,
                                 NKT, NW, SK, BLOCK_N, LOOKUP_BITS, KIDX_TABLE, PERM, CAUSAL, False)  # fmt: skip
            k, v = _load_kv(kbase, vbase, keys, sks, svs, dcols, dmask, IDX64, HEAD_PAD)
            m_i, l_i, acc = _full_tile(q, k, v, m_i, l_i, acc, qk_scale, PREC)
    for it in tl.range(n_full, tl.cdiv(n_keys, BLOCK_N), num_stages=STAGES):
        vmask = it * BLOCK_N + lanes < n_keys
        cols, cols_t = _tile_keys(src, cum, KDELTA, KTILE_C0, BITS, KPERM, row, bh, it * BLOCK_N, lanes, vmask, CK,
                                  NKT, NW, SK, BLOCK_N, LOOKUP_BITS, KIDX_TABLE, PERM, CAUSAL, True)  # fmt: skip
        cols_o = cols_t.to(tl.int64) if IDX64 else cols_t
        kv_mask = (vmask[:, None] & dmask[None, :]) if HEAD_PAD else vmask[:, None]
        k = tl.load(kbase + cols_o[:, None] * sks + dcols[None, :], mask=kv_mask, other=0.0)
        s = dot_f32acc(q, tl.trans(k), PREC) * qk_scale
        keep = vmask[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vbase + cols_o[:, None] * svs + dcols[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot_f32acc(p.to(v.dtype), v, PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    op = O + b * sob + h * soh + rows_o[:, None] * sos + dcols[None, :]
    tl.store(op, out.to(O.dtype.element_ty), mask=(rmask[:, None] & dmask[None, :]) if HEAD_PAD else rmask[:, None])


@triton.jit
def _kmeans_assign_kernel(X, C, CN, LABELS, SUMS, COUNTS, S, NC, D, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_D: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                          ACCUM: tl.constexpr):  # fmt: skip
    # One program per (token tile, batch*head): argmin over centroids of ‖c‖² - 2 x·c (‖x‖² is the same for
    # every centroid), with a running minimum over centroid tiles (software-pipelined over STAGES); ties go to
    # the lowest index. ACCUM: also adds each token (fp32) and a count of 1 to its cluster's row of SUMS /
    # COUNTS with atomics, the update step's sums from the tile already in registers (no second pass over x).
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < S
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    x = tl.load(X + (bh * S + rows[:, None]) * D + dcols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    best = tl.full([BLOCK_S], float("inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_S], dtype=tl.int32)
    for c0 in tl.range(0, NC, BLOCK_C, num_stages=STAGES):
        cid = c0 + tl.arange(0, BLOCK_C)
        cmask = cid < NC
        ct = tl.load(C + (bh * NC + cid[None, :]) * D + dcols[:, None], mask=cmask[None, :] & dmask[:, None],
                     other=0.0)  # fmt: skip
        cn = tl.load(CN + bh * NC + cid, mask=cmask, other=float("inf"))
        dist = cn[None, :] - 2.0 * dot_f32acc(x, ct.to(x.dtype), PREC)
        dist = tl.where(cmask[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)
        tile_arg = tl.min(tl.where(dist == tile_min[:, None], cid[None, :], 2147483647), axis=1)
        better = tile_min < best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_min, best)
    tl.store(LABELS + bh * S + rows, arg, mask=rmask)
    if ACCUM:
        crow = bh * NC + arg
        tl.atomic_add(SUMS + crow[:, None] * D + dcols[None, :], x.to(tl.float32), mask=rmask[:, None] & dmask[None, :],
                      sem="relaxed")  # fmt: skip
        tl.atomic_add(COUNTS + crow, tl.full([BLOCK_S], 1.0, tl.float32), mask=rmask, sem="relaxed")


@triton.jit
def _topp_threshold_kernel(W, THR, N, p, n_min, PASSES: tl.constexpr, WAYS: tl.constexpr, HAS_MIN: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    # One program per row of probabilities (Twilight's sort-free top-p): search for the largest tau with
    # sum(w >= tau) >= p; keeping w >= tau keeps the mass >= p (invariant: the lower bound always satisfies
    # it). Each pass over the row tests WAYS evenly spaced candidates at once and keeps the sub-interval of
    # the largest that satisfies, so a pass narrows the interval WAYS-fold. The per-candidate sums stay
    # element-wise in registers through a pass and are reduced once at its end (a block-wide reduction per
    # tile would cost more than the compares). The search stops early once no entry lies strictly inside
    # (lo, hi): then {w >= lo} is exactly the top-p set (Twilight's stopping rule with eps = 0), at most
    # PASSES passes. With HAS_MIN the threshold is also lowered to the n_min-th largest value (a second
    # search on counts), so at least n_min entries are kept.
    p = tl.cast(p, tl.float32)  # Inductor passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    base = W + row * N
    zero = tl.max(tl.zeros([BLOCK], dtype=tl.float32))  # an fp32 scalar 0 (loop-carried values need a type)
    wmax = zero
    for j in range(0, N, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        wmax = tl.maximum(wmax, tl.max(tl.load(base + cols, mask=cols < N, other=0.0)))
    ways = tl.arange(0, WAYS)
    frac = ways.to(tl.float32) / WAYS
    lo = zero
    hi = wmax
    lo_n = zero
    hi_n = wmax
    passes = 0
    inside = 1
    while (passes < PASSES) & (inside > 0):
        cand = lo + (hi - lo) * frac
        cand_n = lo_n + (hi_n - lo_n) * frac
        mass = tl.zeros([BLOCK, WAYS], dtype=tl.float32)
        count = tl.zeros([BLOCK, WAYS], dtype=tl.int32)
        strict = tl.zeros([BLOCK], dtype=tl.int32)
        for j in range(0, N, BLOCK):
            cols = j + tl.arange(0, BLOCK)
            w = tl.load(base + cols, mask=cols < N, other=-1.0)
            mass += tl.where(w[:, None] >= cand[None, :], w[:, None], 0.0)
            strict += ((w > lo) & (w < hi)).to(tl.int32)
            if HAS_MIN:
                count += (w[:, None] >= cand_n[None, :]).to(tl.int32)
                strict += ((w > lo_n) & (w < hi_n)).to(tl.int32)
        inside = tl.sum(strict)
        k = tl.max(tl.where(tl.sum(mass, axis=0) >= p, ways, 0))  # candidate 0 is lo, which satisfies
        hi = tl.where(k + 1 < WAYS, tl.sum(tl.where(ways == k + 1, cand, 0.0)), hi)
        lo = tl.sum(tl.where(ways == k, cand, 0.0))
        if HAS_MIN:
            k_n = tl.max(tl.where(tl.sum(count, axis=0) >= n_min, ways, 0))
            hi_n = tl.where(k_n + 1 < WAYS, tl.sum(tl.where(ways == k_n + 1, cand_n, 0.0)), hi_n)
            lo_n = tl.sum(tl.where(ways == k_n, cand_n, 0.0))
        passes += 1
    thr = lo
    if HAS_MIN:
        thr = tl.minimum(lo, lo_n)
    tl.store(THR + row, thr)


@triton.jit
def _int4_scores_kernel(Q, KP, KS, KZ, OUT, HQ, HKV, S, D, LEN, scale, GROUP: tl.constexpr, BLOCK_S: tl.constexpr,
                        HALF_D: tl.constexpr):  # fmt: skip
    # One program per (key tile, batch*kv head), for all GROUP q heads of that kv head (GQA), so the packed
    # keys are read once instead of once per q head: q·k̃ with k̃ = code·scale + min dequantized from the
    # packed INT4 keys (two codes per byte, low nibble first); keys past LEN score -inf.
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = kv // HKV
    hk = kv % HKV
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < LEN
    j = tl.arange(0, HALF_D)
    jmask = j < D // 2
    packed = tl.load(KP + (kv * S + rows[:, None]) * (D // 2) + j[None, :], mask=rmask[:, None] & jmask[None, :],
                     other=0).to(tl.int32)  # fmt: skip
    lo_code = (packed & 15).to(tl.float32)
    hi_code = (packed >> 4).to(tl.float32)
    ks = tl.load(KS + kv * S + rows, mask=rmask, other=0.0)
    kz = tl.load(KZ + kv * S + rows, mask=rmask, other=0.0)
    for g in tl.static_range(GROUP):
        bhq = b * HQ + hk * GROUP + g
        q_even = tl.load(Q + bhq * D + 2 * j, mask=jmask, other=0.0).to(tl.float32)
        q_odd = tl.load(Q + bhq * D + 2 * j + 1, mask=jmask, other=0.0).to(tl.float32)
        # q·(code·s + z) = s·(q·code) + z·Σq
        qc = tl.sum(lo_code * q_even[None, :] + hi_code * q_odd[None, :], axis=1)
        qsum = tl.sum(q_even) + tl.sum(q_odd)
        s = (ks * qc + kz * qsum) * scale
        tl.store(OUT + bhq * S + rows, tl.where(rmask, s, float("-inf")), mask=rows < S)


@triton.jit
def _sparse_decode_kernel(Q, K, V, MASK, PO, PM, PL, HQ, HKV, S, D, SPLITS, CHUNK, scale,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # One program per (split, batch*q head): the online softmax over its CHUNK of cache positions, reading
    # the K / V rows (of the q head's kv head) only where the token mask selects them (masked lanes issue no
    # memory traffic), so the kernel needs no compacted index list and every split has work; partial
    # (acc, max, sum) combined afterwards (flash decoding). A tile with no selected token is skipped.
    scale = tl.cast(scale, tl.float32) * 1.4426950408889634  # base-2 softmax; Inductor passes fp64 floats
    sp = tl.program_id(0)
    bhq = tl.program_id(1).to(tl.int64)
    b = bhq // HQ
    hk = (bhq % HQ) // (HQ // HKV)
    kv = b * HKV + hk
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(Q + bhq * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, S)
    l_i = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32))  # fp32 scalars (loop-carried values need a type)
    m_i = l_i + float("-inf")
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end, BLOCK_N):
        offs = j + tl.arange(0, BLOCK_N)
        nmask = (tl.load(MASK + bhq * S + offs, mask=offs < end, other=0) != 0)
        if tl.max(nmask.to(tl.int32)) > 0:
            rows = (kv * S + offs[:, None].to(tl.int64)) * D + dcols[None, :]
            kk = tl.load(K + rows, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.sum(kk * q[None, :], axis=1) * scale
            s = tl.where(nmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe)
            vv = tl.load(V + rows, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
            l_i = l_i * alpha + tl.sum(p)
            m_i = m_new
    out = bhq * SPLITS + sp
    tl.store(PO + out * D + dcols, acc, mask=dmask)
    tl.store(PM + out, m_i)
    tl.store(PL + out, l_i)


@triton.jit
def _compact_mask_kernel(MASK, IDX, CNT, S, BLOCK: tl.constexpr):
    # One program per row of a token mask: the positions it selects, in order, into IDX (a running offset plus
    # a prefix sum over each tile's lanes), and their count into CNT.
    r = tl.program_id(0).to(tl.int64)
    n = tl.max(tl.zeros([BLOCK], dtype=tl.int32))  # an int32 scalar 0 (loop-carried values need a type)
    for j in range(0, S, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = (tl.load(MASK + r * S + offs, mask=offs < S, other=0) != 0).to(tl.int32)
        pos = n + tl.cumsum(m, axis=0) - 1
        tl.store(IDX + r * S + pos, offs, mask=m != 0)
        n += tl.sum(m)
    tl.store(CNT + r, n)


@triton.jit
def _sparse_decode_compact_kernel(Q, K, V, IDX, CNT, PO, PM, PL, HQ, HKV, S, D, SPLITS, scale,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    # One program per (split, batch*q head) over an equal share of the row's selected tokens (IDX, CNT from
    # _compact_mask_kernel): every lane of a full tile is a selected token, so no split or lane idles on
    # unselected positions; the K / V rows are gathered by index, software-pipelined over STAGES tiles.
    # Partial (acc, max, sum) combined afterwards (flash decoding).
    scale = tl.cast(scale, tl.float32) * 1.4426950408889634  # base-2 softmax; Inductor passes fp64 floats
    sp = tl.program_id(0)
    bhq = tl.program_id(1).to(tl.int64)
    b = bhq // HQ
    hk = (bhq % HQ) // (HQ // HKV)
    kv = b * HKV + hk
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(Q + bhq * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    cnt = tl.load(CNT + bhq)
    chunk = tl.cdiv(cnt, SPLITS)
    start = sp * chunk
    end = tl.minimum(start + chunk, cnt)
    l_i = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32))  # fp32 scalars (loop-carried values need a type)
    m_i = l_i + float("-inf")
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    kvbase = kv * S * D
    for j in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs = j + tl.arange(0, BLOCK_N)
        nmask = offs < end
        tok = tl.load(IDX + bhq * S + offs, mask=nmask, other=0)
        rows = kvbase + tok[:, None] * D + dcols[None, :]
        kk = tl.load(K + rows, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.where(nmask, tl.sum(kk * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        vv = tl.load(V + rows, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
        l_i = l_i * alpha + tl.sum(p)
        m_i = m_new
    out = bhq * SPLITS + sp
    tl.store(PO + out * D + dcols, acc, mask=dmask)
    tl.store(PM + out, m_i)
    tl.store(PL + out, l_i)


@triton.jit
def _decode_combine_kernel(PO, PM, PL, OUT, D, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per batch*q head: the flash-decoding combine of the splits' partial (acc, max, sum) in base 2;
    # splits that saw no token (max -inf) weigh 0, and a row with no token at all gives 0.
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    pm = tl.load(PM + r * SPLITS + sp)
    pl = tl.load(PL + r * SPLITS + sp)
    m = tl.max(pm)
    wgt = tl.where(pm == float("-inf"), 0.0, tl.exp2(pm - tl.where(m == float("-inf"), 0.0, m)))
    po = tl.load(PO + (r * SPLITS + sp[:, None]) * D + dcols[None, :], mask=dmask[None, :], other=0.0)
    num = tl.sum(po * wgt[:, None], axis=0)
    den = tl.sum(pl * wgt)
    tl.store(OUT + r * D + dcols, (num / tl.where(den > 0, den, 1.0)).to(OUT.dtype.element_ty), mask=dmask)
