"""Optimizers and LR schedules. Optimizers are looked up by ``optim.name`` in a registry, so that an
optimizer (e.g. CAME-8bit) can be added without touching the train loop."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from scaleforge.platform.fp8_all_gather import plain_tensor

OptimizerFactory = Callable[[list[dict[str, Any]], Any], torch.optim.Optimizer]
#: bytes of optimizer state one parameter of a given (global) shape needs
StateBytes = Callable[[tuple[int, ...]], int]
_REGISTRY: dict[str, OptimizerFactory] = {}
_STATE_BYTES: dict[str, StateBytes] = {}


def register_optimizer(name: str, state_bytes: StateBytes | None = None):
    """Register a factory under ``optim.name``; ``state_bytes(shape)`` tells the dry-run plan how many bytes
    of state one parameter needs (default: AdamW's two fp32 moments)."""
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        _REGISTRY[name] = fn
        _STATE_BYTES[name] = state_bytes or (lambda shape: 8 * math.prod(shape))
        return fn

    return deco


def optimizer_state_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of optimizer state that optimizer ``name`` keeps for one parameter of ``shape``."""
    _load_builtin()
    return _STATE_BYTES[name](tuple(shape))


def build_optimizer(param_groups: list[dict[str, Any]], optim_cfg: Any) -> torch.optim.Optimizer:
    """``param_groups``: torch-style groups (each with ``params``, ``lr``, ``weight_decay``)."""
    from scaleforge.platform.config import ConfigError

    _load_builtin()
    if optim_cfg.name not in _REGISTRY:
        import difflib

        hint = difflib.get_close_matches(optim_cfg.name, list(_REGISTRY), n=1)
        raise ConfigError(f"optim.name: unknown optimizer {optim_cfg.name!r} (known: {', '.join(sorted(_REGISTRY))})"
                          + (f"; did you mean {hint[0]}?" if hint else ""))
    return _REGISTRY[optim_cfg.name](param_groups, optim_cfg)


def known_optimizers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW, with its update applied to the local shards of DTensor parameters.

    Under FSDP2 the parameters, their gradients and the optimizer states are DTensors, and a foreach
    or fused AdamW call over DTensors goes through DTensor's dispatch (sharding propagation for every
    tensor of the list) on the host: about 1.4 ms per fused call and 6.6 ms per step for the 1B LM on
    an H200 host (benchmarks.md, profile), during which the GPU waits. The update is elementwise, so
    each rank applies it to its shards directly: the states stay DTensors (created by torch as usual,
    so checkpoints and resharding are unchanged); only the lists handed to the kernels hold their
    local tensors, which share the DTensors' storage. The arithmetic is torch's, bit for bit.

    ``grad_scale`` / ``found_inf`` attributes (as ``torch.amp.GradScaler`` sets them) reach the fused
    kernel: gradients are divided by ``grad_scale`` and the whole update (step count included) is
    skipped where ``found_inf`` is 1, both read on the device (see the train loop's device step)."""

    def _init_group(self, group, *lists):
        has_complex = super()._init_group(group, *lists)
        for lst in lists:
            if isinstance(lst, list):
                lst[:] = [plain_tensor(getattr(t, "_local_tensor", t)) for t in lst]
        return has_complex


@register_optimizer("adamw")
def _adamw(groups, cfg):
    from scaleforge.platform.config import ConfigError

    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"optim.betas: adamw takes two values in [0, 1), got {list(cfg.betas)}")
    return ShardLocalAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, fused=cfg.fused or None, foreach=None)


@register_optimizer("sgd", state_bytes=lambda shape: 4 * math.prod(shape))
def _sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _load_builtin() -> None:
    # Optimizers in their own modules register themselves on import (CAME-8bit lives in came.py).
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
