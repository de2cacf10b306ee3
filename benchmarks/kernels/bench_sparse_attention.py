"""Sparse attention on one GPU (issue: SVG2 + Twilight; docs/inference.md, docs/benchmarks.md). Prints tables:

A. block-sparse attention vs SDPA (flash backend) at 0 / 50 / 90 / 95% sparsity of the cluster-block map, on
   Wan 2.1 1.3B (12 heads x 32,760 tokens x 128: 480p x 81 frames) and HunyuanVideo (24 heads x 128, trimmed
   from 119,056 to --hunyuan-tokens) shapes, bf16, SVG2's cluster counts (300 / 1000 query / key clusters,
   sizes from k-means on clustered tokens). TFLOP/s count executed blocks only (4·D·Σ q_size·k_size); % of the
   989 TFLOP/s bf16 datasheet peak. FlashInfer's variable-block-sparse wrapper is timed too when importable.
B. SVG2's per-step overhead: k-means on Q and K (warm start, 2 iterations; and the 50-iteration first step),
   permutation and top-p budget, against the dense attention time (target <= 10%); flash-kmeans side by side
   when importable (the baseline).
C. Twilight decode latency against dense SDPA decode at 32k and 128k context (Qwen2-7B-like heads: 28 query /
   4 kv heads x 128), p = 0.85, with the kept-token fraction.

    PYTHONPATH=$PWD python benchmarks/kernels/bench_sparse_attention.py            # one H100: ~2 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels/bench_sparse_attention.py --smoke   # CPU logic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV, bench, log  # noqa: E402

from scaleforge.kernels import sparse_attention as SA  # noqa: E402

PEAK = 989.4  # bf16 dense TFLOP/s, H100/H200 datasheet


def clustered(b, h, s, d, n_centers, dtype, gen):
    """Tokens around n_centers random centres per head (video tokens cluster; pure noise would not)."""
    centres = torch.randn(b, h, n_centers, d, device=DEV, generator=gen)
    idx = torch.randint(0, n_centers, (b, h, s), device=DEV, generator=gen)
    x = centres.gather(2, idx[..., None].expand(b, h, s, d))
    return (x + 0.5 * torch.randn(b, h, s, d, device=DEV, generator=gen)).to(dtype)


def sdpa_flash(q, k, v):
    if DEV == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def random_map(b, h, cq, ck, density, gen):
    """Each query cluster keeps round(density * Ck) key clusters chosen at random (at least one)."""
    n = max(1, round(density * ck))
    scores = torch.rand(b, h, cq, ck, device=DEV, generator=gen)
    top = scores.topk(n, dim=-1).indices
    return torch.zeros(b, h, cq, ck, dtype=torch.bool, device=DEV).scatter_(-1, top, True)


def table_a(args, gen):
    shapes = [("Wan2.1-1.3B 480p x 81", 12, args.wan_tokens), ("HunyuanVideo (trimmed)", 24, args.hunyuan_tokens)]
    log("\n## A. block-sparse attention vs SDPA flash (bf16, D=128, 300 x 1000 clusters)")
    log("| shape | sparsity | ours ms | TFLOP/s executed | % of 989 | SDPA flash ms | speed-up | FlashInfer ms |")
    log("|---|---|---|---|---|---|---|---|")
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    for name, h, s in shapes:
        q, k, v = (clustered(1, h, s, args.head_dim, 64, dt, gen) for _ in range(3))
        ql, qc = SA.kmeans(q, args.q_clusters, iters=args.iters)
        kl, kc = SA.kmeans(k, args.k_clusters, iters=args.iters)
        qp, qs = SA.cluster_permutation(ql, qc.shape[2])
        kp, ks = SA.cluster_permutation(kl, kc.shape[2])
        qq, kk, vv = SA.permute(q, qp), SA.permute(k, kp), SA.permute(v, kp)
        t_sdpa = bench(lambda: sdpa_flash(q, k, v))
        for sparsity in (0.0, 0.5, 0.9, 0.95):
            bm = random_map(1, h, qc.shape[2], kc.shape[2], 1 - sparsity, gen)
            flops = 4 * args.head_dim * float((qs.float()[..., :, None] * ks.float()[..., None, :] * bm).sum())
            t = bench(lambda: SA.block_sparse_attention(qq, kk, vv, qs, ks, bm))
            tf = flops / t / 1e9
            log(f"| {name} ({h}x{s}) | {sparsity:.0%} | {t:.3f} | {tf:.0f} | {tf / PEAK:.0%} | {t_sdpa:.3f} | "
                f"{t_sdpa / t:.2f}x | {flashinfer_ms(qq, kk, vv, qs, ks, bm)} |")


def flashinfer_ms(q, k, v, qs, ks, bm) -> str:
    try:
        import flashinfer
    except ImportError:
        return "n/a (not installed)"
    try:
        b, h, s, d = q.shape
        ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=DEV)
        w = flashinfer.sparse.VariableBlockSparseAttentionWrapper(ws)
        w.plan(bm[0], qs[0], ks[0], h, h, d, q_data_type=q.dtype)
        qn, kn, vn = (t[0].contiguous() for t in (q, k, v))
        return f"{bench(lambda: w.run(qn, kn, vn)):.3f}"
    except Exception as e:  # the wrapper's API differs between releases: report, do not fail the table
        return f"n/a ({type(e).__name__})"


def table_b(args, gen):
    log("\n## B. SVG2 per-step overhead (Wan 1.3B shape, bf16): k-means + permutation + budget vs dense attention")
    log("| part | ms | % of SDPA flash attention |")
    log("|---|---|---|")
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    h, s = 12, args.wan_tokens
    q, k, v = (clustered(1, h, s, args.head_dim, 64, dt, gen) for _ in range(3))
    t_attn = bench(lambda: sdpa_flash(q, k, v))
    _, qc0 = SA.kmeans(q, args.q_clusters, iters=args.iters)
    _, kc0 = SA.kmeans(k, args.k_clusters, iters=args.iters)

    def warm_step():
        ql, qc = SA.kmeans(q, args.q_clusters, init=qc0, iters=2)
        kl, kc = SA.kmeans(k, args.k_clusters, init=kc0, iters=2)
        qp, qs = SA.cluster_permutation(ql, qc.shape[2])
        kp, ks = SA.cluster_permutation(kl, kc.shape[2])
        SA.permute(q, qp), SA.permute(k, kp), SA.permute(v, kp)
        return SA.topp_budget(qc, kc, ks, 0.9, 0.1)

    rows = [
        ("k-means Q (300) + K (1000), 2 warm iterations", lambda: (SA.kmeans(q, args.q_clusters, init=qc0, iters=2),
                                                                   SA.kmeans(k, args.k_clusters, init=kc0, iters=2))),
        ("top-p budget (p 0.9, min 10%)", lambda: SA.topp_budget(qc0, kc0, torch.full((1, h, kc0.shape[2]),
                                                                  s // kc0.shape[2], device=DEV), 0.9, 0.1)),
        ("whole warm step (k-means + permutation + budget)", warm_step),
        ("first step: k-means with 50 iterations", lambda: (SA.kmeans(q, args.q_clusters, iters=args.iters),
                                                            SA.kmeans(k, args.k_clusters, iters=args.iters))),
    ]  # fmt: skip
    for name, fn in rows:
        t = bench(fn, warmup=2, rep=10)
        log(f"| {name} | {t:.3f} | {t / t_attn:.1%} |")
    log(f"| (SDPA flash attention, one layer) | {t_attn:.3f} | 100% |")
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except ImportError:
        log("| flash-kmeans 0.3.1 (baseline) | n/a (not installed) | |")
        return
    for name, x, n, init in (("Q", q, args.q_clusters, qc0), ("K", k, args.k_clusters, kc0)):
        xx = x.reshape(h, s, -1)
        for iters, c0 in ((2, init.reshape(h, n, -1).to(x.dtype)), (args.iters, None)):
            try:
                t = bench(lambda: batch_kmeans_Euclid(xx, n_clusters=n, max_iters=iters, tol=0.0, init_centroids=c0),
                          warmup=2, rep=10)  # fmt: skip
                ours = bench(lambda: SA.kmeans(x, n, init=None if c0 is None else init, iters=iters), warmup=2, rep=10)
                log(f"| {name}: flash-kmeans {iters} it vs ours | {t:.3f} vs {ours:.3f} | {t / t_attn:.1%} vs "
                    f"{ours / t_attn:.1%} |")
            except Exception as e:
                log(f"| {name}: flash-kmeans {iters} it | n/a ({type(e).__name__}: {e}) | |")


def table_c(args, gen):
    log("\n## C. Twilight decode vs dense decode (B 1, 28 q / 4 kv heads x 128, p 0.85)")
    log("| context | dense SDPA ms | Twilight ms (INT4 scores + top-p + sparse) | of which sparse attention ms | "
        "kept tokens | speed-up |")
    log("|---|---|---|---|---|---|")
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    hq, hkv, d = 28, 4, 128
    for s in args.contexts:
        k = torch.randn(1, hkv, s, d, device=DEV, generator=gen).to(dt)
        v = torch.randn(1, hkv, s, d, device=DEV, generator=gen).to(dt)
        q = (3 * torch.randn(1, hq, d, device=DEV, generator=gen)).to(dt)  # a peaked attention, as in LLMs
        packed, scale, lo = SA.quantize_int4(k)
        t_dense = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
        mask, _ = SA.twilight_select(q, packed, scale, lo, 0.85)
        t_tw = bench(lambda: SA.sparse_decode_attention(q, k, v, SA.twilight_select(q, packed, scale, lo, 0.85)[0]))
        t_sp = bench(lambda: SA.sparse_decode_attention(q, k, v, mask))
        log(f"| {s} | {t_dense:.3f} | {t_tw:.3f} | {t_sp:.3f} | {float(mask.float().mean()):.1%} | "
            f"{t_dense / t_tw:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / TRITON_INTERPRET=1)")
    ap.add_argument("--only", default="a,b,c", help="comma list of tables: a, b, c")
    ap.add_argument("--wan-tokens", type=int, default=32760)
    ap.add_argument("--hunyuan-tokens", type=int, default=65536, help="trimmed from 119,056 to fit the time budget")
    args = ap.parse_args()
    args.head_dim, args.q_clusters, args.k_clusters, args.iters = 128, 300, 1000, 50
    args.contexts = [32768, 131072]
    if args.smoke:
        args.wan_tokens, args.hunyuan_tokens, args.head_dim = 96, 80, 32
        args.q_clusters, args.k_clusters, args.iters, args.contexts = 4, 6, 2, [200]
    gen = torch.Generator(device=DEV).manual_seed(0)
    log(f"device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}; torch {torch.__version__}")
    for part in args.only.split(","):
        {"a": table_a, "b": table_b, "c": table_c}[part.strip()](args, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
