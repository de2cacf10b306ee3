import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on CPU-only machines (CI). It must be set before the first
# import of triton-decorated modules, whichever test module imports scaleforge.kernels first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def run_env():
    """Environment for launching jobs from tests: one thread per worker (2-core machines), no wandb."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    # DeepSpeed JIT-compiles its CPU communication op once; keep it where `make test` caches it
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    for k in list(env):
        if k.startswith("SCALEFORGE_FAULT_"):
            del env[k]
    return env
