import pytest
import torch

from _kernel_testing import DEVICE, TOL, needs_triton, rel_err
from scaleforge.kernels import relu_linear_attention
from scaleforge.kernels.reference.linear_attention import relu_linear_attention_ref

pytestmark = needs_triton
SHAPES = [(1, 2, 97, 32), (2, 3, 64, 16), (1, 1, 300, 17), (2, 2, 1, 32)]


def _qkv(shape, dtype, requires_grad=False):
    return [torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def test_reference_matches_direct_formula():
    q, k, v = _qkv((2, 3, 50, 8), torch.float64)
    ref = relu_linear_attention_ref(q, k, v, eps=1e-8)
    qr, kr = q.relu(), k.relu()
    scores = qr @ kr.transpose(-1, -2)  # (B, H, N, N): the quadratic form of the same attention
    direct = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-8)
    assert rel_err(ref, direct) < 1e-6  # the reference computes in fp32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    out = relu_linear_attention(q, k, v, backend="triton")
    ref = relu_linear_attention_ref(q.float(), k.float(), v.float())
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_backward_matches_autograd_through_reference(shape):
    q, k, v = _qkv(shape, torch.float32, requires_grad=True)
    g = torch.randn(shape, device=DEVICE)
    out = relu_linear_attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = relu_linear_attention_ref(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


def test_token_major_strided_inputs_and_layout():
    b, n, h, d = 2, 45, 3, 32
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, requires_grad=True)  # a (B, N, 3C) projection
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views, token-major
    out = relu_linear_attention(q, k, v, backend="triton")
    ref = relu_linear_attention_ref(q, k, v)
    assert rel_err(out, ref) < 1e-5
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory: the out-proj reshape is free
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(out, qkv, g)
    (gb,) = torch.autograd.grad(ref, qkv, g)
    assert rel_err(ga, gb) < 1e-5


def test_qk_norm_across_heads_forward_and_backward():
    shape = (2, 4, 37, 16)
    q, k, v = _qkv(shape, torch.float32, requires_grad=True)
    wq = (1 + 0.1 * torch.randn(64, device=DEVICE)).requires_grad_()
    wk = (1 + 0.1 * torch.randn(64, device=DEVICE)).requires_grad_()
    kw = dict(qk_norm_weight_q=wq, qk_norm_weight_k=wk, qk_norm_eps=1e-5)
    out = relu_linear_attention(q, k, v, backend="triton", **kw)
    ref = relu_linear_attention_ref(q, k, v, **kw)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn(shape, device=DEVICE)
    inputs = (q, k, v, wq, wk)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, b) < 1e-5
    # the norm really is across heads: scaling one head of k changes the other heads' outputs
    # (a per-token factor on q cancels in the ratio; one on k does not)
    k2 = k.detach().clone()
    k2[:, 0] *= 3
    out2 = relu_linear_attention(q, k2, v, backend="triton", **kw)
    assert rel_err(out2[:, 1:], out[:, 1:]) > 1e-3


def test_eps_is_used_and_all_negative_keys_give_zero():
    q, k, v = _qkv((1, 2, 20, 16), torch.float32)
    out = relu_linear_attention(q, -k.abs(), v, eps=1e-3, backend="triton")  # relu(k) = 0: num = den - eps = 0
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_shapes_are_clear_errors():
    q, k, v = _qkv((1, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        relu_linear_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="qk_norm_weight_q"):
        relu_linear_attention(q, k, v, qk_norm_weight_q=torch.ones(16))
