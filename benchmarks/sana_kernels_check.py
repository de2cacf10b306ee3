"""GPU check: the SANA Linear DiT with ``model.kernels=triton`` (fused ReLU linear attention with q/k
RMSNorm, fused adaLN-modulated LayerNorm) against the same weights with ``kernels=torch``: forward output
and gradients, relative error ||a-b||/||b||, in fp32 and bf16 autocast. Exits non-zero on a failure.

    python3 benchmarks/sana_kernels_check.py [--depth 2]
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script (both paths = torch)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1.6b")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    args = ap.parse_args()
    from scaleforge.models.sana.recipe import SanaModelConfig, SanaRecipe

    recipe = SanaRecipe(SanaModelConfig(preset=args.preset, depth=args.depth, kernels="torch"), None)
    torch.manual_seed(0)
    ref = recipe.build_model(torch.device(DEV))
    recipe.init_weights(ref)
    fused = copy.deepcopy(ref)
    fused.set_kernels("triton")
    a = recipe.arch
    b = 2
    x = torch.randn(b, a.in_channels, args.latent, args.latent, device=DEV)
    t = torch.randint(0, 1000, (b,), device=DEV)
    y = torch.randn(b, a.text_len, a.caption_channels, device=DEV)
    mask = torch.ones(b, a.text_len, dtype=torch.bool, device=DEV)
    mask[1, a.text_len // 2:] = False
    failures = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        outs, grads = [], []
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)
            with torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32):
                o = m(x, t, y, mask)
            o.float().square().mean().backward()
            outs.append(o.float())
            grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters() if p.grad is not None]))
        err_o = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        err_g = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
        ok = err_o < tol and err_g < tol
        failures += not ok
        print(f"[{'PASS' if ok else 'FAIL'}] {dtype}: output rel err {err_o:.2e}, gradient rel err {err_g:.2e} "
              f"(tolerance {tol:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
