"""The recipe-agnostic train loop (runs in every worker process).

One optimizer step = ``grad_accum`` micro-batches on each data-parallel rank. Each micro-batch's loss
is a SUM (see ``LossOutput``); after the step's backward passes the gradients are scaled by
``dp_size / N`` where N is the number of loss items summed over all ranks and micro-batches, so the
loss is normalized by the global count (exact gradient accumulation, token-count normalization).

Faults: SIGTERM / SIGUSR1 or a ``PREEMPT`` file in the run directory -> checkpoint, clean exit.
Non-finite loss or gradient norm -> the step is skipped; ``trainer.max_nonfinite_steps`` in a row stop
the run with a message naming the step.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.platform import dist as sfdist
from scaleforge.platform import faults
from scaleforge.platform.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    find_latest,
    resolve_resume,
    restore_rng_state,
)
from scaleforge.platform.config import JobConfig, derive_layout, to_yaml
from scaleforge.platform.engine import Engine, build_engine, clip_coefficient, set_eval_modules
from scaleforge.platform.metrics import MetricsLogger, device_peak_flops, truncate_jsonl
from scaleforge.platform.recipe import DataContext, Recipe

PREEMPT_FILE = "PREEMPT"
#: set by ``launch`` for its workers: the checkpoint it resolved and verified (a path, or "none")
RESUME_ENV = "SCALEFORGE_RESUME_FROM"
DONE_FILE = "DONE"  # written when max_steps is reached: a Slurm job never requeues a finished run


class TrainingError(RuntimeError):
    pass


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _as_device_scalar(v: Any, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(v), dtype=torch.float64, device=device)


def run_dir_of(cfg: JobConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def train(cfg: JobConfig, recipe_cls: type[Recipe]) -> dict[str, Any]:
    """Train until ``trainer.max_steps`` or a stop request. Returns a summary (on every rank)."""
    info = sfdist.init_distributed(cfg.trainer.collective_timeout_s)
    layout = derive_layout(cfg, info.world_size)
    run_dir = _prepare_run_dir(cfg, info)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Model init uses run.seed on every rank (engine); per-rank randomness (noise, dropout) differs.
    torch.manual_seed(cfg.run.seed * 1_000_003 + info.rank)

    recipe = recipe_cls(cfg.model, cfg)
    engine = build_engine(cfg, layout, info, recipe)
    data_seed = cfg.data.seed if cfg.data.seed is not None else cfg.run.seed
    # The ranks of one tensor-parallel group (innermost mesh dimension) read the same micro-batches.
    data = recipe.build_data(DataContext(dp_rank=info.rank // layout.tp, dp_world_size=info.world_size // layout.tp,
                                         micro_batch_size=layout.micro_batch_size, seed=data_seed,
                                         device=info.device))
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, info.rank, info.world_size, to_yaml(cfg), tp=layout.tp)
    step, resume_note = _resume(cfg, run_dir, ckpt, engine, data, info, layout)
    log = MetricsLogger(run_dir, cfg.metrics, _plain(cfg), cfg.trainer.max_steps, step, enabled=info.is_main)
    ckpt.on_written = lambda at, path: log.message(f"checkpoint written: {path} (step {at})")
    if resume_note:
        log.message(resume_note)
    log.message(f"world size {info.world_size} ({info.device.type}), engine {cfg.parallel.engine}, mesh "
                f"dp_replicate={layout.dp_replicate} x dp_shard={layout.dp_shard}"
                f"{f' x tp={layout.tp}' if layout.tp > 1 else ''}, micro-batch "
                f"{layout.micro_batch_size} x accumulation {layout.grad_accum} = global batch "
                f"{layout.global_batch_size}")

    stop = _StopRequests(run_dir, info)
    reader = _StatsReader(cfg, layout, info, log, ckpt, recipe)
    policy = _CheckpointPolicy(cfg, ckpt, engine, data, info, log, start_step=step, resumed=resume_note is not None)
    stepper = _StepRunner(cfg, layout, info, engine, recipe, data, reader, stop)
    with _LoopEnvironment(cfg, run_dir, info) as env:
        set_eval_modules(engine.model, engine.plan)
        while step < cfg.trainer.max_steps:
            env.before_step(step + 1)
            current = stepper.run(step + 1)
            step += 1
            env.after_step(step)
            must_read = reader.stop_seen or policy.must_read(step)
            if stepper.defer and not must_read:
                reader.pending = current
                continue
            want_stop = reader.account_now(current)
            if policy.after_step(step, want_stop, stop):
                break
    policy.finish(step)
    if info.is_main and step >= cfg.trainer.max_steps:
        (run_dir / DONE_FILE).write_text(f"{step}\n")
    log.close(plot=policy.stop_reason is None)
    if policy.stop_reason is None:
        _print_summary(log, recipe, run_dir, step, find_latest(ckpt.root))
    data.close()
    summary = {"step": step, "stopped_by": policy.stop_reason, "run_dir": str(run_dir)}
    sfdist.barrier()
    return summary


def _print_summary(log: MetricsLogger, recipe: Recipe, run_dir: Path, step: int, last: Path | None) -> None:
    lines = [f"finished: {step} steps; run directory {run_dir}",
             f"  last checkpoint  {last if last is not None else 'none (checkpoint.save_final=false)'}",
             f"  metrics          {run_dir / 'metrics.jsonl'}"]
    formats = recipe.export_formats()
    if formats and last is not None:
        lines.append(f"  export           scaleforge export --run {run_dir} --format {formats[0]} "
                     f"--out {run_dir / 'export'}")
    log.message("\n".join(lines))


def _prepare_run_dir(cfg: JobConfig, info) -> Path:
    run_dir = run_dir_of(cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
        (run_dir / DONE_FILE).unlink(missing_ok=True)  # a resumed run with a larger max_steps
    sfdist.barrier()
    return run_dir


def _resume(cfg: JobConfig, run_dir: Path, ckpt: CheckpointManager, engine: Engine, data, info,
            layout) -> tuple[int, str | None]:
    """(step, message): the checkpoint ``checkpoint.resume`` names restored into the engine, the
    schedule, the data loader and the RNG streams; (0, None) for a fresh start."""
    resume_path = _resume_path(cfg, run_dir, info)
    if resume_path is None:
        return 0, None
    trainer_state, rank_states = ckpt.load(resume_path, engine)
    _load_schedule(engine, trainer_state["scheduler"])
    step = int(trainer_state["step"])
    if info.is_main:
        truncate_jsonl(run_dir / "metrics.jsonl", step)
    if trainer_state["world_size"] == info.world_size and trainer_state.get("tp", 1) == layout.tp:
        restore_rng_state(rank_states[0]["rng"])
        data.load_state_dict(rank_states[0]["data"])
        return step, f"resumed from {resume_path} at step {step}"
    how = data.load_resharded_state_dict([s["data"] for s in rank_states])
    return step, (f"resumed from {resume_path} at step {step}, resharded from {trainer_state['world_size']} "
                  f"to {info.world_size} processes{_tp_change(trainer_state.get('tp', 1), layout.tp)}: model and "
                  f"optimizer resharded exactly; data: {how}; RNG streams restart from the seed")


def _tp_change(old: int, new: int) -> str:
    return f" (tensor parallel {old} -> {new})" if old != new or new > 1 else ""


def _load_schedule(engine: Engine, saved: dict[str, Any]) -> None:
    """The resume rule for the LR schedule: the config wins. The scheduler's position (its step count) comes
    from the checkpoint; base LRs (optim.lr x the groups' multipliers), warmup, decay and trainer.max_steps
    come from the config, evaluated at that step, so a changed optim.lr or max_steps takes effect from the
    first resumed step (the launcher prints what changed). Unchanged, this is the LR the checkpoint holds."""
    sched = engine.scheduler
    base_lrs = list(sched.base_lrs)  # built from this run's config
    sched.load_state_dict(saved)
    sched.base_lrs = base_lrs
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(base_lrs, sched.lr_lambdas)]
    for group, base, lr in zip(engine.optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"] = base
        if isinstance(group["lr"], torch.Tensor):  # a tensor LR (capturable / fused optimizers) stays one
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    sched._last_lr = lrs


def _resume_path(cfg: JobConfig, run_dir: Path, info) -> Path | None:
    """The checkpoint to resume from: the one the launcher resolved and verified (``RESUME_ENV``), else
    rank 0 resolves and verifies ``checkpoint.resume`` and tells the others (one verification, one
    choice for every rank)."""
    chosen = os.environ.get(RESUME_ENV)
    if chosen is not None:
        return None if chosen == "none" else Path(chosen)
    found = [resolve_resume(cfg.checkpoint.resume, run_dir) if info.is_main else None]
    if info.world_size > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


class _StopRequests:
    """SIGTERM / SIGUSR1 (Slurm's warning), a PREEMPT file in the run directory (rank 0 looks), and the
    SIGTERM fault drill. ``local()`` is this rank's vote; the loop all-reduces it with the statistics."""

    def __init__(self, run_dir: Path, info):
        self.signal: str | None = None
        self.run_dir, self.is_main = run_dir, info.is_main
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        self.drill_steps = faults.steps(faults.SIGTERM_STEPS) if info.is_main else set()

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def local(self, step: int) -> float:
        if step in self.drill_steps:
            faults.sigterm_self()
        return 1.0 if (self.signal or (self.is_main and (self.run_dir / PREEMPT_FILE).exists())) else 0.0


class _StepRunner:
    """One optimizer step: the micro-batches' forward / backward, the step's single all-reduce of its
    statistics, and the update, on the device path (fused Adam reads the gradient factor and the skip
    flag on the device; nothing waits for the host) or the host path (read first, then step or skip)."""

    def __init__(self, cfg: JobConfig, layout, info, engine: Engine, recipe: Recipe, data, reader, stop):
        self.cfg, self.layout, self.info = cfg, layout, info
        self.engine, self.recipe, self.data, self.reader, self.stop = engine, recipe, data, reader, stop
        self.nan_steps = faults.steps(faults.NAN_STEPS)
        self.device_step = engine.supports_device_step
        # With the device-side step the host needs a step's statistics only for logging and the stop /
        # non-finite decisions, so (trainer.deferred_stats) it reads step N's after enqueueing step N+1's
        # forward and backward: the GPU never drains at the step boundary. Steps that checkpoint, end the
        # run or follow a stop request are read at once; every rank decides that from the same global facts.
        self.defer = self.device_step and cfg.trainer.deferred_stats

    def run(self, step: int) -> "_PendingStats":
        t0 = time.perf_counter()
        dev, engine = self.info.device, self.engine
        started = _record_event(dev)
        # Statistics stay on the device until the host reads them (below, or one step later).
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        items = torch.zeros((), dtype=torch.float64, device=dev)
        tokens = 0.0
        extra: dict[str, torch.Tensor] = {}
        for mb in range(self.layout.grad_accum):
            out = self.recipe.forward_loss(engine.model, _to_device(next(self.data), dev))
            loss = out.loss * float("nan") if step in self.nan_steps else out.loss
            engine.backward(loss, last_micro_batch=mb == self.layout.grad_accum - 1)
            loss_sum += loss.detach().double()
            items += _as_device_scalar(out.num_items, dev)
            tokens += float(out.num_tokens or 0)  # a host int: the recipe knows it without the device
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + _as_device_scalar(v, dev)
        self.reader.read_pending()  # the previous step, now that this one's work is enqueued
        keys = sorted(extra)
        # One all-reduce per step. The gradient norm is taken on the raw (summed-loss) gradients, so the
        # global item-count normalization and the clipping are applied together as one factor.
        # The tp ranks of a group compute the same loss over the same tokens: each counts 1/tp of them.
        tp = self.layout.tp
        stats = torch.stack([loss_sum / tp, items / tp, torch.full((), tokens / tp, dtype=torch.float64, device=dev),
                             torch.full((), self.stop.local(step), dtype=torch.float64, device=dev),
                             engine.grad_sq_norm_local()] + [extra[k] for k in keys])
        dist.all_reduce(stats)
        lr = engine.base_lr()
        if self.device_step:
            factor, nonfinite = _device_step_factor(stats, self.layout.dp_size, self.cfg.optim.grad_clip)
            # clamped: a huge but finite norm must give a tiny update, as the host path's multiply does,
            # not an inf scale (which would step with zero gradients)
            grad_scale = factor.reciprocal().clamp(max=torch.finfo(torch.float32).max).float()
            engine.device_step(grad_scale, nonfinite.float())
            # before the read too: after it the GPU idles until the host launches the next step, and
            # freeing the gradients plus the LR step take ~0.8 ms of host time with 16 layers on CPU
            # (benchmarks/host_step_probe.py: sync -> next step start 0.17 ms here, 1.0 ms after)
        current = _PendingStats(step, t0, lr, stats, keys, self.layout, self.info.world_size, started)
        if not self.device_step:  # the host path reads first: the skip decision and the clip factor
            current.read()
            v = current.values
            if not v.skipped:
                engine.step(v.normalize * clip_coefficient(v.grad_norm, self.cfg.optim.grad_clip))
        engine.zero_grad()
        engine.scheduler.step()
        current.finish()
        current.data_metrics = {k if k.startswith("data/") else f"data/{k}": v
                                for k, v in self.data.metrics().items()}
        return current


class _StatsReader:
    """The host side of each step's statistics: the deferred read (``pending``, one step behind), the
    non-finite bookkeeping, the metrics record. ``stop_seen``: a read step carried a stop request."""

    def __init__(self, cfg: JobConfig, layout, info, log: MetricsLogger, ckpt: CheckpointManager, recipe: Recipe):
        self.cfg, self.layout, self.info, self.log, self.ckpt = cfg, layout, info, log, ckpt
        self.flops_per_sample = recipe.flops_per_sample(None)
        self.peak = device_peak_flops()
        self.pending: _PendingStats | None = None
        self.stop_seen = False
        self.nonfinite_in_row = 0

    def read_pending(self) -> None:
        if self.pending is not None:
            self.pending.read()
            self.stop_seen = self.account(self.pending) or self.stop_seen
            self.pending = None

    def account_now(self, p: "_PendingStats") -> bool:
        """Read p (unless the host path already did) and account it. True = stop requested."""
        if p.values is None:  # the device path; the host path read it before its update
            p.read()
            return self.account(p) or self.stop_seen
        return self.account(p) or self.stop_seen

    def account(self, p: "_PendingStats") -> bool:
        """Non-finite bookkeeping and the metrics record of step p.step. True = stop requested."""
        v, limit = p.values, self.cfg.trainer.max_nonfinite_steps
        if v.skipped:
            self.nonfinite_in_row += 1
            self.log.message(f"step {p.step}: non-finite loss ({v.loss}) or grad norm ({v.grad_norm}); step "
                             f"skipped ({self.nonfinite_in_row} in a row, limit {limit})")
            if self.nonfinite_in_row >= limit:
                self.log.close(plot=False)
                self.ckpt.wait()
                last = find_latest(self.ckpt.root)
                kept = (f"the last checkpoint, {last}, is kept (resume from it after fixing the cause)" if last
                        else "no checkpoint was written before it")
                raise TrainingError(
                    f"stopping at step {p.step}: {self.nonfinite_in_row} consecutive steps with a non-finite loss "
                    f"or gradient norm (trainer.max_nonfinite_steps={limit}); {kept}")
        else:
            self.nonfinite_in_row = 0
        dt = p.step_time()
        if p.step % self.cfg.trainer.log_interval == 0 or p.step == self.cfg.trainer.max_steps:
            self.log.log(self._record(p, dt))
        return v.stop

    def _record(self, p: "_PendingStats", dt: float) -> dict[str, Any]:
        v, L, world = p.values, self.layout, self.info.world_size
        record: dict[str, Any] = {"step": p.step, "loss": v.loss, "lr": p.lr, "grad_norm": v.grad_norm,
                                  "step_time_s": dt, "samples_per_s": L.global_batch_size / dt,
                                  # host time blocked on the device when the statistics were read: near 0
                                  # means the host (Python, dispatch) limits the step, not the GPU
                                  "sync_wait_s": p.sync_wait, "skipped": v.skipped}
        if v.tokens > 0:
            record["tokens_per_s"] = v.tokens / dt
            record["tokens_per_s_per_device"] = v.tokens / dt / world
        if self.flops_per_sample and self.peak:
            record["mfu"] = self.flops_per_sample * L.global_batch_size / dt / (self.peak * world)
        if self.info.device.type == "cuda":
            record["mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record.update(v.extra)
        record.update(p.data_metrics)
        return record


class _CheckpointPolicy:
    """When to save: every ``checkpoint.interval`` steps, on a stop request (blocking, then exit), after
    ``trainer.exit_after_steps`` steps of this job (time slicing), and at the end (``save_final``)."""

    def __init__(self, cfg: JobConfig, ckpt: CheckpointManager, engine: Engine, data, info, log: MetricsLogger,
                 start_step: int, resumed: bool):
        self.cfg, self.ckpt, self.engine, self.data, self.info, self.log = cfg, ckpt, engine, data, info, log
        self.start_step = start_step
        self.last_saved = start_step if resumed else -1
        self.stop_reason: str | None = None
        self.kill_after_ckpt = faults.steps(faults.KILL_AFTER_CHECKPOINT)

    def _sliced(self, step: int) -> bool:
        n = self.cfg.trainer.exit_after_steps
        return n > 0 and step - self.start_step >= n

    def _periodic(self, step: int) -> bool:
        return self.cfg.checkpoint.interval > 0 and step % self.cfg.checkpoint.interval == 0

    def must_read(self, step: int) -> bool:
        """Whether step's statistics must be read now (it may save or end the run)."""
        return self._sliced(step) or self._periodic(step) or step >= self.cfg.trainer.max_steps

    def after_step(self, step: int, want_stop: bool, stop: _StopRequests) -> bool:
        """Save where due. True = leave the loop (a stop request, or the job's slice is done)."""
        if self._sliced(step) and not want_stop and step < self.cfg.trainer.max_steps:
            want_stop, stop.signal = True, "trainer.exit_after_steps"
        if self._periodic(step) or want_stop:
            self.save(step, blocking=want_stop)
            if step in self.kill_after_ckpt:
                self.ckpt.wait()
                faults.kill_self()
        if want_stop:
            self.stop_reason = stop.signal or PREEMPT_FILE
            self.log.message(f"stop requested ({self.stop_reason}): checkpoint written at step {step}; "
                             f"exiting cleanly")
        return want_stop

    def save(self, step: int, blocking: bool) -> None:
        rank_state = {"rng": capture_rng_state(), "data": self.data.state_dict()}
        trainer_state = {"step": step, "world_size": self.info.world_size, "tp": self.ckpt.tp,
                         "scheduler": self.engine.scheduler.state_dict()}
        self.ckpt.save(step, self.engine, rank_state, trainer_state, blocking=blocking)
        self.last_saved = step

    def finish(self, step: int) -> None:
        if self.stop_reason is None and self.cfg.checkpoint.save_final and self.last_saved != step:
            self.save(step, blocking=True)
        self.ckpt.wait()


class _LoopEnvironment:
    """Process-wide settings for the loop, restored on the way out (also on errors, for in-process
    callers): GC control, the profiler, and the NaN fill of new tensors.

    Deterministic mode also fills every new tensor with NaN, a debugging aid against reads of
    uninitialized memory, not part of determinism. It stays on while the model is built and loaded (a
    parameter that init_weights misses then shows as NaN), and is off for the loop, where FSDP's
    all-gather / reduce-scatter buffers and cuDNN attention's gradients made it ~400 fill kernels and
    ~5 ms of GPU time per lm_1b step."""

    def __init__(self, cfg: JobConfig, run_dir: Path, info):
        self.cfg, self.run_dir, self.info = cfg, run_dir, info

    def __enter__(self):
        self.profiler = _Profiler(self.cfg.metrics, self.run_dir, self.info)
        self.gc_control = _GCControl(self.cfg.trainer.gc_interval)
        self.fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False
        return self

    def before_step(self, step: int) -> None:
        self.gc_control.before_step(step)
        self.profiler.before_step(step)

    def after_step(self, step: int) -> None:
        self.profiler.after_step(step)

    def __exit__(self, *exc) -> None:
        self.gc_control.close()
        torch.utils.deterministic.fill_uninitialized_memory = self.fill


def _device_step_factor(stats: torch.Tensor, dp_size: int, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device, from the all-reduced step statistics [loss_sum, items, tokens, stop, grad_sq, ...]:
    the gradient factor (global item-count normalization times the clip coefficient, as the host path
    computes it with ``clip_coefficient``) and the flag that the loss or the gradient norm is not finite."""
    loss_sum, items, grad_sq = stats[0], stats[1], stats[4]
    normalize = dp_size / items
    grad_norm = grad_sq.sqrt() * normalize
    clip = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones_like(grad_norm)
    nonfinite = ~(torch.isfinite(loss_sum / items) & torch.isfinite(grad_norm))
    return normalize * clip, nonfinite


class _StepValues:
    """A step's all-reduced statistics [loss_sum, items, tokens, stop, grad_sq, *extra] as host numbers."""

    def __init__(self, values: list[float], step: int, keys: list[str], layout, world_size: int):
        loss_sum, items, self.tokens, stop, grad_sq, *extra = values
        if items <= 0:
            raise TrainingError(f"step {step}: the global batch has no loss items (every label masked?)")
        self.loss = loss_sum / items
        # Both engines' gradient reductions average over the dp ranks; rescale to the global per-item mean.
        self.normalize = layout.dp_size / items
        self.grad_norm = math.sqrt(grad_sq) * self.normalize if math.isfinite(grad_sq) else float("nan")
        self.skipped = not (math.isfinite(self.loss) and math.isfinite(self.grad_norm))  # as _device_step_factor
        self.stop = stop > 0
        self.extra = {k: v / (world_size * layout.grad_accum) for k, v in zip(keys, extra)}


class _PendingStats:
    """One step's statistics on their way to the host: on CUDA an asynchronous copy into pinned memory and
    an event, so that reading them later waits for this step's work only, not for work enqueued after it
    (a plain ``tolist()`` then would wait for the whole queue)."""

    def __init__(self, step: int, t0: float, lr: float, stats: torch.Tensor, keys: list[str], layout,
                 world_size: int, started=None):
        self.step, self.t0, self.lr, self.keys = step, t0, lr, keys
        self.started, self.ended, self.t_end = started, None, None
        self.layout, self.world_size = layout, world_size
        self.data_metrics: dict[str, Any] = {}
        self.values: _StepValues | None = None
        self.sync_wait = 0.0
        self.t_done = 0.0
        self.event = None
        self.stats_device = stats.device
        if stats.is_cuda:
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stats

    def finish(self) -> None:
        """The step's work is all issued (on CPU: done): mark its end."""
        self.t_end = time.perf_counter()
        self.ended = _record_event(self.stats_device)

    def step_time(self) -> float:
        """Seconds the step took, whichever step reads it and when. On CUDA: between events recorded at the
        step's first and last launch, i.e. from when the device could start the step (the previous step done
        and this one's first kernel issued) to when it finished its update. On CPU the work runs as it is
        issued: the host's time from the step's start to its end. Not the interval between statistics reads,
        which differs from the step time wherever a read is deferred and the next one is not."""
        if self.started is not None and self.ended is not None:
            self.ended.synchronize()
            return self.started.elapsed_time(self.ended) / 1e3
        return (self.t_end if self.t_end is not None else time.perf_counter()) - self.t0

    def read(self) -> None:
        t = time.perf_counter()
        if self.event is not None:
            self.event.synchronize()
        values = self.host.tolist()
        self.t_done = time.perf_counter()
        self.sync_wait = self.t_done - t
        self.values = _StepValues(values, self.step, self.keys, self.layout, self.world_size)


def _record_event(device: torch.device):
    """A timing event recorded on the current CUDA stream (None on CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class _GCControl:
    """Python's generational GC pauses the host at arbitrary points of a step, and a paused host stops
    launching GPU work (on CPU, lm_tiny with 16 layers: about one gen-0 collection per step and gen-2
    pauses of up to 0.14 s; benchmarks/host_step_probe.py). As torchtitan does, ``trainer.gc_interval`` > 0 turns automatic
    collection off for the loop and collects generations 0-1 at the start of every N-th step, where the
    pause is predictable and the same on every rank (ranks stall together, not one after another)."""

    def __init__(self, interval: int):
        self.interval = interval
        self.was_enabled = gc.isenabled()
        if interval > 0:
            gc.collect()  # the garbage of model building, once
            gc.disable()

    def before_step(self, step: int) -> None:
        if self.interval > 0 and step > 1 and step % self.interval == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.interval > 0 and self.was_enabled:
            gc.enable()


class _Profiler:
    """``metrics.profile_start_step``: torch.profiler over a few steps; rank 0 writes a Chrome trace and
    tables of the top operators by device (or CPU) time, by host time, and by input shape into
    ``<run_dir>/profile/``."""

    def __init__(self, metrics_cfg, run_dir: Path, info):
        self.start = metrics_cfg.profile_start_step
        self.end = self.start + metrics_cfg.profile_steps
        self.run_dir, self.info, self.prof = run_dir, info, None

    def before_step(self, step: int) -> None:
        if self.start > 0 and step == self.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.info.device.type == "cuda" else [])
            if self.info.device.type == "cuda":
                torch.cuda.synchronize()  # with the deferred read the previous step may still be running
            self.prof = profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is None or step < self.end - 1:
            return
        if self.info.device.type == "cuda":
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        if self.info.is_main:
            out = self.run_dir / "profile"
            out.mkdir(exist_ok=True)
            self.prof.export_chrome_trace(str(out / f"trace_rank0_steps{self.start}-{self.end - 1}.json"))
            key = "self_device_time_total" if self.info.device.type == "cuda" else "self_cpu_time_total"
            (out / "top_ops.txt").write_text(self.prof.key_averages().table(sort_by=key, row_limit=40))
            (out / "top_ops_host.txt").write_text(
                self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            (out / "top_ops_by_shape.txt").write_text(
                self.prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=60))
        self.prof = None


def _plain(cfg: JobConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
