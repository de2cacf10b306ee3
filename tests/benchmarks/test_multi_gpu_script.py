"""benchmarks/multi_gpu.sh: MODE=dry checks that every script a section calls exists and parses its arguments
(benchmarks/argcheck.py), an unknown section is refused, and argcheck itself rejects a bad argument."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def test_dry_mode_checks_the_commands_of_a_section(tmp_path):
    p = subprocess.run(["bash", "benchmarks/multi_gpu.sh", "coat"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(MODE="dry", OUT=str(tmp_path), LAYERS="2"), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok benchmarks/coat_memory.py --model llama2-7b-cut --layers 2 --seq 2048" in p.stdout
    assert (tmp_path / "coat.log").read_text() == p.stdout.split("\n", 1)[1]  # the section's log, after the banner


def test_unknown_section_and_bad_arguments_fail(tmp_path):
    p = subprocess.run(["bash", "benchmarks/multi_gpu.sh", "coat", "engins"], cwd=ROOT, capture_output=True,
                       text=True, env=_env(MODE="dry", OUT=str(tmp_path)), timeout=60)
    assert p.returncode == 2 and "unknown section engins" in p.stderr
    p = subprocess.run([sys.executable, "benchmarks/argcheck.py", "benchmarks/coat_memory.py", "--nlayers", "2"],
                       cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 2 and "unrecognized arguments: --nlayers 2" in p.stderr
