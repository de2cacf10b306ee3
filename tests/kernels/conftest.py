"""Kernel tests: on a machine without CUDA the Triton kernels run in the triton interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (at import of
``scaleforge.kernels``), so it is set here, at collection, and only when there is no GPU.
Every kernel output buffer is NaN-poisoned (``POISON_OUTPUTS``) so elements a kernel forgets to write
show up as NaN in the comparisons."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scaleforge.kernels import _backend  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)
    torch.manual_seed(0)
    yield
