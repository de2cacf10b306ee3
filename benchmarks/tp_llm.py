"""Megatron-core tensor parallelism of the LM against tp = 1, through the real launcher.

    python benchmarks/tp_llm.py --check          # 2 GPUs: tp=2 losses vs tp=1 over 20 steps (bf16)
    python benchmarks/tp_llm.py --bench          # 2 GPUs: lm_1b tokens/s, tp=2 vs FSDP2 alone
    python benchmarks/tp_llm.py --check --smoke  # CPU: the tp=1 leg only (tp > 1 needs CUDA)

--check: the tiny LM (bf16, synthetic tokens) for 20 steps at tp=2 on 2 GPUs and at tp=1 on 1 GPU with
the same global batch, micro-batch and accumulation, so both read the same tokens and start from the same
weights (the engine initializes the full model and keeps each rank's slices); per-step losses must agree
within bf16 tolerance (relative 2e-2; tp=2 sums partial matmuls in another order and reduces in bf16).
--bench: lm_1b (seq 2048, bf16, eager: megatron's layers are not compiled) on 2 GPUs, FSDP2 over 2 ranks
against tp=2 (FSDP2 over 1 rank), same global batch; medians over the steps after warm-up.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = ["metrics.wandb.mode=disabled", "metrics.plot=false", "metrics.progress_bar=false",
          "checkpoint.interval=0", "checkpoint.save_final=false", "run.name=tp"]


def run(config: str, nproc: int, overrides: list[str]) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="sf_tp_"))
    try:
        cmd = [sys.executable, "-m", "scaleforge.launch.cli", "--config", config, "--nproc", str(nproc),
               *COMMON, f"run.output_dir={out}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(line) for line in (out / "tp" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check(smoke: bool, steps: int) -> bool:
    base = [f"trainer.max_steps={steps}", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
            "parallel.mixed_precision=bf16" if not smoke else "parallel.mixed_precision=fp32",
            "model.seq_len=128"]
    ref = run("lm_tiny.yaml", 1, base + ["parallel.tp=1"])
    if smoke:
        print(f"tp=1 ran {len(ref)} steps, loss {ref[0]['loss']:.4f} -> {ref[-1]['loss']:.4f} (tp=2 needs CUDA)")
        return True
    tp2 = run("lm_tiny.yaml", 2, base + ["parallel.tp=2"])
    print(f"{'step':>4} {'loss tp=1':>10} {'loss tp=2':>10} {'rel diff':>9}")
    worst = 0.0
    for a, b in zip(ref, tp2):
        rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        worst = max(worst, rel)
        print(f"{a['step']:>4} {a['loss']:>10.5f} {b['loss']:>10.5f} {rel:>9.2e}")
    ok = len(ref) == len(tp2) == steps and worst < 2e-2
    print(f"worst relative difference {worst:.2e}: {'PASS' if ok else 'FAIL'} (tolerance 2e-2)")
    return ok


def bench(steps: int, warmup: int, mbs: int, global_batch: int) -> None:
    base = [f"trainer.max_steps={steps}", f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={global_batch}", "parallel.compile=false"]
    print(f"lm_1b, 2 GPUs, global batch {global_batch} x 2048 tokens, micro-batch {mbs}, eager, "
          f"medians of steps {warmup + 1}..{steps}")
    print(f"{'layout':<22} {'tokens/s/device':>16} {'step s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name, tp in (("FSDP2 dp=2", 1), ("tp=2 (FSDP2 dp=1)", 2)):
        recs = run("lm_1b.yaml", 2, base + [f"parallel.tp={tp}"])[warmup:]
        med = lambda k: statistics.median(r[k] for r in recs if k in r) if any(k in r for r in recs) else float("nan")
        print(f"{name:<22} {med('tokens_per_s_per_device'):>16.0f} {med('step_time_s'):>8.3f} "
              f"{med('mfu'):>6.3f} {med('mem_peak_gib'):>9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU: tp=1 leg of --check only, 2 steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bench-steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    args = ap.parse_args()
    ok = True
    if args.check or not args.bench:
        ok = check(args.smoke, 2 if args.smoke else args.steps)
    if args.bench:
        bench(args.bench_steps, args.warmup, args.micro_batch, args.global_batch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
