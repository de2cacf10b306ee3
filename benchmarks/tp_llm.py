"""Tensor parallelism of the LM and of NVILA's LLM against tp = 1, through the real launcher.

    python benchmarks/tp_llm.py --check          # 2 GPUs: tp=2 losses vs tp=1 over 20 steps (bf16)
    python benchmarks/tp_llm.py --bench          # 2 GPUs: lm_1b tokens/s, tp=2 vs FSDP2 alone
    python benchmarks/tp_llm.py --check --smoke  # CPU: the same check in fp32, 3 steps (gloo, torch.distributed layers)
    python benchmarks/tp_llm.py --check --bench --dry-run --layers 4   # launch --dry-run of every run only

--check: the tiny LM (bf16, synthetic tokens) for 20 steps at tp=2 on 2 GPUs and at tp=1 on 1 GPU with
the same global batch, micro-batch and accumulation, so both read the same tokens and start from the same
weights (the engine initializes the full model and keeps each rank's slices); per-step losses must agree
within bf16 tolerance (relative 2e-2; tp=2 sums partial matmuls in another order and reduces in bf16).
Rows: tp=2 with megatron-core's layers (model.kernels=torch), tp=2 with model.kernels=triton (our
RMSNorm and SwiGLU kernels on the sequence / feature slices; the loss through the vocabulary-parallel head
instead of the fused linear + cross-entropy) and tp=2 with parallel.compile=true (each block of megatron
layers compiled), all against the same tp=1 run; and NVILA (nvila_tiny, micro-batch 2) at tp=2 against tp=1:
the LLM split, the vision tower and projector replicated over tp. On CPU (--smoke) tp=2 runs
on the torch.distributed equivalents of megatron's layers, in fp32 (tolerance 1e-4).
--bench: lm_1b (seq 2048, bf16) on 2 GPUs, FSDP2 over 2 ranks against tp=2 (FSDP2 over 1 rank), eager and
compiled, same global batch; medians over the steps after warm-up; ``--layers N``
cuts lm_1b to N blocks.
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


DRY_RUN = False  # --dry-run: every run is ``launch --dry-run`` (config, tp arithmetic and plan checked)


def run(config: str, nproc: int, overrides: list[str]) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="sf_tp_"))
    try:
        cmd = [sys.executable, "-m", "scaleforge.launch.cli", "--config", config, "--nproc", str(nproc),
               *COMMON, f"run.output_dir={out}", *overrides, *(["--dry-run"] if DRY_RUN else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # one failing run must not hide the others
            print(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}", flush=True)
            return None
        if DRY_RUN:
            print(f"dry-run ok: {config} --nproc {nproc} {' '.join(overrides)}")
            return []
        return [json.loads(line) for line in (out / "tp" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check(smoke: bool, steps: int) -> bool:
    precision = "parallel.mixed_precision=" + ("fp32" if smoke else "bf16")
    tolerance = 1e-4 if smoke else 2e-2
    lm = [f"trainer.max_steps={steps}", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", precision,
          "model.seq_len=128"]
    legs = {"tp=2": ("lm_tiny.yaml", lm, ["parallel.tp=2"])}
    if not smoke:  # the triton kernels run on GPUs only; compiling on CPU takes minutes
        legs["tp=2 triton"] = ("lm_tiny.yaml", lm, ["parallel.tp=2", "model.kernels=triton"])
        legs["tp=2 compiled"] = ("lm_tiny.yaml", lm, ["parallel.tp=2", "parallel.compile=true"])
    nvila = [f"trainer.max_steps={steps}", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", precision]
    legs["nvila tp=2"] = ("nvila_tiny.yaml", nvila, ["parallel.tp=2"])
    refs = {cfg: run(cfg, 1, base + ["parallel.tp=1"]) for cfg, base, _ in legs.values()}
    rows = {name: run(cfg, 2, base + extra) for name, (cfg, base, extra) in legs.items()}
    if DRY_RUN:
        return all(r is not None for r in (*refs.values(), *rows.values()))
    failed = [name for name, r in rows.items() if r is None or refs[legs[name][0]] is None]
    worst = 0.0
    for cfg, ref in refs.items():
        mine = {name: r for name, r in rows.items() if legs[name][0] == cfg and name not in failed}
        if not mine:
            continue
        print(f"{cfg}: per-step loss at tp=1 (1 process) and tp=2 (2 processes), same global batch")
        print(f"{'step':>4} {'loss tp=1':>10} " + " ".join(f"{name:>14} {'rel diff':>9}" for name in mine))
        for i, a in enumerate(ref):
            line = f"{a['step']:>4} {a['loss']:>10.5f}"
            for recs in mine.values():
                b = recs[i]
                rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
                worst = max(worst, rel)
                line += f" {b['loss']:>14.5f} {rel:>9.2e}"
            print(line)
    ok = not failed and all(len(r) == steps for r in (*refs.values(), *rows.values())) and worst < tolerance
    print(f"worst relative difference {worst:.2e}: {'PASS' if ok else 'FAIL'} (tolerance {tolerance:g})"
          + (f"; failed to run: {', '.join(failed)}" if failed else ""))
    return ok


def bench(steps: int, warmup: int, mbs: int, global_batch: int, layers: int | None) -> None:
    base = [f"trainer.max_steps={steps}", f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={global_batch}",
            *([f"model.n_layers={layers}"] if layers else [])]
    print(f"lm_1b{f' cut to {layers} layers' if layers else ''}, 2 GPUs, global batch {global_batch} x 2048 tokens, micro-batch {mbs}, "
          f"medians of steps {warmup + 1}..{steps}")
    print(f"{'layout':<22} {'tokens/s/device':>16} {'step s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name, tp, compiled in (("FSDP2 dp=2", 1, "false"), ("tp=2 (FSDP2 dp=1)", 2, "false"),
                               ("FSDP2 dp=2, compiled", 1, "true"), ("tp=2, compiled", 2, "true")):
        recs = run("lm_1b.yaml", 2, base + [f"parallel.tp={tp}", f"parallel.compile={compiled}"])
        if recs is None:
            print(f"{name:<22} failed (above)", flush=True)
        if DRY_RUN or recs is None:
            continue
        recs = recs[warmup:]
        med = lambda k: statistics.median(r[k] for r in recs if k in r) if any(k in r for r in recs) else float("nan")
        print(f"{name:<22} {med('tokens_per_s_per_device'):>16.0f} {med('step_time_s'):>8.3f} "
              f"{med('mfu'):>6.3f} {med('mem_peak_gib'):>9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU: --check in fp32 for 3 steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bench-steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="--bench: lm_1b cut to this many blocks")
    ap.add_argument("--dry-run", action="store_true", help="launch --dry-run of every run instead of training")
    args = ap.parse_args()
    global DRY_RUN
    DRY_RUN = args.dry_run
    ok = True
    if args.check or not args.bench:
        ok = check(args.smoke, 3 if args.smoke else args.steps)
    if args.bench:
        bench(args.bench_steps, args.warmup, args.micro_batch, args.global_batch, args.layers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
