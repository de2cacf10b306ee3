"""Pure units of the runtime: LR schedule, parameter groups, checkpoint discovery and retention,
metrics truncation on resume, activation-memory probe."""
import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scaleforge.platform.checkpoint import (COMPLETE, CheckpointError, CheckpointManager, find_latest,
                                            resolve_resume)
from scaleforge.platform.config import ConfigError
from scaleforge.platform.engine import apply_freeze, build_param_groups, clip_coefficient
from scaleforge.platform.memory import saved_tensor_bytes
from scaleforge.platform.metrics import truncate_jsonl
from scaleforge.platform.recipe import ParallelPlan, ParamGroupRule
from scaleforge.platform.schedule import lr_factor


def test_warmup_then_cosine_to_floor():
    f = [lr_factor(s, "cosine", 10, 110, 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert lr_factor(50, "linear", 0, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(99, "constant", 5, 100, 0.1) == 1.0


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2, bias=False)


def test_param_groups_decay_rules_lr_mult_and_frozen():
    m = Toy()
    apply_freeze(m, ParallelPlan(frozen=("vision",)))
    rules = [ParamGroupRule("projector", prefixes=("proj",), lr_mult=10.0)]
    groups = build_param_groups(m, rules, base_lr=1e-3, base_wd=0.1)
    by = {(g["group_name"], g["weight_decay"]): g for g in groups}
    names = {k: sorted(g["param_names"]) for k, g in by.items()}
    assert names[("projector", 0.1)] == ["proj.weight"] and names[("projector", 0.0)] == ["proj.bias"]
    assert by[("projector", 0.1)]["lr"] == pytest.approx(1e-2)
    assert names[("default", 0.0)] == ["norm.bias", "norm.weight"]
    assert names[("default", 0.1)] == ["head.weight"]
    assert not any(n.startswith("vision") for g in groups for n in g["param_names"])  # frozen: not stepped


def test_freeze_unknown_module_is_clear():
    with pytest.raises(ConfigError, match="frozen module 'visoin' does not exist"):
        apply_freeze(Toy(), ParallelPlan(frozen=("visoin",)))


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"step_{step:08d}"
    p.mkdir(parents=True)
    (p / "trainer.json").write_text("{}")
    if complete:
        (p / COMPLETE).write_text("1")
    return p


def test_find_latest_skips_incomplete_and_stale_pointer(tmp_path):
    _fake_ckpt(tmp_path, 4)
    _fake_ckpt(tmp_path, 8)
    _fake_ckpt(tmp_path, 12, complete=False)
    (tmp_path / "step_00000016.tmp").mkdir()
    (tmp_path / "latest").write_text("step_00000012\n")  # points at an incomplete one: ignored
    assert find_latest(tmp_path).name == "step_00000008"
    run = tmp_path.parent
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(tmp_path / "step_00000012"), run)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), run)
    assert resolve_resume("none", run) is None


def _recorded_ckpt(root: Path, step: int) -> Path:
    """A complete checkpoint whose COMPLETE records its files' sizes and checksums, as a save writes it."""
    from scaleforge.platform.checkpoint import file_records

    p = root / f"step_{step:08d}"
    (p / "rank_state").mkdir(parents=True)
    (p / "trainer.json").write_text("{}")
    (p / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (p / "rank_state" / "rank_00000.pt").write_bytes(b"rng" * 10)
    (p / COMPLETE).write_text(json.dumps({"completed_at": 0.0, "files": file_records(p)}))
    return p


def test_damaged_checkpoint_is_named_and_auto_resume_falls_back(tmp_path):
    from scaleforge.platform.checkpoint import resolve_resume, verify

    root = tmp_path / "checkpoints"
    _recorded_ckpt(root, 4)
    newest = _recorded_ckpt(root, 8)
    (root / "latest").write_text("step_00000008\n")
    assert verify(newest) is None and resolve_resume("auto", tmp_path) == newest
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as a failed copy leaves it
    assert verify(newest) == f"{shard} has 1000 bytes, 16384 when it was saved"
    warnings = []
    assert resolve_resume("auto", tmp_path, warn=warnings.append) == root / "step_00000004"
    assert str(shard) in warnings[0] and "step_00000004" in warnings[1]
    with pytest.raises(CheckpointError, match=r"^--resume .*step_00000008: checkpoint is damaged: .*__0_0.distcp has "
                                              r"1000 bytes, 16384 when it was saved$"):
        resolve_resume(str(newest), tmp_path)
    # same size, other bytes: the checksum catches it; with no intact checkpoint left, auto is an error
    old = root / "step_00000004" / "rank_state" / "rank_00000.pt"
    old.write_bytes(b"RNG" * 10)
    assert "does not match the checksum" in verify(root / "step_00000004")
    with pytest.raises(CheckpointError, match="every complete checkpoint is damaged"):
        resolve_resume("auto", tmp_path, warn=warnings.append)


def test_retention_keeps_last_k_and_every_m(tmp_path):
    mgr = CheckpointManager.__new__(CheckpointManager)
    mgr.root, mgr.cfg = tmp_path, SimpleNamespace(keep_last=2, keep_every=10)
    for s in (5, 10, 15, 20, 25, 30, 35):
        _fake_ckpt(tmp_path, s)
    mgr._retain()
    assert sorted(int(p.name[5:]) for p in tmp_path.glob("step_*")) == [10, 20, 30, 35]


def test_truncate_jsonl_moves_redone_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 11)) + '{"step": 11, "lo')
    assert truncate_jsonl(p, 8) == 3
    assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == list(range(1, 9))
    assert len((tmp_path / "metrics.superseded.jsonl").read_text().splitlines()) == 3


def test_saved_tensor_bytes_counts_activations_not_weights():
    lin = nn.Linear(256, 256, bias=False)
    x = torch.randn(8, 256, requires_grad=True)
    # relu saves its output (8x256 fp32); the linear saves its input x (a leaf input: activation) and
    # the weight (a parameter: not counted)
    got = saved_tensor_bytes(lambda: torch.relu(lin(x)).sum(), params=lin.parameters())
    assert got == 2 * 8 * 256 * 4


def test_clip_coefficient_matches_torch_clip_grad_norm():
    for max_norm in (0.5, 1.0, 100.0):
        p = torch.nn.Parameter(torch.randn(64))
        p.grad = torch.randn(64) * 3
        want = p.grad.clone()
        norm = float(torch.nn.utils.clip_grad_norm_([p], max_norm))
        assert torch.allclose(p.grad, want * clip_coefficient(norm, max_norm), rtol=1e-6, atol=0)
    assert clip_coefficient(5.0, 0.0) == 1.0  # clipping off
    assert clip_coefficient(0.5, 1.0) == 1.0  # under the bound: unchanged


def test_device_step_factor_matches_the_host_rule():
    """The device-side factor and skip flag (fused-optimizer path) equal the host path's
    normalize * clip_coefficient and its finiteness test, for clipped, unclipped and bad steps."""
    from scaleforge.platform.trainer import _device_step_factor

    dp = 2
    for loss_sum, items, grad_sq, max_norm in [(7.5, 300.0, 9e4, 1.0), (7.5, 300.0, 1e-3, 1.0),
                                               (7.5, 300.0, 9e4, 0.0), (float("nan"), 300.0, 9e4, 1.0),
                                               (7.5, 300.0, float("inf"), 1.0), (7.5, 0.0, 9e4, 1.0)]:
        stats = torch.tensor([loss_sum, items, 1.0, 0.0, grad_sq, 3.0], dtype=torch.float64)
        factor, nonfinite = _device_step_factor(stats, dp, max_norm)
        normalize = dp / items if items else math.inf
        norm = math.sqrt(grad_sq) * normalize if math.isfinite(grad_sq) else math.nan
        loss = loss_sum / items if items else math.nan
        host_skip = not (math.isfinite(loss) and math.isfinite(norm))
        assert bool(nonfinite) == host_skip, (loss_sum, items, grad_sq)
        if not host_skip:
            assert float(factor) == pytest.approx(normalize * clip_coefficient(norm, max_norm), rel=1e-15)


def test_trace_summary_reads_the_timeline(tmp_path):
    """benchmarks/trace_summary.py: idle time, NCCL overlapped vs exposed, categories, and the host op
    that launched the kernel ending the longest gap, on a hand-made Chrome trace."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_summary", Path(__file__).parents[2] / "benchmarks" / "trace_summary.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    ev = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 5, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 1000, "dur": 1000, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_ReduceScatter", "ts": 1500, "dur": 1000, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::fill_", "ts": 2000, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 2050, "dur": 5, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel fill", "ts": 4500, "dur": 500, "args": {"correlation": 3}},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    out = ts.summarize(str(path), steps=1)
    # window 1000..5000 = 4 ms; busy 1000..2500 + 4500..5000 = 2 ms; NCCL 1 ms, 0.5 ms under the gemm
    assert "| 4.0 | 2.0 | 2.0 (50.0%) | 1.5 | 1.0 | 0.5 | 0.5 |" in out, out
    assert "| 2000 | 1.5 | vectorized_elementwise_kernel fill | aten::fill_ |" in out, out
    assert "| matmul | 1.0 | 1 |" in out and "| copy/fill | 0.5 | 1 |" in out
    # --callers: fills under two different autograd nodes, grouped by the host operators around the launch
    ev += [
        {"ph": "X", "cat": "cpu_op", "name": "autograd::engine::evaluate_function: SliceBackward0", "ts": 6000, "dur": 300},
        {"ph": "X", "cat": "cpu_op", "name": "aten::zeros", "ts": 6010, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "aten::fill_", "ts": 6020, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 6030, "dur": 5, "args": {"correlation": 4}},
        {"ph": "X", "cat": "kernel", "name": "fill", "ts": 7000, "dur": 250, "args": {"correlation": 4}},
    ]
    path.write_text(json.dumps({"traceEvents": ev}))
    out = ts.callers(str(path), steps=1, pattern="fill_")
    assert "| 0.25 | 1 | aten::fill_ < aten::zeros < autograd::engine::evaluate_function: SliceBackward0 |" in out, out
    assert "| 0.50 | 1 | aten::fill_ |" in out, out
    assert "aten::mm" not in out


def test_gc_control_disables_automatic_gc_and_collects_every_n_steps():
    import gc

    from scaleforge.platform.trainer import _GCControl

    seen = []
    cb = lambda phase, info: seen.append(info["generation"]) if phase == "start" else None  # noqa: E731
    assert gc.isenabled()
    ctl = _GCControl(3)
    try:
        assert not gc.isenabled()
        gc.callbacks.append(cb)
        for step in range(1, 8):
            ctl.before_step(step)
        assert seen == [1, 1]  # steps 3 and 6, generations 0-1
    finally:
        gc.callbacks.remove(cb)
        ctl.close()
    assert gc.isenabled()
    off = _GCControl(0)
    assert gc.isenabled()
    off.close()


def test_device_step_scale_stays_finite_for_huge_finite_norms():
    """A finite norm whose 1/factor overflows fp32 must give a tiny update (the host path's multiply), not
    an inf grad_scale with found_inf=0 (a step on zero gradients)."""
    from scaleforge.platform.trainer import _device_step_factor

    stats = torch.tensor([1.0, 1.0, 1.0, 0.0, 4 * (2e38) ** 2, 0.0], dtype=torch.float64)
    factor, nonfinite = _device_step_factor(stats, 1, 1.0)
    assert not bool(nonfinite)
    grad_scale = factor.reciprocal().clamp(max=torch.finfo(torch.float32).max).float()
    assert torch.isfinite(grad_scale)


@contextlib.contextmanager
def _in_process_world(tmp_path, monkeypatch, name, overrides, env=None):
    """lm_tiny's config for trainer.train in this process as a world of one (gloo); afterwards restores what
    train() sets process-wide (it is meant to own its process) and drops ``env`` again."""
    import gc
    import signal

    import torch.distributed as dist

    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import load_config
    from scaleforge.platform.dist import _free_port

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0", **(env or {})).items():
        monkeypatch.setenv(k, v)
    cfg = load_config("lm_tiny.yaml", ["trainer.global_batch_size=4", "metrics.wandb.mode=disabled",
                                       "metrics.progress_bar=false", "metrics.plot=false", "checkpoint.interval=0",
                                       f"run.output_dir={tmp_path}", f"run.name={name}", *overrides],
                      recipe_config=recipe_config_class)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield cfg
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.enable()
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        for s, h in handlers.items():
            signal.signal(s, h)
        for k in (env or {}):
            monkeypatch.delenv(k)


def test_gc_control_is_restored_when_training_fails(tmp_path, monkeypatch):
    import gc

    from scaleforge.models import get_recipe_class
    from scaleforge.platform import trainer

    with _in_process_world(tmp_path, monkeypatch, "g", ["trainer.max_steps=3", "trainer.max_nonfinite_steps=2",
                                                        "trainer.gc_interval=1"],
                           env={"SCALEFORGE_FAULT_NAN_STEPS": "1,2"}) as cfg:
        with pytest.raises(trainer.TrainingError, match="stopping at step 2"):
            trainer.train(cfg, get_recipe_class("llm"))
        assert gc.isenabled()


def _train_in_process(tmp_path, monkeypatch, name, overrides, env=None):
    """trainer.train in this process as a world of one; its summary and metrics records."""
    from scaleforge.models import get_recipe_class
    from scaleforge.platform import trainer

    with _in_process_world(tmp_path, monkeypatch, name, overrides, env) as cfg:
        summary = trainer.train(cfg, get_recipe_class("llm"))
    recs = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, recs


def test_deferred_stats_same_run_and_stop_one_step_later(tmp_path, monkeypatch):
    """trainer.deferred_stats (the default with the fused optimizer): the host reads step N's statistics
    after step N+1 is enqueued. The run is the same as with immediate reads (losses, norms, skips, LRs;
    a NaN step included); a stop request seen at step 3 checkpoints step 4 (immediate reads: step 3), and
    resuming from it reproduces the uninterrupted losses bit for bit."""
    keys = ("step", "loss", "grad_norm", "lr", "skipped")
    nan = {"SCALEFORGE_FAULT_NAN_STEPS": "2"}
    _, ref = _train_in_process(tmp_path, monkeypatch, "ref", ["trainer.max_steps=6", "trainer.deferred_stats=false"],
                               env=nan)
    assert [r["skipped"] for r in ref] == [False, True, False, False, False, False]
    term = {"SCALEFORGE_FAULT_SIGTERM_STEPS": "3", **nan}
    summary, recs = _train_in_process(tmp_path, monkeypatch, "d", ["trainer.max_steps=6"], env=term)
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 4
    assert (tmp_path / "d" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    summary, _ = _train_in_process(tmp_path, monkeypatch, "i", ["trainer.max_steps=6", "trainer.deferred_stats=false"],
                                   env=term)
    assert summary["step"] == 3
    summary, recs = _train_in_process(tmp_path, monkeypatch, "d", ["trainer.max_steps=6"])
    assert summary["step"] == 6 and summary["stopped_by"] is None
    assert [tuple(r[k] for k in keys) for r in recs] == [tuple(r[k] for k in keys) for r in ref]


def test_statistics_are_read_once_per_step(tmp_path, monkeypatch):
    """Each step's statistics reach the host exactly once, on the deferred device path (fused AdamW) and on
    the host path (foreach AdamW: read before the update), and every step is recorded once, in order."""
    from scaleforge.platform import trainer

    reads = []
    read = trainer._PendingStats.read
    monkeypatch.setattr(trainer._PendingStats, "read", lambda self: (reads.append(self.step), read(self))[1])
    for name, fused in (("dev", "true"), ("host", "false")):
        reads.clear()
        _, recs = _train_in_process(tmp_path, monkeypatch, name, ["trainer.max_steps=5", "checkpoint.interval=3",
                                                                  f"optim.fused={fused}"])
        assert reads == [1, 2, 3, 4, 5], (name, reads)
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
        assert all(r["step_time_s"] > 0 for r in recs)


def test_launch_config_options_are_passed_only_where_torch_has_them():
    """torch 2.11 (the GPU clusters' build) has no LaunchConfig.shutdown_timeout: passing it failed every launch."""
    from dataclasses import dataclass

    from torch.distributed.launcher.api import LaunchConfig

    from scaleforge.launch.cli import _supported

    @dataclass
    class OlderLaunchConfig:
        nproc_per_node: int = 1

    options = dict(shutdown_timeout=60, signals_to_handle="SIGTERM")
    assert _supported(OlderLaunchConfig, options) == {}
    kept = _supported(LaunchConfig, options)
    assert set(kept) == set(options) & set(LaunchConfig.__dataclass_fields__) and kept.get("shutdown_timeout", 60) == 60


def test_ema_update_skips_on_the_device_flag():
    """ShardedEMA.update(found_inf): the step the optimizer skipped (flag 1, parameters possibly already
    poisoned elsewhere) leaves the EMA as it was; flag 0 is the plain update."""
    import torch

    from scaleforge.platform.ema import ShardedEMA

    model = torch.nn.Linear(3, 2)
    ema, ref = ShardedEMA(model, 0.9), ShardedEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = [s.clone() for s in ema.shadow]
    ema.update(torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before))
    ema.update(torch.tensor(0.0))
    ref.update()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(ema.shadow, ref.shadow))
    assert not all(torch.equal(a, b) for a, b in zip(ema.shadow, before))
