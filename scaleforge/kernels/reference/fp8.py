"""FP8 quantizers (COAT ``coat/activation/real_quantization/_quantize.py``) and the COAT optimizer-state
codec with dynamic range expansion (``fp8_adamw_expand_cuda_kernel.cu``; coat.md §2), in plain PyTorch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
AMAX_EPS = 1e-10  # COAT adds 1e-10 to amax so all-zero tensors get a finite scale
RANGE_EPS = 1e-30  # COAT adds 1e-30 to the nonzero max/min of an optimizer-state group


def fp8_max(dtype: torch.dtype) -> float:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype={dtype} is not an FP8 dtype; choose torch.float8_e4m3fn or torch.float8_e5m2")
    return float(torch.finfo(dtype).max)  # 448 (E4M3) / 57344 (E5M2)


def check_granularity(granularity: str, group_size: int) -> None:
    if granularity not in ("tensor", "group"):
        raise ValueError(f"granularity={granularity!r}; choose 'tensor' or 'group'")
    if granularity == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a positive int")


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """(..., K) -> (..., G, group_size) zero-padded; returns the padded view and K."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], groups, group_size), k


def quantize_fp8_ref(
    x: torch.Tensor,
    granularity: str = "tensor",
    group_size: int = 128,
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """amax (per tensor): max|x| computed elsewhere (by the kernel that produced x), used for the scale."""
    check_granularity(granularity, group_size)
    qmax = fp8_max(dtype)
    xf = x.float()
    if granularity == "tensor":
        if scale is None:
            amax = xf.abs().amax() if amax is None else amax.float().reshape(())
            scale = (amax + AMAX_EPS) / qmax
        scale = scale.float().reshape(())
        q = (xf / scale).clamp(-qmax, qmax).to(dtype)
        return q, scale
    xg, k = _grouped(xf, group_size)
    if scale is None:
        scale = (xg.abs().amax(dim=-1) + AMAX_EPS) / qmax
    q = (xg / scale.float().unsqueeze(-1)).clamp(-qmax, qmax).to(dtype)
    q = q.reshape(*x.shape[:-1], -1)[..., :k]
    return q, scale.float()


def dequantize_fp8_ref(
    q: torch.Tensor,
    scale: torch.Tensor,
    granularity: str | None = None,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    if granularity is None:
        granularity = "tensor" if scale.numel() == 1 and scale.ndim <= 1 else "group"
    check_granularity(granularity, group_size)
    if granularity == "tensor":
        return (q.float() * scale.float()).to(out_dtype)
    qg, k = _grouped(q.float(), group_size)
    if scale.shape != qg.shape[:-1]:
        raise ValueError(f"group scale has shape {tuple(scale.shape)}, expected {tuple(qg.shape[:-1])}")
    return (qg * scale.float().unsqueeze(-1)).reshape(*q.shape[:-1], -1)[..., :k].to(out_dtype)


class FP8State(NamedTuple):
    """One optimizer-state tensor in COAT's expanded FP8 form (flat, padded to whole groups)."""

    q: torch.Tensor  # (G * group_size,) fp8 codes
    scale: torch.Tensor  # (G,) fp32
    expand: torch.Tensor  # (G,) fp32, the exponent k
    sqrt_minmax: torch.Tensor  # (G,) fp32, the centre c = sqrt(max * min)
    shape: torch.Size  # original shape (numel <= q.numel())


def expansion_exponent(amax: torch.Tensor, amin: torch.Tensor, qmax: float, expand_min: int) -> torch.Tensor:
    """k = floor(log2(qmax^2/2) / log2(max/min) * E) / E, clamped to k >= 1; k = 1 when max == min."""
    log_range = torch.log2(amax / amin)
    target = math.log2(qmax * qmax / 2)
    safe = torch.where(log_range > 0, log_range, torch.ones_like(log_range))
    k = torch.floor(target / safe * expand_min) / expand_min
    return torch.where(log_range > 0, k.clamp_min(1.0), torch.ones_like(k))


def quantize_fp8_state_ref(
    x: torch.Tensor, group_size: int = 128, dtype: torch.dtype = torch.float8_e4m3fn, expand_min: int = 16
) -> FP8State:
    qmax = fp8_max(dtype)
    xf = x.detach().float().reshape(-1)
    xg = xf.reshape(1, -1)
    xg, _ = _grouped(xg, group_size)
    xg = xg[0]  # (G, group_size)
    a = xg.abs()
    nonzero = a > 0
    amax = a.amax(dim=-1) + RANGE_EPS
    amin = torch.where(nonzero, a, torch.full_like(a, float("inf"))).amin(dim=-1)
    amin = torch.where(torch.isinf(amin), torch.zeros_like(amin), amin) + RANGE_EPS
    k = expansion_exponent(amax, amin, qmax, expand_min)
    c = torch.sqrt(amax) * torch.sqrt(amin)  # sqrt(max*min) would underflow fp32 for all-zero groups
    y = torch.sign(xg) * torch.pow(a / c[:, None], k[:, None])
    scale = torch.pow(amax / c, k) / qmax
    q = (y / scale[:, None]).clamp(-qmax, qmax).to(dtype)
    return FP8State(q.reshape(-1), scale, k, c, x.shape)


def dequantize_fp8_state_ref(state: FP8State, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = state.scale.numel()
    qg = state.q.float().reshape(g, -1)
    y = qg * state.scale[:, None]
    x = torch.sign(y) * torch.pow(y.abs(), 1.0 / state.expand[:, None]) * state.sqrt_minmax[:, None]
    n = math.prod(state.shape)
    return x.reshape(-1)[:n].reshape(state.shape).to(out_dtype)


def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """torch's AdamW (single-tensor path) in fp32, in place on p, m and v."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _state_rows(st: tuple[torch.Tensor, ...], rows: slice) -> FP8State:
    q = st[0][rows]
    return FP8State(q.reshape(-1), *(t[rows].reshape(-1) for t in st[1:]), q.shape)


def _store_state_rows(st: tuple[torch.Tensor, ...], rows: slice, enc: FP8State) -> None:
    for dst, src in zip(st, enc[:4]):
        dst[rows].copy_(src.view(dst[rows].shape))


ADAMW_CHUNK = 1 << 24  # elements per row chunk of the reference step: bounded fp32 temporaries


def adamw_fp8_step_ref(p: torch.Tensor, g: torch.Tensor, exp_avg: tuple, exp_avg_sq: tuple, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                       dtype: torch.dtype = torch.float8_e4m3fn, expand_min: int = 16) -> None:
    """One AdamW step of p (rows, cols) fp32 whose moments are (codes (rows, G * 128), scale, expand, centre
    (rows, G)) states: decode, :func:`adamw_update_`, encode, in row chunks of at most ADAMW_CHUNK elements."""
    rows, cols = p.shape
    gs = exp_avg[0].shape[1] // exp_avg[1].shape[1]
    step_rows = max(1, ADAMW_CHUNK // cols)
    for r0 in range(0, rows, step_rows):
        r = slice(r0, min(rows, r0 + step_rows))
        m, v = (dequantize_fp8_state_ref(_state_rows(st, r))[:, :cols] for st in (exp_avg, exp_avg_sq))
        adamw_update_(p[r], g[r], m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      step=step)
        for st, x in ((exp_avg, m), (exp_avg_sq, v)):
            padded = torch.nn.functional.pad(x, (0, st[0].shape[1] - cols))
            _store_state_rows(st, r, quantize_fp8_state_ref(padded, gs, dtype, expand_min))
