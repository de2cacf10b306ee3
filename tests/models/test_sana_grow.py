"""SANA-1.5 depth growth: the grown model equals the (truncated) source at step 0, and keeps training."""
import pytest
import torch

from scaleforge.models.sana.grow import GrowError, grow_state_dict, truncate_state_dict
from scaleforge.models.sana.model import SanaTransformer, preset_arch
from scaleforge.models.sana.recipe import SyntheticLatentText
from scaleforge.models.sana import flow


def _model(depth, seed=0):
    torch.manual_seed(seed)
    m = SanaTransformer(preset_arch("tiny", depth=depth))
    m.init_weights()
    return m


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 6, 6, generator=g)
    t = torch.tensor([150.0, 820.0])
    y = torch.randn(2, 16, 32, generator=g)
    mask = torch.ones(2, 16)
    mask[0, 12:] = 0
    return x, t, y, mask


@pytest.mark.parametrize("strategy,src_layers,target", [
    ("constant", 3, 7), ("constant", 4, 6), ("cyclic", 4, 9), ("block_expand", 4, 12),
])
def test_grown_model_equals_source_at_step0(strategy, src_layers, target):
    src = _model(4)
    sd = grow_state_dict(src.state_dict(), target, strategy=strategy, source_num_layers=src_layers,
                         expand_ratio=3, zero_gate=True)
    grown = SanaTransformer(preset_arch("tiny", depth=target))
    grown.load_state_dict(sd)
    ref = SanaTransformer(preset_arch("tiny", depth=src_layers))
    ref.load_state_dict(truncate_state_dict(src.state_dict(), src_layers))
    x, t, y, mask = _inputs()
    with torch.no_grad():
        out, expect = grown(x, t, y, mask), ref(x, t, y, mask)
    assert expect.norm() > 0
    assert torch.allclose(out, expect, rtol=1e-6, atol=1e-6)
    # the new blocks are real blocks, not copies of nothing: their non-output weights are non-zero
    assert sd[f"blocks.{target - 1}.attn.qkv.weight"].abs().sum() > 0


def test_cyclic_without_zero_gate_is_not_identity():
    src = _model(4)
    sd = grow_state_dict(src.state_dict(), 8, strategy="cyclic", zero_gate=False)
    grown = SanaTransformer(preset_arch("tiny", depth=8))
    grown.load_state_dict(sd)
    x, t, y, mask = _inputs()
    with torch.no_grad():
        assert not torch.allclose(grown(x, t, y, mask), src(x, t, y, mask), atol=1e-4)


def test_grow_errors_are_clear():
    sd = _model(4).state_dict()
    with pytest.raises(GrowError, match="block_expand"):
        grow_state_dict(sd, 10, strategy="block_expand", expand_ratio=3)
    with pytest.raises(GrowError, match="source_num_layers"):
        grow_state_dict(sd, 10, source_num_layers=6)
    with pytest.raises(GrowError, match="strategy"):
        grow_state_dict(sd, 10, strategy="zigzag")


def test_grown_model_trains_and_loss_falls():
    torch.manual_seed(0)
    src = _model(2)
    data = SyntheticLatentText(0, 0, 1, 8, (4, 4), 16, 32, num_classes=4)
    grown = SanaTransformer(preset_arch("tiny", depth=4))
    grown.load_state_dict(grow_state_dict(src.state_dict(), 4, strategy="constant"))
    opt = torch.optim.AdamW(grown.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(25):
        b = next(data)
        noise = torch.randn(b["latents"].shape, generator=g)
        sig = flow.sample_sigmas(8, 3.0, g)
        pred = grown(flow.add_noise(b["latents"], noise, sig), sig * 1000, b["text_embeddings"], b["text_mask"])
        loss = flow.flow_loss(pred, b["latents"], noise).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the zero-initialised output projections of the new blocks receive gradient
            assert grown.blocks[3].attn.proj.weight.grad.abs().sum() > 0
            assert grown.blocks[3].mlp.point_conv.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
