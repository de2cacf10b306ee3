"""COAT's FP8 building blocks (scaleforge.fp8) on the Triton backend against the torch reference backend (CPU:
the Triton interpreter, fp32 inputs). Outputs match to fp32 rounding (the same norm / activation); gradients
come from FP8 codes, which on a GPU round as torch's do (the two backends then differ by a few codes one E4M3
step apart: 2% bound), while the interpreter's fp32 -> fp8 conversion is not round-to-nearest (docs/kernels.md;
measured: 4.4% RMS round-trip error against torch's 2.2%): 10% under the interpreter. FP8Linear's
Triton path needs torch._scaled_mm on a GPU (benchmarks/kernels/run_all.py covers fp8_linear there)."""
import pytest
import torch

from scaleforge import fp8 as coat
from scaleforge.kernels import use_backend


def _run(backend, fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with use_backend(backend):
        y = fn(*leaves)
        y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "rms_norm": (lambda x, w: coat.norm(x, w), lambda g: [torch.randn(3, 5, 80, generator=g), torch.randn(80, generator=g)]),
    "layer_norm_adaln": (
        lambda x, sh, sc: coat.norm(x, None, None, 1e-6, rms=False, shift=sh, scale=sc),
        lambda g: [torch.randn(2, 7, 48, generator=g), torch.randn(2, 1, 48, generator=g) * 0.1,
                   torch.randn(2, 1, 48, generator=g) * 0.1]),
    "gelu": (lambda x: coat.act(x, "gelu_tanh"), lambda g: [torch.randn(6, 40, generator=g)]),
    "swiglu": (lambda a, b: coat.glu(a, b, "silu"), lambda g: [torch.randn(4, 3, 64, generator=g),
                                                               torch.randn(4, 3, 64, generator=g)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_backend_matches_torch_backend(case):
    fn, make = CASES[case]
    g = torch.Generator().manual_seed(0)
    inputs = [t * 2 + 0.3 for t in make(g)]
    if torch.cuda.is_available():
        inputs = [t.cuda() for t in inputs]
    probe = fn(*inputs)
    dy = torch.randn(probe.shape, generator=g).to(probe.device)
    y_t, g_t = _run("triton", fn, inputs, dy)
    y_r, g_r = _run("torch", fn, inputs, dy)
    assert _rel(y_t, y_r) < 1e-5
    for a, b in zip(g_t, g_r):
        assert torch.isfinite(a).all() and _rel(a, b) < (0.02 if torch.cuda.is_available() else 0.10)
