"""Sparse attention (SVG2, Twilight): every Triton op against its plain-PyTorch reference on odd sizes in
fp32 / fp16 (the CPU interpreter; bf16 numerics are checked on the GPU by
benchmarks/kernels/sparse_attention_check.py), p = 1 against dense attention, and the ops under
torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch
import torch.nn.functional as F

from scaleforge.kernels import sparse_attention as SA
from scaleforge.kernels.reference import sparse_attention as R

from _kernel_testing import DEVICE, TOL, needs_triton, rel_err

pytestmark = needs_triton


def _sizes(b, h, c, s, gen, empty=True):
    """Random cluster sizes (B, H, C) summing to s per head, some clusters empty."""
    out = torch.zeros(b, h, c, dtype=torch.int32)
    for i in range(b):
        for j in range(h):
            lab = torch.randint(0, c if not empty else max(1, c - 1), (s,), generator=gen)
            out[i, j] = torch.bincount(lab, minlength=c)[:c].int()
    return out.to(DEVICE)


def _launch(q, k, v, qs, ks, bm, causal=False, table=True, qp=None, kp=None):
    """The interpreter configuration with the key index table (the default) or the per-lane lookup."""
    from scaleforge.kernels.sparse_attention import op

    cfg = op._interpreter_config()._replace(lookup_bits=not table, index_table=table)
    return op.launch_block_sparse(q, k, v, qs, ks, bm, causal, q.shape[-1] ** -0.5, cfg, qp, kp)


def _random_perms(b, h, s, gen):
    return torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).reshape(b, h, s).to(DEVICE)


@pytest.mark.parametrize("table", [True, False], ids=["table", "lookup"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq,sk,d,causal", [(37, 37, 64, False), (97, 53, 64, False), (45, 45, 128, True),
                                            (23, 23, 24, True), (51, 75, 128, False)])
def test_block_sparse_attention_matches_reference(dtype, sq, sk, d, causal, table):
    """Each key path against the reference, in cluster order and in token order through permutations."""
    gen = torch.Generator().manual_seed(sq * 7 + d)
    b, h, cq, ck = 2, 2, 5, 7
    if causal:
        sk = sq
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for n in (sq, sk, sk))
    q_sizes, k_sizes = _sizes(b, h, cq, sq, gen), _sizes(b, h, ck, sk, gen)
    block_map = (torch.rand(b, h, cq, ck, generator=gen) < 0.5).to(DEVICE)
    block_map[0, 0, 1] = False  # a query cluster with no key cluster: its rows give 0
    block_map[1, 0, 2] = k_sizes[1, 0] > 0  # a query cluster that selects every key
    out = _launch(q, k, v, q_sizes, k_sizes, block_map, causal, table)
    ref = R.block_sparse_attention_ref(q.float(), k.float(), v.float(), q_sizes, k_sizes, block_map, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype] * 2
    if dtype == torch.float16:  # flash-attention rule: within 2x the error of the reference run in fp16
        low = R.block_sparse_attention_ref(q, k, v, q_sizes, k_sizes, block_map, causal).float()
        assert (out.float() - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3
    qp, kp = _random_perms(b, h, sq, gen), _random_perms(b, h, sk, gen)
    tok = _launch(SA.unpermute(q, qp), SA.unpermute(k, kp), SA.unpermute(v, kp), q_sizes, k_sizes, block_map, causal,
                  table, qp, kp)  # fmt: skip
    assert rel_err(SA.permute(tok, qp), ref) < TOL[dtype] * 2


def test_key_index_table_lists_the_selected_keys():
    """KIDX row = the token positions (through k_perm) of the row's selected, non-empty key clusters in cluster
    order; a row that selects every key is left unwritten and read from KFULL (k_perm, or the identity)."""
    from scaleforge.kernels.sparse_attention import op

    gen = torch.Generator().manual_seed(15)
    b, h, cq, ck, sk = 1, 2, 4, 30, 70  # clusters of ~2 keys: a 16-position group crosses many starts
    ks = _sizes(b, h, ck, sk, gen)
    bm = (torch.rand(b, h, cq, ck, generator=gen) < 0.6).to(DEVICE)
    bm[0, 1, 3] = True
    kp = _random_perms(b, h, sk, gen).to(torch.int32).reshape(b * h, sk)
    kcum, kdelta, c0, _ = op._key_tables(ks, bm, sk, False)
    off = op._offsets(ks)
    for perm in (kp, None):
        kidx, kfull, sfull = op._key_index_table(kcum, kdelta, c0, perm, cq, sk)
        for bh in range(b * h):
            for r in range(cq):
                row = bh * cq + r
                pos = [j for c in range(ck) if bm[0, bh, r, c]
                       for j in range(int(off[0, bh, c]), int(off[0, bh, c + 1]))]  # fmt: skip
                want = torch.tensor(pos, dtype=torch.int32, device=DEVICE)
                want = perm[bh, want.long()] if perm is not None else want
                assert int(kcum[row, -1]) == len(pos)
                got = kfull.reshape(-1)[bh * sfull: bh * sfull + sk] if len(pos) == sk else kidx[row, :len(pos)]
                assert torch.equal(got, want), (bh, r)


@pytest.mark.parametrize("table", [True, False], ids=["table", "lookup"])
def test_block_sparse_key_tiles_span_many_small_clusters(table):
    """Key clusters of 0-3 tokens (more clusters than a key tile has lanes): a tile crosses many of them."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 50, 32, generator=gen).to(DEVICE) for _ in range(3))
    q_sizes, k_sizes = _sizes(1, 2, 3, 50, gen), _sizes(1, 2, 40, 50, gen)
    block_map = (torch.rand(1, 2, 3, 40, generator=gen) < 0.7).to(DEVICE)
    out = _launch(q, k, v, q_sizes, k_sizes, block_map, table=table)
    assert rel_err(out, R.block_sparse_attention_ref(q, k, v, q_sizes, k_sizes, block_map)) < TOL[torch.float32] * 2


def test_block_sparse_merges_query_clusters_with_equal_maps():
    """Consecutive query clusters selecting the same key clusters share query tiles; runs of equal rows, a row
    that differs, empty clusters and a row with no key cluster all keep the reference's output."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=gen).to(DEVICE) for _ in range(3))
    qs, ks = _sizes(1, 2, 7, 70, gen), _sizes(1, 2, 9, 70, gen)
    row = torch.rand(9, generator=gen) < 0.5
    bm = row.expand(1, 2, 7, 9).clone()
    bm[0, 0, 3] = ~row  # a run of 3, one different row, a run of 3
    bm[0, 1, 5:] = False  # rows with no key cluster: zeros
    out = SA.block_sparse_attention(q, k, v, qs, ks, bm.to(DEVICE), backend="triton")
    assert rel_err(out, R.block_sparse_attention_ref(q, k, v, qs, ks, bm.to(DEVICE))) < TOL[torch.float32] * 2
    sizes, rows = SA._op._merge_equal_rows(qs, bm.to(DEVICE))
    assert sizes[0, 0, :3].tolist() == [int(qs[0, 0, :3].sum()), int(qs[0, 0, 3]), int(qs[0, 0, 4:].sum())]
    assert sizes.sum(-1).eq(70).all() and torch.equal(rows[0, 0, 1], ~row.to(DEVICE))


@pytest.mark.parametrize("causal,prefetch,bits", [(False, False, True), (True, False, False), (False, True, True)])
def test_block_sparse_remainder_launch_and_prefetch(causal, prefetch, bits):
    """A configuration with rest_m: full BLOCK_M tiles in one launch, each cluster's remaining rows in a second
    launch of smaller tiles; the two together cover every row once. With prefetch, the full-tile loop's
    register double buffering; without bits, the lanes find their clusters by comparisons."""
    from scaleforge.kernels.sparse_attention import op

    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 90, 32, generator=gen).to(DEVICE) for _ in range(3))
    qs, ks = _sizes(1, 2, 3, 90, gen), _sizes(1, 2, 8, 90, gen)
    bm = (torch.rand(1, 2, 3, 8, generator=gen) < 0.6).to(DEVICE)
    cfg = op.BlockSparseConfig(32, 16, 1, 1, bits, 16, prefetch)
    out = op.launch_block_sparse(q, k, v, qs, ks, bm, causal, 32**-0.5, cfg)
    assert rel_err(out, R.block_sparse_attention_ref(q, k, v, qs, ks, bm, causal)) < TOL[torch.float32] * 2


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_with_permutations_equals_permuting(causal):
    # the default path (the key index table); the lookup's permutations: test_block_sparse_attention_matches_reference
    """q_perm / k_perm: inputs and output in token order, the same result as permuting q, k, v into cluster
    order and the output back; bad permutation arguments are refused."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, 61, 32, generator=gen).to(DEVICE) for _ in range(3))
    ql, kl = (torch.randint(0, n, (1, 2, 61), generator=gen).to(DEVICE) for n in (4, 9))
    qp, qs = SA.cluster_permutation(ql, 4)
    kp, ks = SA.cluster_permutation(kl, 9)
    bm = (torch.rand(1, 2, 4, 9, generator=gen) < 0.6).to(DEVICE)
    want = SA.unpermute(SA.block_sparse_attention(SA.permute(q, qp), SA.permute(k, kp), SA.permute(v, kp), qs, ks, bm,
                                                  causal=causal, backend="triton"), qp)  # fmt: skip
    for backend in ("triton", "torch"):
        got = SA.block_sparse_attention(q, k, v, qs, ks, bm, causal=causal, q_perm=qp, k_perm=kp, backend=backend)
        assert rel_err(got, want) < TOL[torch.float32] * 2
    with pytest.raises(ValueError, match="q_perm"):
        SA.block_sparse_attention(q, k, v, qs, ks, bm, q_perm=qp, backend="triton")


@pytest.mark.parametrize("table", [True, False], ids=["table", "lookup"])
def test_block_sparse_all_blocks_is_dense_attention(table):
    """All blocks: dense attention in the cluster order, and through permutations (the index table then reads
    k_perm or the identity for every row)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 41, 64, generator=gen).to(DEVICE) for _ in range(3))
    qs, ks = _sizes(1, 2, 4, 41, gen, empty=False), _sizes(1, 2, 6, 41, gen)
    full = torch.ones(1, 2, 4, 6, dtype=torch.bool, device=DEVICE)
    qp, kp = _random_perms(1, 2, 41, gen), _random_perms(1, 2, 41, gen)
    for causal in (False, True):
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert rel_err(_launch(q, k, v, qs, ks, full, causal, table), dense) < 1e-5
        tok = _launch(SA.unpermute(q, qp), SA.unpermute(k, kp), SA.unpermute(v, kp), qs, ks, full, causal, table, qp,
                      kp)  # fmt: skip
        assert rel_err(SA.permute(tok, qp), dense) < 1e-5


def test_block_sparse_rejects_bad_shapes():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_map"):
        SA.block_sparse_attention(q, q, q, torch.full((1, 2, 3), 8), torch.full((1, 2, 2), 8),
                                  torch.ones(1, 2, 2, 2, dtype=torch.bool), backend="triton")


def test_kmeans_triton_matches_torch_and_warm_start_continues():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 101, 32, generator=gen).to(DEVICE)
    lab_t, c_t = SA.kmeans(x, 9, iters=4, backend="triton")
    lab_r, c_r = SA.kmeans(x, 9, iters=4, backend="torch")
    assert torch.equal(lab_t, lab_r) and rel_err(c_t, c_r) < 1e-5
    # 4 iterations = 2 + 2 warm-started from the cached centroids
    lab_a, c_a = SA.kmeans(x, 9, iters=2, backend="triton")
    lab_b, c_b = SA.kmeans(x, 9, init=c_a, iters=2, backend="triton")
    assert torch.equal(lab_b, lab_t) and rel_err(c_b, c_t) < 1e-6
    # the centroids are the means of the returned clusters (one assignment per round, ending on the update)
    sums = torch.zeros(2, 3, 9, 32, device=DEVICE).index_put_(
        (torch.arange(2)[:, None, None], torch.arange(3)[None, :, None], lab_t), x, accumulate=True)
    counts = torch.bincount((lab_t + 9 * torch.arange(6, device=DEVICE).reshape(2, 3, 1)).flatten(), minlength=54)
    full = counts.reshape(2, 3, 9) > 0
    assert full.any() and rel_err(c_t[full], (sums / counts.reshape(2, 3, 9, 1).clamp_min(1))[full]) < 1e-5


def test_cluster_permutation_roundtrip():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 6, (2, 3, 50), generator=gen).to(DEVICE)
    x = torch.randn(2, 3, 50, 8, generator=gen).to(DEVICE)
    perm, sizes = SA.cluster_permutation(labels, 7)
    assert sizes.sum(-1).eq(50).all() and sizes[..., 6].eq(0).all()
    xp = SA.permute(x, perm)
    lp = labels.gather(2, perm)
    assert (lp[..., 1:] >= lp[..., :-1]).all()  # clusters contiguous, in cluster order
    assert torch.equal(SA.unpermute(xp, perm), x)


@pytest.mark.parametrize("n,p,min_keep", [(50, 0.9, 0), (1000, 0.95, 0), (5000, 0.5, 0), (37, 0.3, 12)])
def test_topp_mask_matches_sorting_reference(n, p, min_keep):
    gen = torch.Generator().manual_seed(n)
    w = torch.softmax(torch.randn(7, n, generator=gen) * 3, -1).to(DEVICE)
    got = SA.topp_mask(w, p, min_keep, backend="triton")
    want = SA.topp_mask(w, p, min_keep, backend="torch")
    assert torch.equal(got, want)
    assert ((w * got).sum(-1) >= p - 1e-6).all() and (got.sum(-1) >= min_keep).all()
    assert SA.topp_mask(w, 1.0, backend="triton").all()


def test_topp_budget_keeps_mass_and_min_fraction():
    gen = torch.Generator().manual_seed(4)
    qc, kc = torch.randn(1, 2, 6, 16, generator=gen).to(DEVICE), torch.randn(1, 2, 40, 16, generator=gen).to(DEVICE)
    ks = torch.randint(0, 9, (1, 2, 40), generator=gen).to(DEVICE)
    got = SA.topp_budget(qc, kc, ks, 0.8, 0.1, backend="triton")
    want = R.topp_budget_ref(qc, kc, ks, 0.8, 0.1)
    assert torch.equal(got, want)
    w = R.cluster_weights(qc, kc, ks)
    assert ((w * got).sum(-1) >= 0.8 - 1e-6).all() and (got.sum(-1) >= 4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_svg2_attention_p1_equals_dense_and_p09_error(dtype):
    gen = torch.Generator().manual_seed(5)
    # clustered tokens (as video tokens are), so the top-p budget can drop blocks at little error
    centers = torch.randn(2, 8, 64, generator=gen)
    idx = torch.randint(0, 8, (1, 2, 150), generator=gen)
    base = centers[torch.arange(2)[None, :, None], idx]
    q, k, v = ((base + 0.5 * torch.randn(base.shape, generator=gen)).to(DEVICE, dtype) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    cfg = SA.SVG2Config(q_clusters=10, k_clusters=12, init_iters=10, warm_iters=1, top_p=1.0, min_key_fraction=0.0)
    out = SA.svg2_attention(q, k, v, cfg, backend="triton")
    assert rel_err(out, dense) < TOL[dtype] * 2
    state = SA.SVG2State()
    cfg09 = SA.SVG2Config(q_clusters=10, k_clusters=12, init_iters=10, warm_iters=1, top_p=0.9, min_key_fraction=0.1)
    out09 = SA.svg2_attention(q, k, v, cfg09, state, backend="triton")
    ref09 = SA.svg2_attention(q, k, v, cfg09, SA.SVG2State(), backend="torch")
    assert float(state.stats["density"]) < 1.0  # blocks were skipped
    assert rel_err(out09, dense) < 0.05  # the documented p = 0.9 error on clustered tokens (docs/inference.md)
    assert rel_err(out09, ref09) < TOL[dtype] * 2
    # the next call warm-starts from the cached centroids
    assert state.q_centroids is not None
    SA.svg2_attention(q, k, v, cfg09, state, backend="triton")


def test_int4_keys_error_within_half_a_step():
    k = torch.randn(2, 3, 17, 64, device=DEVICE) * 3
    packed, scale, lo = SA.quantize_int4(k)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 17, 32)
    err = (R.dequantize_int4_ref(packed, scale, lo) - k).abs()
    assert (err <= scale[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_twilight_select_and_sparse_decode_match_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    b, hq, hkv, s, d = 2, 4, 2, 301, 64
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    packed, scale, lo = SA.quantize_int4(k)
    mask, w = SA.twilight_select(q, packed, scale, lo, 0.85, length=290, backend="triton")
    mask_r, w_r = SA.twilight_select(q, packed, scale, lo, 0.85, length=290, backend="torch")
    assert rel_err(w, w_r) < 1e-3 and (mask ^ mask_r).float().mean() < 0.01  # ties at the threshold only
    assert ((w * mask).sum(-1) >= 0.85 - 1e-5).all() and not mask[..., 290:].any()
    out = SA.sparse_decode_attention(q, k, v, mask, backend="triton")
    ref = R.sparse_decode_ref(q.float(), k.float(), v.float(), mask)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype] * 2
    from scaleforge.kernels.sparse_attention import op  # the scan over all positions (the other decode config)

    scan = op.launch_sparse_decode(q, k, v, mask.contiguous(), d**-0.5, op.DecodeConfig(False, 0, 16, 1))
    assert rel_err(scan, ref) < TOL[dtype] * 2
    none = mask.clone()
    none[0, 1] = False  # a head with no selected token gives 0, the others are unchanged
    out_none = SA.sparse_decode_attention(q, k, v, none, backend="triton")
    assert not out_none[0, 1].any() and torch.equal(out_none[1], out[1])
    full = torch.ones(b, hq, s, dtype=torch.bool, device=DEVICE)
    dense = F.scaled_dot_product_attention(q.float()[:, :, None], k.float(), v.float(), enable_gqa=True)[:, :, 0]
    assert rel_err(SA.sparse_decode_attention(q, k, v, full, backend="triton"), dense) < TOL[dtype] * 2


def test_ops_opcheck_and_compile():
    """Schemas everywhere; fake tensors and torch.compile(fullgraph=True) on a GPU only (the interpreter runs a
    kernel launched on fake tensors instead of tracing it)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 19, 32, generator=gen).to(DEVICE) for _ in range(3))
    qs, ks = _sizes(1, 2, 3, 19, gen), _sizes(1, 2, 4, 19, gen)
    bm = torch.rand(1, 2, 3, 4, generator=gen).to(DEVICE) < 0.6
    from scaleforge.kernels.sparse_attention import op

    utils = ("test_schema",) if DEVICE == "cpu" else ("test_schema", "test_faketensor")
    torch.library.opcheck(op.block_sparse_attention_op.op, (q, k, v, qs, ks, bm, False, 0.2), test_utils=utils)
    torch.library.opcheck(op.kmeans_assign_op.op, (q, k[:, :, :5]), test_utils=utils)
    torch.library.opcheck(op.kmeans_round_op.op, (q, k[:, :, :5]), test_utils=utils)
    w = torch.softmax(torch.randn(3, 40, generator=gen), -1).to(DEVICE)
    torch.library.opcheck(op.topp_threshold_op.op, (w, 0.9, 2), test_utils=utils)
    if DEVICE == "cpu":
        return

    def fn(q, k, v):
        return SA.block_sparse_attention(q, k, v, qs, ks, bm, backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    assert rel_err(compiled(q, k, v), R.block_sparse_attention_ref(q, k, v, qs, ks, bm)) < 1e-5
