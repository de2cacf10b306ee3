"""NVILA from real webdataset shards: image conversations and video blended, DataLoader workers, 2 ranks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def test_nvila_trains_from_conversation_and_video_shards(tmp_path, run_env):
    for kind, extra in (("conversations", ["--size", "96"]), ("video-text", ["--size", "64", "--frames", "8"])):
        r = subprocess.run([str(BIN / "scaleforge"), "data", "synth", "--kind", kind, "--out",
                            str(tmp_path / kind), "--n", "32", "--per-shard", "8", *extra],
                           capture_output=True, text=True, env=run_env)
        assert r.returncode == 0, r.stderr
    cfg = tmp_path / "nvila_wds.yaml"
    cfg.write_text(f"""defaults: [nvila_tiny.yaml]
data:
  kind: webdataset
  num_workers: 1
  sources:
    - {{name: conv, shards: "{tmp_path}/conversations/shard-{{000000..000003}}.tar", weight: 0.7}}
    - {{name: video, shards: "{tmp_path}/video-text/shard-{{000000..000003}}.tar", weight: 0.3}}
""")
    common = [str(BIN / "launch"), "--config", str(cfg), "--nproc", "2", f"run.output_dir={tmp_path}",
              "run.name=w", "trainer.max_steps=5", "metrics.wandb.mode=disabled", "metrics.plot=false"]
    # a missing shard is refused by the launcher, before any worker process starts
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(cfg.read_text().replace(f"{tmp_path}/video-text/", "/nonexistent/"))
    bad = subprocess.run([*common[:2], str(bad_cfg), *common[3:]], capture_output=True, text=True, env=run_env,
                         timeout=120)
    assert bad.returncode == 2 and "data.sources[1] (video).shards" in bad.stderr and "not found" in bad.stderr
    assert "world size" not in bad.stdout
    r = subprocess.run(common, capture_output=True, text=True, env=run_env, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and recs[-1]["loss"] < recs[0]["loss"]
    counts = {k: v for k, v in recs[-1].items() if k.startswith("data/") and ("conv" in k or "video" in k)}
    assert any("conv" in k and v > 0 for k, v in counts.items()), recs[-1]
    assert any("video" in k and v > 0 for k, v in counts.items()), recs[-1]
