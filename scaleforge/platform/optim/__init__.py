"""Optimizers and LR schedules. Optimizers are looked up by ``optim.name`` in a registry, so that an
optimizer (e.g. CAME-8bit) can be added without touching the train loop."""
from __future__ import annotations

from typing import Any, Callable

import torch

OptimizerFactory = Callable[[list[dict[str, Any]], Any], torch.optim.Optimizer]
_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str):
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def build_optimizer(param_groups: list[dict[str, Any]], optim_cfg: Any) -> torch.optim.Optimizer:
    """``param_groups``: torch-style groups (each with ``params``, ``lr``, ``weight_decay``)."""
    from scaleforge.platform.config import ConfigError

    _load_builtin()
    if optim_cfg.name not in _REGISTRY:
        raise ConfigError(f"optim.name: unknown optimizer {optim_cfg.name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[optim_cfg.name](param_groups, optim_cfg)


def known_optimizers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


@register_optimizer("adamw")
def _adamw(groups, cfg):
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=cfg.fused or None, foreach=None)


@register_optimizer("sgd")
def _sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _load_builtin() -> None:
    # Optimizers in their own modules register themselves on import (CAME-8bit lives in came.py).
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
