"""Training engines: how a recipe's model is parallelized, optimized and checkpointed.

``Engine`` is the seam between the recipe-agnostic train loop and the sharding technology.
``FSDP2Engine`` implements it with ``fully_shard`` over a ``DeviceMesh`` (HSDP when
``parallel.dp_replicate > 1``); a DeepSpeed ZeRO engine implements the same methods (backward,
clip, step, state dicts, full state dict for export).

Order of the parallelize step (torchtitan's): build on meta -> freeze -> FP8 conversion (``parallel.fp8``; with
``parallel.fp8_all_gather`` its linears' weights are wrapped to be gathered as FP8 codes) ->
activation checkpointing ->
per-block compile -> fully_shard per unit, then the root -> ``to_empty`` -> seeded ``init_weights`` (or
load pretrained weights) -> optimizer over the trainable parameters.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import warnings

import torch
from torch import nn

from scaleforge.platform.config import ConfigError, JobConfig, Layout
from scaleforge.platform.dist import DistInfo
from scaleforge.platform.ema import ShardedEMA
from scaleforge.platform.fp8_all_gather import wrap_fp8_linear_weights
from scaleforge.platform.optim import build_optimizer, optimizer_state_bytes
from scaleforge.platform.recipe import ParallelPlan, ParamGroupRule, Recipe
from scaleforge.platform.schedule import build_lr_scheduler

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class Engine(ABC):
    """What the train loop needs from a sharding engine; the only place that knows the engine.

    One optimizer step: ``backward(loss, last_micro_batch)`` per micro-batch (an engine may defer its
    gradient reduction to the last one, ``no_sync``-style), ``grad_sq_norm_local`` (all-reduced by the
    loop with its statistics), then ``step(factor)`` (or ``device_step`` where
    ``supports_device_step``), ``zero_grad`` and ``scheduler.step()``. The EMA, the sharded checkpoint
    state and pretrained-weight loading live behind the same seam."""

    model: nn.Module
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups the LR scheduler drives
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: ParallelPlan
    #: names the on-disk layout of ``save_state`` (recorded in trainer.json; ``read_model_weights`` reads it)
    checkpoint_format: str = "dcp"

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool = True) -> None: ...

    @abstractmethod
    def grad_sq_norm_local(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm, an fp64 scalar on the device, such
        that the sum over all ranks is the squared norm of the full gradient. No host synchronization:
        the train loop all-reduces it together with the loss statistics."""

    @abstractmethod
    def step(self, factor: float) -> None:
        """Multiply every gradient by ``factor`` (global item-count normalization times the clip
        coefficient, one pass), take the optimizer step and update the EMA."""

    @property
    def supports_device_step(self) -> bool:
        """Whether ``device_step`` exists: the update reads its gradient scale and skip flag on the device."""
        return False

    def device_step(self, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """One optimizer step with gradients divided by ``grad_scale`` inside the update, skipped where
        ``found_inf`` is 1 (fp32 scalars on the device), without the host reading either."""
        raise NotImplementedError(f"{type(self).__name__} has no device-side optimizer step")

    @abstractmethod
    def zero_grad(self) -> None: ...

    def base_lr(self) -> float:
        """The schedule's current LR (the first group's, without its LR multiplier)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / (group.get("lr_mult") or 1.0)

    @abstractmethod
    def save_state(self, path: Path, async_group=None):
        """Write the sharded model, optimizer (and EMA) state into the folder ``path`` (every rank
        calls it). With ``async_group`` (a gloo group for the background collectives) the write may
        continue after the call returns: it returns a future then, else None."""

    @abstractmethod
    def load_state(self, path: Path) -> None:
        """Restore what ``save_state`` wrote (resharded where the engine can; see ``reshard_note``)."""

    @abstractmethod
    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model state dict on CPU (rank 0 gets it; others may get an empty dict)."""

    # -- the dry-run plan (no instance: the model is on the meta device, no process group) -----------
    @classmethod
    @abstractmethod
    def model_state_memory(cls, cfg: JobConfig, layout: Layout, model: nn.Module, plan: ParallelPlan,
                           per_device) -> dict[str, float]:
        """GiB per device of the model states under this engine's rules ({part: GiB}); ``per_device(p)``
        is the number of a parameter's elements a device holds before data-parallel sharding (1/tp of
        the ones tensor parallelism splits)."""

    @classmethod
    def plan_note(cls, cfg: JobConfig) -> str | None:
        """An ``engine`` line for the dry-run plan, or None."""
        return None


def copy_full_tensor(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full (unsharded) tensor ``full`` into ``dst``, whatever an engine made of that parameter or
    buffer: FSDP2's DTensor shard (every rank holds the full tensor, so each slices its own: no
    communication) or a plain tensor (DeepSpeed builds the full model before partitioning it; one
    device). The one place the HF / diffusers loaders and the checkpoint reader reach the engine's storage."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        full = full.to(device=dst.device, dtype=dst.dtype)
        if isinstance(dst, DTensor):
            dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
        else:
            dst.copy_(full)


def count_params(module: nn.Module, frozen_prefixes: tuple[str, ...], prefix: str = "") -> tuple[int, int]:
    """(parameters, trainable parameters) of ``module``; the plan's frozen prefixes are not trainable."""
    total = trainable = 0
    for name, p in module.named_parameters(prefix=prefix):
        total += p.numel()
        if p.requires_grad and not any(name == f or name.startswith(f + ".") for f in frozen_prefixes):
            trainable += p.numel()
    return total, trainable


def optimizer_bytes(model: nn.Module, frozen_prefixes: tuple[str, ...], name: str, per_device) -> float:
    """The optimizer's own count of its state bytes for every trainable parameter (e.g. adamw_fp8's codes
    and per-group metadata, which depend on each parameter's shape), times the share a device holds along
    the tensor-parallel dimension (``per_device(p) / numel``)."""
    return sum(optimizer_state_bytes(name, p.shape) * per_device(p) / p.numel() for fqn, p in model.named_parameters()
               if p.requires_grad and not any(fqn == f or fqn.startswith(f + ".") for f in frozen_prefixes))


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


def build_optimizer_and_schedule(engine: Engine, model: nn.Module, cfg: JobConfig) -> list[dict[str, Any]]:
    """Our optimizer over the trainable parameters in the recipe's groups, and the LR schedule over it;
    sets ``engine.optimizer`` / ``engine.scheduler`` / ``engine.param_groups_summary``."""
    groups = build_param_groups(model, engine.plan.param_groups, cfg.optim.lr, cfg.optim.weight_decay)
    engine.param_groups_summary = [(g["group_name"], len(g["params"]), g["lr_mult"], g["weight_decay"])
                                   for g in groups]
    for g in groups:
        g.pop("param_names")
    engine.optimizer = build_optimizer(groups, cfg.optim)
    engine.scheduler = build_lr_scheduler(engine.optimizer, cfg.optim, cfg.trainer.max_steps)
    return groups


def set_eval_modules(model: nn.Module, plan: ParallelPlan) -> None:
    """``model.train()`` everywhere except the plan's frozen ``eval_modules`` (e.g. a frozen ViT's dropout)."""
    model.train()
    modules = dict(model.named_modules())
    for name in plan.eval_modules:
        modules[name].eval()


class FSDP2Engine(Engine):
    def __init__(self, cfg: JobConfig, layout: Layout, info: DistInfo, recipe: Recipe):
        self.cfg, self.layout, self.info, self.recipe = cfg, layout, info, recipe
        self.full_mesh = build_mesh(layout, info.device)
        self.mesh = data_parallel_mesh(self.full_mesh)
        with torch.device("meta"):
            model = recipe.build_model(torch.device("meta"))
        self.tp = None
        if layout.tp > 1:
            from scaleforge.platform import tensor_parallel

            self.tp = tensor_parallel.apply_tensor_parallel(model, recipe.tensor_parallel_plan(model),
                                                            self.full_mesh["tp"].get_group(), torch.device("meta"),
                                                            tensor_parallel.backend_for(info.device))
            self.tp.mesh = self.full_mesh
        self.plan = recipe.parallel_plan(model)
        apply_freeze(model, self.plan)
        self._parallelize(model)
        self._materialize(model)
        set_eval_modules(model, self.plan)
        self.model = model
        build_optimizer_and_schedule(self, model, cfg)
        self.ema = ShardedEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

    def _parallelize(self, model: nn.Module) -> None:
        """COAT FP8 conversion, activation checkpointing, per-block compile, then ``fully_shard`` per
        group and the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        pcfg, plan = self.cfg.parallel, self.plan
        if pcfg.fp8 == "coat":
            self.fp8_summary = apply_coat(model, plan)
            if pcfg.fp8_all_gather:
                self.fp8_summary["fp8_all_gathered_weights"] = wrap_fp8_linear_weights(model)
            if self.info.rank == 0:
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

    def _materialize(self, model: nn.Module) -> None:
        """Sharded storage, seeded ``init_weights``, then the pretrained weights (the recipe copies full
        tensors into the DTensor shards)."""
        cfg, info, recipe = self.cfg, self.info, self.recipe
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

    @classmethod
    def model_state_memory(cls, cfg: JobConfig, layout: Layout, model: nn.Module, plan: ParallelPlan,
                           per_device) -> dict[str, float]:
        """FSDP2 with mixed precision (what ``torch.cuda.max_memory_allocated`` measures; CUDA context
        and allocator fragmentation not included): fp32 parameters, gradients and optimizer state
        (the optimizer's registry entry counts each trainable shape: AdamW 8 B per parameter, adamw_fp8
        ~2.2) sharded over dp_shard; the compute-dtype parameters of the root (never resharded after
        forward) plus two FSDP groups in flight (the current one and the prefetched one), the
        unsharded gradients of one group before its reduce-scatter, and the EMA's fp32 shadow when
        ``optim.ema_decay`` > 0."""
        total, trainable = count_params(model, plan.frozen)
        unit_sizes = [sum(per_device(p) for u in group for p in u.parameters())
                      for group in fsdp_groups(plan.fsdp_units, cfg.parallel.fsdp_group_size)]
        local_total = sum(per_device(p) for p in model.parameters())
        local_trainable = local_total * (trainable / total) if total else 0
        root, largest = local_total - sum(unit_sizes), max(unit_sizes, default=0)
        compute_bytes = 2 if cfg.parallel.mixed_precision in ("bf16", "fp16") else 4
        shard, gib = layout.dp_shard, 2**30
        mem = {
            "params (fp32)": 4 * local_total / shard / gib,
            "grads (fp32)": 4 * local_trainable / shard / gib,
            f"optimizer ({cfg.optim.name})": optimizer_bytes(model, plan.frozen, cfg.optim.name, per_device) / shard / gib,
            "unsharded units": (compute_bytes * (root + 2 * largest) + compute_bytes * largest) / gib,
        }
        if cfg.optim.ema_decay > 0:  # ShardedEMA: an fp32 shadow of every trainable shard
            mem["ema (fp32)"] = 4 * local_trainable / shard / gib
        return mem

    # -- step pieces ------------------------------------------------------------------------------
    def trainable_params(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool = True) -> None:
        # Reduce-scatter after every micro-batch (no deferral): the gradients stay sharded in memory.
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

    def step(self, factor: float) -> None:
        grads = self._local_grads()
        if grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()

    @property
    def supports_device_step(self) -> bool:
        # torch's fused Adam/AdamW kernels read grad_scale and found_inf on the device, so does CAME with
        # optim.fused; the EMA takes found_inf too
        if getattr(self.optimizer, "supports_device_step", False):
            return True
        return isinstance(self.optimizer, torch.optim.Adam) and all(g.get("fused") for g in self.optimizer.param_groups)

    def device_step(self, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        if not self.supports_device_step:
            raise RuntimeError("device_step needs a fused Adam/AdamW or CAME optimizer")
        # torch's Adam reads these attributes (the GradScaler protocol) and passes them to the kernel
        self.optimizer.grad_scale, self.optimizer.found_inf = grad_scale, found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf
        if self.ema is not None:
            self.ema.update(found_inf)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ----------------------------------------------------------------------------------------
    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        # tp-split entries as global DTensors over the full mesh: DCP reshards them between tp sizes
        return state if self.tp is None else self.tp.checkpoint_view(state, self.tp.to_global)

    def save_state(self, path: Path, async_group=None):
        import torch.distributed.checkpoint as dcp

        if async_group is None:
            dcp.save(self._dcp_state(), checkpoint_id=str(path))
            return None
        # DCP stages the state into its own CPU buffers before returning: training may go on mutating
        # the parameters while the background thread writes.
        return dcp.async_save(self._dcp_state(), checkpoint_id=str(path), process_group=async_group)

    def load_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()  # the EMA's tensors are its shadow itself: loaded in place
        dcp.load(state, checkpoint_id=str(path))  # reshards to this world size
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = recipe.build_model(torch.device("cpu"))
        recipe.init_weights(full)
    if pretrained:
        recipe.load_pretrained(full, pretrained)
    source = full.state_dict()
    for name, t in model.state_dict().items():
        src = source[name]
        if tp is not None:
            src = tp.local_slice(name, src.to(t.dtype)).contiguous()
        copy_full_tensor(t, src)


def engine_class(name: str) -> type[Engine]:
    """The ``Engine`` subclass of ``parallel.engine``."""
    if name == "fsdp2":
        return FSDP2Engine
    if name == "deepspeed":
        from scaleforge.platform.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine
    raise ConfigError(f"parallel.engine: {name!r} is not one of fsdp2, deepspeed")


def build_engine(cfg: JobConfig, layout: Layout, info: DistInfo, recipe: Recipe) -> Engine:
    return engine_class(cfg.parallel.engine)(cfg, layout, info, recipe)
