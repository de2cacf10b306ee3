"""Training engines: how a recipe's model is parallelized, optimized and checkpointed.

``Engine`` is the seam between the recipe-agnostic train loop and the sharding technology.
``FSDP2Engine`` implements it with ``fully_shard`` over a ``DeviceMesh`` (HSDP when
``parallel.dp_replicate > 1``); a DeepSpeed ZeRO engine implements the same methods (backward,
clip, step, state dicts, full state dict for export).

Order of the parallelize step (torchtitan's): build on meta -> freeze -> FP8 conversion (``parallel.fp8``) ->
activation checkpointing ->
per-block compile -> fully_shard per unit, then the root -> ``to_empty`` -> seeded ``init_weights`` (or
load pretrained weights) -> optimizer over the trainable parameters.
"""
from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from typing import Any, Iterator

import warnings

import torch
from torch import nn

from scaleforge.platform.config import ConfigError, JobConfig, Layout
from scaleforge.platform.dist import DistInfo
from scaleforge.platform.optim import build_optimizer
from scaleforge.platform.recipe import ParallelPlan, ParamGroupRule, Recipe
from scaleforge.platform.schedule import build_lr_scheduler

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class Engine(ABC):
    """What the train loop needs from a sharding engine."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient by ``factor`` (global item-count normalization times the clip
        coefficient, applied as one pass)."""

    @abstractmethod
    def grad_sq_norm_local(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm, an fp64 scalar on the device, such
        that the sum over all ranks is the squared norm of the full gradient. No host synchronization:
        the train loop all-reduces it together with the loss statistics."""

    @abstractmethod
    def optimizer_step(self, grad_scale: torch.Tensor | None = None,
                       found_inf: torch.Tensor | None = None) -> None:
        """One optimizer step. With ``grad_scale`` / ``found_inf`` (fp32 scalars on the device; only
        where ``supports_device_step``) the gradients are divided by ``grad_scale`` inside the update
        and the whole step is skipped where ``found_inf`` is 1, without the host reading either."""

    @property
    def supports_device_step(self) -> bool:
        """Whether ``optimizer_step`` takes device-side ``grad_scale`` / ``found_inf``."""
        return False

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """Sharded model + optimizer state for torch.distributed.checkpoint."""

    @abstractmethod
    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model state dict on CPU (rank 0 gets it; others may get an empty dict)."""

    def no_sync(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """The factor that clips gradients of norm ``grad_norm`` to ``max_norm`` (torch's
    ``clip_grad_norm_`` rule, eps 1e-6); 1 when ``max_norm <= 0`` (clipping off)."""
    return min(1.0, max_norm / (grad_norm + 1e-6)) if max_norm > 0 else 1.0


# ---------------------------------------------------------------------------------------------------
def build_mesh(layout: Layout, device: torch.device):
    """The device mesh ``([dp_replicate,] dp_shard[, tp])``; tp innermost, so a tensor-parallel group
    is consecutive ranks (one host)."""
    from torch.distributed.device_mesh import init_device_mesh

    dims = [("dp_replicate", layout.dp_replicate)] if layout.dp_replicate > 1 else []
    dims.append(("dp_shard", layout.dp_shard))
    if layout.tp > 1:
        dims.append(("tp", layout.tp))
    return init_device_mesh(device.type, tuple(n for _, n in dims), mesh_dim_names=tuple(d for d, _ in dims))


def data_parallel_mesh(mesh):
    """The mesh's data-parallel dimensions (what FSDP2 shards over)."""
    names = tuple(n for n in mesh.mesh_dim_names if n != "tp")
    return mesh[names] if len(names) < len(mesh.mesh_dim_names) else mesh


def fsdp_groups(units: list[nn.Module], group_size: int) -> list[list[nn.Module]]:
    """The recipe's FSDP units in runs of ``group_size`` consecutive units, each run sharded as one
    ``fully_shard`` group (``parallel.fsdp_group_size``): one all-gather and one reduce-scatter per run
    instead of per unit, so fewer, larger collectives and a fraction of FSDP's per-unit host work (hooks,
    copy-in / copy-out, chunk-cat), for ``group_size`` units' unsharded parameters in flight."""
    return [units[i:i + group_size] for i in range(0, len(units), group_size)]


def apply_freeze(model: nn.Module, plan: ParallelPlan) -> None:
    names = dict(model.named_modules())
    for prefix in plan.frozen:
        if prefix not in names:
            raise ConfigError(f"frozen module {prefix!r} does not exist in the model "
                              f"(top-level modules: {', '.join(n for n, _ in model.named_children())})")
        names[prefix].requires_grad_(False)


def apply_coat(model: nn.Module, plan: ParallelPlan) -> dict[str, int]:
    """COAT FP8 mode from outside the model (as torchao's ``convert_to_float8_training``): eligible linears
    become FP8 linears, FP8-aware blocks save FP8 activations; ``plan.fp8_keep`` stays high precision."""
    from scaleforge.fp8 import convert_to_coat

    try:
        return convert_to_coat(model, plan.fp8_keep)
    except ValueError as e:
        raise ConfigError(f"parallel.fp8=coat: {e}") from None


def apply_activation_checkpointing(modules: list[nn.Module]) -> None:
    """Recompute each block's activations in backward. Patching the instance's ``forward`` (rather
    than wrapping the module) keeps parameter names, so checkpoints and exports are unaffected."""
    from torch.utils.checkpoint import checkpoint

    for m in modules:
        inner = m.forward

        @functools.wraps(inner)
        def forward(*args, __inner=inner, **kwargs):
            return checkpoint(__inner, *args, use_reentrant=False, **kwargs)

        m.forward = forward


def apply_compile(modules: list[nn.Module]) -> None:
    for m in modules:
        m.compile(fullgraph=False)


def default_no_decay(fqn: str, p: nn.Parameter) -> bool:
    """Biases, norm weights, and other 1-D parameters are not decayed (the usual GPT/Llama rule)."""
    return p.ndim < 2 or fqn.endswith(".bias")


def build_param_groups(model: nn.Module, rules: list[ParamGroupRule], base_lr: float,
                       base_wd: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, float], dict[str, Any]] = {}
    for fqn, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = next((r for r in rules if r.matches(fqn, p)), None)
        lr_mult = rule.lr_mult if rule else 1.0
        if rule is not None and rule.weight_decay is not None:
            wd = rule.weight_decay
        else:
            wd = 0.0 if default_no_decay(fqn, p) else base_wd
        name = rule.name if rule else "default"
        key = (name, lr_mult, wd)
        g = groups.setdefault(key, {"params": [], "param_names": [], "lr": base_lr * lr_mult,
                                    "weight_decay": wd, "lr_mult": lr_mult, "group_name": name})
        g["params"].append(p)
        g["param_names"].append(fqn)
    if not groups:
        raise ConfigError("the model has no trainable parameters (every module is frozen)")
    return list(groups.values())


class FSDP2Engine(Engine):
    def __init__(self, cfg: JobConfig, layout: Layout, info: DistInfo, recipe: Recipe):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.cfg, self.layout, self.info, self.recipe = cfg, layout, info, recipe
        self.full_mesh = build_mesh(layout, info.device)
        self.mesh = data_parallel_mesh(self.full_mesh)
        pcfg = cfg.parallel

        with torch.device("meta"):
            model = recipe.build_model(torch.device("meta"))
        self.tp = None
        if layout.tp > 1:
            from scaleforge.platform import tensor_parallel

            tensor_parallel.check_device(layout.tp, info.device)
            self.tp = tensor_parallel.apply_tensor_parallel(model, recipe.tensor_parallel_plan(model),
                                                            self.full_mesh["tp"].get_group(), torch.device("meta"))
            self.tp.mesh = self.full_mesh
        plan = recipe.parallel_plan(model)
        self.plan = plan
        apply_freeze(model, plan)
        if pcfg.fp8 == "coat":
            self.fp8_summary = apply_coat(model, plan)
            if info.rank == 0:
                print("parallel.fp8=coat: " + ", ".join(f"{v} {k}" for k, v in self.fp8_summary.items()), flush=True)
        ckpt_units = plan.checkpoint_units if plan.checkpoint_units is not None else plan.fsdp_units
        if pcfg.activation_checkpointing == "full":
            apply_activation_checkpointing(ckpt_units)
        if pcfg.compile:
            apply_compile(ckpt_units)

        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[pcfg.mixed_precision],
                                  reduce_dtype=_DTYPES[pcfg.reduce_dtype])
        kwargs = dict(mesh=self.mesh, mp_policy=mp)
        groups = fsdp_groups(plan.fsdp_units, pcfg.fsdp_group_size)
        for i, group in enumerate(groups):
            # The last group's backward starts as soon as its forward ends: resharding it would only gather
            # it again, exposed, before the first backward kernel (torchtitan keeps its last block likewise).
            reshard = pcfg.reshard_after_forward and i < len(groups) - 1
            fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard, **kwargs)
        # The root: parameters outside the units (embeddings, final norm...); no reshard after forward
        # because backward needs them first.
        fully_shard(model, reshard_after_forward=False, **kwargs)

        model.to_empty(device=info.device)
        source = recipe.pretrained_source()
        if self.tp is not None:
            self.tp.dp_placements = next(p for p in model.parameters()).placements
            # Megatron's parameters are the rank's tp slice: initialize (or load) the full model once per
            # rank and keep the slices, so any tp size starts from the weights of tp = 1.
            _copy_full_init(model, recipe, cfg.run.seed, self.tp, source)
            source = None
        else:
            # Same seed on every rank: parameters that are replicated (none under FSDP, but buffers) agree.
            with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
                torch.manual_seed(cfg.run.seed)
                recipe.init_weights(model)
        if info.device.type == "cpu" and self.tp is None:
            # DTensor's offset-based RNG (which makes a sharded init equal the unsharded one) exists for
            # CUDA only; on CPU every rank would draw the same numbers for its shard. Initialize the
            # full model instead and keep each rank's slice: the same weights at any world size.
            _copy_full_init(model, recipe, cfg.run.seed)
        if source:
            recipe.load_pretrained(model, source)
        for name in plan.eval_modules:
            dict(model.named_modules())[name].eval()
        self.model = model

        groups = build_param_groups(model, plan.param_groups, cfg.optim.lr, cfg.optim.weight_decay)
        self.param_groups_summary = [(g["group_name"], len(g["params"]), g["lr_mult"], g["weight_decay"])
                                     for g in groups]
        for g in groups:
            g.pop("param_names")
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)

    # -- step pieces ------------------------------------------------------------------------------
    def trainable_params(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def backward(self, loss: torch.Tensor) -> None:
        if self.tp is None:
            loss.backward()
            return
        # Sequence parallelism: parameters every tp rank holds (norm weights) got gradients from this
        # rank's tokens only; sum this backward's contribution over the tp group.
        before = self.tp.replicated_grads(self.model)
        loss.backward()
        self.tp.sum_replicated_grads(before)

    def _local_grads(self) -> list[torch.Tensor]:
        # The local shards as plain tensors: foreach kernels on DTensors pay DTensor dispatch on the host,
        # and ``to_local()`` is an autograd function; ``_local_tensor`` is the shard itself (no copy).
        return [getattr(g, "_local_tensor", g) for g in (p.grad for p in self.trainable_params())
                if g is not None]

    def scale_grads(self, factor: float) -> None:
        grads = self._local_grads()
        if grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)

    def grad_sq_norm_local(self) -> torch.Tensor:
        grads = self._local_grads()
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.info.device)
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).double().square()
        if self.tp is not None:
            # parameters not split over tp are held (identically) by every rank of the tp group
            held_by = [1.0 if self.tp.is_split(n) else float(self.tp.size)
                       for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
            norms = norms / torch.tensor(held_by, dtype=norms.dtype, device=norms.device)
        sq = norms.sum()
        # Under HSDP each shard is held (identically) by dp_replicate ranks.
        return sq / self.layout.dp_replicate

    @property
    def supports_device_step(self) -> bool:
        # torch's fused Adam/AdamW kernels read grad_scale and found_inf on the device
        return all(g.get("fused") for g in self.optimizer.param_groups) and isinstance(
            self.optimizer, torch.optim.Adam)

    def optimizer_step(self, grad_scale: torch.Tensor | None = None,
                       found_inf: torch.Tensor | None = None) -> None:
        if grad_scale is None and found_inf is None:
            self.optimizer.step()
            return
        if not self.supports_device_step:
            raise RuntimeError("optimizer_step(grad_scale=, found_inf=) needs a fused Adam/AdamW optimizer")
        # torch's Adam reads these attributes (the GradScaler protocol) and passes them to the kernel
        self.optimizer.grad_scale, self.optimizer.found_inf = grad_scale, found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ----------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        # tp-split entries as global DTensors over the full mesh: DCP reshards them between tp sizes
        return state if self.tp is None else self.tp.checkpoint_view(state, self.tp.to_global)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if self.tp is not None:
            state = self.tp.checkpoint_view(state, lambda fqn, t: self.tp.to_local(fqn, t, self.mesh))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.tp is not None:
            return self.tp.full_state_dict(self.model, self.info.rank == 0)
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))


# FSDP2Engine handles CPU initialization itself (_copy_full_init), so DTensor's CPU RNG warning is moot.
warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")


def _copy_full_init(model: nn.Module, recipe: Recipe, seed: int, tp=None, pretrained: str | None = None) -> None:
    """Initialize a full CPU copy of the model with ``seed`` (and load ``pretrained`` into it), then
    copy each rank's slice (its tp slice, when ``tp`` is given, then its data-parallel shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = recipe.build_model(torch.device("cpu"))
        recipe.init_weights(full)
    if pretrained:
        recipe.load_pretrained(full, pretrained)
    source = full.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            src = source[name].to(device=t.device, dtype=t.dtype)
            if tp is not None:
                src = tp.local_slice(name, src).contiguous()
            if isinstance(t, DTensor):
                # every rank holds the same full tensor: slice locally, no communication
                t.to_local().copy_(distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None).to_local())
            else:
                t.copy_(src)


def build_engine(cfg: JobConfig, layout: Layout, info: DistInfo, recipe: Recipe) -> Engine:
    if cfg.parallel.engine == "fsdp2":
        return FSDP2Engine(cfg, layout, info, recipe)
    raise ConfigError(f"parallel.engine: {cfg.parallel.engine!r} is not available yet (fsdp2 is)")
