"""FP8 quantizers (COAT activations, kernels.md §2.2) and the COAT optimizer-state codec with dynamic range
expansion (coat.md §2): Triton kernels, torch.library ops and the public functions.

The kernels are memory bound (bf16 quantize: 2 B read + 1 B written per element), so every program streams
tiles of 1k-16k contiguous elements with 16-byte accesses and a few instructions per element; the launch
configs come from a fixed table measured on an H200 (``_LAUNCH``), where the quantizers and the amax pass
can also run as a persistent grid that prefetches its next tile (see ``_cfg``):
* per tensor: one flat pass; a dynamic scale first needs an amax pass (each program's max folded into one
  int32 ``atomic_max`` on the fp32 bits), and the quantize pass turns that amax into the scale on the device
  (no host sync, no torch ops between the passes; 5 B/element move for the 3 logical ones; its own table
  entry, and it can visit the tiles in reverse to find the amax pass's last ones in L2). fp8_linear.py's
  fused quantize+transpose reads the same amax (``_amax_bits``);
* per group (1×G along the last dim, G a power of two): the tensor as rows of G elements, a program takes
  BLOCK/G whole groups, so a group's max is a row reduction; when K % G != 0 the tile indexes (row, column)
  and masks each row's partial last group (compile-time variants of the quantizer: _QUANT_GROUP_OPTS);
* state codec: the same tiling over the flattened tensor, in groups of 128.
FP8 codes equal the torch reference's bit for bit (see ``_div_rn`` and ``_scale_from_amax``).
Reference: ``reference/fp8.py`` (same formulas; COAT ``_quantize.py`` and ``fp8_adamw_expand_cuda_kernel.cu``).

Files: this module is the public API (argument checks, the torch-reference dispatch); ``launch.py`` the launch
configuration (``_cfg``, ``_LAUNCH``); ``quant_kernels.py`` the quantizer kernels; ``state_kernels.py`` the
state-codec kernels; ``op.py`` the torch.library ops and the amax pass.
"""

from __future__ import annotations

import math

import torch

from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.fp8 import (
    AMAX_EPS,
    RANGE_EPS,
    FP8State,
    adamw_fp8_step_ref,
    check_granularity,
    dequantize_fp8_ref,
    dequantize_fp8_state_ref,
    fp8_max,
    quantize_fp8_ref,
    quantize_fp8_state_ref,
)

__all__ = ["FP8State", "adamw_fp8_step", "dequantize_fp8", "dequantize_fp8_state", "quantize_fp8", "quantize_fp8_state"]

if HAS_TRITON:
    from scaleforge.kernels.fp8.op import (
        _adamw_fp8_step,
        _dequantize,
        _dequantize_state,
        _quantize_group,
        _quantize_tensor,
        _quantize_state,
    )


def _checked_amax(amax: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """A given max|x| (quantize_fp8's amax, fp8_linear's x_amax), validated and detached: a statistic, no
    gradient through the scale on either backend."""
    if amax.numel() != 1 or amax.dtype != torch.float32 or amax.device != x.device:
        raise ValueError(f"{what} must be a one-element float32 tensor on x's device ({x.device}), "
                         f"got {amax.dtype} of shape {tuple(amax.shape)} on {amax.device}")  # fmt: skip
    return amax.detach()


def _pow2(group_size: int, what: str) -> None:
    if group_size & (group_size - 1):
        raise ValueError(f"{what}: the triton kernels need a power-of-two group_size (got {group_size}); use backend='torch'")


def quantize_fp8(
    x: torch.Tensor,
    granularity: str = "tensor",
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    scale: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization, per tensor or per 1×``group_size`` group along the last dim (docs/kernels.md).
    Returns ``(q, scale)`` with fp32 scales. Per tensor only: ``scale=`` quantizes with a given scale;
    ``amax=`` (an fp32 one-element tensor, max|x| as the kernel that wrote x computed it, e.g.
    ``layer_norm(..., return_amax=True)``) gives the scale ``(amax + 1e-10) / fp8_max`` without a pass over x
    to find it: one read of x instead of two, the same codes as without it when amax is max|x|."""
    check_granularity(granularity, group_size)
    fp8_max(dtype)
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"quantize_fp8: x must be a bf16/fp16/fp32 tensor, got {x.dtype}")
    if (scale is not None or amax is not None) and granularity != "tensor":
        raise ValueError("quantize_fp8: a given scale or amax is only supported for granularity='tensor'")
    if scale is not None and amax is not None:
        raise ValueError("quantize_fp8: pass a scale or an amax, not both")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"quantize_fp8: a given scale must have one element, got shape {tuple(scale.shape)}")
    if amax is not None:
        amax = _checked_amax(amax, x, "quantize_fp8: amax")
    if resolve(backend) == "torch" or x.numel() == 0:
        return quantize_fp8_ref(x, granularity, group_size, dtype, scale, amax=amax)
    check_triton_device(x)
    x = x.contiguous()
    if granularity == "tensor":
        return _quantize_tensor(x, scale, amax, dtype)
    _pow2(group_size, "quantize_fp8")
    return _quantize_group(x, group_size, dtype)


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    granularity: str | None = None,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``q * scale`` in ``out_dtype`` (granularity from scale's shape if None)."""
    if granularity is None:
        granularity = "tensor" if scale.numel() == 1 and scale.ndim <= 1 else "group"
    check_granularity(granularity, group_size)
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"dequantize_fp8: q must be an FP8 tensor, got {q.dtype}")
    if granularity == "group":
        expected = (*q.shape[:-1], -(-q.shape[-1] // group_size))
        if tuple(scale.shape) != expected:
            raise ValueError(f"dequantize_fp8: group scale has shape {tuple(scale.shape)}, expected {expected}")
    if resolve(backend) == "torch" or q.numel() == 0:
        return dequantize_fp8_ref(q, scale, granularity, group_size, out_dtype)
    check_triton_device(q)
    if granularity == "tensor":
        return _dequantize(q.contiguous(), scale.float().reshape(()), 0, out_dtype)
    _pow2(group_size, "dequantize_fp8")
    return _dequantize(q.contiguous(), scale.float().contiguous(), group_size, out_dtype)


def quantize_fp8_state(
    x: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    expand_min: int = 16,
    *,
    backend: str | None = None,
) -> FP8State:
    """COAT optimizer-state quantization with dynamic range expansion (coat.md §2; docs/kernels.md)."""
    fp8_max(dtype)
    if x.numel() == 0:
        raise ValueError("quantize_fp8_state: empty tensor")
    if resolve(backend) == "torch":
        return quantize_fp8_state_ref(x, group_size, dtype, expand_min)
    check_triton_device(x)
    _pow2(group_size, "quantize_fp8_state")
    q, scale, expand, centre = _quantize_state(x.detach().contiguous(), group_size, dtype, expand_min)
    return FP8State(q, scale, expand, centre, x.shape)


def dequantize_fp8_state(state: FP8State, out_dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> torch.Tensor:
    """Exact inverse transform of :func:`quantize_fp8_state` (up to the FP8 rounding)."""
    if resolve(backend) == "torch":
        return dequantize_fp8_state_ref(state, out_dtype)
    check_triton_device(state.q)
    n = math.prod(state.shape)
    y = _dequantize_state(state.q, state.scale, state.expand, state.sqrt_minmax, n, out_dtype)
    return y.reshape(state.shape)


def adamw_fp8_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: tuple[torch.Tensor, ...], exp_avg_sq: tuple[torch.Tensor, ...],
    *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int,
    dtype: torch.dtype = torch.float8_e4m3fn, expand_min: int = 16, backend: str | None = None,
) -> None:
    """One AdamW step, in place, of an fp32 ``param`` (rows, cols) whose two moments are COAT FP8 states, each
    ``(codes (rows, G * group), scale, expand, centre (rows, G))`` with groups along the rows (the last one
    zero-padded): decode, torch's AdamW arithmetic in fp32, encode (coat.md §2). Triton: one fused kernel
    (COAT's one optimizer kernel); torch: the reference, the same steps as separate ops in row chunks."""
    if param.ndim != 2 or grad.shape != param.shape or param.dtype != torch.float32:
        raise ValueError(f"adamw_fp8_step: param must be 2-D fp32 with a gradient of its shape, got {param.dtype} "
                         f"{tuple(param.shape)} and grad {tuple(grad.shape)}")
    for name, st in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        q, *meta = st
        if q.dtype != dtype or q.shape[0] != param.shape[0] or any(t.shape != meta[0].shape for t in meta) \
                or q.shape[1] % meta[0].shape[1] or q.shape[1] < param.shape[1]:
            raise ValueError(f"adamw_fp8_step: {name} must be ({dtype} codes (rows, G * group), scale, expand, "
                             f"centre (rows, G)) for param {tuple(param.shape)}")
    hp = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay, step=step)
    if resolve(backend) == "torch":
        return adamw_fp8_step_ref(param, grad, exp_avg, exp_avg_sq, **hp, dtype=dtype, expand_min=expand_min)
    check_triton_device(param, grad)
    if not (param.is_contiguous() and grad.is_contiguous() and all(t.is_contiguous() for t in (*exp_avg, *exp_avg_sq))):
        raise ValueError("adamw_fp8_step: the triton kernel needs contiguous param, grad and states")
    _pow2(exp_avg[0].shape[1] // exp_avg[1].shape[1], "adamw_fp8_step")
    _adamw_fp8_step(param, grad, exp_avg, exp_avg_sq, **hp, dtype=dtype, expand_min=expand_min)


del AMAX_EPS, RANGE_EPS  # documented in the kernels as literals
