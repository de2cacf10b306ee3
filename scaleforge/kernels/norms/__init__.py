"""Fused RMSNorm / LayerNorm with adaLN modulation and a gated residual add, forward and backward.

One read of each row computes (all math fp32, I/O in the input dtype)::

    h = residual + gate * x          (only with residual; h is also returned: the new residual stream)
    y = norm(h) * weight + bias      (norm over the last dim C; RMS or mean/variance)
    y = y * (1 + scale) + shift      (adaLN modulation, sana.md §2)

``shift``/``scale``/``gate`` are per channel, per sample (B, 1, C) or per token. The backward pass
recomputes x̂ from the saved (mean, rstd) and reduces the parameter/modulation gradients with per-program
fp32 partials (summed afterwards, deterministic). Programs walk contiguous runs of [block_r, C] row tiles
inside one modulation group, so modulation/affine rows are read once per program, not once per row (see
``launch.NormConfig``); ``benchmarks/kernels/tune_norms.py`` sweeps the launch shapes and prints the defaults
table. Reference: ``reference/norms.py``.

Files: this module is the public API (argument checks, modulation layouts, the torch-reference dispatch);
``launch.py`` the launch configuration and plans; ``triton_kernels.py`` the Triton kernels; ``op.py`` the
torch.library ops and their autograd.
"""

from __future__ import annotations

import functools
import math

import torch

from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

__all__ = ["layer_norm", "rms_norm"]

if HAS_TRITON:
    from scaleforge.kernels._triton_utils import cached_call
    from scaleforge.kernels.norms.op import _norm_fwd


@functools.lru_cache(maxsize=1024)
def _mod_layout(t_shape: tuple, x_shape: tuple, name: str) -> int:
    """Rows of x (viewed as (M, C)) per row of a modulation tensor of shape t_shape: M for per channel (C,),
    N for per sample (B, 1, C) / (B, C), 1 per token; a ValueError naming the tensor otherwise."""
    c = x_shape[-1]
    m = math.prod(x_shape) // c
    if t_shape[-1] != c:
        raise ValueError(f"{name} has shape {t_shape}; its last dim must be C = {c}")
    if math.prod(t_shape) == c:
        return m
    shape = t_shape
    if len(shape) == 2 and len(x_shape) == 3:
        if shape[0] != x_shape[0]:
            raise ValueError(f"2-D {name} {shape} for x {x_shape} must be (B, C) per sample")
        shape = (shape[0], 1, c)  # (B, C) modulation for (B, N, C) tokens
    shape = (1,) * (len(x_shape) - len(shape)) + shape
    for j in range(len(x_shape) - 1, -1, -1):
        if shape[:j] == x_shape[:j] and all(s == 1 for s in shape[j:-1]):
            return m // math.prod(x_shape[:j])
    raise ValueError(
        f"{name} of shape {t_shape} does not broadcast against x {x_shape} as a per-channel "
        "(C,), per-sample (B, 1, C) / (B, C) or per-token tensor"
    )


def _mod_rows(t: torch.Tensor | None, x: torch.Tensor, name: str) -> int:
    if t is None:
        return 0
    return cached_call(_mod_layout, tuple(t.shape), tuple(x.shape), name)


def _with_amax(out, return_amax: bool, amax: torch.Tensor | None = None):
    """The public return: y or (y, h), with max|y| (an fp32 0-d tensor) appended when asked for: the kernel's
    amax, or computed here from y (the torch reference path)."""
    if not return_amax:
        return out
    if amax is None:
        y = (out[0] if isinstance(out, tuple) else out).detach()
        amax = y.abs().amax().float() if y.numel() else y.new_zeros((), dtype=torch.float32)
    return (*out, amax) if isinstance(out, tuple) else (out, amax)


def _norm(x, weight, bias, eps, shift, scale, residual, gate, is_rms, return_amax):
    c = x.shape[-1]
    if weight is not None and weight.shape != (c,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({c},)")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({c},)")
    if gate is not None and residual is None:
        raise ValueError("gate is only used with residual (h = residual + gate * x)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_triton_device(x)
    p_gate, p_shift, p_scale = _mod_rows(gate, x, "gate"), _mod_rows(shift, x, "shift"), _mod_rows(scale, x, "scale")
    if x.numel() == 0:  # no rows to launch over (the launch plan divides by the row count)
        ref = rms_norm_ref(x, weight, eps, shift=shift, scale=scale, residual=residual, gate=gate) if is_rms else \
            layer_norm_ref(x, weight, bias, eps, shift=shift, scale=scale, residual=residual, gate=gate)  # fmt: skip
        return _with_amax(ref, return_amax)
    # the kernels read every tensor as rows of C through its pointer, so the tensors go in with their own
    # shapes (a reshape here would add a view node per tensor to the autograd graph; outputs come back shaped
    # like x); per-sample modulation (B, 1, C) is the same memory as (B, C)
    y, h, _, _, amax = _norm_fwd(
        x.contiguous(), _contig(residual), _contig(gate), _contig(weight), _contig(bias),
        _contig(shift), _contig(scale), p_gate, p_shift, p_scale, float(eps), is_rms, bool(return_amax),
    )  # fmt: skip
    # amax: the kernel's int32 bits of max|y| (empty unless asked for)
    return _with_amax(y if residual is None else (y, h), return_amax, amax.view(torch.float32))


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    return_amax: bool = False,
    backend: str | None = None,
):
    """RMSNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given; ``return_amax`` appends max|y| as an fp32 0-d tensor,
    computed by the kernel as it writes y (no pass of its own): the amax that ``quantize_fp8(y, "tensor",
    amax=...)`` and ``fp8_linear(y, w, x_amax=...)`` take to quantize y per tensor in one pass (COAT's
    producer-fused scaling, coat.md §3)."""
    if resolve(backend) == "torch":
        ref = rms_norm_ref(x, weight, eps, shift=shift, scale=scale, residual=residual, gate=gate)
        return _with_amax(ref, return_amax)
    return _norm(x, weight, None, eps, shift, scale, residual, gate, True, return_amax)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    return_amax: bool = False,
    backend: str | None = None,
):
    """LayerNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given; ``return_amax`` appends max|y| as an fp32 0-d tensor,
    computed by the kernel as it writes y (no pass of its own): the amax that ``quantize_fp8(y, "tensor",
    amax=...)`` and ``fp8_linear(y, w, x_amax=...)`` take to quantize y per tensor in one pass (COAT's
    producer-fused scaling, coat.md §3)."""
    if resolve(backend) == "torch":
        ref = layer_norm_ref(x, weight, bias, eps, shift=shift, scale=scale, residual=residual, gate=gate)
        return _with_amax(ref, return_amax)
    return _norm(x, weight, bias, eps, shift, scale, residual, gate, False, return_amax)
