"""NVILA vision side: SigLIP parity vs transformers, Dynamic-S2 geometry and token counts, STC,
projectors, temporal pooling (as the NVILA paper describes them)."""
import math

import pytest
import torch

from scaleforge.models.nvila import dynamic_s2 as ds2
from scaleforge.models.nvila.projector import (MultimodalProjector, space_to_channel,
                                               space_to_channel_reference, temporal_pool)
from scaleforge.models.nvila.siglip import SiglipConfig, SiglipVisionTower
from scaleforge.models.nvila.hf_io import siglip_from_hf_state_dict, siglip_to_hf_state_dict

torch.set_num_threads(1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


TINY_VIT = dict(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4, patch_size=4, image_size=32)


def hf_tiny_siglip(seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    c = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           patch_size=4, image_size=32, vision_use_head=False, attn_implementation="eager")
    m = SiglipVisionModel(c).eval()
    # HF's default init leaves biases/LN at 0/1; randomize everything so the parity test sees them
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_siglip_matches_transformers_penultimate_and_last():
    hf = hf_tiny_siglip()
    ours = SiglipVisionTower(SiglipConfig(**TINY_VIT))
    ours.load_state_dict(siglip_from_hf_state_dict(hf.state_dict()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        ref_pen, ref_last = out.hidden_states[-2], out.last_hidden_state
        pen, last = ours(x), ours.forward_last_hidden_state(x)
    assert pen.shape == (3, 64, 48)
    assert rel_err(pen, ref_pen) < 1e-5
    assert rel_err(last, ref_last) < 1e-5
    # the penultimate features differ from the last layer's, so the select-layer test is meaningful
    assert rel_err(pen, out.hidden_states[-1]) > 1e-2


def test_siglip_hf_key_round_trip_pins_vision_model_prefix():
    ours = SiglipVisionTower(SiglipConfig(**TINY_VIT))
    hf_sd = siglip_to_hf_state_dict(ours.state_dict())
    assert "vision_model.embeddings.patch_embedding.weight" in hf_sd
    assert "vision_model.encoder.layers.2.self_attn.q_proj.bias" in hf_sd
    assert "vision_model.post_layernorm.weight" in hf_sd
    assert all(k.startswith("vision_model.") for k in hf_sd)
    back = siglip_from_hf_state_dict(hf_sd)
    assert set(back) == set(ours.state_dict())
    # transformers 5 flattened names (no vision_model. prefix) are accepted too
    flat = {k.removeprefix("vision_model."): v for k, v in hf_sd.items()}
    assert set(siglip_from_hf_state_dict(flat)) == set(back)


def test_so400m_shapes_on_meta():
    cfg = SiglipConfig()
    with torch.device("meta"):
        tower = SiglipVisionTower(cfg)
        feats = tower(torch.empty(2, 3, 448, 448))
    assert feats.shape == (2, 1024, 1152)  # 32x32 tokens per 448 tile, width 1152 (nvila.md §1)
    n = sum(p.numel() for p in tower.parameters())
    assert 0.40e9 < n < 0.43e9  # "so400m"
    assert cfg.num_used_layers == 26


# --------------------------------------------------------------------------------------------------
# Dynamic-S2 geometry
# --------------------------------------------------------------------------------------------------
ASPECTS = [(448, 448), (1000, 1000), (640, 480), (480, 640), (1920, 1080), (1080, 1920), (2000, 500),
           (500, 2000), (300, 1500), (4000, 1000), (800, 600), (1344, 1344), (100, 30), (1024, 768),
           (3000, 2000), (1500, 1000)]


@pytest.mark.parametrize("w,h", ASPECTS)
def test_s2_tile_and_token_counts(w, h):
    s2 = ds2.S2Settings()
    grids = ds2.s2_grids(w, h, s2)
    assert grids[:2] == [(1, 1), (2, 2)]
    rows, cols = grids[-1]
    assert 9 <= rows * cols <= 12
    assert 14 <= ds2.s2_num_tiles(w, h) <= 17
    assert 2304 <= ds2.s2_visual_tokens(w, h, k=2) <= 3072
    assert ds2.s2_visual_tokens(w, h, k=2) == rows * cols * 256
    # the chosen grid is the closest aspect among 9..12-tile grids
    best = min(abs(w / h - c / r) for r, c in ds2.candidate_grids(9, 12))
    assert abs(w / h - cols / rows) == pytest.approx(best)


def test_closest_grid_specific_cases():
    assert ds2.closest_grid(1344, 1344, 448, 9, 12) == (3, 3)
    assert ds2.closest_grid(1920, 1080, 448, 9, 12) == (3, 4)  # 16:9 -> 4/3 is closest
    assert ds2.closest_grid(2000, 500, 448, 9, 12) == (2, 6)   # 4:1 -> 3.0 (2x6)
    assert ds2.closest_grid(500, 2000, 448, 9, 12) == (6, 2)
    # tie between 1x1 and 2x2 (both aspect 1): a big image takes the larger grid, a small one not
    assert ds2.closest_grid(1000, 1000, 448, 1, 4) == (2, 2)
    assert ds2.closest_grid(300, 300, 448, 1, 4) == (1, 1)


def test_nvila_lite_counts():
    assert ds2.tokens_per_tile(32, 3) == 121  # 32 -> padded 33 -> 11x11
    for w, h in ASPECTS:
        n = ds2.dynamic_num_tiles(w, h)
        assert 1 <= n <= 13
        assert n * 121 <= 1573
    assert ds2.dynamic_num_tiles(448, 448) == 1  # small square: one tile, no thumbnail


def test_video_token_counts():
    assert ds2.video_visual_tokens(256, k=2, temporal_pool=8) == 8192
    assert ds2.video_visual_tokens(256, k=2, temporal_pool=1) == 65536
    with pytest.raises(ValueError, match="not divisible"):
        ds2.video_visual_tokens(250, temporal_pool=8)


def test_preprocess_tiles_real_pixels():
    s2 = ds2.S2Settings(scales=(32, 64, 96), tile=32, max_tiles=12)
    img = torch.rand(3, 50, 130)
    tiles, grids = ds2.dynamic_s2_preprocess(img, s2)
    rows, cols = grids[-1]
    assert tiles.shape == (1 + 4 + rows * cols, 3, 32, 32)
    # first tile is the whole image squashed to 32x32
    torch.testing.assert_close(tiles[0], ds2.resize(img, 32, 32))
    # the largest-scale tiles stitch back into the aspect-preserving resize
    big = ds2.resize(img, rows * 32, cols * 32)
    st = ds2.stitch(tiles[5:].permute(0, 2, 3, 1), rows, cols).permute(2, 0, 1)
    torch.testing.assert_close(st, big)


def test_merge_s2_features_against_loop_reference():
    torch.manual_seed(0)
    g, c = 4, 5
    grids = [(1, 1), (2, 2), (2, 3)]
    n = sum(r * cc for r, cc in grids)
    feats = torch.randn(n, g * g, c)
    out = ds2.merge_s2_features(feats, grids)
    assert out.shape == (6, g, g, 3 * c)
    # reference: build each scale's map tile by tile, upsample by averaging source cells (area rule)
    rows, cols = grids[-1]
    H, W = rows * g, cols * g
    ref_maps, start = [], 0
    for r, cc in grids:
        m = torch.zeros(r * g, cc * g, c)
        for t in range(r * cc):
            ti, tj = divmod(t, cc)
            m[ti * g:(ti + 1) * g, tj * g:(tj + 1) * g] = feats[start + t].view(g, g, c)
        start += r * cc
        big = torch.zeros(H, W, c)
        for i in range(H):
            for j in range(W):
                i0, i1 = math.floor(i * m.shape[0] / H), math.ceil((i + 1) * m.shape[0] / H)
                j0, j1 = math.floor(j * m.shape[1] / W), math.ceil((j + 1) * m.shape[1] / W)
                big[i, j] = m[i0:i1, j0:j1].mean(dim=(0, 1))
        ref_maps.append(big)
    ref = torch.cat(ref_maps, -1)
    got = ds2.stitch(out, rows, cols)
    assert rel_err(got, ref) < 1e-6
    # the largest scale passes through untouched
    torch.testing.assert_close(got[..., 2 * c:], ref_maps[2])


# --------------------------------------------------------------------------------------------------
# STC, projector, temporal pooling
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,k", [(4, 4, 2), (5, 7, 2), (32, 32, 3), (7, 5, 3), (3, 3, 2), (6, 6, 1)])
def test_space_to_channel_matches_reference(h, w, k):
    x = torch.randn(2, h, w, 3)
    out = space_to_channel(x, k)
    assert out.shape == (2, -(-h // k), -(-w // k), k * k * 3)
    torch.testing.assert_close(out, space_to_channel_reference(x, k))


def test_space_to_channel_meta_448_geometry():
    x = torch.empty(17, 32, 32, 3456, device="meta")
    assert space_to_channel(x, 2).shape == (17, 16, 16, 13824)
    assert space_to_channel(x, 3).shape == (17, 11, 11, 31104)


@pytest.mark.parametrize("ptype,k", [("mlp_downsample", 2), ("mlp_downsample_2x2_fix", 2),
                                     ("mlp_downsample_3x3_fix", 3), ("mlp2x_gelu", 1)])
def test_projector_matches_layer_by_layer_reference(ptype, k):
    torch.manual_seed(0)
    dv, d = 6, 10
    proj = MultimodalProjector(ptype, dv, d)
    for p in proj.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 7, dv)
    out = proj(x)
    g = -(-7 // k)
    assert out.shape == (3, g, g, d)
    lin = [m for m in proj.layers if isinstance(m, torch.nn.Linear)]
    ln = [m for m in proj.layers if isinstance(m, torch.nn.LayerNorm)]
    gelu = torch.nn.functional.gelu
    y = space_to_channel_reference(x, k)
    if ptype == "mlp_downsample_3x3_fix":
        y = torch.nn.functional.layer_norm(y, (9 * dv,), ln[0].weight, ln[0].bias)
        y = gelu(lin[0](y))
        y = torch.nn.functional.layer_norm(y, (3 * dv,), ln[1].weight, ln[1].bias)
        y = lin[2](gelu(lin[1](y)))
    elif ptype == "mlp2x_gelu":
        y = lin[1](gelu(lin[0](y)))
    else:
        y = torch.nn.functional.layer_norm(y, (4 * dv,), ln[0].weight, ln[0].bias)
        y = lin[1](gelu(lin[0](y)))
    assert rel_err(out, y) < 1e-6


def test_projector_key_names_and_8b_first_linear():
    p = MultimodalProjector("mlp_downsample", 3456, 3584, device="meta")
    keys = set(p.state_dict())
    assert keys == {"layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                    "layers.4.weight", "layers.4.bias"}
    assert p.layers[2].weight.shape == (3584, 13824)  # nvila.md §3: first Linear 13824 -> 3584
    p3 = MultimodalProjector("mlp_downsample_3x3_fix", 1152, 3584, device="meta")
    assert p3.layers[2].weight.shape == (3456, 10368)


def test_temporal_pool():
    x = torch.randn(16, 5, 7)
    y = temporal_pool(x, 4)
    assert y.shape == (4, 5, 7)
    torch.testing.assert_close(y[1], x[4:8].mean(0))
    with pytest.raises(ValueError, match="not divisible"):
        temporal_pool(torch.randn(10, 5, 7), 4)
    big = torch.empty(256, 256, 3584, device="meta")
    assert temporal_pool(big, 8).reshape(-1, 3584).shape[0] == 8192
