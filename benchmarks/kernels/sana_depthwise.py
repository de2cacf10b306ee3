"""SANA's Mix-FFN depthwise 3x3 convolution, forward + backward, three ways at SANA-1.6B's shape:

    python benchmarks/kernels/sana_depthwise.py              # one GPU, ~1 min (two compiles)
    python benchmarks/kernels/sana_depthwise.py --smoke      # CPU: tiny shape, checks only

``conv2d (model)``: what MixFFN does eager, transpose the tokens (B, N, 2Hd) to (B, 2Hd, H, W), ``nn.Conv2d``
(cuDNN), transpose back; ``conv2d compiled``: the same under ``torch.compile``; ``shifted sum compiled``:
``depthwise_conv3x3_tokens``, nine shifted products on the token layout, under ``torch.compile``. Micro-batch 8 at
1024 px: 8 x 1024 tokens x 11200 channels (2 x 2.5 x 2240), bf16. Roofline: the forward reads and writes the
activation once, the backward reads dy and x and writes dx (5 passes of 183 MB) at 3.35 TB/s (H100 HBM3).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from scaleforge.models.sana.model import depthwise_conv3x3_tokens

HBM_TBPS = 3.35


def conv_model(h, hw, weight, bias):
    b, n, c = h.shape
    x = h.transpose(1, 2).reshape(b, c, hw[0], hw[1])
    return F.conv2d(x, weight, bias, padding=1, groups=c).flatten(2).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, rows, cols, c = (8, 32, 32, 11200) if cuda else (2, 4, 6, 8)
    g = torch.Generator(dev).manual_seed(0)
    h = torch.randn(b, rows * cols, c, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = (0.3 * torch.randn(c, 1, 3, 3, device=dev, generator=g)).to(dtype).requires_grad_()
    bias = torch.randn(c, device=dev, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(b, rows * cols, c, device=dev, dtype=dtype, generator=g)
    impls = {"conv2d (model)": conv_model}
    if cuda:
        impls["conv2d compiled"] = torch.compile(conv_model)
        impls["shifted sum compiled"] = torch.compile(depthwise_conv3x3_tokens)
    else:
        impls["shifted sum"] = depthwise_conv3x3_tokens
    ref = [t.float() for t in torch.autograd.grad(conv_model(h.float(), (rows, cols), w.float(), bias.float()),
                                                   (h, w, bias), dy.float())]
    moved = 5 * h.numel() * h.element_size()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, tokens {b}x{rows * cols}, channels {c}, {dtype}")
    print("| impl | fwd+bwd ms | roofline ms (HBM) | % of roofline | dx rel err | dw rel err |")
    print("|---|---|---|---|---|---|")
    for name, fn in impls.items():
        def step():
            return torch.autograd.grad(fn(h, (rows, cols), w, bias), (h, w, bias), dy)

        grads = step()
        err = [((a.float() - r).norm() / r.norm()).item() for a, r in zip(grads, ref)]
        ms = float("nan")
        if cuda:
            import triton.testing

            ms = triton.testing.do_bench(step, quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        roof = moved / (HBM_TBPS * 1e12) * 1e3
        print(f"| {name} | {ms:.3f} | {roof:.3f} | {100 * roof / ms:.0f}% | {err[0]:.2e} | {err[1]:.2e} |", flush=True)


if __name__ == "__main__":
    main()
