"""``scaleforge nvila generate --sparse-attention twilight`` through the console script on the tiny exported
model: greedy output identical to dense at p = 1; at p < 1 every head keeps >= p of its estimated attention
mass at every decode step, and a bad --top-p fails before the model loads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_nvila_model import tiny_model, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def export_and_image(tmp_path_factory):
    from PIL import Image

    r = tiny_recipe()
    m = tiny_model(r, seed=3)
    out = tmp_path_factory.mktemp("nvila_twilight")
    r.export({k: v.clone() for k, v in m.state_dict().items()}, str(out / "model"), "hf")
    Image.fromarray((torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        out / "x.png")
    return out


def _generate(out, *extra):
    p = subprocess.run([str(BIN / "scaleforge"), "nvila", "generate", "--model", str(out / "model"), "--image",
                        str(out / "x.png"), "--prompt", "What is this?", "--max-new-tokens", "8", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    return p


def test_twilight_generate_p1_identical_and_mass_kept(export_and_image):
    out = export_and_image
    dense = _generate(out)
    assert dense.returncode == 0, dense.stderr[-2000:]
    p1 = _generate(out, "--sparse-attention", "twilight", "--top-p", "1.0", "--dense-layers", "0")
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p1.stdout == dense.stdout and dense.stdout.strip()
    p8 = _generate(out, "--sparse-attention", "twilight", "--top-p", "0.8", "--dense-layers", "0")
    assert p8.returncode == 0, p8.stderr[-2000:]
    stats = json.loads(p8.stderr.strip().splitlines()[-1])["twilight"]
    assert stats["min_est_mass"] >= 0.8 - 1e-5  # every head, every decode step, every sparse layer
    assert stats["kept_fraction"] < 1.0  # tokens were pruned
    assert stats["min_true_mass"] > 0.5  # the INT4 estimate ranks the tokens nearly as the exact weights do


def test_twilight_bad_top_p_fails_early(export_and_image):
    p = _generate(export_and_image, "--sparse-attention", "twilight", "--top-p", "1.5")
    assert p.returncode != 0 and "top_p must be in (0, 1]" in p.stderr
