"""The direct eager path of the kernel ops (KernelOp: the implementation called without the torch.library
dispatch, with its own autograd.Function) gives exactly what the op path gives, values and gradients,
and hands tensor subclasses and dispatch modes to the op."""
import pytest
import torch

from _kernel_testing import DEVICE, needs_triton
from scaleforge.kernels import _triton_utils as tu
from scaleforge.kernels import dequantize_fp8, layer_norm, quantize_fp8, relu_linear_attention, rms_norm

pytestmark = needs_triton


def _both(fn):
    """fn() through the direct path, then through the op path (same inputs)."""
    assert tu.EAGER_DIRECT
    a = fn()
    tu.EAGER_DIRECT = False
    try:
        b = fn()
    finally:
        tu.EAGER_DIRECT = True
    return a, b


def _grads(ts):
    out = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", [layer_norm, rms_norm])
def test_norm_direct_path_equals_op_path(norm, residual):
    b, n, c = 2, 5, 48
    x = torch.randn(b, n, c, device=DEVICE, requires_grad=True)
    w = torch.randn(c, device=DEVICE, requires_grad=True)
    sh, sc = (torch.randn(b, 1, c, device=DEVICE, requires_grad=True) for _ in range(2))
    r = torch.randn(b, n, c, device=DEVICE, requires_grad=True)
    g = torch.randn(b, 1, c, device=DEVICE, requires_grad=True)
    dy, dh = torch.randn(b, n, c, device=DEVICE), torch.randn(b, n, c, device=DEVICE)
    leaves = [x, w, sh, sc] + ([r, g] if residual else [])

    def run():
        kw = dict(shift=sh, scale=sc, residual=r, gate=g) if residual else dict(shift=sh, scale=sc)
        out = norm(x, w, eps=1e-6, backend="triton", **kw)
        if residual:
            y, h = out
            (y * dy).sum().add((h * dh).sum()).backward()
            return [y.detach(), h.detach()] + _grads(leaves)
        (out * dy).sum().backward()
        return [out.detach()] + _grads(leaves)

    direct, op = _both(run)
    for a, b_ in zip(direct, op):
        assert torch.equal(a, b_)


def test_norm_direct_path_only_h_used():
    """With the residual, a loss on h alone: the unused y gradient arrives as None and is treated as 0."""
    x, r = (torch.randn(2, 3, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 1, 32, device=DEVICE, requires_grad=True)
    _, h = rms_norm(x, None, eps=1e-6, residual=r, gate=g, backend="triton")
    h.sum().backward()
    assert torch.allclose(r.grad, torch.ones_like(r))
    assert torch.allclose(x.grad, g.detach().expand_as(x))


def test_linear_attention_and_fp8_direct_path_equals_op_path():
    q, k, v = (torch.randn(2, 3, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 3, 40, 16, device=DEVICE)

    def run():
        o = relu_linear_attention(q, k, v, backend="triton")
        (o * do).sum().backward()
        return [o.detach()] + _grads([q, k, v])

    for a, b in zip(*_both(run)):
        assert torch.equal(a, b)
    x = torch.randn(16, 256, device=DEVICE, dtype=torch.float16)

    def codec():
        out = []
        for gran in ("tensor", "group"):
            qv, s = quantize_fp8(x, gran, 128, backend="triton")
            out += [qv.view(torch.uint8), s, dequantize_fp8(qv, s, gran, 128, torch.float32, backend="triton")]
        return out

    for a, b in zip(*_both(codec)):
        assert torch.equal(a, b)


def test_subclasses_and_modes_take_the_op_path():
    x = torch.randn(4, 8)
    assert tu.eager_direct_ok((x, None, 3))
    assert tu.eager_direct_ok((torch.nn.Parameter(x),))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not tu.eager_direct_ok((fake,))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not tu.eager_direct_ok((x,))


def test_expanded_output_gradients():
    """The backward of .sum() hands the kernels a zero-stride (expanded) gradient; they must read it as
    the values it stands for (a regression: the norm backward read such views as contiguous rows)."""
    from scaleforge.kernels.reference.linear_attention import relu_linear_attention_ref
    from scaleforge.kernels.reference.norms import layer_norm_ref

    x = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    w, bias = torch.randn(40, device=DEVICE, requires_grad=True), torch.randn(40, device=DEVICE, requires_grad=True)
    grads = []
    for fn in (lambda: layer_norm(x, w, bias, eps=1e-6, backend="triton"), lambda: layer_norm_ref(x, w, bias, 1e-6)):
        fn().sum().backward()
        grads.append(_grads([x, w, bias]))
    for a, b in zip(*grads):
        assert (a - b).norm() / b.norm() < 1e-5
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    grads = []
    for fn in (lambda: relu_linear_attention(q, k, v, backend="triton"), lambda: relu_linear_attention_ref(q, k, v)):
        fn().sum().backward()
        grads.append(_grads([q, k, v]))
    for a, b in zip(*grads):
        assert (a - b).norm() / b.norm() < 1e-4


def test_ops_without_autograd_never_drop_gradients_silently():
    """A codec op has no autograd formula: with an input that requires grad the call goes through the op,
    whose backward raises, instead of the direct path returning a tensor without grad_fn. A double
    backward through the norm (its backward op has no formula either) raises the same way."""
    q, s = quantize_fp8(torch.randn(8, 256, device=DEVICE), "tensor", backend="triton")
    s = s.clone().requires_grad_()
    y = dequantize_fp8(q, s, "tensor", backend="triton")
    with pytest.raises(RuntimeError, match="autograd"):
        y.sum().backward()
    x = torch.randn(2, 4, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    out = layer_norm(x, w, None, eps=1e-6, backend="triton")
    (gx,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        gx.pow(2).sum().backward()
