"""Helpers shared by the triton kernel files (imported only when triton is installed)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scaleforge.kernels._backend import triton_interpreting


def dot_precision() -> str:
    """fp32 x fp32 tl.dot precision: three-pass TF32 (about fp32 accurate, on tensor cores) on GPU;
    the interpreter computes in numpy fp32 and only accepts the plain names."""
    return "ieee" if triton_interpreting() else "tf32x3"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter runs every config it is given, so it gets only the first one."""
    return configs[:1] if triton_interpreting() else configs


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def dot_f32acc(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands use PREC (see dot_precision)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a, b, out_dtype=tl.float32)
