"""benchmarks/ps3_step.py runs (CPU smoke shapes) and prints both tables."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ps3_step_smoke():
    p = subprocess.run([sys.executable, "benchmarks/ps3_step.py", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert any(l.startswith("1.5k") for l in lines) and any(l.startswith("4k") for l in lines)
    assert [l.split()[0] for l in lines if l.strip().split()[0:1] in (["16"], ["64"], ["160"])] == ["16", "64", "160"]
