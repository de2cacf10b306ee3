"""Launch-configuration sweep of the sparse-attention kernels on one GPU (issue: SVG2 + Twilight; picks the
defaults in scaleforge/kernels/sparse_attention/op.py). Prints markdown tables:

0. the rooflines: the bf16 datasheet peak (989 TFLOP/s) and a measured 8192³ bf16 matmul.
1. every block-sparse forward configuration (BLOCK_M x BLOCK_N, warps, pipeline stages, how a key lane finds
   its key: "bits" / "cmp" lane lookups or "table", the per-token key index table) checked
   against the fp32 reference on a small bf16 problem (causal and not): a broken configuration shows FAIL.
2. every configuration, and the autotuned default, on the Wan 2.1 1.3B (12 heads x 32,760 x 128) and trimmed
   HunyuanVideo (24 x --hunyuan-tokens x 128) shapes at 0 / 50 / 90 / 95% sparsity of a random 300 x 1000
   cluster map (clusters from k-means of clustered tokens): ms, TFLOP/s of the executed blocks, % of the
   datasheet and of the measured matmul, speed-up over SDPA's flash backend, and the query-tile row use (rows
   / BLOCK_M x tiles: a tile holds one query cluster, or a run of clusters with the same map row); per shape
   one more row, the index-table kernel (128x64, 8 warps, 3 stages) on the identity layout with all blocks (one cluster per
   head, KIDX = arange): what the kernel's loop structure reaches without any sparsity bookkeeping; then the
   best configuration per cell and overall.
3. k-means: the assignment kernel's configurations, one Lloyd round split into assignment and update, the
   warm SVG2 step (2 rounds on Q (300) and K (1000) + permutation + top-p budget) against dense attention
   (target <= 10%), and flash-kmeans 0.3.1 side by side when importable.
4. Twilight decode (B 1, 28 q / 4 kv heads x 128, p 0.85) at 32k and 128k against dense SDPA decode, each
   stage timed alone, eagerly and as a CUDA graph (a decode loop's launch mode).

    PYTHONPATH=$PWD python benchmarks/kernels/sparse_attention_sweep.py                 # one H100: < 4 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels/sparse_attention_sweep.py --smoke  # CPU logic
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV, FAILURES, bench, check, finish, graph_bench, log, matmul_rooflines, rel_err, run_step, \
    script_parser, start  # noqa: E402
from bench_sparse_attention import clustered, random_map, sdpa_flash  # noqa: E402

from scaleforge.kernels import sparse_attention as SA  # noqa: E402
from scaleforge.kernels.reference import sparse_attention as R  # noqa: E402
from scaleforge.kernels.sparse_attention import op as OP  # noqa: E402

PEAK = 989.4
Cfg = OP.BlockSparseConfig
CONFIGS = [
    # the per-lane cluster lookup (bitmap + prefix sum), its best configurations of the earlier sweeps
    Cfg(128, 64, 8, 3, True), Cfg(128, 128, 8, 2, True), Cfg(128, 64, 8, 1, True, 0, True),
    # the key index table (index_table=True; lookup_bits unused)
    Cfg(128, 64, 8, 3, False, 0, False, True), Cfg(128, 64, 8, 2, False, 0, False, True),
    Cfg(128, 64, 8, 4, False, 0, False, True), Cfg(128, 128, 8, 2, False, 0, False, True),
    Cfg(128, 64, 4, 3, False, 0, False, True), Cfg(128, 64, 8, 3, False, 64, False, True),
    Cfg(128, 64, 8, 1, False, 0, True, True), Cfg(128, 128, 8, 1, False, 0, True, True),
]
KM_CONFIGS = [OP.KMeansConfig(*c) for c in ((64, 64, 4, 2), (128, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3))]
TH_CONFIGS = [OP.ThresholdConfig(*c) for c in ((16, 12, 1024, 16), (16, 12, 2048, 16), (8, 16, 1024, 16),
                                             (32, 8, 512, 16))]  # fmt: skip
BUDGET_TH_CONFIGS = [OP.ThresholdConfig(*c) for c in ((16, 12, 1024, 16), (16, 12, 1024, 4), (16, 12, 256, 4),
                                                     (16, 12, 256, 2), (8, 16, 256, 2), (16, 12, 128, 1))]  # fmt: skip
DEC_CONFIGS = [OP.DecodeConfig(*c) for c in ((False, 0, 64, 1), (True, 0, 32, 2), (True, 0, 64, 2),
                                          (True, 16, 32, 2))]  # fmt: skip
SMOKE_CONFIGS = [Cfg(16, 16, 1, 1, True), Cfg(32, 16, 1, 1, False, 16), Cfg(16, 16, 1, 1, True, 0, True),
                 Cfg(16, 16, 1, 1, False, 0, False, True), Cfg(32, 16, 1, 1, False, 16, True, True)]
IDENTITY = "128x64 w8 s3 table, identity layout, all blocks (KIDX = arange)"
IDENTITY_CFG = Cfg(128, 64, 8, 3, False, 0, False, True)


def name(c) -> str:
    if c is None or c == "perm":
        return "autotuned" if c is None else "autotuned, token order + permutations"
    rest = f" +{c.rest_m}" if c.rest_m else ""
    pre = " prefetch" if c.prefetch else ""
    keys = "table" if c.index_table else "bits" if c.lookup_bits else "cmp"
    return f"{c.block_m}{rest}x{c.block_n} w{c.num_warps} s{c.num_stages} {keys}{pre}"


def timed(fn, budget_ms: float = 250.0) -> float:
    """Median ms of back-to-back calls (CUDA events), as many as fit the budget (3 to 40): enough for the
    10-300 ms attention calls here without do_bench's fixed warm-up and estimate rounds."""
    if DEV != "cuda":
        return bench(fn)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(3, min(40, int(budget_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]


def correctness(args, configs):
    log("\n## 1. Each configuration against the fp32 reference (small problem, low precision)")
    log("| config | causal | max err | bound (2x SDPA-style low-precision ref + 1e-3) | |")
    log("|---|---|---|---|---|")
    gen = torch.Generator(device=DEV).manual_seed(1)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    h, s, d, cq, ck = (2, 1500, 128, 20, 60) if not args.smoke else (1, 50, 32, 4, 9)
    q, k, v = (torch.randn(1, h, s, d, device=DEV, generator=gen).to(dt) for _ in range(3))
    qs = torch.bincount(torch.randint(0, cq, (s,), device=DEV, generator=gen), minlength=cq).int()
    ks = torch.bincount(torch.randint(0, ck - 2, (s,), device=DEV, generator=gen), minlength=ck).int()  # 2 empty
    qs, ks = qs.expand(1, h, cq).contiguous(), ks.expand(1, h, ck).contiguous()
    bm = torch.rand(1, h, cq, ck, device=DEV, generator=gen) < 0.5
    for causal in (False, True):
        ref = R.block_sparse_attention_ref(q.float(), k.float(), v.float(), qs, ks, bm, causal)
        low = R.block_sparse_attention_ref(q, k, v, qs, ks, bm, causal).float()
        bound = 2 * (low - ref).abs().max().item() + 1e-3
        # causal: the first configuration of each key path (compile time)
        for c in configs + [None] if not causal else [configs[0], next(c for c in configs if c.index_table)]:
            try:
                out = OP.launch_block_sparse(q, k, v, qs, ks, bm, causal, d**-0.5, c)
            except Exception as e:  # noqa: BLE001  (a configuration that does not compile: shown, the rest go on)
                check(f"config {name(c)} causal={causal}", False, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            err = (out.float() - ref).abs().max().item()
            ok = math.isfinite(err) and err <= bound
            check(f"config {name(c)} causal={causal}", ok, f"max err {err:.2e} <= {bound:.2e}")
            log(f"| {name(c)} | {causal} | {err:.2e} | {bound:.2e} | {'ok' if ok else 'FAIL'} |")


def row_use(qs, bm, c) -> float:
    """Rows over the rows of the query tiles the configuration launches."""
    qs = OP._merge_equal_rows(qs, bm)[0]
    s = int(qs.sum(-1).max())
    parts = [(c.block_m, 0, False)] if not c.rest_m else [(c.block_m, c.block_m, False), (c.rest_m, c.block_m, True)]
    slots = sum(float((OP._query_tiles(qs, s, m, split, rest)[0] >= 0).sum()) * m for m, split, rest in parts)
    return float(qs.sum()) / slots


def tile_config(c, d):
    """The configuration's query tiling (the autotuned launch: the host's BLOCK_M and rest_m)."""
    if c is not None and c != "perm":
        return c
    if DEV != "cuda":
        return OP._interpreter_config()
    block_m, bits, rest_m, prefetch, table = OP._query_block(d)
    return Cfg(block_m, 0, 0, 0, bits, rest_m, prefetch, table)


def attention_sweep(args, configs, peak_mm):
    log("\n## 2. Block-sparse forward vs SDPA flash (bf16, D 128, 300 x 1000 clusters, random cluster maps)")
    log("| shape | sparsity | config | ms | TFLOP/s executed | % of 989 | % of matmul | SDPA flash ms | speed-up | "
        "row use |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=DEV).manual_seed(0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    shapes = [("Wan2.1-1.3B", 12, args.wan_tokens), ("HunyuanVideo", 24, args.hunyuan_tokens)][:1 if args.smoke else 2]
    results = {}  # (shape, sparsity) -> {config name: speed-up}
    for label, h, s in shapes:
        q, k, v = (clustered(1, h, s, args.head_dim, 64, dt, gen) for _ in range(3))
        ql, qc = SA.kmeans(q, args.q_clusters, iters=args.iters)
        kl, kc = SA.kmeans(k, args.k_clusters, iters=args.iters)
        qp, qs = SA.cluster_permutation(ql, qc.shape[2])
        kp, ks = SA.cluster_permutation(kl, kc.shape[2])
        qq, kk, vv = SA.permute(q, qp), SA.permute(k, kp), SA.permute(v, kp)
        dense = sdpa_flash(qq, kk, vv)
        t_sdpa = timed(lambda: sdpa_flash(q, k, v))
        identity_row(label, h, s, q, k, v, t_sdpa, args.head_dim, peak_mm)
        for sparsity in args.sparsities:
            bm = random_map(1, h, qc.shape[2], kc.shape[2], 1 - sparsity, gen)
            flops = 4 * args.head_dim * float((qs.float()[..., :, None] * ks.float()[..., None, :] * bm).sum())
            cell = results.setdefault((label, sparsity), {})
            sc = args.head_dim**-0.5
            for c in configs + [None, "perm"]:
                if c == "perm":  # the autotuned launch on token-order q, k, v through the permutations (SVG2's use)
                    fn = lambda: OP.launch_block_sparse(q, k, v, qs, ks, bm, False, sc, None, qp, kp)  # noqa: E731
                else:
                    fn = lambda: OP.launch_block_sparse(qq, kk, vv, qs, ks, bm, False, sc, c)  # noqa: E731
                try:
                    out = fn()
                except Exception as e:  # noqa: BLE001
                    check(f"{label} {name(c)}", False, f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                if c == "perm":
                    out = SA.permute(out, qp)
                if sparsity == 0.0:
                    err = rel_err(out, dense)
                    check(f"{label} all blocks = SDPA, {name(c)}", err < 2e-2, f"rel err {err:.1e}")
                del out
                t = timed(fn)
                tf = flops / t / 1e9
                cell[name(c)] = t_sdpa / t
                log(f"| {label} ({h}x{s}) | {sparsity:.0%} | {name(c)} | {t:.2f} | {tf:.0f} | {tf / PEAK:.0%} | "
                    f"{tf / peak_mm:.0%} | {t_sdpa:.2f} | {t_sdpa / t:.2f}x | "
                    f"{row_use(qs, bm, tile_config(c, args.head_dim)):.0%} |")
        del q, k, v, qq, kk, vv, dense
    log("\n| shape | sparsity | best config | speed-up | autotuned |")
    log("|---|---|---|---|---|")
    for (label, sparsity), cell in results.items():
        best = max((n for n in cell if not n.startswith("autotuned")), key=cell.get)
        log(f"| {label} | {sparsity:.0%} | {best} | {cell[best]:.2f}x | {cell.get('autotuned', 0):.2f}x |")
    names = [n for n in map(name, configs + [None]) if all(n in cell for cell in results.values())]
    gmean = {n: math.exp(sum(math.log(cell[n]) for cell in results.values()) / len(results)) for n in names}
    best = max((n for n in gmean if not n.startswith("autotuned")), key=gmean.get)
    log(f"\nbest overall (geometric mean of speed-ups over all cells): {best} ({gmean[best]:.2f}x); "
        f"autotuned {gmean.get('autotuned', float('nan')):.2f}x")


def identity_row(label, h, s, q, k, v, t_sdpa, d, peak_mm):
    """The index-table kernel with one query and one key cluster per head, all selected: every row reads the
    identity as its key index table, so the tiles and the loop are those of dense flash attention."""
    one = torch.full((1, h, 1), s, dtype=torch.int32, device=DEV)
    bm = torch.ones(1, h, 1, 1, dtype=torch.bool, device=DEV)
    cfg = IDENTITY_CFG if DEV == "cuda" else None
    fn = lambda: OP.launch_block_sparse(q, k, v, one, one, bm, False, d**-0.5, cfg)  # noqa: E731
    try:
        err = rel_err(fn(), sdpa_flash(q, k, v))
    except Exception as e:  # noqa: BLE001
        check(f"{label} {IDENTITY}", False, f"{type(e).__name__}: {str(e)[:300]}")
        return
    check(f"{label} {IDENTITY} = SDPA", err < 2e-2, f"rel err {err:.1e}")
    t = timed(fn)
    tf = 4 * d * h * float(s) * s / t / 1e9
    log(f"| {label} ({h}x{s}) | 0% | {IDENTITY} | {t:.2f} | {tf:.0f} | {tf / PEAK:.0%} | {tf / peak_mm:.0%} | "
        f"{t_sdpa:.2f} | {t_sdpa / t:.2f}x | {row_use(one, bm, tile_config(cfg, d)):.0%} |")


def kmeans_part(args):
    log("\n## 3. k-means and the SVG2 warm step (Wan 1.3B shape, bf16)")
    gen = torch.Generator(device=DEV).manual_seed(2)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    h, s = (12, args.wan_tokens) if not args.smoke else (2, args.wan_tokens)
    q, k, v = (clustered(1, h, s, args.head_dim, 64, dt, gen) for _ in range(3))
    t_attn = bench(lambda: sdpa_flash(q, k, v))
    _, qc0 = SA.kmeans(q, args.q_clusters, iters=args.iters)
    _, kc0 = SA.kmeans(k, args.k_clusters, iters=args.iters)
    log(f"dense attention (SDPA flash, one layer): {t_attn:.3f} ms")
    log("\n| assignment config | Q (300) ms | K (1000) ms | K TFLOP/s (% of 989) | labels = default |")
    log("|---|---|---|---|---|")
    want = OP.launch_kmeans_assign(k, kc0)
    for c in KM_CONFIGS if DEV == "cuda" else [None]:
        try:
            OP.launch_kmeans_assign(q, qc0, c)
        except Exception as e:  # noqa: BLE001
            check(f"kmeans assign {c}", False, f"{type(e).__name__}: {str(e)[:300]}")
            continue
        tq = bench(lambda: OP.launch_kmeans_assign(q, qc0, c))
        tk = bench(lambda: OP.launch_kmeans_assign(k, kc0, c))
        same = float((OP.launch_kmeans_assign(k, kc0, c) == want).float().mean())
        check(f"kmeans assign {c}", same > 0.999, f"{same:.2%} labels as the default config")
        tf = 2 * h * s * kc0.shape[2] * args.head_dim / tk / 1e9
        log(f"| {c} | {tq:.3f} | {tk:.3f} | {tf:.0f} ({tf / PEAK:.0%}) | {same:.2%} |")
    xf, kl = k.float(), want.long()
    rows = [
        ("K: one assignment", lambda: SA._op.kmeans_assign_op(k, kc0)),
        ("K: one update (scatter-add, torch)", lambda: R.update_ref(xf, kl, kc0)),
        ("K: one round, assignment + update by atomics in one kernel", lambda: SA._op.kmeans_round_op(k, kc0)),
        ("K: x.float() (once per k-means call)", lambda: k.float()),
        ("k-means Q + K, 2 warm rounds", lambda: (SA.kmeans(q, args.q_clusters, init=qc0, iters=2),
                                                  SA.kmeans(k, args.k_clusters, init=kc0, iters=2))),
        ("permutation: argsort + gather of q, k, v", lambda: permute3(q, k, v, want.long(), kc0.shape[2])),
        ("top-p budget (p 0.9, min 10%)", lambda: SA.topp_budget(qc0, kc0, torch.full((1, h, kc0.shape[2]),
                                                                  s // kc0.shape[2], device=DEV), 0.9, 0.1)),
        ("whole warm step (k-means + argsort + budget; attention reads through the permutation)",
         lambda: warm_step(q, k, v, qc0, kc0)),
    ]  # fmt: skip
    log("\n| part | ms | % of dense attention |")
    log("|---|---|---|")
    for label, fn in rows:
        t = bench(fn, warmup=2, rep=20)
        log(f"| {label} | {t:.3f} | {t / t_attn:.1%} |")
    budget_threshold_configs(qc0, kc0, h, s)


def budget_threshold_configs(qc0, kc0, h, s):
    """The budget's threshold search on its own shape (B*H*Cq rows of Ck weights: many short rows, unlike
    Twilight's few long ones), per launch configuration, against the default's thresholds."""
    sizes = torch.full((1, h, kc0.shape[2]), s // kc0.shape[2], device=DEV)
    w = R.cluster_weights(qc0, kc0, sizes).reshape(-1, kc0.shape[2]).float().contiguous()
    n_min = math.ceil(0.1 * w.shape[1])
    want = OP.launch_topp_threshold(w, 0.9, n_min)
    log(f"\n| budget threshold config ({w.shape[0]} rows x {w.shape[1]}) | ms | thresholds = default |")
    log("|---|---|---|")
    for c in BUDGET_TH_CONFIGS if DEV == "cuda" else [None]:
        t = bench(lambda: OP.launch_topp_threshold(w, 0.9, n_min, c), warmup=2, rep=20)
        same = bool(torch.equal(OP.launch_topp_threshold(w, 0.9, n_min, c), want))
        check(f"budget threshold {c}", same, "thresholds differ from the default configuration's")
        log(f"| {c} | {t:.3f} | {same} |")
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except ImportError:
        log("| flash-kmeans 0.3.1 | n/a (not installed) | |")
        return
    for label, x, n, init in (("Q", q, args.q_clusters, qc0), ("K", k, args.k_clusters, kc0)):
        xx = x.reshape(h, s, -1)
        for iters in (2, args.iters):
            c0 = init.reshape(h, n, -1).to(x.dtype)
            try:
                t = bench(lambda: batch_kmeans_Euclid(xx, n_clusters=n, max_iters=iters, tol=-1.0, init_centroids=c0),
                          warmup=2, rep=20)  # fmt: skip
            except Exception as e:  # noqa: BLE001  (the baseline's failure is reported, not ours)
                log(f"| {label}: flash-kmeans {iters} rounds | n/a ({type(e).__name__}) | |")
                continue
            ours = bench(lambda: SA.kmeans(x, n, init=init, iters=iters), warmup=2, rep=20)
            log(f"| {label}: {iters} rounds from the same centroids, flash-kmeans vs ours | {t:.3f} vs {ours:.3f} | "
                f"{t / t_attn:.1%} vs {ours / t_attn:.1%} |")


def permute3(q, k, v, labels, n):
    perm, _ = SA.cluster_permutation(labels, n)
    return SA.permute(q, perm), SA.permute(k, perm), SA.permute(v, perm)


def warm_step(q, k, v, qc0, kc0):
    """svg2_attention's work before the attention: k-means, the permutations (argsort; the attention reads
    q, k, v through them) and the budget."""
    ql, qc = SA.kmeans(q, qc0.shape[2], init=qc0, iters=2)
    kl, kc = SA.kmeans(k, kc0.shape[2], init=kc0, iters=2)
    qp, qs = SA.cluster_permutation(ql, qc.shape[2])
    kp, ks = SA.cluster_permutation(kl, kc.shape[2])
    return SA.topp_budget(qc, kc, ks, 0.9, 0.1)


def decode_part(args):
    log("\n## 4. Twilight decode vs dense decode (B 1, 28 q / 4 kv heads x 128, p 0.85): eager | CUDA graph ms")
    log("| context | stage | eager ms | graph ms |")
    log("|---|---|---|---|")
    gen = torch.Generator(device=DEV).manual_seed(3)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    hq, hkv, d = (28, 4, 128) if not args.smoke else (4, 2, 32)
    for s in args.contexts:
        k = torch.randn(1, hkv, s, d, device=DEV, generator=gen).to(dt)
        v = torch.randn(1, hkv, s, d, device=DEV, generator=gen).to(dt)
        q = (3 * torch.randn(1, hq, d, device=DEV, generator=gen)).to(dt)  # a peaked attention, as in LLMs
        packed, scale, lo = SA.quantize_int4(k)
        scores = SA._op.int4_scores_op(q, packed, scale, lo, s, d**-0.5)
        w = torch.softmax(scores, -1)
        wf = w.reshape(-1, s)
        thr = SA._op.topp_threshold_op(wf, 0.85, 0)
        mask = (wf >= thr[:, None]).reshape(w.shape)
        stages = [
            ("dense SDPA decode", lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)),
            ("INT4 scores", lambda: SA._op.int4_scores_op(q, packed, scale, lo, s, d**-0.5)),
            ("softmax", lambda: torch.softmax(scores, -1)),
            ("top-p threshold", lambda: SA._op.topp_threshold_op(wf, 0.85, 0)),
            ("mask (w >= thr)", lambda: wf >= thr[:, None]),
            ("sparse decode + combine", lambda: SA.sparse_decode_attention(q, k, v, mask)),
            ("Twilight total", lambda: SA.sparse_decode_attention(q, k, v,
                                                                  SA.twilight_select(q, packed, scale, lo, 0.85)[0])),
        ]  # fmt: skip
        for label, fn in stages:
            log(f"| {s} | {label} | {bench(fn):.4f} | {graph_bench(fn):.4f} |")
        log(f"| {s} | kept tokens | {float(mask.float().mean()):.2%} | |")
        want = SA.topp_mask(wf, 0.85, backend="torch")
        for c in TH_CONFIGS if DEV == "cuda" else [None]:
            try:
                OP.launch_topp_threshold(wf, 0.85, 0, c)
            except Exception as e:  # noqa: BLE001
                check(f"top-p threshold {c}", False, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            got = wf >= OP.launch_topp_threshold(wf, 0.85, 0, c)[:, None]
            agree = float((got == want).float().mean())
            check(f"top-p threshold {c} at {s}", agree > 0.999 and bool(((wf * got).sum(-1) >= 0.85 - 1e-5).all()),
                  f"{agree:.4%} of the sort's mask")  # fmt: skip
            log(f"| {s} | top-p threshold {c} | {bench(lambda: OP.launch_topp_threshold(wf, 0.85, 0, c)):.4f} | "
                f"mask = sort's on {agree:.3%} |")
        ref = R.sparse_decode_ref(q.float(), k.float(), v.float(), mask)
        for c in DEC_CONFIGS if DEV == "cuda" else [OP.DecodeConfig(False, 0, 16, 1), None]:
            fn = lambda: OP.launch_sparse_decode(q, k, v, mask, d**-0.5, c)  # noqa: E731
            try:
                err = rel_err(fn(), ref)
            except Exception as e:  # noqa: BLE001
                check(f"sparse decode {c}", False, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            check(f"sparse decode {c} at {s}", err < 2e-2, f"rel err {err:.1e}")
            log(f"| {s} | sparse decode {c} | {bench(fn):.4f} | {graph_bench(fn):.4f} |")
        check(f"sparse decode {s}", rel_err(SA.sparse_decode_attention(q, k, v, mask), ref) < 2e-2, "vs reference")


def main() -> int:
    ap = script_parser(__doc__)
    ap.add_argument("--only", default="attn,kmeans,decode", help="comma list of parts: attn, kmeans, decode")
    ap.add_argument("--wan-tokens", type=int, default=32760)
    ap.add_argument("--hunyuan-tokens", type=int, default=65536, help="trimmed from 119,056 to fit the time")
    args = ap.parse_args()
    start(args.smoke)
    args.head_dim, args.q_clusters, args.k_clusters, args.iters = 128, 300, 1000, 50
    args.contexts, args.sparsities = [32768, 131072], [0.0, 0.5, 0.9, 0.95]
    configs = CONFIGS if DEV == "cuda" else SMOKE_CONFIGS
    if args.smoke:
        args.wan_tokens, args.hunyuan_tokens, args.head_dim = 96, 80, 32
        args.q_clusters, args.k_clusters, args.iters, args.contexts = 4, 6, 2, [64]
        args.sparsities = [0.0, 0.5]
    parts = {p.strip() for p in args.only.split(",")}
    t0 = time.perf_counter()
    if "attn" in parts:
        bf16, _ = matmul_rooflines(args.smoke)
        log(f"\n## 0. Rooflines: bf16 datasheet {PEAK} TFLOP/s; measured 8192³ bf16 matmul {bf16 / 1e12:.0f} TFLOP/s")
        run_step("correctness", lambda: correctness(args, configs))
        run_step("attention sweep", lambda: attention_sweep(args, configs, bf16 / 1e12))
    if "kmeans" in parts:
        run_step("kmeans", lambda: kmeans_part(args))
    if "decode" in parts:
        run_step("decode", lambda: decode_part(args))
    log(f"\nsweep time: {time.perf_counter() - t0:.0f} s")
    finish()
    return 0 if not FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())
