"""The dry-run plan: world size, mesh, accumulation, parameter counts and a per-device memory estimate,
computed from a model built on the meta device (no memory, no process group).

The model-state memory (parameters, gradients, optimizer state, what is gathered in flight) is the
engine's own rule (``Engine.model_state_memory``: FSDP2's in engine.py, DeepSpeed ZeRO's by DeepSpeed's
estimators in deepspeed_engine.py); this module adds the activations of one micro-batch, from the recipe
(``Recipe.activation_bytes``).

The total adds all of these, except that without gradient accumulation only the larger of gradients and
activations counts (backward frees a block's activations as it creates the block's gradients; with
accumulation, the gradients of earlier micro-batches stay while the next one's activations are saved).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaleforge.platform.config import JobConfig, Layout
from scaleforge.platform.engine import count_params, engine_class
from scaleforge.platform.recipe import Recipe


@dataclass
class Plan:
    layout: Layout
    params_total: int
    params_trainable: int
    components: dict[str, tuple[int, int]]  # top-level module -> (params, trainable)
    memory: dict[str, float] = field(default_factory=dict)  # GiB per device
    extra: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        L = self.layout
        out = [
            f"world size        {L.world_size}",
            f"mesh              dp_replicate={L.dp_replicate} x dp_shard={L.dp_shard}"
            + (f" x tp={L.tp} (tensor parallel, innermost)" if L.tp > 1 else ""),
            f"batch             global {L.global_batch_size} = micro {L.micro_batch_size} x accumulation "
            f"{L.grad_accum} x data-parallel {L.dp_size}",
            f"parameters        {_fmt(self.params_total)} total, {_fmt(self.params_trainable)} trainable",
        ]
        for name, (n, t) in self.components.items():
            out.append(f"  {name:<16} {_fmt(n)} ({'trainable' if t == n else 'frozen' if t == 0 else f'{_fmt(t)} trainable'})")
        if self.memory:
            out.append(f"memory / device   {self.memory['total']:.1f} GiB estimated")
            for k, v in self.memory.items():
                if k != "total":
                    out.append(f"  {k:<16} {v:.2f} GiB")
            if "activations" in self.memory and L.grad_accum == 1:
                out.append("  (no accumulation: the total counts the larger of gradients and activations)")
        for k, v in self.extra.items():
            out.append(f"{k:<18} {v}")
        return out


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _tp_per_device(model: nn.Module, recipe: Recipe, tp: int):
    """numel of a parameter held per device along the tp dimension (1/tp for split ones)."""
    if tp == 1:
        return lambda p: p.numel()
    from scaleforge.platform.tensor_parallel import split_parameters

    split = split_parameters(model, recipe.tensor_parallel_plan(model))
    split_ids = {id(p) for n, p in model.named_parameters() if n in split}
    return lambda p: p.numel() / tp if id(p) in split_ids else p.numel()


def make_plan(cfg: JobConfig, layout: Layout, recipe: Recipe) -> Plan:
    with torch.device("meta"):
        model = recipe.build_model(torch.device("meta"))
    plan = recipe.parallel_plan(model)
    total, trainable = count_params(model, plan.frozen)
    components = {name: count_params(child, plan.frozen, prefix=name) for name, child in model.named_children()}
    engine = engine_class(cfg.parallel.engine)
    # Per-device parameter counts: tensor parallelism holds 1/tp of the parameters it splits.
    mem = engine.model_state_memory(cfg, layout, model, plan, _tp_per_device(model, recipe, layout.tp))
    fp8 = cfg.parallel.fp8
    fp8_kw = {"fp8": fp8} if fp8 != "none" and fp8 in recipe.activation_fp8_modes else {}
    tp_kw = {"tp": layout.tp} if layout.tp > 1 else {}
    act = recipe.activation_bytes(layout.micro_batch_size, cfg.parallel.activation_checkpointing == "full",
                                  compiled=cfg.parallel.compile, **fp8_kw, **tp_kw)
    if act is not None:
        mem["activations"] = act / 2**30
    mem["total"] = sum(mem.values())
    if act is not None and layout.grad_accum == 1 and "grads (fp32)" in mem:
        # Without accumulation, full activations and full gradients never coexist: the peak is at the
        # start of backward (every activation saved, almost no gradient yet); each block's backward
        # then frees its activations as it produces its gradients. The larger of the two counts.
        mem["total"] -= min(mem["activations"], mem["grads (fp32)"])
    extra = {k: v for k, v in recipe.describe(model).items()}
    note = engine.plan_note(cfg)
    if note:
        extra["engine"] = note
    if act is None:
        extra["note"] = "the recipe gives no activation-memory model; activations are not in the estimate"
    elif fp8 != "none" and not fp8_kw:
        extra["note"] = f"activations: the recipe's BF16 estimate (it has no parallel.fp8={fp8} model)"
    return Plan(layout, total, trainable, components, mem, extra)
