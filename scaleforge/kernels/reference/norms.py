"""Reference RMSNorm / LayerNorm with adaLN modulation and a gated residual add (sana.md §2)."""

from __future__ import annotations

import torch


def _prologue(x, residual, gate):
    if residual is None:
        if gate is not None:
            raise ValueError("gate is only used with residual (h = residual + gate * x)")
        return x.float(), None
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    gate = as_broadcastable(gate, x)
    h = x.float() if gate is None else gate.float() * x.float()
    h = residual.float() + h
    return h, h.to(x.dtype)


def as_broadcastable(t, x):
    """A (B, C) modulation for (B, N, C) tokens means per sample (adaLN): insert the token axis."""
    if t is not None and t.ndim == 2 and x.ndim == 3 and t.shape[-1] == x.shape[-1] and t.numel() != t.shape[-1]:
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"2-D modulation {tuple(t.shape)} for x {tuple(x.shape)} must be (B, C) per sample")
        return t.unsqueeze(1)
    return t


def _epilogue(y, x, weight, bias, shift, scale):
    shift, scale = as_broadcastable(shift, x), as_broadcastable(scale, x)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if scale is not None:
        y = y * (1 + scale.float())
    if shift is not None:
        y = y + shift.float()
    return y.to(x.dtype)


def rms_norm_ref(x, weight=None, eps=1e-6, *, shift=None, scale=None, residual=None, gate=None):
    h, h_out = _prologue(x, residual, gate)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = _epilogue(y, x, weight, None, shift, scale)
    return y if h_out is None else (y, h_out)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-6, *, shift=None, scale=None, residual=None, gate=None):
    h, h_out = _prologue(x, residual, gate)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    y = _epilogue(y, x, weight, bias, shift, scale)
    return y if h_out is None else (y, h_out)
