"""Host-side costs of the train loop, in one process (world size 1, gloo/CPU or one GPU): Python GC
collections during training and the host time from the step's synchronization to the first launch of the
next step (docs/benchmarks.md, "Where the step time goes").

    OMP_NUM_THREADS=1 python benchmarks/host_step_probe.py [overrides...]

Defaults: lm_tiny with 16 layers, micro-batch 2, 30 steps. Prints, per GC generation, the collections
and their total and longest pause over the whole run (model building included, so compare runs with and
without ``trainer.gc_interval=N``), and the median / max of sync -> next step start over steps 6+.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from collections import defaultdict

import torch

DEFAULTS = ["trainer.max_steps=30", "model.n_layers=16", "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
            "metrics.wandb.mode=disabled", "metrics.progress_bar=false", "metrics.plot=false",
            "checkpoint.interval=0", "checkpoint.save_final=false", "run.output_dir=/tmp/host_step_probe",
            "run.name=probe"]


def main() -> None:
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform import trainer
    from scaleforge.platform.config import load_config
    from scaleforge.platform.dist import _free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    pauses: dict[int, list[float]] = defaultdict(list)
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started["t"])

    # step boundaries: the stats read (.tolist(), the step's one sync) and the next step's first tensor
    # (the float64 zeros of its statistics)
    marks: list[tuple[str, float]] = []
    tolist, zeros = torch.Tensor.tolist, torch.zeros

    def timed_tolist(self):
        out = tolist(self)
        marks.append(("sync", time.perf_counter()))
        return out

    def timed_zeros(*a, **k):
        if a == ((),) and k.get("dtype") is torch.float64:
            marks.append(("start", time.perf_counter()))
        return zeros(*a, **k)

    cfg = load_config("lm_tiny.yaml", DEFAULTS + sys.argv[1:], recipe_config=recipe_config_class)
    gc.callbacks.append(on_gc)
    torch.Tensor.tolist, torch.zeros = timed_tolist, timed_zeros
    try:
        trainer.train(cfg, get_recipe_class("llm"))
    finally:
        torch.Tensor.tolist, torch.zeros = tolist, zeros
        gc.callbacks.remove(on_gc)
    steps = cfg.trainer.max_steps
    for gen, p in sorted(pauses.items()):
        print(f"GC generation {gen}: {len(p)} collections over the run ({steps} steps), total {1e3 * sum(p):.1f} ms, "
              f"longest {1e3 * max(p):.2f} ms")
    gaps = [1e3 * (tb - ta) for (a, ta), (b, tb) in zip(marks, marks[1:]) if a == "sync" and b == "start"][5:]
    if gaps:
        print(f"sync -> next step start: median {sorted(gaps)[len(gaps) // 2]:.2f} ms, max {max(gaps):.2f} ms "
              f"(steps 6-{steps})")


if __name__ == "__main__":
    main()
