"""PS3 recipe: selection budget and rounds, K/V-cached attention, losses vs plain references, the
2-rank loss vs the single-process loss, data, and the recipe through ``launch`` (reference ps3.md §6)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scaleforge.models.ps3.config import PS3Config, PS3TextConfig, PS3VisionConfig
from scaleforge.models.ps3.losses import selection_bce, siglip_rows
from scaleforge.models.ps3.model import PS3Model

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"


def tiny(max_select_num: int = 40) -> PS3Config:
    return PS3Config(
        vision=PS3VisionConfig(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4, scales=[16, 32, 64],
                               select_layers=[0, 2], max_select_num=max_select_num, highres_hidden=8,
                               highres_out=8, highres_depth=1, highres_kernel=8, highres_input=64,
                               timm_name="ps3_tiny_vit"),
        text=PS3TextConfig(vocab_size=257, context_length=16, width=32, heads=2, layers=2, mlp_dim=64, output_dim=32))


def model(cfg: PS3Config | None = None, seed: int = 0) -> PS3Model:
    torch.manual_seed(seed)
    m = PS3Model(cfg or tiny())
    m.init_weights()
    with torch.no_grad():  # non-zero residuals / layer scales so that every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


@pytest.mark.parametrize("scales,budget,split", [([378, 756, 1512], 2560, [512, 2048]),
                                                 ([378, 756, 1512, 3780], 2560, [85, 341, 2133])])
def test_budget_split_real_configs(scales, budget, split):
    v = PS3VisionConfig(scales=scales, max_select_num=budget)
    assert v.budget_per_scale() == split
    assert abs(sum(split) - budget) <= 1  # proportional to pixels, rounded down
    assert v.low_res_tokens == 729
    assert v.max_rounds() == (6 if len(scales) == 3 else 35)


def test_token_budget_and_no_patch_twice():
    m = model()
    x = torch.randn(2, 3, 64, 64)
    n0, per_round = 16, 40
    seen = None
    for k in (1, 2, 3):
        out = m.vision_model(x, num_look_close=k)
        assert out.last_hidden_state.shape[1] == n0 + per_round * k  # 729 + 2560 k, scaled down
        total = sum(s.flatten(1).sum(1) for s in out.selection_maps)
        assert total.tolist() == [per_round * k] * 2
        assert all(((s == 0) | (s == 1)).all() for s in out.selection_maps)  # each patch at most once
        if seen is not None:  # earlier rounds' patches stay selected
            assert all((a <= b).all() for a, b in zip(seen, out.selection_maps))
        seen = out.selection_maps
    all_out = m.vision_model(x, num_look_close="all")
    assert all(s.all() for s in all_out.selection_maps)
    assert all_out.last_hidden_state.shape[1] == n0 + 64 + 256
    tok = m.vision_model(x, num_token_look_close=50)  # 40 + 10: the last round takes the remainder
    assert tok.last_hidden_state.shape[1] == n0 + 50


def test_rounds_follow_probability_order():
    m = model()
    probs = [torch.rand(2, 4, 4), torch.rand(2, 8, 8)]
    taken = [torch.zeros(2, 16, dtype=torch.bool), torch.zeros(2, 64, dtype=torch.bool)]
    idx = m.vision_model.select_round(probs, taken)
    for p, ix in zip(probs, idx):
        k = ix.shape[1]
        ref = p.flatten(1).topk(k).indices.sort(1).values
        assert torch.equal(ix, ref)


def test_ground_truth_box_forcing():
    m = model()
    x = torch.randn(2, 3, 64, 64)
    gt = torch.zeros(2, 16, 16)
    gt[0, 2:6, 8:12] = 1  # a box on sample 0 only
    out = m.vision_model(x, num_look_close=1, gt_selection_maps=gt)
    big = out.selection_probs[1]  # 16 x 16 grid of the largest scale
    assert (big[0][2:6, 8:12] == 1).all()
    assert (out.selection_maps[1][0][2:6, 8:12] == 1).all()  # forced patches are encoded
    ref = m.vision_model(x[1:], num_look_close=1)
    assert torch.allclose(big[1], ref.selection_probs[1][0])


def test_low_res_path_identical_with_and_without_rounds():
    m = model()
    x = torch.randn(2, 3, 64, 64)
    low = m.vision_model(x, num_look_close=0).last_hidden_state
    hi = m.vision_model(x, num_look_close=2).last_hidden_state
    assert torch.equal(low, hi[:, :16])


def test_kv_cached_attention_equals_concatenated_reference():
    m = model()
    enc = m.vision_model
    x = torch.randn(2, 3, 64, 64)
    images = enc.scale_images(x)
    hidden, cache = enc.forward_low_res(images[0])
    taken = [torch.zeros(2, 64, dtype=torch.bool), torch.zeros(2, 256, dtype=torch.bool)]
    probs = [torch.rand(2, 8, 8), torch.rand(2, 16, 16)]
    idx = enc.select_round(probs, taken)
    tokens = enc.embed_selected(images, idx, (64, 64))
    got = enc.forward_high_res(tokens, cache)[-1]
    # reference: run [low-res tokens || selected] through plain blocks, queries of the high-res rows see
    # all keys, low-res rows only the low-res keys (block mask), then take the high-res rows
    lo = enc.trunk.patch_embed.proj(images[0]).flatten(2).transpose(1, 2) + enc.trunk.pos_embed
    h = torch.cat([lo, tokens], 1)
    n0 = lo.shape[1]
    n = h.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[:n0, n0:] = False
    for blk in enc.trunk.blocks:
        a = blk.norm1(h)
        b, _, d = a.shape
        q, k, v = blk.attn.qkv(a).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // 2)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + blk.attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        h = h + blk.mlp(blk.norm2(h))
    ref = h[:, n0:]
    assert (got - ref).norm() / ref.norm() < 1e-5


def test_patch_embed_selected_equals_conv_gather():
    m = model()
    pe = m.vision_model.trunk.patch_embed
    x = torch.randn(2, 3, 32, 32)
    idx = torch.tensor([[0, 5, 63], [1, 2, 40]])
    full = pe.proj(x).flatten(2).transpose(1, 2)
    ref = full.gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert (pe.selected(x, idx) - ref).norm() / ref.norm() < 1e-5


def test_masked_pool_uses_only_masked_tokens():
    m = model()
    pool = m.vision_model.trunk.attn_pool
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True  # sample 1: no token in the box -> pools everything
    got = pool(x, mask)
    assert torch.allclose(got[0], pool(x[:1, :3])[0], atol=1e-6)
    assert torch.allclose(got[1], pool(x[1:])[0], atol=1e-6)


def siglip_reference(img, txt, scale, bias):
    """Plain SigLIP loss over a full batch: sum over all pairs of -log sigmoid(label * logit)."""
    total = 0.0
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            z = 1.0 if i == j else -1.0
            logit = math.exp(scale) * float(img[i] @ txt[j]) + bias
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    return total


def test_siglip_loss_against_reference():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s, b = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    rows = siglip_rows(img, txt, s, b)
    assert abs(float(rows.sum()) - siglip_reference(img, txt, math.log(10.0), -10.0)) < 1e-3
    # a rank holding rows 3..5 with all texts sums to the same rows
    assert torch.allclose(siglip_rows(img[3:], txt, s, b, offset=3), rows[3:])


def test_selection_bce_against_reference():
    p = torch.rand(2, 4, 4) * 0.98 + 0.01
    t = (torch.rand(2, 4, 4) > 0.5).float()
    ref = -(t * p.log() + (1 - t) * (1 - p).log()).flatten(1).mean(1)
    assert torch.allclose(selection_bce(p, t), ref, atol=1e-6)


def _batch(cfg, n, seed):
    from scaleforge.models.ps3.data import SyntheticBoxes
    from scaleforge.models.ps3.text import build_tokenizer

    it = SyntheticBoxes(cfg, build_tokenizer(cfg.text), seed, 0, 1, n, 64)
    return next(it)


def test_synthetic_batch_and_loss_init():
    cfg = tiny()
    b = _batch(cfg, 8, 0)
    assert [tuple(b[f"pixel_values_{i}"].shape) for i in range(3)] == [(8, 3, 16, 16), (8, 3, 32, 32), (8, 3, 64, 64)]
    assert b["box_mask"].shape == (8, 16, 16) and b["text"].shape == (8, 16)
    local = ~b["is_global"]
    assert (b["box_mask"][local].flatten(1).sum(1) > 0).all() and (b["box_mask"][~local] == 0).all()
    m = model(cfg)
    m.init_weights()
    assert math.isclose(float(m.logit_scale.detach().exp()), 10.0, rel_tol=1e-6) and float(m.logit_bias.detach()) == -10.0


def test_webdataset_image_boxes(tmp_path):
    from scaleforge.models.ps3.data import webdataset_sample_fn
    from scaleforge.models.ps3.text import build_tokenizer
    from scaleforge.platform.data.shards import iter_shard, ShardReadResult

    res = subprocess.run([str(BIN / "scaleforge"), "data", "synth", "--kind", "image-boxes", "--out",
                          str(tmp_path), "--n", "4", "--size", "80"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cfg = tiny()
    tok = build_tokenizer(cfg.text)
    samples = [webdataset_sample_fn(raw, cfg, tok, 0) for _, raw in iter_shard(str(tmp_path / "shard-000000.tar"),
                                                                                ShardReadResult())]
    assert len(samples) == 4 and samples[0]["pixel_values_2"].shape == (3, 64, 64)
    again = [webdataset_sample_fn(raw, cfg, tok, 0) for _, raw in iter_shard(str(tmp_path / "shard-000000.tar"),
                                                                              ShardReadResult())]
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(samples, again))  # seeded choices


def test_export_import_roundtrip(tmp_path):
    from scaleforge.models.ps3 import from_pretrained, save_pretrained

    cfg = tiny()
    m = model(cfg)
    save_pretrained(m, str(tmp_path))
    back = from_pretrained(str(tmp_path), base=cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(m.vision_model(x, num_look_close=2).last_hidden_state,
                       back.vision_model(x, num_look_close=2).last_hidden_state)
    cfgj = json.loads((tmp_path / "config.json").read_text())
    assert cfgj["model_type"] == "ps3" and cfgj["vision_config"]["ps3_scales"] == [16, 32, 64]


def test_grad_accum_micro_batch_negatives_are_its_own_texts():
    """With accumulation each micro-batch contrasts against its own texts only (world of 1 here): the
    summed contrastive loss of two micro-batches equals the plain SigLIP loss over the block-diagonal
    blocks of the full batch's logit matrix, not over the whole matrix."""
    cfg = tiny()
    m = model(cfg)
    with torch.no_grad():
        m.logit_bias.zero_()  # at the initial -10 every negative costs ~5e-5 and the two losses look alike
    b = _batch(cfg, 8, 3)
    imgs = [b[f"pixel_values_{i}"] for i in range(3)]
    mask, is_g, text = b["box_mask"], b["is_global"].bool(), b["text"]
    with torch.no_grad():
        parts = [m(imgs_s, text[s], mask[s], is_g[s])[1]["contrastive"]
                 for s in (slice(0, 4), slice(4, 8)) for imgs_s in [[x[s] for x in imgs]]]
        txt, prompt = m.text_model(text)
        img = m.vision_model.forward_pretrain(imgs, prompt, mask, is_g).pooled_output
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale, bias = float(m.logit_scale), float(m.logit_bias)
    blocks = sum(siglip_reference(img[s], txt[s], scale, bias) for s in (slice(0, 4), slice(4, 8)))
    whole = siglip_reference(img, txt, scale, bias)
    got = float(parts[0] + parts[1])
    assert abs(got - blocks) <= 1e-4 * abs(blocks)
    assert abs(got - whole) > 0.1 * abs(whole)
