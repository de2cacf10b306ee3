"""benchmarks/coat_memory.py runs (CPU smoke shapes, LM and SANA) and prints its table and the loss line."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lm_1b", "sana-1.6b"])
def test_coat_memory_smoke(model):
    extra = ["--loss-steps", "3"] if model == "lm_1b" else []
    p = subprocess.run([sys.executable, "benchmarks/coat_memory.py", "--smoke", "--model", model, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [l.split("|") for l in p.stdout.splitlines() if l.strip().startswith(("bf16", "coat"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("bf16", "1"), ("bf16", "2"), ("coat", "1"), ("coat", "2")]
    assert all(float(r[-1]) > 0 for r in rows)  # tokens/s
    assert ("loss (mean of the last" in p.stdout) == (model == "lm_1b")


def test_torchao_filter_skips_dims_not_divisible_by_16():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("coat_memory", ROOT / "benchmarks" / "coat_memory.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    keep = cm.SANA_KEEP
    assert cm._ao_eligible(torch.nn.Linear(2240, 2240), "blocks.0.attn.qkv", keep)
    assert not cm._ao_eligible(torch.nn.Linear(300, 2240), "blocks.0.cross.kv", keep)  # SANA's caption width
    assert not cm._ao_eligible(torch.nn.Linear(2240, 2240), "caption_projection.linear_1", keep)
    assert not cm._ao_eligible(torch.nn.Linear(2240, 4480), "blocks.3.cross_attn.kv_linear", keep)  # 300 tokens
