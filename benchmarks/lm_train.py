"""Training throughput of the dense LM through the real launcher: tokens/s/device, MFU, peak memory,
and the dry-run memory estimate beside the measured peak.

    python benchmarks/lm_train.py --config lm_1b.yaml --nproc 1 2 --compile off on --steps 30
    python benchmarks/lm_train.py --config lm_1b.yaml --engine fsdp2 zero2 zero3   # the two engines
    python benchmarks/lm_train.py --config lm_1b.yaml --nproc 4 --dry-run          # launch --dry-run of each row only

Each configuration is a real `launch` run (FSDP2 or DeepSpeed ZeRO-1/2/3 by ``--engine``, bf16,
synthetic tokens), one after another on the same machine; figures are medians over
the steps after warm-up (compile and allocator warm-up excluded). Samples/s/GPU and, for recipes that log
it (NVILA), visual tokens per sample come from the same records. ``--dry-run`` runs ``launch --dry-run``
for every row instead (the config, overrides and plan checked on any machine, CPU included). MFU uses the recipe's FLOPs formula
(6*N*S + 12*L*H*d_head*S^2 per sample) against 989 TFLOP/s (H100/H200 BF16 dense).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def estimate_gib(config: str, nproc: int, overrides: list[str]) -> float:
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config
    from scaleforge.platform.plan import make_plan

    cfg = load_config(config, overrides, recipe_config=recipe_config_class)
    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    return make_plan(cfg, derive_layout(cfg, nproc), recipe).memory["total"]


ENGINES = {"fsdp2": ["parallel.engine=fsdp2"],
           **{f"zero{k}": ["parallel.engine=deepspeed", f"parallel.deepspeed.zero_stage={k}"] for k in (1, 2, 3)}}


def launch_overrides(out: Path, nproc: int, compile_: bool, steps: int, mbs: int, extra: list[str],
                     engine: str) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={mbs * nproc}", f"parallel.compile={str(compile_).lower()}",
            "metrics.wandb.mode=disabled", "metrics.plot=false", "metrics.progress_bar=false",
            "checkpoint.interval=0", "checkpoint.save_final=false", f"run.output_dir={out}",
            "run.name=bench", *ENGINES[engine], *extra]


def dry_run_one(config: str, nproc: int, compile_: bool, steps: int, mbs: int, extra: list[str],
                engine: str = "fsdp2") -> dict:
    """``launch --dry-run`` of one row: the config, the overrides, the layout and the plan's checks."""
    with tempfile.TemporaryDirectory(prefix="sf_bench_") as out:
        overrides = launch_overrides(Path(out), nproc, compile_, steps, mbs, extra, engine)
        cmd = [sys.executable, "-m", "scaleforge.launch.cli", "--config", config, "--nproc", str(nproc),
               "--resume", "none", "--dry-run", *overrides]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"nproc": nproc, "compile": compile_, "engine": engine, "error": (r.stderr or r.stdout)[-2000:]}
    est = re.search(r"memory / device\s+([\d.]+) GiB", r.stdout)
    return {"nproc": nproc, "compile": compile_, "engine": engine, "estimate": est.group(1) if est else "n/a"}


def run_one(config: str, nproc: int, compile_: bool, steps: int, warmup: int, mbs: int, extra: list[str],
            engine: str = "fsdp2", profile_to: str | None = None) -> dict:
    """One launch run -> its figures. ``profile_to``: torch.profiler over two extra steps after the measured ones
    (their times left out), whose trace and operator tables are copied into that folder."""
    out = Path(tempfile.mkdtemp(prefix="sf_bench_"))
    if profile_to:
        extra = [*extra, f"metrics.profile_start_step={steps + 1}", "metrics.profile_steps=2"]
        steps += 2
    overrides = launch_overrides(out, nproc, compile_, steps, mbs, extra, engine)
    cmd = [sys.executable, "-m", "scaleforge.launch.cli", "--config", config, "--nproc", str(nproc),
           "--resume", "none", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"nproc": nproc, "compile": compile_, "engine": engine, "error": (r.stderr or r.stdout)[-2000:]}
    recs = [json.loads(l) for l in (out / "bench" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steady = recs[warmup:len(recs) - 2] if profile_to else recs[warmup:]
    res = {
        "nproc": nproc, "compile": compile_, "engine": engine, "steps": len(recs),
        "tokens_per_s_per_device": statistics.median(r.get("tokens_per_s_per_device", 0.0) for r in steady),
        "samples_per_s_per_device": statistics.median(r["samples_per_s"] for r in steady) / nproc,
        "visual_tokens_per_sample": (statistics.median(r["visual_tokens_per_sample"] for r in steady)
                                     if "visual_tokens_per_sample" in steady[0] else None),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "sync_wait_s": statistics.median(r.get("sync_wait_s", float("nan")) for r in steady),
        # the spread within a run: the GPU machines here vary by up to +-30% between runs of the same code
        "step_time_min_s": min(r["step_time_s"] for r in steady),
        "step_time_p90_s": sorted(r["step_time_s"] for r in steady)[int(0.9 * (len(steady) - 1))],
        "step_times_s": [round(r["step_time_s"], 5) for r in steady],
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
        "mem_peak_gib": max(r.get("mem_peak_gib", 0.0) for r in recs),
        "estimate_gib": estimate_gib(config, nproc, overrides),
        "final_loss": recs[-1]["loss"],
    }
    if profile_to:
        shutil.copytree(out / "bench" / "profile", profile_to, dirs_exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="lm_1b.yaml")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--engine", nargs="+", default=["fsdp2"], choices=sorted(ENGINES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="launch --dry-run of every row instead of training")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = [(e, n, c) for e in args.engine for n in args.nproc for c in args.compile]
    if args.dry_run:
        failed = 0
        for e, n, c in rows:
            r = dry_run_one(args.config, n, c == "on", args.steps, args.micro_batch, args.overrides, e)
            failed += "error" in r
            print(f"dry-run {args.config} {e} nproc={n} compile={c}: "
                  + (f"FAILED {r['error'].strip().splitlines()[-1]}" if "error" in r else f"ok, {r['estimate']} GiB/device"),
                  flush=True)
        sys.exit(1 if failed else 0)
    results = []
    print("| engine | GPUs | compile | tokens/s/GPU | samples/s/GPU | visual tokens/sample | MFU | step (s) | "
          "step min / p90 (s) | host wait at sync (ms) | peak mem (GiB) | dry-run estimate (GiB) | est./peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e, n, c in rows:
        r = run_one(args.config, n, c == "on", args.steps, args.warmup, args.micro_batch, args.overrides, e)
        results.append(r)
        if "error" in r:
            print(f"| {e} | {n} | {c} | failed: {r['error'][-300:]!r} |", flush=True)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = r["estimate_gib"] / r["mem_peak_gib"] if r["mem_peak_gib"] else float("nan")
        vis = f"{r['visual_tokens_per_sample']:,.0f}" if r["visual_tokens_per_sample"] is not None else "n/a"
        print(f"| {e} | {n} | {c} | {r['tokens_per_s_per_device']:,.0f} | {r['samples_per_s_per_device']:.2f} | {vis} | "
              f"{mfu} | {r['step_time_s']:.3f} | "
              f"{r['step_time_min_s']:.3f} / {r['step_time_p90_s']:.3f} | "
              f"{1e3 * r['sync_wait_s']:.1f} | {r['mem_peak_gib']:.1f} | {r['estimate_gib']:.1f} | "
              f"{ratio:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
