"""COAT's FP8 building blocks (scaleforge.fp8) against their BF16 counterparts, on odd shapes, torch reference
backend (CPU). Forward: the blocks compute from the unquantized input, so the output is the BF16 block's
exactly. Backward: it runs from the input dequantized from E4M3 with one scale per 1 x 16 group: each element
is rounded to 3 mantissa bits (relative error <= 2^-4, about 2^-4 / sqrt(3) ~ 3.6% RMS for uniformly spread
mantissas), so the gradients' relative (Frobenius) error stays below that (0.6-2% measured); the bound is 5%."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat
from scaleforge.kernels import layer_norm, rms_norm, swiglu, use_backend

BF16 = torch.bfloat16
SHAPE = (3, 7, 72)  # 72 channels: four full 1 x 16 groups and a partial one


@pytest.fixture(autouse=True)
def _torch_backend():
    # these tensors live on the CPU: pin the reference backend, which a CUDA machine would not pick by itself
    with use_backend("torch"):
        yield


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _compare(block, ref, inputs, fwd_tol=0.0, bwd_tol=0.05, exact_grad=False):
    g = torch.Generator().manual_seed(7)
    ours, theirs = _leaves(*inputs), _leaves(*inputs)
    y, y_ref = block(*ours), ref(*theirs)
    assert _rel(y, y_ref) <= fwd_tol
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(dy)
    y_ref.backward(dy)
    errs = [_rel(a.grad, b.grad) for a, b in zip(ours, theirs)]
    # grads that do not depend on the saved input (bias, shift) are exact; the input's is not: the backward
    # really ran from the FP8 codes
    assert all(e < bwd_tol for e in errs) and (errs[0] == 0 if exact_grad else errs[0] > 0), errs
    return errs


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(BF16)


def test_rms_norm_block():
    x, w = _rand(*SHAPE), _rand(SHAPE[-1], seed=1)
    _compare(lambda x, w: coat.norm(x, w, eps=1e-6), lambda x, w: rms_norm(x, w, 1e-6), [x, w])


def test_layer_norm_with_adaln_modulation_block():
    x, w, b = _rand(*SHAPE), _rand(SHAPE[-1], seed=1), _rand(SHAPE[-1], seed=2)
    shift, scale = _rand(3, 1, SHAPE[-1], seed=3) * 0.1, _rand(3, 1, SHAPE[-1], seed=4) * 0.1
    _compare(lambda *a: coat.norm(a[0], a[1], a[2], 1e-6, rms=False, shift=a[3], scale=a[4]),
             lambda *a: layer_norm(a[0], a[1], a[2], 1e-6, shift=a[3], scale=a[4]), [x, w, b, shift, scale])


def test_norm_leaves_its_amax_for_the_next_linear():
    x = _rand(*SHAPE)
    y = coat.norm(x, None)
    assert torch.equal(getattr(y, coat.AMAX_ATTR), y.float().abs().max())


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activation_block(name):
    # relu's gradient needs only the input's sign, which the FP8 codes keep: exact
    _compare(lambda x: coat.act(x, name), coat.ACTIVATIONS[name], [_rand(5, 33)], exact_grad=name == "relu")


def test_act_then_consumer_block_saves_only_the_fp8_input():
    """act(x) followed by a consumer with weights (SANA's depthwise conv): the same output, gradients for x and
    the consumer's weight and bias from x's codes, and only x's codes (+ the weights) kept for backward, where
    autograd keeps x and act(x) (the conv's input) in bf16."""
    x, w, b = _rand(2, 16, 32), _rand(32, 1, 3, 3, seed=1) * 0.3, _rand(32, seed=2)

    def conv(a, w, b):
        return F.conv2d(a.transpose(1, 2).reshape(2, 32, 4, 4), w, b, padding=1, groups=32).flatten(2).transpose(1, 2)

    errs = _compare(lambda x, w, b: coat.act_then(x, "silu", conv, w, b), lambda x, w, b: conv(F.silu(x), w, b),
                    [x, w, b])
    assert errs[1] > 0 and errs[2] == 0  # the weight's gradient reads act(x) from the codes; the bias's does not
    n = x.numel()
    assert _saved_bytes(lambda x: coat.act_then(x, "silu", conv, w, b), x) == n + n // 16 * 4 + w.numel() * 2 + b.numel() * 2
    assert _saved_bytes(lambda x: conv(F.silu(x), w, b), x) >= 4 * n


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_glu_block(name):
    """SwiGLU against the kernel library's swiglu (the fused-kernel BF16 path: silu and product in fp32),
    GeGLU against autograd's act(a) * b."""
    ref = swiglu if name == "silu" else lambda a, b: F.gelu(a) * b
    _compare(lambda a, b: coat.glu(a, b, name), ref, [_rand(5, 3, 40), _rand(5, 3, 40, seed=1)])


def test_fp8_linear_block():
    """E4M3 operands in forward (two roundings of <= 2^-4 each), E5M2 gradients in backward (2 mantissa bits,
    <= 2^-3): the forward within 8%, the backward within 15% (about twice the RMS of those roundings)."""
    lin = nn.Linear(48, 32).to(BF16)
    fp8 = nn.Linear(48, 32).to(BF16)
    fp8.load_state_dict(lin.state_dict())
    coat.convert_to_coat(fp8)
    assert type(fp8) is coat.FP8Linear
    x = _rand(4, 5, 48)
    xa, xb = _leaves(x, x)
    ya, yb = fp8(xa), lin(xb)
    assert 0 < _rel(ya, yb) < 0.08
    dy = _rand(*ya.shape, seed=3)
    ya.backward(dy)
    yb.backward(dy)
    assert 0 < _rel(xa.grad, xb.grad) < 0.15 and 0 < _rel(fp8.weight.grad, lin.weight.grad) < 0.15


def test_fp8_linears_of_one_input_share_its_codes_until_it_changes():
    """Two FP8Linears reading one x quantize it once and save one FP8 copy; after an in-place change of x the
    next one quantizes the new values (the codes carry x's version)."""
    a, b = nn.Linear(48, 32).to(BF16), nn.Linear(48, 16).to(BF16)
    coat.convert_to_coat(a)
    coat.convert_to_coat(b)
    x = _rand(4, 48).requires_grad_()
    h = x * 1  # a non-leaf, as a norm's output is
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        a(h), b(h)
    assert len({t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float8_e4m3fn}) == 1
    with torch.no_grad():
        h.mul_(2)
    assert torch.equal(b(h), b(x.detach() * 2))


def test_convert_keeps_named_and_ineligible_linears():
    class M(coat.FP8Block):
        def __init__(self):
            super().__init__()
            self.a, self.odd, self.head = nn.Linear(32, 64), nn.Linear(32, 24 + 1), nn.Linear(64, 32)
            self.ln, self.gelu = nn.LayerNorm(32), nn.GELU(approximate="tanh")

    m = M()
    counts = coat.convert_to_coat(m, ("head",))
    assert type(m.a) is coat.FP8Linear and type(m.odd) is nn.Linear and type(m.head) is nn.Linear
    assert type(m.ln) is coat.FP8LayerNorm and type(m.gelu) is coat.FP8GELU and m.fp8
    assert counts == {"fp8_linears": 1, "high_precision_linears": 2, "fp8_blocks": 3}
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in M().named_parameters()]
    with pytest.raises(ValueError, match="'nope' does not exist"):
        coat.convert_to_coat(M(), ("nope",))


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_models_take_the_fp8_path_only_when_converted(dtype):
    """bf16 compute, and fp32 (parallel.mixed_precision=fp32): the FP8 GEMMs' bf16 outputs continue in fp32."""
    from scaleforge.models.llm.model import LLMModelConfig, build_transformer

    torch.manual_seed(0)
    model = build_transformer(LLMModelConfig(preset="tiny")).to(dtype)
    ids = torch.randint(0, 256, (2, 24))
    ref = model(ids)
    coat.convert_to_coat(model, ("output",))
    out = model(ids)
    assert type(model.layers[0].attention.wq) is coat.FP8Linear and model.layers[0].feed_forward.fp8
    assert out.dtype == dtype and 0 < _rel(out, ref) < 0.1
    out.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_ps3_blocks_take_the_fp8_path_when_converted():
    """PS3's timm-style Mlp (erf GELU) and text MLP (functional GELU, no nn.GELU to swap) are FP8 blocks."""
    from scaleforge.models.ps3.text import TextMlp
    from scaleforge.models.ps3.vision import Mlp

    for mlp in (Mlp(32, 64), TextMlp(32, 64, tanh=False)):
        mlp = mlp.to(BF16)
        x = _rand(3, 32)
        ref = mlp(x)
        assert coat.convert_to_coat(mlp)["fp8_blocks"] == 1
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = mlp(x.requires_grad_())
        assert 0 < _rel(out, ref) < 0.1  # the FP8 linears' rounding
        acts = [t for t in saved if not isinstance(t, nn.Parameter)]
        assert not [t for t in acts if t.dtype == BF16 and t.shape[-1] == 64]  # no bf16 GELU input
        assert [t for t in acts if t.dtype == torch.float8_e4m3fn and t.shape[-1] == 64]


def _saved_bytes(fn, *inputs):
    """Bytes autograd keeps for backward while fn's output is alive (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = _leaves(*inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*leaves)
    y.sum().backward()
    return sum(seen.values())


def test_blocks_save_fp8_instead_of_bf16():
    """What the non-linear blocks keep for backward: E4M3 codes + one fp32 scale per 16 (1.25 B/element)
    instead of bf16 tensors: the SwiGLU product 2.5 B against autograd's a, silu(a), b (6 B); a norm's input
    1.25 B against 2 B (+ its statistics)."""
    a, b = _rand(8, 16, 256), _rand(8, 16, 256, seed=1)
    n = a.numel()
    assert _saved_bytes(lambda a, b: coat.glu(a, b, "silu"), a, b) == 2 * (n + n // 16 * 4)
    assert _saved_bytes(lambda a, b: F.silu(a) * b, a, b) >= 6 * n
    w = _rand(256, seed=2)
    assert _saved_bytes(lambda x, w: coat.norm(x, w), a, w) == n + n // 16 * 4 + w.numel() * 2
    assert _saved_bytes(lambda x, w: rms_norm(x, w), a, w) >= 2 * n
