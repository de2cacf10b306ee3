"""The dry-run plan: world size, mesh, accumulation, parameter counts and a per-device memory estimate,
computed from a model built on the meta device (no memory, no process group).

Memory model for FSDP2 with mixed precision (per device; what ``torch.cuda.max_memory_allocated``
measures, so CUDA context and allocator fragmentation are not included):
- sharded fp32 parameters: 4 B x params / dp_shard
- sharded fp32 gradients: 4 B x trainable / dp_shard
- optimizer state: what the optimizer's registry entry counts for each trainable parameter's shape
  (``optimizer_state_bytes``; AdamW 8 B per parameter, adamw_fp8 ~2.2) / dp_shard
- unsharded compute-dtype parameters of the root unit (embeddings, head; not resharded after forward)
  plus two FSDP groups in flight (the current one and the prefetched one; a group is
  ``parallel.fsdp_group_size`` consecutive units), and the unsharded gradients of one group before its
  reduce-scatter
- activations of one micro-batch, from the recipe (``Recipe.activation_bytes``)

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
from scaleforge.platform.engine import fsdp_groups
from scaleforge.platform.optim import optimizer_state_bytes
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


def _optimizer_bytes(model: nn.Module, frozen_prefixes: tuple[str, ...], name: str, per_device) -> float:
    """The optimizer's own count of its state bytes for every trainable parameter (e.g. adamw_fp8's codes
    and per-group metadata, which depend on each parameter's shape), times the share a device holds along
    the tensor-parallel dimension (``per_device(p) / numel``)."""
    return sum(optimizer_state_bytes(name, p.shape) * per_device(p) / p.numel() for fqn, p in model.named_parameters()
               if p.requires_grad and not any(fqn == f or fqn.startswith(f + ".") for f in frozen_prefixes))


def _count(module: nn.Module, frozen_prefixes: tuple[str, ...], prefix: str = "") -> tuple[int, int]:
    total = trainable = 0
    for name, p in module.named_parameters(prefix=prefix):
        total += p.numel()
        if p.requires_grad and not any(name == f or name.startswith(f + ".") for f in frozen_prefixes):
            trainable += p.numel()
    return total, trainable


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
    total, trainable = _count(model, plan.frozen)
    components = {name: _count(child, plan.frozen, prefix=name) for name, child in model.named_children()}
    # Per-device parameter counts: tensor parallelism holds 1/tp of the parameters it splits.
    per_device = _tp_per_device(model, recipe, layout.tp)
    unit_sizes = [sum(per_device(p) for u in group for p in u.parameters())
                  for group in fsdp_groups(plan.fsdp_units, cfg.parallel.fsdp_group_size)]
    in_units = sum(unit_sizes)
    local_total = sum(per_device(p) for p in model.parameters())
    local_trainable = local_total * (trainable / total) if total else 0
    root = local_total - in_units
    largest = max(unit_sizes) if unit_sizes else 0
    compute_bytes = 2 if cfg.parallel.mixed_precision in ("bf16", "fp16") else 4
    shard = layout.dp_shard
    gib = 2**30
    mem = {
        "params (fp32)": 4 * local_total / shard / gib,
        "grads (fp32)": 4 * local_trainable / shard / gib,
        f"optimizer ({cfg.optim.name})": _optimizer_bytes(model, plan.frozen, cfg.optim.name, per_device) / shard / gib,
        "unsharded units": (compute_bytes * (root + 2 * largest) + compute_bytes * largest) / gib,
    }
    if cfg.parallel.engine == "deepspeed":
        mem = _deepspeed_memory(cfg, layout, total, trainable, largest)
    act = recipe.activation_bytes(layout.micro_batch_size, cfg.parallel.activation_checkpointing == "full",
                                  compiled=cfg.parallel.compile)
    if act is not None:
        # Sequence parallelism splits over tp what the tp layers do not (norms, residual stream): the
        # activations per device are about 1/tp of tp = 1's (Korthikanti et al., 2022).
        mem["activations"] = act / layout.tp / gib
    mem["total"] = sum(mem.values())
    if act is not None and layout.grad_accum == 1 and "grads (fp32)" in mem:
        # Without accumulation, full activations and full gradients never coexist: the peak is at the
        # start of backward (every activation saved, almost no gradient yet); each block's backward
        # then frees its activations as it produces its gradients. The larger of the two counts.
        mem["total"] -= min(mem["activations"], mem["grads (fp32)"])
    extra = {k: v for k, v in recipe.describe(model).items()}
    if cfg.parallel.engine == "deepspeed":
        ds = cfg.parallel.deepspeed
        extra["engine"] = (f"DeepSpeed ZeRO-{ds.zero_stage}" + (", optimizer offload" if ds.offload_optimizer else "")
                           + (", parameter offload" if ds.offload_param else "")
                           + "; model states by DeepSpeed's estimate_zero*_model_states_mem_needs")
    if act is None:
        extra["note"] = "the recipe gives no activation-memory model; activations are not in the estimate"
    return Plan(layout, total, trainable, components, mem, extra)


def _deepspeed_memory(cfg: JobConfig, layout: Layout, total: int, trainable: int, largest_unit: int) -> dict[str, float]:
    """Model-state memory per GPU by DeepSpeed's own rules (its ``estimate_zero2/3_model_states_mem_needs``;
    ZeRO-1 by the same byte counts with the gradients not partitioned), trainable parameters as DeepSpeed
    counts them, plus the frozen parameters' 16-bit copies (partitioned under ZeRO-3)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds, n, gib = cfg.parallel.deepspeed, layout.world_size, 2**30
    frozen = total - trainable
    if ds.zero_stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(trainable, largest_unit, num_gpus_per_node=n,
                                                          cpu_offload=ds.offload_optimizer,
                                                          cpu_offload_params=ds.offload_param, zero_init=False)
        frozen_bytes = 2 * frozen / n
    elif ds.zero_stage == 2:
        _, states = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=n,
                                                          cpu_offload=ds.offload_optimizer)
        frozen_bytes = 2 * frozen
    else:  # 16-bit parameters and gradients in full, fp32 master weights, gradients and Adam states partitioned
        states = 2 * trainable + (2 * trainable if ds.offload_optimizer else 2 * trainable + 16 * trainable / n)
        frozen_bytes = 2 * frozen
    return {f"model states (ZeRO-{ds.zero_stage})": states / gib, "frozen params (16-bit)": frozen_bytes / gib}
