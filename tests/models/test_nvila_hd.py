"""PS3 as NVILA's vision tower (VILA-HD, ``model.vision_tower: ps3``): token counts per ps3.md §4, the
encoder path, config errors, and ``launch --config nvila_hd_tiny.yaml --nproc 2`` + export."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleforge.models.nvila.config import NVILAConfig
from scaleforge.models.nvila.model import NVILAModel, tokens_per_tile
from scaleforge.models.nvila.siglip import SiglipConfig
from scaleforge.models.ps3.config import PS3VisionConfig
from scaleforge.platform.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def hd(rounds: int, **ps3) -> NVILAConfig:
    p = PS3VisionConfig(**ps3)
    return NVILAConfig(vision_tower="ps3", image_mode="single", ps3=p, ps3_num_look_close=rounds,
                       vision=SiglipConfig(image_size=p.scales[-1], hidden_size=p.width, patch_size=p.patch_size))


@pytest.mark.parametrize("rounds,tokens", [(0, 196), (1, 836), (6, 4036)])
def test_vila_hd_token_counts(rounds, tokens):
    assert tokens_per_tile(hd(rounds)) == tokens  # 196 + 640 k (VILA-HD-8B-4K: 6 rounds -> 4036)


def test_ps3_tower_encodes_fixed_token_counts():
    cfg = hd(2, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, scales=[16, 32, 64], select_layers=[0, 1],
             max_select_num=40, highres_hidden=8, highres_out=8, highres_depth=1, highres_kernel=8, highres_input=64)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=272))
    torch.manual_seed(0)
    m = NVILAModel(cfg)
    m.init_weights()
    out, dummy = m.encode_media(torch.randn(3, 3, 64, 64), torch.zeros(3, dtype=torch.long),
                                torch.ones(3, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    assert dummy is None and [o.shape[0] for o in out] == [tokens_per_tile(cfg)] * 3 == [24] * 3
    none, dummy = m.encode_media(None, None, None, None)
    assert none == [] and dummy is not None and float(dummy) == 0.0


def test_ps3_tower_config_errors():
    with pytest.raises(ConfigError, match="image_mode"):
        dataclasses.replace(hd(1), image_mode="dynamic_s2").validate()
    with pytest.raises(ConfigError, match="ps3_num_look_close"):
        hd(7).validate()  # 1.5K: 6 rounds cover every patch
    with pytest.raises(ConfigError, match="image_size"):
        dataclasses.replace(hd(1), vision=SiglipConfig(image_size=448)).validate()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nvila_hd_tiny_trains_and_exports(tmp_path):
    from scaleforge.models.ps3 import from_pretrained
    from scaleforge.models.ps3.config import PS3Config, PS3TextConfig

    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(BIN / "launch"), "--config", "configs/nvila_hd_tiny.yaml", "--nproc", "2",
                        f"run.output_dir={tmp_path}", "trainer.max_steps=12", "metrics.progress_bar=false",
                        "metrics.plot=false", "metrics.wandb.mode=disabled"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    rows = [json.loads(l) for l in (tmp_path / "nvila_hd_tiny" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    out = tmp_path / "export"
    p = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(tmp_path / "nvila_hd_tiny"), "--format",
                        "hf", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["config.json", "llm", "mm_projector", "vision_tower"]
    base = PS3Config(vision=PS3VisionConfig(num_heads=2, highres_input=64),
                     text=PS3TextConfig(vocab_size=257, width=32, heads=2, layers=1, mlp_dim=64, output_dim=32))
    tower = from_pretrained(str(out / "vision_tower"), base=base).vision_model
    assert tower.cfg.scales == [16, 32, 64] and tower.cfg.depth == 3
