"""SANA training throughput through the real launcher: images/s/GPU, MFU and peak memory of `launch` runs.

    python benchmarks/sana_train.py --nproc 1 --micro-batch 8 --compile on --ac full none --kernels torch triton
    python benchmarks/sana_train.py --config sana_tiny.yaml --steps 3 --warmup 1 --micro-batch 2   # CPU smoke run
    python benchmarks/sana_train.py --nproc 2 --kernels torch triton --dry-run   # launch --dry-run of each row only

Every configuration is one `launch --config sana_1.6b.yaml` run (SANA-1.6B at 1024 px unless overridden: CAME-8bit,
bf16 FSDP2, QK-norm, fp32 linear attention), on the recipe's synthetic latents and text embeddings (``data.kind=
synthetic``: the same shapes as the precomputed shards, no VAE or text encoder in the step), through
``benchmarks/lm_train.py``'s runner: medians over the steps after warm-up, MFU by the recipe's written-down FLOPs
formula (scaleforge/models/sana/recipe.py: per block 27NC^2 + 4LC^2 + 4NLC + 4NC(d+1) + 90NC, plus embeddings and
the final layer, x3 for forward + backward) against 989 TFLOP/s, peak memory from the trainer's metrics, and the
`launch --dry-run` estimate beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_train import dry_run_one, run_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sana_1.6b.yaml")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--compile", nargs="+", default=["on"], choices=["off", "on"])
    ap.add_argument("--ac", nargs="+", default=["full"], choices=["none", "full"], help="activation checkpointing")
    ap.add_argument("--kernels", nargs="+", default=["triton"], choices=["torch", "triton"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--profile-to", help="also profile two steps after the measured ones; trace and tables go here "
                    "(then: python benchmarks/trace_summary.py DIR/trace_rank0_*.json --steps 2)")
    ap.add_argument("--dry-run", action="store_true", help="launch --dry-run of every row instead of training")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args()
    base = ["data.kind=synthetic", "data.sources=[]", "data.num_workers=0", "model.encode_online=false",
            "optim.warmup_steps=0"]
    print(f"config {args.config}, {args.nproc} GPU(s), micro-batch {args.micro_batch}")
    print("| kernels | AC | compile | step (s) | images/s/GPU | MFU | peak mem (GiB) | dry-run estimate (GiB) | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for kernels in args.kernels:
        for ac in args.ac:
            for c in args.compile:
                extra = [*base, f"model.kernels={kernels}", f"parallel.activation_checkpointing={ac}", *args.overrides]
                if args.dry_run:
                    r = dry_run_one(args.config, args.nproc, c == "on", args.steps, args.micro_batch, extra)
                    print(f"| {kernels} | {ac} | {c} | dry-run: " + (f"FAILED {r['error'].strip().splitlines()[-1]}"
                          if "error" in r else f"ok, {r['estimate']} GiB/device") + " ||||||", flush=True)
                    failed = failed or "error" in r
                    continue
                r = run_one(args.config, args.nproc, c == "on", args.steps, args.warmup, args.micro_batch, extra,
                            profile_to=args.profile_to and f"{args.profile_to}/{kernels}_{ac}_{c}")
                if "error" in r:
                    print(f"| {kernels} | {ac} | {c} | failed: {r['error'][-300:]!r} ||||||", flush=True)
                    continue
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                print(f"| {kernels} | {ac} | {c} | {r['step_time_s']:.3f} | {args.micro_batch / r['step_time_s']:.2f} | "
                      f"{mfu} | {r['mem_peak_gib']:.1f} | {r['estimate_gib']:.1f} | {r['final_loss']:.4f} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
