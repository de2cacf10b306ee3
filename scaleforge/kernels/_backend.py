"""Global backend switch: ``"triton"`` kernels or the plain-PyTorch ``"torch"`` references."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "torch")

try:  # triton is optional: without it only the torch references are available
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def triton_interpreting() -> bool:
    """True when triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _default_backend() -> str:
    env = os.environ.get("SCALEFORGE_KERNELS")
    if env:
        return _check(env, "environment variable SCALEFORGE_KERNELS")
    return "triton" if HAS_TRITON and torch.cuda.is_available() else "torch"


def _check(name: str, where: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a kernel backend; choose one of {BACKENDS}")
    return name


_current = None


def get_backend() -> str:
    global _current
    if _current is None:
        _current = _default_backend()
    return _current


def set_backend(name: str) -> None:
    """Select the kernels every public function uses when called with ``backend=None``."""
    global _current
    _current = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(backend: str | None) -> str:
    """The backend for one call; raises a clear error if triton was asked for but cannot run."""
    name = get_backend() if backend is None else _check(backend)
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("kernel backend 'triton' requested but triton is not installed; use backend='torch'")
    return name


def check_triton_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"triton kernels need CUDA tensors (got a tensor on {t.device}); use backend='torch' on CPU "
                "or set TRITON_INTERPRET=1 to run the kernels in the triton interpreter"
            )


# Tests set this so every buffer a kernel must fully write starts as NaN: unwritten elements then show.
POISON_OUTPUTS = os.environ.get("SCALEFORGE_KERNELS_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device, strides=None) -> torch.Tensor:
    """torch.empty(_strided) for kernel outputs, NaN-filled when POISON_OUTPUTS is on."""
    if strides is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t
