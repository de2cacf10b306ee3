"""DeepSpeed ZeRO as the second engine (``parallel.engine=deepspeed``, ``parallel.deepspeed.*``).

The same recipe, configs, train loop and checkpoint protocol as FSDP2; what differs stays here:

- The model is built full on the device, seeded ``init_weights`` (the same weights as FSDP2's at any
  world size), the recipe's pretrained weights are loaded into it, then ``deepspeed.initialize``
  partitions it (ZeRO stage 1, 2 or 3). ``zero.Init`` (partitioning while building) is not used: the
  full fp32 model must fit in one device's memory once, at start-up.
- Our optimizer (torch AdamW; the only one DeepSpeed's ZeRO drives here) over the recipe's parameter
  groups, frozen parameters excluded; our LR schedule drives its ``param_groups``.
- Gradient accumulation: every micro-batch's backward goes through DeepSpeed with the accumulation
  boundary set explicitly (``set_gradient_accumulation_boundary``): the reduction happens at the last
  micro-batch, no GA scaling of the loss.
- Normalization and clipping: the loop's one factor (global item-count normalization x clip coefficient)
  becomes ZeRO's loss scale for the step (it divides the gradients by it), with DeepSpeed's own clipping
  off, so both engines apply the same rule. The loop's skip decision discards the gradients without a step.
- Checkpoints: DeepSpeed's own sharded files (``save_checkpoint``), written into our step folder, inside
  our protocol (temporary folder, rename, COMPLETE, ``latest``, retention, data / RNG / step state).
  ``checkpoint.read_model_weights`` reconstructs the full fp32 weights from them (DeepSpeed's
  ``zero_to_fp32``) for export and ``init_from_run``. At another world size a run loads the checkpoint's
  universal form (``convert_to_universal``: DeepSpeed's ``ds_to_universal``, then ``load_universal``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleforge.platform.config import ConfigError, JobConfig, Layout
from scaleforge.platform.dist import DistInfo
from scaleforge.platform.engine import (Engine, apply_activation_checkpointing, apply_compile, apply_freeze,
                                        build_optimizer_and_schedule, count_params, fsdp_groups,
                                        set_eval_modules)
from scaleforge.platform.recipe import ParallelPlan, Recipe

#: optimizers whose update DeepSpeed's ZeRO optimizer can drive over its flat fp32 partitions
SUPPORTED_OPTIMIZERS = ("adamw",)


def unsupported(cfg: JobConfig) -> list[str]:
    """Why ``cfg`` cannot run on the DeepSpeed engine (empty: it can); checked by the launcher before any
    worker starts, and again by the engine."""
    p, why = cfg.parallel, []
    if p.dp_replicate > 1:
        why.append("parallel.dp_replicate > 1 (HSDP) is FSDP2's; DeepSpeed shards over all ranks (use dp_replicate=1)")
    if p.tp > 1:
        why.append("parallel.tp > 1 is applied in FSDP2's parallelize step only (use parallel.engine=fsdp2)")
    if p.dp_shard not in (-1,):
        why.append("parallel.dp_shard is FSDP2's mesh setting; leave it at -1 with parallel.engine=deepspeed")
    if cfg.optim.name not in SUPPORTED_OPTIMIZERS:
        why.append(f"optim.name={cfg.optim.name}: DeepSpeed's ZeRO optimizer drives {', '.join(SUPPORTED_OPTIMIZERS)} "
                   f"here (use parallel.engine=fsdp2 for {cfg.optim.name})")
    if cfg.optim.ema_decay > 0:
        why.append("optim.ema_decay > 0: the EMA of ZeRO-partitioned weights is not implemented (use fsdp2)")
    if cfg.checkpoint.async_save:
        why.append("checkpoint.async_save=true: DeepSpeed checkpoints are written synchronously here")
    if p.fp8 != "none":
        why.append(f"parallel.fp8={p.fp8} is applied in FSDP2's parallelize step only")
    if p.mixed_precision == "fp16":
        why.append("parallel.mixed_precision=fp16 is not supported (bf16 or fp32)")
    ds = p.deepspeed
    if ds.zero_stage not in (1, 2, 3):
        why.append(f"parallel.deepspeed.zero_stage must be 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_param and ds.zero_stage != 3:
        why.append("parallel.deepspeed.offload_param needs zero_stage=3")
    return why


def ds_config(cfg: JobConfig, layout: Layout) -> dict[str, Any]:
    """DeepSpeed's configuration derived from ours (one source of truth: batch, accumulation, precision)."""
    p, ds = cfg.parallel, cfg.parallel.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                            "reduce_bucket_size": ds.bucket_size, "allgather_bucket_size": ds.bucket_size}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.bucket_size, stage3_param_persistence_threshold=0)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": 0.0,  # applied through the step's loss scale (see the module docstring)
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "communication_data_type": "fp32" if p.reduce_dtype == "fp32" else "bf16",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if p.mixed_precision == "bf16":
        out["bf16"] = {"enabled": True}
        if p.reduce_dtype == "fp32":
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


class DeepSpeedEngine(Engine):
    checkpoint_format = "deepspeed"

    def __init__(self, cfg: JobConfig, layout: Layout, info: DistInfo, recipe: Recipe):
        why = unsupported(cfg)
        if why:
            raise ConfigError(f"parallel.engine=deepspeed: {why[0]}")
        import deepspeed

        self.cfg, self.layout, self.info, self.recipe = cfg, layout, info, recipe
        self.stage = cfg.parallel.deepspeed.zero_stage
        model = self._build(cfg, info, recipe)
        groups = build_optimizer_and_schedule(self, model, cfg)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                model_parameters=groups, config=ds_config(cfg, layout),
                                                dist_init_required=False)
        self.model = self.ds.module
        set_eval_modules(self.model, self.plan)
        self.zero = self.ds.optimizer  # the ZeRO optimizer wrapping self.optimizer
        self._stepped = False
        if info.rank == 0:
            print(self.summary(), flush=True)

    def summary(self) -> str:
        """What DeepSpeed's engine was built with, read back from it (not from our config): the ZeRO stage,
        where the optimizer states and the parameters live, and the checkpointed units."""
        z = self.zero
        optim = "cpu" if getattr(z, "offload_optimizer", False) or getattr(z, "cpu_offload", False) else "off"
        params = "cpu" if getattr(z, "offload_param", False) else "off"
        return (f"DeepSpeed ZeRO-{self.ds.zero_optimization_stage()}: optimizer offload {optim}, parameter offload "
                f"{params}, activation checkpointing on {self.checkpointed_units} units")

    def _build(self, cfg: JobConfig, info: DistInfo, recipe: Recipe) -> nn.Module:
        """The full model on the device: seeded init (same on every rank), pretrained weights, freezing,
        activation checkpointing and compile, before DeepSpeed partitions it."""
        with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed)
            with torch.device("cpu"):
                model = recipe.build_model(torch.device("cpu"))
            recipe.init_weights(model)
        source = recipe.pretrained_source()
        if source:
            recipe.load_pretrained(model, source)
        self.plan = recipe.parallel_plan(model)
        apply_freeze(model, self.plan)
        units = self.plan.checkpoint_units if self.plan.checkpoint_units is not None else self.plan.fsdp_units
        self.checkpointed_units = len(units) if cfg.parallel.activation_checkpointing == "full" else 0
        if self.checkpointed_units:
            apply_activation_checkpointing(units)
        if cfg.parallel.compile:
            apply_compile(units)
        return model.to(info.device)

    # -- the dry-run plan ----------------------------------------------------------------------------
    @classmethod
    def model_state_memory(cls, cfg: JobConfig, layout: Layout, model: nn.Module, plan: ParallelPlan,
                           per_device) -> dict[str, float]:
        """Model-state memory per GPU by DeepSpeed's own rules (its ``estimate_zero2/3_model_states_mem_needs``;
        ZeRO-1 by the same byte counts with the gradients not partitioned), trainable parameters as DeepSpeed
        counts them, plus the frozen parameters' 16-bit copies (partitioned under ZeRO-3)."""
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        ds, n, gib = cfg.parallel.deepspeed, layout.world_size, 2**30
        total, trainable = count_params(model, plan.frozen)
        frozen = total - trainable
        if ds.zero_stage == 3:
            largest = max((sum(p.numel() for u in group for p in u.parameters())
                           for group in fsdp_groups(plan.fsdp_units, cfg.parallel.fsdp_group_size)), default=0)
            _, states, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=n,
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

    @classmethod
    def plan_note(cls, cfg: JobConfig) -> str | None:
        ds = cfg.parallel.deepspeed
        return (f"DeepSpeed ZeRO-{ds.zero_stage}" + (", optimizer offload" if ds.offload_optimizer else "")
                + (", parameter offload" if ds.offload_param else "")
                + "; model states by DeepSpeed's estimate_zero*_model_states_mem_needs")

    # -- step pieces ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last_micro_batch: bool = True) -> None:
        # the reduction waits for the accumulation boundary; our loss is a sum, normalized at the step
        self.ds.set_gradient_accumulation_boundary(last_micro_batch)
        self.ds.backward(loss, scale_wrt_gas=False)
        if not last_micro_batch:
            # what DeepSpeed's engine.forward does first (recipes call the module itself): ZeRO-3 then
            # accumulates the next micro-batch's gradients into its partitions instead of overwriting them
            self.zero.clear_backward_seen_flag()

    def grad_sq_norm_local(self) -> torch.Tensor:
        # ZeRO reduces its norm over the data-parallel group itself; each rank contributes 1/world of its
        # square so that the loop's all-reduce gives the square of the same global norm.
        if self.stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(self.zero._get_norm_groups())
        else:
            norm = self.zero.scaled_global_norm()
        norm = torch.as_tensor(norm, device=self.info.device).double()
        # DeepSpeed reports an inf/NaN norm as -1
        norm = torch.where(norm < 0, torch.full_like(norm, float("nan")), norm)
        return norm.square() / self.layout.dp_size

    def step(self, factor: float) -> None:
        self.zero.loss_scale = 1.0 / factor  # ZeRO divides the gradients by its loss scale in its step
        try:
            self.ds.step()
        finally:
            self.zero.loss_scale = 1.0  # backward multiplies the loss by it
        self._stepped = True

    def zero_grad(self) -> None:
        # After a step DeepSpeed has cleared its gradients; after a skipped step, discard them here.
        if not self._stepped:
            self._discard_grads()
        self._stepped = False

    def _discard_grads(self) -> None:
        """Drop the step's reduced gradients without updating (what ZeRO does after an overflow)."""
        z = self.zero
        if self.stage == 3:
            z._overflow_clean_up(z.loss_scale)
            return
        z.zero_grad(set_to_none=True)
        z._release_preflattened_grad_buffers()
        if z.cpu_offload:
            z.reset_cpu_buffers()
        else:
            for k in z.averaged_gradients.keys():
                z.averaged_gradients[k] = None
                z.all_grad_tensors[k] = None

    # -- state ----------------------------------------------------------------------------------------
    def save_state(self, path: Path, async_group=None):
        # tag "": DeepSpeed's files (and its zero_to_fp32.py) land in our step folder itself
        self.ds.save_checkpoint(str(path), tag="", save_latest=False)
        return None

    def load_state(self, path: Path) -> None:
        from scaleforge.platform.checkpoint import UNIVERSAL, read_trainer_state

        # At another world size: the universal form (``convert_to_universal``), which DeepSpeed loads into
        # this run's partitions when its config says load_universal (read when loading, so set here).
        universal = read_trainer_state(path)["world_size"] != self.info.world_size
        self.ds._config.load_universal_checkpoint = universal
        source = path / UNIVERSAL if universal else path
        load_path, _ = self.ds.load_checkpoint(str(source), tag="", load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            from scaleforge.platform.checkpoint import CheckpointError

            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint files to load")

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def convert_to_universal(ckpt: Path) -> Path:
    """Add DeepSpeed's universal checkpoint of the complete step folder ``ckpt`` (its ``ds_to_universal``:
    every parameter's fp32 weights and optimizer states, unpartitioned) as ``ckpt/universal``, which a run of
    any world size loads. Written into ``universal.tmp`` and renamed, then recorded in COMPLETE; the
    checkpoint's own files are untouched. One process, CPU only."""
    import shutil
    import subprocess
    import sys

    from scaleforge.platform.checkpoint import (UNIVERSAL, CheckpointError, add_file_records, is_complete,
                                                read_trainer_state)

    if not is_complete(ckpt) or read_trainer_state(ckpt)["format"] != "deepspeed":
        raise CheckpointError(f"{ckpt}: not a complete DeepSpeed checkpoint (parallel.engine=deepspeed)")
    out, tmp = ckpt / UNIVERSAL, ckpt / (UNIVERSAL + ".tmp")
    if out.is_dir():
        return out
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                        "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
                        "--inject_missing_state"], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{ckpt}: DeepSpeed's ds_to_universal failed: {last}")
    os.replace(tmp, out)
    add_file_records(ckpt, sorted(str(p.relative_to(ckpt)) for p in out.rglob("*") if p.is_file()))
    return out


def read_full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a DeepSpeed checkpoint folder, in one process (DeepSpeed's
    ``zero_to_fp32``: merges the partitions of any ZeRO stage; buffers and frozen weights included)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="")
