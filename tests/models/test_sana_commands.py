"""`scaleforge sana ...` as users run it (console script in a subprocess), on a 2-step `sana_tiny` run with the
tiny random text encoder and DC-AE (built offline into a temporary cache): sample, precompute, grow, prune, and
their one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(cmd, env, cwd, check=True, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def sana_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana_cmds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEFORGE_FAULT_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", SCALEFORGE_CACHE=str(root / "cache"))
    _run([str(BIN / "launch"), "--config", "sana_tiny.yaml", "--nproc", "1", "trainer.max_steps=2",
          "trainer.global_batch_size=8", "metrics.plot=false", "metrics.progress_bar=false"], env, root)
    return root, env


def test_sample_from_the_tiny_run_offline(sana_run):
    root, env = sana_run
    r = _run([str(BIN / "scaleforge"), "sana", "sample", "--ckpt", "runs/sana_tiny", "--prompt", "a red circle",
              "a blue square", "--steps", "2", "--out", "samples"], env, root)
    assert "wrote 2 images" in r.stdout
    from PIL import Image

    img = Image.open(root / "samples" / "0001.png")
    assert img.size == (256, 256)  # the run's image_size, decoded by the tiny DC-AE (f32)
    assert json.loads((root / "samples" / "prompts.json").read_text())["0001.png"] == "a blue square"
    # the tiny encoders were saved in the transformers / diffusers formats
    cache = root / "cache"
    assert (next(cache.glob("tiny-gemma2-v*")) / "tokenizer.json").is_file()
    assert (next(cache.glob("tiny-dc-ae-v*")) / "diffusion_pytorch_model.safetensors").is_file()


def test_precompute_with_the_tiny_config_feeds_training(sana_run):
    root, env = sana_run
    _run([str(BIN / "scaleforge"), "data", "synth", "--kind", "image-text", "--out", "raw", "--n", "6",
          "--size", "256", "--random-aspect"], env, root)
    r = _run([str(BIN / "scaleforge"), "sana", "precompute", "--config", "sana_tiny.yaml",
              "--shards", "raw/shard-000000.tar", "--out", "latents"], env, root)
    assert "wrote 6 samples" in r.stdout
    samples = list(wds.WebDataset(str(root / "latents" / "shard-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 6
    for s in samples:
        assert s["latent.npy"].shape[0] == 32 and s["text_emb.npy"].shape == (16, 32)  # sana_tiny: 16 x 32
        assert s["latent.npy"].shape[1] * 32 in (64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448)


def test_grow_and_prune_through_the_console_script(sana_run):
    root, env = sana_run
    r = _run([str(BIN / "scaleforge"), "sana", "grow", "--ckpt", "runs/sana_tiny", "--depth", "6",
              "--out", "grown"], env, root)
    assert "grew 4 -> 6 blocks" in r.stdout
    r = _run([str(BIN / "scaleforge"), "sana", "prune", "--ckpt", "grown", "--keep", "3", "--calib-samples", "8",
              "--out", "pruned"], env, root)
    assert "kept blocks" in r.stdout and (root / "pruned" / "model" / "config.json").is_file()
    assert json.loads((root / "pruned" / "model" / "config.json").read_text())["num_layers"] == 3


@pytest.mark.parametrize("argv, expected", [
    (["grow", "--ckpt", "runs/sana_tiny", "--depth", "2", "--out", "g2"], "smaller than the 4 source blocks"),
    (["grow", "--ckpt", "runs/sana_tiny", "--depth", "0", "--out", "g0"], "--depth 0: must be >= 1"),
    (["prune", "--ckpt", "runs/sana_tiny", "--keep", "9", "--out", "p9"], "--keep 9: must be between 1 and"),
    (["sample", "--ckpt", "nowhere", "--prompt", "x", "--out", "s"], "nowhere: no such SANA checkpoint"),
])
def test_errors_are_one_line(sana_run, argv, expected):
    root, env = sana_run
    r = _run([str(BIN / "scaleforge"), "sana", *argv], env, root, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
