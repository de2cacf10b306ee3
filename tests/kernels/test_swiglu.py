"""Fused SwiGLU against its fp32 reference: forward, gradients, odd sizes, the torch.library op path."""
import pytest
import torch

from scaleforge.kernels import swiglu
from scaleforge.kernels.reference.swiglu import swiglu_ref
from tests.kernels._kernel_testing import DEVICE, TOL, needs_triton, rel_err

pytestmark = needs_triton


@pytest.mark.parametrize("shape", [(3, 97, 40), (2, 1025), (5000,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_matches_reference_forward_and_backward(shape, dtype):
    g = (2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    u = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y = swiglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(y, (g, u), dy)
    g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    y_ref = swiglu_ref(g32, u32)
    dg_ref, du_ref = torch.autograd.grad(y_ref, (g32, u32), dy.float())
    assert y.dtype == dtype
    for out, ref in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        assert rel_err(out, ref) < TOL[dtype]


def test_swiglu_op_path_equals_the_eager_path(monkeypatch):
    from scaleforge.kernels import _triton_utils

    g = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    u = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    y = swiglu(g, u, backend="triton")
    (dg,) = torch.autograd.grad(y.sum(), g)
    monkeypatch.setattr(_triton_utils, "EAGER_DIRECT", False)  # through the torch.library op
    y_op = swiglu(g, u, backend="triton")
    (dg_op,) = torch.autograd.grad(y_op.sum(), g)
    assert torch.equal(y, y_op) and torch.equal(dg, dg_op)


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="swiglu: gate and up"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4), backend="torch")
