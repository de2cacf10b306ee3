import pytest
import torch

from _kernel_testing import DEVICE, needs_triton, rel_err
from scaleforge.kernels import fp8_linear


def _fp8_exact(shape, dtype, max_value, grad=False):
    """Values exactly representable after per-tensor scaling (amax = max_value·2^10, scale 2^10), so the
    test does not depend on the fp32 -> fp8 rounding mode (the interpreter's is not torch's)."""
    t = (torch.randn(shape, device=DEVICE) * max_value / 4).clamp(-max_value, max_value).to(dtype).float()
    t.view(-1)[0] = max_value
    t = t * 1024
    return t.requires_grad_(grad)


def test_reference_is_close_to_bf16_linear():
    x, w, b = torch.randn(64, 128), torch.randn(96, 128) / 11, torch.randn(96)
    y = fp8_linear(x, w, b, backend="torch")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x @ w.t() + b) < 0.06  # E4M3 has 3 mantissa bits: ~2-3% per operand


@needs_triton
def test_triton_path_matches_reference_forward_and_backward():
    x = _fp8_exact((3, 11, 64), torch.float8_e4m3fn, 448, grad=True)
    w = _fp8_exact((32, 64), torch.float8_e4m3fn, 448, grad=True)
    b = torch.randn(32, device=DEVICE, requires_grad=True)
    out = fp8_linear(x, w, b, backend="triton")
    ref = fp8_linear(x, w, b, backend="torch")
    assert out.shape == (3, 11, 32) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # both round an fp32 GEMM to bf16
    g = _fp8_exact((3, 11, 32), torch.float8_e5m2, 57344).to(torch.bfloat16)
    ga = torch.autograd.grad(out, (x, w, b), g)
    gb = torch.autograd.grad(ref, (x, w, b), g)
    for a, c in zip(ga, gb):
        assert a.shape == c.shape and a.dtype == c.dtype
        assert rel_err(a, c) < 1e-2


@needs_triton
def test_output_group_quantization_for_the_next_op():
    x, w = torch.randn(16, 64, device=DEVICE), torch.randn(48, 64, device=DEVICE)
    y, (q, s) = fp8_linear(x, w, output_group_size=16, backend="triton")
    assert q.dtype == torch.float8_e4m3fn and q.shape == y.shape and s.shape == (16, 3)
    from scaleforge.kernels import dequantize_fp8

    assert rel_err(dequantize_fp8(q, s, group_size=16, backend="torch"), y) < 0.1


@needs_triton
def test_shapes_not_multiple_of_16_are_rejected():
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8_linear(torch.randn(4, 20, device=DEVICE), torch.randn(32, 20, device=DEVICE), backend="triton")
