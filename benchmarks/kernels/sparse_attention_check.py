"""GPU numerics of the sparse-attention kernels (the CPU tests check their logic in fp32 / fp16 in the
interpreter; bf16 tl.dot and real launch shapes are checked here). Each line is PASS / FAIL; exit code 1 on any
FAIL.

    PYTHONPATH=$PWD python benchmarks/kernels/sparse_attention_check.py        # one H100: ~30 s

Checks: block-sparse attention in bf16 / fp16 at head dims 64 and 128, odd lengths, causal and not, against
the fp32 reference (flash-attention rule: error <= 2x that of the reference run in the low precision, plus a
small floor); all blocks against SDPA; k-means labels against the torch reference; the binary-search top-p
against the sort; Twilight scores / mask / sparse decode against their references; SVG2 at p = 1 against SDPA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV, FAILURES, check, rel_err  # noqa: E402

from scaleforge.kernels import sparse_attention as SA  # noqa: E402
from scaleforge.kernels.reference import sparse_attention as R  # noqa: E402


def sizes(h, c, s, gen):
    lab = torch.randint(0, c, (1, h, s), device=DEV, generator=gen)
    return torch.zeros(1, h, c, dtype=torch.int32, device=DEV).scatter_add_(2, lab, torch.ones_like(lab, dtype=torch.int32))


def low_precision_ref(q, k, v, qs, ks, bm, causal):
    """The reference as a low-precision flash kernel rounds: scores in fp32, probabilities rounded to q's dtype
    before the product with v (what the flash-attention tests' low-precision reference does)."""
    mask = R.expand_block_map(bm, qs, ks)
    if causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return ((p.to(q.dtype).float() @ v.float())).to(q.dtype)


def block_sparse(gen):
    for dt in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            for s, causal in ((4099, False), (2047, True)):
                h, cq, ck = 4, 37, 113
                q, k, v = (torch.randn(1, h, s, d, device=DEV, generator=gen).to(dt) for _ in range(3))
                qs, ks = sizes(h, cq, s, gen), sizes(h, ck, s, gen)
                bm = torch.rand(1, h, cq, ck, device=DEV, generator=gen) < 0.3
                out = SA.block_sparse_attention(q, k, v, qs, ks, bm, causal=causal, backend="triton")
                ref = R.block_sparse_attention_ref(q.float(), k.float(), v.float(), qs, ks, bm, causal)
                low = low_precision_ref(q, k, v, qs, ks, bm, causal)
                low_err = float((low.float() - ref).abs().max())
                err = float((out.float() - ref).abs().max())
                check(f"block_sparse {dt} d{d} s{s} causal={causal}", err <= 2 * low_err + 2e-3,
                      f"max err {err:.2e}, low-precision reference {low_err:.2e}, rel {rel_err(out, ref):.2e}")
        q, k, v = (torch.randn(2, 8, 3001, 128, device=DEV, generator=gen).to(dt) for _ in range(3))
        qs, ks = sizes(8, 20, 3001, gen).expand(2, 8, 20).contiguous(), sizes(8, 50, 3001, gen).expand(2, 8, 50).contiguous()
        full = torch.ones(2, 8, 20, 50, dtype=torch.bool, device=DEV)
        out = SA.block_sparse_attention(q, k, v, qs, ks, full, backend="triton")
        check(f"all blocks = SDPA {dt}", rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-2,
              f"rel {rel_err(out, F.scaled_dot_product_attention(q, k, v)):.2e}")


def kmeans_topp_twilight(gen):
    x = torch.randn(1, 12, 32760, 128, device=DEV, generator=gen).to(torch.bfloat16)
    # One assignment step from the same centroids (full Lloyd runs diverge from any near-tie): the labels may
    # differ only where the two distances tie within the Triton path's rounding (bf16 centroids: each
    # ‖x - c‖² moves by at most 2·2⁻⁹·(‖c‖² + ‖x‖‖c‖); the bound is twice that for the two candidates, x2).
    c0 = x[:, :, torch.randperm(x.shape[2], device=DEV, generator=gen)[:300]].float()
    lab, _ = SA.kmeans(x, 300, init=c0, iters=0, backend="triton")
    lab_r, _ = SA.kmeans(x, 300, init=c0, iters=0, backend="torch")
    agree = float((lab == lab_r).float().mean())
    xf = x.float()
    dist = lambda lb: (xf - c0.gather(2, lb[..., None].expand(*lb.shape, 128))).square().sum(-1)  # noqa: E731
    c_max = c0.norm(dim=-1).amax(-1, keepdim=True)
    bound = 2.0**-6 * c_max * (c_max + xf.norm(dim=-1))
    gap = (dist(lab) - dist(lab_r)).abs()
    ties = bool((gap <= bound)[lab != lab_r].all())
    check("kmeans assignment (bf16, 12 x 32760 x 128, 300 clusters)", agree > 0.99 and ties,
          f"{agree:.4%} agree; every differing label a tie within rounding: {ties}")
    w = torch.softmax(torch.randn(300, 1000, device=DEV, generator=gen) * 3, -1)
    same = torch.equal(SA.topp_mask(w, 0.9, 100, backend="triton"), SA.topp_mask(w, 0.9, 100, backend="torch"))
    check("top-p binary search = sort (300 x 1000)", same, "masks equal" if same else "masks differ")
    k = torch.randn(1, 4, 32768, 128, device=DEV, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 4, 32768, 128, device=DEV, generator=gen).to(torch.bfloat16)
    q = (3 * torch.randn(1, 28, 128, device=DEV, generator=gen)).to(torch.bfloat16)
    pk, sc, lo = SA.quantize_int4(k)
    m, w = SA.twilight_select(q, pk, sc, lo, 0.85, backend="triton")
    m_r, w_r = SA.twilight_select(q, pk, sc, lo, 0.85, backend="torch")
    check("twilight estimate", rel_err(w, w_r) < 1e-3, f"rel {rel_err(w, w_r):.2e}; mask diff "
          f"{float((m ^ m_r).float().mean()):.2e}, kept {float(m.float().mean()):.2%}")
    check("twilight kept mass >= p", bool(((w * m).sum(-1) >= 0.85 - 1e-4).all()), "every head")
    out = SA.sparse_decode_attention(q, k, v, m, backend="triton")
    ref = R.sparse_decode_ref(q.float(), k.float(), v.float(), m)
    check("sparse decode (bf16, 32k)", rel_err(out, ref) < 1e-2, f"rel {rel_err(out, ref):.2e}")


def svg2_p1(gen):
    q, k, v = (torch.randn(1, 12, 8190, 128, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(3))
    cfg = SA.SVG2Config(top_p=1.0, min_key_fraction=0.0, init_iters=5)
    out = SA.svg2_attention(q, k, v, cfg, backend="triton")
    e = rel_err(out, F.scaled_dot_product_attention(q, k, v))
    check("SVG2 p=1 = SDPA (bf16, 12 x 8190 x 128)", e < 1e-2, f"rel {e:.2e}")


def main() -> int:
    if DEV != "cuda":
        print("needs a GPU (the CPU tests cover the logic: pytest tests/kernels/test_sparse_attention.py)")
        return 0
    gen = torch.Generator(device=DEV).manual_seed(0)
    block_sparse(gen)
    kmeans_topp_twilight(gen)
    svg2_p1(gen)
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
