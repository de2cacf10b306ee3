import pytest
import torch

from _kernel_testing import DEVICE, needs_triton, rel_err
from scaleforge.kernels import fp8_linear
from scaleforge.kernels.reference.fp8 import quantize_fp8_ref

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _fp8_exact(shape, dtype, max_value, grad=False, mult=1024.0, in_dtype=torch.float32):
    """Values exactly representable after per-tensor scaling (amax = max_value·mult, scale = mult), so the
    test does not depend on the fp32 -> fp8 rounding mode (the interpreter's is not torch's)."""
    t = (torch.randn(shape, device=DEVICE) * max_value / 4).clamp(-max_value / 2, max_value / 2).to(dtype).float()
    t.view(-1)[-1] = max_value  # the only amax element, and the last: the amax pass must reach the end
    t = (t * mult).to(in_dtype)
    return t.requires_grad_(grad)


def _codes(t):
    return t.view(torch.uint8)


def test_reference_is_close_to_bf16_linear():
    x, w, b = torch.randn(64, 128), torch.randn(96, 128) / 11, torch.randn(96)
    y = fp8_linear(x, w, b, backend="torch")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x @ w.t() + b) < 0.06  # E4M3 has 3 mantissa bits: ~2-3% per operand


@needs_triton
@pytest.mark.parametrize("shape", [(33, 64), (1, 16), (130, 200), (300, 520), (64, 48)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16])
def test_quantize_transpose_matches_reference(shape, dtype, in_dtype):
    """One pass writes the codes of quantize_fp8(x, "tensor") row-major and transposed, the transposed
    copy zero-padded to a multiple of 16 rows of x; (300, 520) takes several amax programs."""
    from scaleforge.kernels.fp8_linear import _quantize_transpose

    qmax = torch.finfo(dtype).max
    # fp16 cannot hold qmax·1024: scale 1/16 keeps the values exact there
    x = _fp8_exact(shape, dtype, qmax, mult=1024.0 if in_dtype == torch.float32 else 1 / 16, in_dtype=in_dtype)
    q, qt, s = _quantize_transpose(x, dtype)
    qr, sr = quantize_fp8_ref(x, "tensor", dtype=dtype)
    r, c = shape
    rp = -(-r // 16) * 16
    assert q.shape == (r, c) and qt.shape == (c, rp) and q.dtype == qt.dtype == dtype
    assert s.shape == () and torch.equal(s, sr)
    assert torch.equal(_codes(q), _codes(qr))
    assert torch.equal(_codes(qt[:, :r]), _codes(qr).t())
    assert not _codes(qt[:, r:]).any()  # +0.0 padding, not the NaN poison


@needs_triton
@pytest.mark.parametrize("x_shape,n,bias", [((3, 11, 64), 32, True), ((80, 48), 16, False), ((2, 40, 32), 48, True)])
def test_triton_path_matches_reference_forward_and_backward(x_shape, n, bias):
    x = _fp8_exact(x_shape, E4M3, 448, grad=True)
    w = _fp8_exact((n, x_shape[-1]), E4M3, 448, grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True) if bias else None
    out = fp8_linear(x, w, b, backend="triton")
    ref = fp8_linear(x, w, b, backend="torch")
    assert out.shape == (*x_shape[:-1], n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # both round an fp32 GEMM to bf16
    g = _fp8_exact((*x_shape[:-1], n), E5M2, 57344).to(torch.bfloat16)
    leaves = (x, w, b) if bias else (x, w)
    ga = torch.autograd.grad(out, leaves, g)
    gb = torch.autograd.grad(ref, leaves, g)
    for a, c in zip(ga, gb):
        assert a.shape == c.shape and a.dtype == c.dtype
        assert rel_err(a, c) < 1e-2


@needs_triton
def test_x_amax_from_the_producer_replaces_the_amax_pass():
    """x_amax (max|x| from the kernel that wrote x): the same codes, scale, output and gradients as the amax
    pass's, on the triton path and the reference; a wrong x_amax is named."""
    from scaleforge.kernels.fp8_linear import _quantize_transpose

    x = _fp8_exact((40, 64), E4M3, 448, grad=True)
    w = _fp8_exact((32, 64), E4M3, 448, grad=True)
    amax = x.detach().abs().amax()
    (q, qt, s), (q0, qt0, s0) = _quantize_transpose(x.detach(), E4M3, amax), _quantize_transpose(x.detach(), E4M3)
    assert torch.equal(s, s0) and torch.equal(_codes(q), _codes(q0)) and torch.equal(_codes(qt), _codes(qt0))
    q2, _, s2 = _quantize_transpose(x.detach(), E4M3, amax * 2)  # used, not recomputed: codes halve exactly
    assert torch.equal(s2, quantize_fp8_ref(x.detach(), "tensor", amax=amax * 2)[1])
    assert torch.equal(q2.float() * 2, q0.float())
    g = _fp8_exact((40, 32), E5M2, 57344).to(torch.bfloat16)
    for backend in ("triton", "torch"):
        outs = [fp8_linear(x, w, x_amax=a, backend=backend) for a in (amax, None)]
        assert torch.equal(outs[0], outs[1])
        grads = [torch.autograd.grad(o, (x, w), g) for o in outs]
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="x_amax must be a one-element float32 tensor"):
        fp8_linear(x, w, x_amax=amax.repeat(2), backend="triton")


@needs_triton
def test_backward_takes_a_non_contiguous_grad():
    x = _fp8_exact((33, 64), E4M3, 448, grad=True)
    w = _fp8_exact((32, 64), E4M3, 448, grad=True)
    g = _fp8_exact((33, 64), E5M2, 57344).to(torch.bfloat16)[:, ::2]
    assert not g.is_contiguous()
    ga = torch.autograd.grad(fp8_linear(x, w, backend="triton"), (x, w), g)
    gb = torch.autograd.grad(fp8_linear(x, w, backend="torch"), (x, w), g)
    for a, c in zip(ga, gb):
        assert rel_err(a, c) < 1e-2


def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_saves_x_codes_and_the_weight_itself(backend):
    """Backward gets x's FP8 codes (x_qᵀ (K, M16) on the triton path) and scale, and the weight as given (the
    gathered parameter under FSDP2, freed after forward): no FP8 weight copy stays alive until backward."""
    x = torch.randn(33, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    _, saved = _saved(lambda: fp8_linear(x, w, backend=backend))
    xcodes = (64, 48) if backend == "triton" else (33, 64)
    assert sorted(((tuple(t.shape), t.dtype) for t in saved), key=str) == sorted(
        [(xcodes, E4M3), ((), torch.float32), ((32, 64), torch.float32)], key=str)
    assert any(t is w for t in saved)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shared_input_codes_and_kept_input_give_the_same_gradients(backend):
    """Linears of one x sharing its codes (x_fp8) save one storage between them; save_x="input" keeps x itself
    and quantizes it again in backward. Both give exactly the outputs and gradients of the plain call."""
    from scaleforge.kernels.fp8_linear import quantize_fp8_input

    x = _fp8_exact((2, 20, 64), E4M3, 448, grad=True)
    ws = [_fp8_exact((n, 64), E4M3, 448, grad=True) for n in (32, 48)]
    g = [_fp8_exact((2, 20, n), E5M2, 57344).to(torch.bfloat16) for n in (32, 48)]
    plain = [fp8_linear(x, w, backend=backend) for w in ws]
    codes = quantize_fp8_input(x, backend=backend)
    shared, saved = _saved(lambda: [fp8_linear(x, w, x_fp8=codes, backend=backend) for w in ws])
    fp8_storages = {t.untyped_storage().data_ptr() for t in saved if t.dtype == E4M3}
    assert len(fp8_storages) == 1
    kept, saved = _saved(lambda: [fp8_linear(x, w, save_x="input", backend=backend) for w in ws])
    assert not any(t.dtype == E4M3 for t in saved)
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    want = torch.autograd.grad(plain, [x, *ws], g)
    for outs in (shared, kept):
        assert all(torch.equal(a, b) for a, b in zip(outs, plain))
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(outs, [x, *ws], g), want))
    other = quantize_fp8_input(x, backend="torch" if backend == "triton" else "triton")
    with pytest.raises(ValueError, match="other backend"):
        fp8_linear(x, ws[0], x_fp8=other, backend=backend)


@needs_triton
def test_custom_ops_fake_tensors_match_the_kernels():
    """torch.compile traces the ops through their fake implementations (the padded x_qᵀ shape included)."""
    x, w, b = torch.randn(33, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE), torch.randn(32, device=DEVICE)
    ops = torch.ops.scaleforge
    quant, fwd, bwd = ops.fp8_quantize_input.default, ops.fp8_linear_fwd.default, ops.fp8_linear_bwd.default
    amax = x.abs().amax().reshape(())
    for a in (None, amax):
        torch.library.opcheck(quant, (x, a), test_utils=("test_faketensor",))  # test_schema cannot compare FP8
    xq, xt, sx = quant(x, None)
    torch.library.opcheck(fwd, (x, xq, xt, sx, w, b, None), test_utils=("test_faketensor",))
    torch.library.opcheck(fwd, (x, xq, None, sx, w, None, amax), test_utils=("test_faketensor",))
    g = torch.randn(33, 32, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(bwd, (g, xt, sx, w), test_utils=("test_faketensor",))


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
