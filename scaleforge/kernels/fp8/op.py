"""The FP8 torch.library ops (quantizers and state codec) and the device-side amax pass."""

from __future__ import annotations

import math

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._triton_utils import cdiv, kernel_op
from scaleforge.kernels.fp8.launch import (
    _INV_QMAX,
    _QUANT_GROUP_OPTS,
    _QUANT_TENSOR_OPTS,
    _config,
    _group_tiles,
    _launch,
)
from scaleforge.kernels.fp8.quant_kernels import (
    _amax_kernel,
    _dequant_group_kernel,
    _dequant_tensor_kernel,
    _quant_group_kernel,
    _quant_tensor_kernel,
)
from scaleforge.kernels.fp8.state_kernels import _adamw_fp8_kernel, _state_dequant_kernel, _state_quant_kernel
from scaleforge.kernels.reference.fp8 import fp8_max


def _amax_bits(x: torch.Tensor) -> torch.Tensor:
    """max|x| over the whole tensor as the int32 bits of an fp32, on the device (no host sync); the
    per-tensor quantizers here and in fp8_linear.py read their scale from it."""
    amax = torch.zeros((), dtype=torch.int32, device=x.device)
    n = x.numel()
    cfg = _config("amax")
    _launch(_amax_kernel, cfg, cdiv(n, cfg["BLOCK"]), x.device, x, amax, n)
    return amax


@kernel_op("scaleforge::quantize_fp8_tensor")
def _quantize_tensor(
    x: torch.Tensor, scale: torch.Tensor | None, amax: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor with a given scale, a given amax (fp32, one element, e.g. from the norm that wrote x: one
    pass, the given scale's launch config and clamps, so codes saturate should the amax be too small), or
    neither (an amax pass first)."""
    n = x.numel()
    q = _backend.new_output(x.shape, dtype, x.device)
    out_scale = _backend.new_output((), torch.float32, x.device)
    # the kernel reads the one element through the pointer (no reshape: a torch op of host time each) and
    # bitcasts an amax to fp32, which is the identity for a given fp32 amax and decodes the amax pass's bits
    src = scale if scale is not None else (amax if amax is not None else _amax_bits(x))
    dynamic = scale is None and amax is None
    cfg = _QUANT_TENSOR_OPTS | _config("quant_tensor_dynamic" if dynamic else "quant_tensor")
    _launch(
        _quant_tensor_kernel, cfg, cdiv(n, cfg["BLOCK"]), x.device,
        x, q, src, out_scale, n, fp8_max(dtype), _INV_QMAX[dtype],
        FROM_AMAX=scale is None, GIVEN_AMAX=amax is not None, RECIP=x.device.type == "cuda",
    )  # fmt: skip
    return q, out_scale


@kernel_op("scaleforge::quantize_fp8_group")
def _quantize_group(x: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    ng = cdiv(k, group_size)
    groups = x.numel() // k * ng
    q = _backend.new_output(x.shape, dtype, x.device)
    s = _backend.new_output((*x.shape[:-1], ng), torch.float32, x.device)
    cfg = _QUANT_GROUP_OPTS | _config("quant_group", group_size)  # every option passed, set or not
    _launch(
        _quant_group_kernel, cfg, _group_tiles(groups, group_size, cfg["BLOCK"]), x.device,
        x, q, s, groups, ng, k, fp8_max(dtype), _INV_QMAX[dtype],
        GS=group_size, EVEN=k % group_size == 0, RECIP=x.device.type == "cuda",
    )  # fmt: skip
    return q, s


@kernel_op("scaleforge::dequantize_fp8")
def _dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    y = _backend.new_output(q.shape, out_dtype, q.device)
    n = q.numel()
    if group_size <= 0:
        cfg = _config("dequant_tensor")
        _launch(_dequant_tensor_kernel, cfg, cdiv(n, cfg["BLOCK"]), q.device, q, scale, y, n)
        return y
    k = q.shape[-1]
    ng = scale.shape[-1]
    groups = n // k * ng
    cfg = _config("dequant_group", group_size)
    _launch(
        _dequant_group_kernel, cfg, _group_tiles(groups, group_size, cfg["BLOCK"]), q.device,
        q, scale, y, groups, ng, k, GS=group_size, EVEN=k % group_size == 0,
    )  # fmt: skip
    return y


@kernel_op("scaleforge::quantize_fp8_state")
def _quantize_state(
    x: torch.Tensor, group_size: int, dtype: torch.dtype, expand_min: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    g = cdiv(n, group_size)
    qmax = fp8_max(dtype)
    q = _backend.new_output((g * group_size,), dtype, x.device)
    scale, expand, centre = (_backend.new_output((g,), torch.float32, x.device) for _ in range(3))
    cfg = _config("state_quant")
    _launch(
        _state_quant_kernel, cfg, _group_tiles(g, group_size, cfg["BLOCK"]), x.device,
        x, q, scale, expand, centre, n, g, qmax, math.log2(qmax * qmax / 2), float(expand_min), GS=group_size,
    )  # fmt: skip
    return q, scale, expand, centre


@kernel_op("scaleforge::dequantize_fp8_state")
def _dequantize_state(
    q: torch.Tensor, scale: torch.Tensor, expand: torch.Tensor, centre: torch.Tensor, n: int, out_dtype: torch.dtype
) -> torch.Tensor:
    g = scale.numel()
    gs = q.numel() // g
    y = _backend.new_output((n,), out_dtype, q.device)
    cfg = _config("state_dequant")
    _launch(
        _state_dequant_kernel, cfg, _group_tiles(g, gs, cfg["BLOCK"]), q.device,
        q, scale, expand, centre, y, n, g, GS=gs,
    )  # fmt: skip
    return y




def _adamw_fp8_step(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, dtype, expand_min):
    """In place, one kernel launch (not a torch.library op: it mutates its arguments and the optimizer step is
    never traced)."""
    rows, cols = p.shape
    gpr = exp_avg[1].shape[1]
    gs = exp_avg[0].shape[1] // gpr
    qmax = fp8_max(dtype)
    cfg = dict(_config("state_quant"))
    cfg.pop("WAVES", None)
    warps = cfg.pop("num_warps")
    n_groups = rows * gpr
    grid = (_group_tiles(n_groups, gs, cfg["BLOCK"]),)
    _adamw_fp8_kernel[grid](
        p, g, *exp_avg, *exp_avg_sq, n_groups, gpr, cols,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step), math.sqrt(1 - beta2**step), eps,
        qmax, math.log2(qmax * qmax / 2), float(expand_min), GS=gs, BLOCK=cfg["BLOCK"], num_warps=warps,
    )  # fmt: skip
