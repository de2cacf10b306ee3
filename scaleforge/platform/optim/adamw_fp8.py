"""COAT's FP8 AdamW (``optim.name=adamw_fp8``): first and second moments stored as FP8 E4M3 codes per group
of 128 with dynamic range expansion (the kernel library's state codec, ``quantize_fp8_state``), fp32 master
weights, torch's AdamW arithmetic in fp32 between the decode and the encode.

Group layout: a parameter of two or more dimensions is viewed as ``(rows, cols)`` with ``rows = shape[0]``
and each row is cut into groups of 128 (the last one zero-padded; zeros are outside the codec's min/max).
FSDP2 shards dim 0, so a group never straddles a shard boundary at any world size, the per-group metadata
``(rows, groups)`` shards like the parameter, and DCP reshards codes and metadata exactly (2 -> 1 ranks
continues from the same states). One-dimensional parameters (norm weights, biases: a negligible share of
the bytes) keep fp32 moments, which makes their update torch's AdamW bit for bit.

State per quantized parameter and moment: ``<m>_q`` (rows, cols padded to 128) FP8, ``<m>_scale``,
``<m>_expand``, ``<m>_centre`` (rows, groups) fp32 -- 1 + 12/128 bytes per element and moment, so about
2.2 B/param against AdamW's 8 (:func:`state_bytes`, which the dry-run plan reads).

``fused=True`` (``optim.fused``): each quantized parameter's update is one kernel (the kernel library's
``adamw_fp8_step``: decode, AdamW, encode per group, COAT's fused optimizer kernel) on the GPU; off the GPU
that function's torch reference, the same arithmetic as the unfused path. Unfused: the state codec's
kernels and torch's AdamW ops in between, on row chunks.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from scaleforge.kernels import FP8State, adamw_fp8_step, dequantize_fp8_state, quantize_fp8_state
from scaleforge.kernels.reference.fp8 import adamw_update_
from scaleforge.platform.fp8_all_gather import plain_tensor
from scaleforge.platform.optim import register_optimizer

GROUP = 128
MOMENTS = ("exp_avg", "exp_avg_sq")
META = ("scale", "expand", "centre")


def _quantized(shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) >= 2


def _cols(shape) -> int:
    return math.prod(shape[1:])


def state_bytes(shape: torch.Size | tuple[int, ...]) -> int:
    """Bytes of optimizer state of one parameter of this (global) shape, step counter excluded."""
    n = math.prod(shape)
    if not _quantized(shape):
        return 8 * n
    groups = -(-_cols(shape) // GROUP)
    return 2 * shape[0] * groups * (GROUP * 1 + 4 * len(META))


def _local(t: torch.Tensor) -> torch.Tensor:
    return plain_tensor(getattr(t, "_local_tensor", t))


def _like_param(p: torch.Tensor, local: torch.Tensor, global_cols: int) -> torch.Tensor:
    """A state tensor sharded like the parameter along dim 0 (a DTensor when p is one), for DCP."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    shape = torch.Size((p.shape[0], global_cols))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=(global_cols, 1))


class AdamWFP8(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_dtype: torch.dtype = torch.float8_e4m3fn,
                 expand_min: int = 16, fused: bool = False, backend: str | None = None):
        if state_dtype != torch.float8_e4m3fn:
            # COAT's kernel read every code as E4M3 whatever dtype was chosen (coat.md §6): only E4M3 here
            raise ValueError(f"adamw_fp8: only float8_e4m3fn moments are supported, got {state_dtype}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"adamw_fp8: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.expand_min, self.fused, self.backend = state_dtype, expand_min, fused, backend

    # -- state ----------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st: dict[str, Any] = {"step": torch.tensor(0.0)}
        if not _quantized(p.shape):
            for m in MOMENTS:
                st[m] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return st
        rows = _local(p).shape[0]
        groups = -(-_cols(p.shape) // GROUP)
        dev = _local(p).device
        for m in MOMENTS:
            st[f"{m}_q"] = _like_param(p, torch.zeros(rows, groups * GROUP, dtype=self.state_dtype, device=dev),
                                       groups * GROUP)
            for k in META:
                fill = 1.0 if k in ("expand", "centre") else 0.0
                st[f"{m}_{k}"] = _like_param(p, torch.full((rows, groups), fill, device=dev), groups)
        return st

    def _decode(self, st: dict, m: str, rows: slice, cols: int) -> torch.Tensor:
        q = _local(st[f"{m}_q"])[rows]
        state = FP8State(q.reshape(-1), *(_local(st[f"{m}_{k}"])[rows].reshape(-1) for k in META), q.shape)
        return dequantize_fp8_state(state, backend=self.backend)[:, :cols]

    def _encode(self, st: dict, m: str, rows: slice, x: torch.Tensor) -> None:
        q = _local(st[f"{m}_q"])[rows]
        padded = torch.nn.functional.pad(x, (0, q.shape[1] - x.shape[1]))
        enc = quantize_fp8_state(padded, GROUP, self.state_dtype, self.expand_min, backend=self.backend)
        q.copy_(enc.q.view(q.shape))
        for k, v in zip(META, (enc.scale, enc.expand, enc.sqrt_minmax)):
            dst = _local(st[f"{m}_{k}"])[rows]
            dst.copy_(v.view(dst.shape))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every loaded floating state to the parameter's dtype (the FSDP checkpoint bug of COAT's
        # optimizer, coat.md §6); FP8 codes are exact in fp32, so casting them back loses nothing
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for m in MOMENTS:
                if f"{m}_q" in st and st[f"{m}_q"].dtype != self.state_dtype:
                    st[f"{m}_q"] = st[f"{m}_q"].to(self.state_dtype)

    # -- update ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("adamw_fp8 does not support sparse gradients")
        st = self.state[p]
        if not st:
            st.update(self._init_state(p))
        st["step"] += 1
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        step = st["step"].item()
        pl, g = _local(p), _local(p.grad)
        if pl.numel() == 0:
            return
        hp = dict(lr=lr, weight_decay=wd, eps=eps, step=step)
        if not _quantized(p.shape):
            adamw_update_(pl, g, _local(st["exp_avg"]), _local(st["exp_avg_sq"]), beta1=b1, beta2=b2, **hp)
            return
        rows, cols = pl.shape[0], pl.numel() // pl.shape[0]
        target, g = pl.view(rows, cols), g.reshape(rows, cols)
        if self.fused:  # one kernel: decode, update, encode (the kernel library's reference off the GPU)
            states = [tuple(_local(st[f"{m}_{k}"]) for k in ("q", *META)) for m in MOMENTS]
            adamw_fp8_step(target, g, *states, betas=(b1, b2), dtype=self.state_dtype, expand_min=self.expand_min,
                           backend=self.backend, **hp)
            return
        # a bounded number of rows at a time: the decoded fp32 moments and the update's temporaries then take
        # a few times CHUNK_ELEMENTS x 4 bytes whatever the parameter's size (an embedding's would take GBs)
        step_rows = max(1, CHUNK_ELEMENTS // cols)
        for r0 in range(0, rows, step_rows):
            r = slice(r0, min(rows, r0 + step_rows))
            m, v = (self._decode(st, k, r, cols) for k in MOMENTS)
            adamw_update_(target[r], g[r], m, v, beta1=b1, beta2=b2, **hp)
            self._encode(st, "exp_avg", r, m)
            self._encode(st, "exp_avg_sq", r, v)


CHUNK_ELEMENTS = 1 << 24


@register_optimizer("adamw_fp8", state_bytes=state_bytes)
def _adamw_fp8(groups, cfg):
    return AdamWFP8(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    fused=cfg.fused)
