"""Our LLM kernels against Liger-Kernel (0.8.5) and torch, side by side: RMSNorm, SwiGLU, fused linear + CE, and
the SigLIP tower's LayerNorm (weight and bias).

    python benchmarks/kernels/vs_liger.py                  # one GPU, ~1 min
    TRITON_INTERPRET=1 python benchmarks/kernels/vs_liger.py --smoke    # CPU: tiny shapes, no timing claims

Shapes: lm_1b at micro-batch 4 (8192 tokens, dim 2048, SwiGLU 5632, vocab 50304) and NVILA-8B's LLM
(Qwen2.5-7B: dim 3584, SwiGLU 18944, vocab 152064) at 8192 tokens; the LayerNorm at SigLIP so400m's width
(1152) over 16 tiles of 1024 patches; bf16. Each row: forward + backward time
(``triton.testing.do_bench``, median), the peak memory the call adds over its inputs, the error of the output
and of the input gradient against the fp32 reference (relative L2), and the roofline: HBM bytes of the fused
kernel at 3.35 TB/s (H100 datasheet) for the elementwise / norm kernels, the three GEMMs' FLOPs (6·N·D·V) at
989 TFLOP/s for the linear + CE. Implementations: ``torch`` (eager, as the model writes it), ``compiled``
(``torch.compile`` of the same), ``ours`` (scaleforge.kernels), ``liger`` (liger_kernel.transformers.functional).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

HBM_TBPS, PEAK_TFLOPS = 3.35, 989.0


def _liger():
    try:
        from liger_kernel.transformers import functional as lf
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"liger-kernel not available: {e}", file=sys.stderr)
        return None
    return lf


def rms_torch(x, w, eps=1e-5):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ln_torch(x, w, b, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def swiglu_torch(g, u):
    return F.silu(g) * u


def flce_torch(x, w, y):
    return F.cross_entropy((x @ w.t()).float(), y, reduction="sum")


def impls(family: str, lf):
    from scaleforge.kernels import fused_linear_cross_entropy, layer_norm, rms_norm, swiglu

    if family == "rms_norm":
        out = {"torch": rms_torch, "ours": lambda x, w: rms_norm(x, w, 1e-5, backend="triton")}
        if lf:
            out["liger"] = lambda x, w: lf.liger_rms_norm(x, w, 1e-5, in_place=False)
    elif family == "layer_norm":
        out = {"torch": ln_torch, "ours": lambda x, w, b: layer_norm(x, w, b, 1e-6, backend="triton")}
        if lf:
            out["liger"] = lambda x, w, b: lf.liger_layer_norm(x, w, b, 1e-6)
    elif family == "swiglu":
        out = {"torch": swiglu_torch, "ours": lambda g, u: swiglu(g, u, backend="triton")}
        if lf:
            out["liger"] = lf.liger_swiglu
    else:
        out = {"torch": flce_torch, "ours": lambda x, w, y: fused_linear_cross_entropy(x, w, y, backend="triton")}
        if lf:
            out["liger"] = lambda x, w, y: lf.liger_fused_linear_cross_entropy(x, w, y, reduction="sum")
    if torch.cuda.is_available():
        out["compiled"] = torch.compile(out["torch"])
    return out


def make_inputs(family: str, tokens: int, dim: int, hidden: int, vocab: int, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    if family == "rms_norm":
        return [r(tokens, dim).to(dtype).requires_grad_(), (1 + 0.1 * r(dim)).to(dtype).requires_grad_()]
    if family == "layer_norm":
        return [r(tokens, dim).to(dtype).requires_grad_(), (1 + 0.1 * r(dim)).to(dtype).requires_grad_(),
                (0.1 * r(dim)).to(dtype).requires_grad_()]
    if family == "swiglu":
        return [r(tokens, hidden).to(dtype).requires_grad_(), r(tokens, hidden).to(dtype).requires_grad_()]
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return [r(tokens, dim).to(dtype).requires_grad_(), (0.02 * r(vocab, dim)).to(dtype).requires_grad_(), y]


def roofline_ms(family: str, inputs) -> tuple[float, str]:
    if family == "flce":
        n, d = inputs[0].shape
        v = inputs[1].shape[0]
        return 6 * n * d * v / (PEAK_TFLOPS * 1e12) * 1e3, "GEMM FLOPs"
    el, b = inputs[0].numel(), inputs[0].element_size()
    moved = (3 + 5) * el * b if family == "swiglu" else (2 + 3) * el * b  # fwd + bwd tensors
    return moved / (HBM_TBPS * 1e12) * 1e3, "HBM bytes"


def fresh(inputs):
    """Copies of the inputs for one implementation: Liger's SwiGLU backward writes the gradients into its
    saved inputs' storage, which would change the inputs of every later row."""
    return [t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]


def errors(fn, inputs) -> tuple[float, float]:
    ours = fresh(inputs)
    out = fn(*ours)
    grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    (dx,) = torch.autograd.grad(out, ours[0], grad)
    ref_in = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    ref = {"rms_norm": rms_torch, "layer_norm": ln_torch, "swiglu": swiglu_torch, "flce": flce_torch}[FAMILY](*ref_in)
    (dx_ref,) = torch.autograd.grad(ref, ref_in[0], grad.float())
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    return rel(out, ref), rel(dx, dx_ref)


def bench(fn, inputs, smoke: bool) -> tuple[float, float]:
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out) if out.dim() == 0 else torch.ones_like(out))

    if smoke or not torch.cuda.is_available():
        step()
        return float("nan"), float("nan")
    import triton.testing

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, grad_to_none=[t for t in inputs if t.requires_grad], quantiles=[0.5])
    return float(ms if not isinstance(ms, (list, tuple)) else ms[0]), peak


FAMILY = ""


def main() -> None:
    global FAMILY
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--only", help="comma-separated families: rms_norm,layer_norm,swiglu,flce")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"lm_1b": (8192, 2048, 5632, 50304), "nvila_8b_llm": (8192, 3584, 18944, 152064)}
    family_shapes = {"layer_norm": {"SigLIP so400m (d 1152)": (16384, 1152, 0, 0)}}
    if args.smoke:
        shapes = family_shapes = {"tiny": (64, 32, 48, 300)}
    lf = _liger() if device == "cuda" else None
    families = args.only.split(",") if args.only else ["rms_norm", "layer_norm", "swiglu", "flce"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype {dtype}, torch {torch.__version__}")
    print("| kernel | shape | impl | fwd+bwd ms | roofline ms (what) | % of roofline | extra peak MiB | "
          "out rel err | dx rel err | x vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for FAMILY in families:
        fam_shapes = shapes if args.smoke else family_shapes.get(FAMILY, shapes)
        for name, (n, d, h, v) in fam_shapes.items():
            inputs = make_inputs(FAMILY, n, d, h, v, dtype, device)
            roof, what = roofline_ms(FAMILY, inputs)
            base_ms = None
            for impl, fn in impls(FAMILY, lf).items():
                try:
                    e_out, e_dx = errors(fn, inputs)
                    ms, peak = bench(fn, fresh(inputs), args.smoke)
                except Exception as e:  # noqa: BLE001 - report the failure in the table, go on
                    print(f"| {FAMILY} | {name} | {impl} | failed: {type(e).__name__}: {str(e)[:150]} |||||||")
                    continue
                base_ms = ms if impl == "torch" else base_ms
                speed = base_ms / ms if base_ms else float("nan")
                print(f"| {FAMILY} | {name} | {impl} | {ms:.3f} | {roof:.3f} ({what}) | {100 * roof / ms:.0f}% | "
                      f"{peak:.0f} | {e_out:.2e} | {e_dx:.2e} | {speed:.2f} |", flush=True)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
