"""SANA's production path: training from precomputed latent/text-embedding shards (the format
`scaleforge sana precompute` writes: latent.npy, text_emb.npy, text_mask.npy) with aspect-ratio buckets,
DataLoader workers and 2 ranks, through `launch`."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_sana_trains_from_precomputed_bucketed_shards(tmp_path, run_env):
    import webdataset as wds

    rng = np.random.default_rng(0)
    # two aspect-ratio buckets of the 256 px table: 256x256 (8x8 latents) and 192x384 (6x12 latents)
    shapes = [(8, 8), (6, 12)]
    (tmp_path / "pre").mkdir()
    for shard in range(4):
        with wds.TarWriter(str(tmp_path / "pre" / f"shard-{shard:06d}.tar")) as w:
            for i in range(12):
                h, wd = shapes[(shard + i) % 2]
                mask = np.zeros(16, dtype=np.float32)
                mask[: rng.integers(4, 17)] = 1
                w.write({"__key__": f"{shard:02d}{i:04d}",
                         "latent.npy": _npy(rng.standard_normal((32, h, wd)).astype(np.float16)),
                         "text_emb.npy": _npy(rng.standard_normal((16, 32)).astype(np.float16)),
                         "text_mask.npy": _npy(mask)})
    cfg = tmp_path / "sana_wds.yaml"
    cfg.write_text(f"""defaults: [sana_tiny.yaml]
model:
  aspect_buckets: true
data:
  kind: webdataset
  num_workers: 1
  sources:
    - {{name: pre, shards: "{tmp_path}/pre/shard-{{000000..000003}}.tar"}}
""")
    r = subprocess.run([str(BIN / "launch"), "--config", str(cfg), "--nproc", "2", f"run.output_dir={tmp_path}",
                        "run.name=s", "trainer.max_steps=6", "trainer.global_batch_size=8",
                        "trainer.micro_batch_size=4", "metrics.wandb.mode=disabled", "metrics.plot=false"],
                       capture_output=True, text=True, env=run_env, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(l) for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(np.isfinite(x["loss"]) for x in recs)
    assert any(k.startswith("data/") and "pre" in k and v > 0 for k, v in recs[-1].items()), recs[-1]
