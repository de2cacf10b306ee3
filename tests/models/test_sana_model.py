"""SANA Linear DiT: parts against plain-PyTorch references, diffusers parity, export/import round trip."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from scaleforge.models.sana import from_diffusers
from scaleforge.models.sana.diffusers_io import ConversionError, export_diffusers, to_diffusers_state_dict
from scaleforge.models.sana.model import (
    PRESETS, SanaTransformer, count_params, preset_arch, relu_linear_attention_ref, sincos_pos_embed,
)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = SanaTransformer(preset_arch("tiny", **kw))
    m.init_weights()
    with torch.no_grad():  # norms away from their init so the parity test sees them
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _inputs(b=2, h=8, w=6, L=16, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 32, h, w, generator=g)
    t = torch.rand(b, generator=g) * 1000
    y = torch.randn(b, L, D, generator=g)
    mask = torch.ones(b, L)
    mask[1, L // 2:] = 0
    return x, t, y, mask


def test_linear_attention_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = relu_linear_attention_ref(q, k, v, eps=1e-8)
    rq, rk = F.relu(q), F.relu(k)
    scores = rq @ rk.transpose(-1, -2)  # (B, H, N, N): explicit quadratic form
    ref = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-8)
    assert rel(out, ref) < 1e-6  # computed in fp32 by design
    # bf16 inputs: accumulation in fp32, output bf16, close to the fp64 result
    out_bf16 = relu_linear_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out_bf16.dtype == torch.bfloat16 and rel(out_bf16.double(), ref) < 2e-2


def test_mixffn_matches_conv_glumbconv():
    m = _tiny()
    ffn = m.blocks[0].mlp
    x = torch.randn(2, 8 * 6, 64)
    out = ffn(x, (8, 6))
    # upstream GLUMBConv with Conv2d 1x1 layers on (B, C, H, W)
    img = x.transpose(1, 2).reshape(2, 64, 8, 6)
    h = F.silu(F.conv2d(img, ffn.inverted_conv.weight[:, :, None, None], ffn.inverted_conv.bias))
    h = F.conv2d(h, ffn.depth_conv.weight, ffn.depth_conv.bias, padding=1, groups=h.shape[1])
    a, gate = h.chunk(2, dim=1)
    ref = F.conv2d(a * F.silu(gate), ffn.point_conv.weight[:, :, None, None]).flatten(2).transpose(1, 2)
    assert rel(out, ref) < 1e-6


def test_depthwise_conv_on_tokens_matches_conv2d_forward_and_backward():
    from scaleforge.models.sana.model import depthwise_conv3x3_tokens

    b, rows, cols, c = 2, 5, 7, 6
    h = torch.randn(b, rows * cols, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    out = depthwise_conv3x3_tokens(h, (rows, cols), w, bias)
    ref = F.conv2d(h.transpose(1, 2).reshape(b, c, rows, cols), w, bias, padding=1, groups=c)
    ref = ref.flatten(2).transpose(1, 2)
    g = torch.randn_like(out)
    assert rel(out, ref) < 1e-12
    for a, r in zip(torch.autograd.grad(out, (h, w, bias), g), torch.autograd.grad(ref, (h, w, bias), g)):
        assert rel(a, r) < 1e-12


def test_sincos_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed(64, 8, 6, base_size=4, interpolation=2.0)
    ref = get_2d_sincos_pos_embed(64, (8, 6), base_size=4, interpolation_scale=2.0, output_type="pt")
    assert rel(ours, ref.float()) < 1e-6


@pytest.mark.parametrize("use_pe", [False, True])
def test_diffusers_parity_and_round_trip(tmp_path, use_pe):
    from diffusers import SanaTransformer2DModel

    m = _tiny(use_pe=use_pe, sample_size=8)
    export_diffusers(m.state_dict(), tmp_path, m.arch)
    ref_model = SanaTransformer2DModel.from_pretrained(tmp_path).eval()
    assert ref_model.config.num_layers == m.arch.depth
    x, t, y, mask = _inputs()
    with torch.no_grad():
        ours = m(x, t, y, mask)
        ref = ref_model(x, y, t, encoder_attention_mask=mask).sample
    assert ours.shape == x.shape and ref.norm() > 0
    assert rel(ours, ref) < 1e-5
    # the mask matters (padded tokens are really excluded in both)
    with torch.no_grad():
        unmasked = m(x, t, y, torch.ones_like(mask))
    assert rel(unmasked[1], ours[1]) > 1e-3 and rel(unmasked[0], ours[0]) < 1e-6
    # import: exact round trip, forward identical
    back = from_diffusers(tmp_path)
    a, b = m.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(back(x, t, y, mask), ours)


def test_parity_detects_a_wrong_weight(tmp_path):
    from diffusers import SanaTransformer2DModel

    m = _tiny()
    sd = m.state_dict()
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"].clone()
    sd["blocks.1.attn.qkv.weight"][128:192] *= 1.5  # the v slice only (q, k are RMS-normalised)
    export_diffusers(sd, tmp_path, m.arch)
    ref_model = SanaTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y, mask = _inputs()
    with torch.no_grad():
        assert rel(m(x, t, y, mask), ref_model(x, y, t, encoder_attention_mask=mask).sample) > 1e-4


def test_conversion_rejects_unknown_and_leftover_keys():
    m = _tiny()
    sd = dict(m.state_dict())
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="blocks.0.extra.weight"):
        to_diffusers_state_dict(sd)


def test_presets_parameter_counts():
    # sizes of the registered presets (sana.md §1): 0.6B, 1.6B, 4.8B; counted on meta tensors
    expect = {"0.6b": (0.55e9, 0.65e9), "1.6b": (1.5e9, 1.7e9), "4.8b": (4.5e9, 4.9e9)}
    for name, (lo, hi) in expect.items():
        with torch.device("meta"):
            m = SanaTransformer(preset_arch(name))
        n = count_params(m)
        assert lo < n < hi, (name, n)
        assert m.arch.self_heads == m.arch.hidden_size // 32
    assert PRESETS["4.8b"]["hidden_size"] == PRESETS["1.6b"]["hidden_size"]


def test_bad_input_shape_is_named():
    m = _tiny()
    with pytest.raises(ValueError, match="in_channels"):
        m(torch.randn(1, 16, 8, 8), torch.zeros(1), torch.randn(1, 16, 32))


def test_output_is_a_fresh_tensor_not_a_view():
    # FSDP2 hooks the root module's output for backward and warned ("returned a view tensor") in every SANA
    # run while the unpatchify reshape returned a view of proj_out's output
    m = _tiny()
    out = m(*_inputs())
    assert out._base is None and out.is_contiguous() and out.shape == (2, 32, 8, 6)
