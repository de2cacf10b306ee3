"""End to end on CPU with 2 processes (``launch``): a projector-only stage (frozen ViT/LLM are not
stepped), then a full stage started from its checkpoint (``model.init_from_run``) whose loss falls,
then ``scaleforge export --format hf`` and greedy generation from the export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _launch(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(BIN / "launch"), "--config", "configs/nvila_tiny.yaml", "--nproc", "2", *args,
                        "metrics.progress_bar=false", "metrics.plot=false", "metrics.wandb.mode=disabled"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_stages_export_and_generate(tmp_path):
    from scaleforge.launch.export import load_model_state

    out = tmp_path / "runs"
    # stage A: projector alignment (only mm_projector trains)
    _launch(f"run.output_dir={out}", "run.name=align", "model.trainable=[mm_projector]", "trainer.max_steps=2",
            "optim.lr=1e-2")
    _, recipe, sd_a = load_model_state(out / "align")
    torch.manual_seed(0)
    fresh = recipe.build_model(torch.device("cpu"))
    recipe.init_weights(fresh)
    init = fresh.state_dict()
    for k in sd_a:
        same = torch.equal(sd_a[k], init[k])
        if k.startswith("mm_projector.") and k.endswith("weight"):
            assert not same, f"{k} did not train"
        elif not k.startswith("mm_projector."):
            assert same, f"frozen {k} changed"

    # stage B: everything trains, starting from stage A's checkpoint
    _launch(f"run.output_dir={out}", "run.name=sft", f"model.init_from_run={out / 'align'}",
            "trainer.max_steps=15")
    losses = _losses(out / "sft")
    assert len(losses) == 15
    # started from stage A: the first step's loss is not that of a fresh model (ln 272 = 5.6)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses

    export_dir = tmp_path / "export"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(out / "sft"), "--format", "hf",
                        "--out", str(export_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for sub in ("llm", "vision_tower", "mm_projector"):
        assert (export_dir / sub / "model.safetensors").is_file()

    from scaleforge.models.nvila.cli import generate, load_exported
    from scaleforge.models.nvila.data import _draw

    model, tok, cfg = load_exported(export_dir)
    img = _draw(64, 96, "square", (0.9, 0.1, 0.1), 24, 32, 10)
    text = generate(model, tok, cfg, "What shape is in the image?", [img], max_new_tokens=12)
    assert isinstance(text, str) and len(text) > 0
