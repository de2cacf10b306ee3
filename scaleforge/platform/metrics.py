"""Metrics on rank 0: ``metrics.jsonl`` (one object per optimizer step), a rich progress bar (plain
lines when the output is not a terminal), wandb (offline by default) and a PNG plot at the end."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

#: BF16 dense peak used for MFU (reference convention: 989 TFLOP/s for H100/H200 SXM).
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def truncate_jsonl(path: Path, last_step: int) -> int:
    """On resume, move records of steps after the resumed checkpoint (they will be redone) to
    ``metrics.superseded.jsonl``, so ``metrics.jsonl`` holds each step once. Returns how many moved."""
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            drop.append(line)
            continue
        (keep if rec.get("step", 0) <= last_step else drop).append(line)
    if drop:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.write("\n".join(drop) + "\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, path)
    return len(drop)


class MetricsLogger:
    def __init__(self, run_dir: Path, metrics_cfg, job_cfg_dict: dict, max_steps: int, start_step: int,
                 enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.cfg = metrics_cfg
        self.max_steps = max_steps
        self._jsonl = None
        self._progress = None
        self._task = None
        self._wandb = None
        if not enabled:
            return
        if metrics_cfg.jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if metrics_cfg.progress_bar and sys.stdout.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._progress.start()
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step, info="")
        if metrics_cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=metrics_cfg.wandb.project, entity=metrics_cfg.wandb.entity,
                                     mode=metrics_cfg.wandb.mode, dir=str(run_dir), name=run_dir.name,
                                     config=job_cfg_dict, resume="allow", id=_wandb_id(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record.get('samples_per_s', 0):.1f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        else:
            print(f"step {record['step']}/{self.max_steps} {info}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if plot and self.cfg.plot:
            try:
                out = plot_run(self.run_dir)
                print(f"plot: {out}", flush=True)
            except Exception as e:  # a plot must never fail a finished run
                print(f"warning: could not draw the plot: {e}", flush=True)


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed or requeued job continues the same run."""
    p = run_dir / ".wandb_id"
    if not p.exists():
        import uuid

        p.write_text(uuid.uuid4().hex[:12])
    return p.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def plot_run(run_dir: Path | str) -> Path:
    """``<run_dir>/metrics.png``: loss, learning rate and throughput per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty")
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] if r["loss"] is not None and math.isfinite(r["loss"]) else float("nan")
                         for r in recs])
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["lr"] for r in recs])
    axes[1].set_title("learning rate")
    key = "tokens_per_s" if "tokens_per_s" in recs[-1] else "samples_per_s"
    axes[2].plot(steps, [r.get(key, float("nan")) for r in recs])
    axes[2].set_title(key.replace("_", " "))
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
