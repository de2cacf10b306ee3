"""Shared helpers for the kernel tests (scale-free error metrics, kernels.md §4)."""

import pytest
import torch

from scaleforge.kernels._backend import HAS_TRITON, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and not triton_interpreting()),
    reason="triton kernels need triton and either CUDA or TRITON_INTERPRET=1",
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere (e.g. an unwritten, poisoned element) gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return (20 * torch.log10(x.norm() / (x - x_hat).norm())).item()


# relative-error tolerance of a kernel output vs the fp32 reference, by input dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
