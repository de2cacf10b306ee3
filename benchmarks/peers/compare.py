"""Ours against the peers, one after another on one machine, in one table.

    python benchmarks/peers/compare.py --nproc 1 --steps 30 --warmup 10          # one GPU, ~5 min
    python benchmarks/peers/compare.py --smoke                                   # CPU, tiny dims
    python benchmarks/peers/compare.py --nproc 2 --layers 4 --steps 12 --warmup 4  # every row cut to 4 blocks

Rows (every one a separate process, so each starts from a cold allocator):
- ``ours``: ``launch --config lm_1b.yaml`` through ``benchmarks/lm_train.py`` (compiled), the reference row, and
  the same with ``model.kernels=triton`` (the chunked linear + cross-entropy; inside the compiled blocks the
  norms and SwiGLU are Inductor's); then ours as a demanding user sets it up for one GPU (``TUNED``): the whole
  model as one FSDP group kept unsharded between forward and backward (one rank has nothing to overlap or to
  free), and the micro-batch the fused loss makes room for (``--tuned-micro-batch``, 8 and 16: the logits of 16 x
  2048 tokens would take 6 GiB in bf16 and their fp32 loss copy twice that);
- ``naive FSDP2, GPT 0.94B`` eager and compiled, ``naive FSDP2, Llama (lm_1b dims)`` compiled (also at the
  tuned rows' largest micro-batch: the same-batch comparison) and ``our model in the naive loop`` (+ ``torchao
  float8``): ``benchmarks/peers/naive_fsdp2.py``;
- ``torchtitan``: torchtitan's own trainer on lm_1b's model: 0.2.2 (``benchmarks/peers/torchtitan022_lm_1b.py``,
  the release that runs on torch 2.11) and 0.3.0 (``benchmarks/peers/torchtitan_lm_1b.py``, newer torch only);
  one process holds one of them, so each row runs where its version is the importable one.

Columns: tokens/s/GPU, MFU against 989 TFLOP/s and against the bf16 matmul ceiling measured at the start
(8192^3), peak memory, and two ratios to ours: tokens/s (same model rows) and FLOP rate (MFU; the GPT row
has ~5% fewer FLOPs per token than lm_1b). A row that fails prints its reason and the table goes on. The last
lines set the best row of ours against the targets: >= 1.15x the compiled naive GPT script's FLOP rate and
>= 1.0x torchtitan's tokens/s on the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from flops import mfu  # noqa: E402


def matmul_ceiling_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def _run(cmd: list[str], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return r.returncode, r.stdout + r.stderr


def run_ours(args, overrides: list[str], micro_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ours.json"
        config = "lm_tiny.yaml" if args.smoke else "lm_1b.yaml"
        cmd = [sys.executable, str(ROOT / "benchmarks/lm_train.py"), "--config", config, "--nproc", str(args.nproc),
               "--compile", "off" if args.smoke else "on", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--micro-batch", str(micro_batch), "--json", str(out), *overrides, *_ours_layers(args)]
        rc, log = _run(cmd, args.timeout)
        if rc != 0 or not out.exists():
            return {"error": log[-400:]}
        r = json.loads(out.read_text())[0]
    if "error" in r:
        return {"error": r["error"][-400:]}
    tps = r["tokens_per_s_per_device"]
    return {"tokens_per_s_per_gpu": tps, "mfu": mfu(tps, recipe_flops_per_token(config, _ours_layers(args))),
            "peak_mem_gib": r["mem_peak_gib"]}


def _ours_layers(args) -> list[str]:
    return [f"model.n_layers={args.layers}"] if args.layers else []


def recipe_flops_per_token(config: str, overrides: list[str] = ()) -> float:
    """The llm recipe's formula (the one of flops.py) for the config's model."""
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import load_config

    cfg = load_config(config, list(overrides), recipe_config=recipe_config_class)
    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    return recipe.flops_per_sample() / recipe.cfg.seq_len


def run_script(args, script: str, extra: list[str], micro_batch: int) -> dict:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd = [*torchrun, str(HERE / script), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--micro-batch", str(micro_batch), *(["--tiny"] if args.smoke else []), *extra,
           *(["--layers", str(args.layers)] if args.layers else [])]
    rc, log = _run(cmd, args.timeout)
    for line in log.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if rc:  # the failure's own lines, not torchrun's summary banner
        print("\n".join(log.strip().splitlines()[-40:]), file=sys.stderr, flush=True)
    return {"error": _error_line(log) if rc else "no RESULT line"}


def _error_line(log: str) -> str:
    """The last exception line of a failed run (torchrun ends with a '====' banner and a summary)."""
    lines = [l.strip() for l in log.strip().splitlines() if l.strip()]
    raised = [l for l in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", l) and "ChildFailedError" not in l]
    plain = [l for l in lines if l.strip("=-* ")]
    return ((raised or plain or ["no output"])[-1])[-400:]


#: ours on one GPU as a demanding user runs it: fused linear + CE, one FSDP group, no reshard after forward
TUNED = ["model.kernels=triton", "parallel.fsdp_group_size=32", "parallel.reshard_after_forward=false"]
#: (name, script or "ours", arguments, micro-batch: None = --micro-batch, "tuned:i" = the i-th --tuned-micro-batch)
ROWS = [
    ("ours: launch lm_1b (compiled)", "ours", [], None),
    ("ours: launch lm_1b, model.kernels=triton", "ours", ["model.kernels=triton"], None),
    ("ours tuned for 1 GPU (fused CE, one group, no reshard)", "ours", TUNED, None),
    ("ours tuned for 1 GPU, larger micro-batch", "ours", TUNED, "tuned:0"),
    ("ours tuned for 1 GPU, largest micro-batch", "ours", TUNED, "tuned:-1"),
    ("naive FSDP2, GPT 0.94B, eager", "naive_fsdp2.py", ["--arch", "gpt"], None),
    ("naive FSDP2, GPT 0.94B, compiled", "naive_fsdp2.py", ["--arch", "gpt", "--compile"], None),
    ("naive FSDP2, Llama lm_1b dims, compiled", "naive_fsdp2.py", ["--arch", "llama", "--compile"], None),
    ("naive FSDP2, Llama lm_1b dims, compiled, largest micro-batch", "naive_fsdp2.py",
     ["--arch", "llama", "--compile"], "tuned:-1"),
    ("our model in the naive loop, compiled", "naive_fsdp2.py", ["--arch", "ours", "--compile"], None),
    ("our model in the naive loop, compiled + torchao float8", "naive_fsdp2.py", ["--arch", "ours", "--compile", "--float8"],
     None),
    ("torchtitan 0.2.2, lm_1b model (compiled)", "torchtitan022_lm_1b.py", [], None),
    ("torchtitan 0.3.0, lm_1b model (compiled)", "torchtitan_lm_1b.py", [], None),
]


def row_micro_batch(args, spec) -> int:
    if spec is None:
        return args.micro_batch
    return args.tuned_micro_batch[int(spec.split(":")[1])]


def print_targets(rows: list[dict]) -> None:
    """The best row of ours against the compiled naive GPT script (FLOP rate) and torchtitan (tokens/s)."""
    ours = [r for r in rows if r["stack"].startswith("ours") and "error" not in r]
    if not ours:
        return
    best = max(ours, key=lambda r: r["mfu"])
    print(f"\nbest of ours: {best['stack']} (micro-batch {best['micro_batch']}), MFU {100 * best['mfu']:.1f}%")
    for prefix, key, target in (("naive FSDP2, GPT 0.94B, compiled", "mfu", 1.15),
                                ("torchtitan", "tokens_per_s_per_gpu", 1.0)):
        peer = next((r for r in rows if r["stack"].startswith(prefix) and "error" not in r), None)
        name = peer["stack"] if peer else prefix
        if peer is None:
            print(f"target vs {name}: not measured (row missing or failed)")
            continue
        ratio = best[key] / peer[key]
        what = "FLOP rate" if key == "mfu" else "tokens/s"
        print(f"target vs {name}: {ratio:.3f}x {what} (target >= {target}: {'met' if ratio >= target else 'NOT met'})")


def dry_run(args) -> int:
    """Every row's command checked without training: ``lm_train.py --dry-run`` (launch --dry-run) for ours, the
    peers' scripts by ``benchmarks/argcheck.py`` (exists, arguments parse)."""
    failed = 0
    config = "lm_tiny.yaml" if args.smoke else "lm_1b.yaml"
    keep = {0} | {int(i) for i in args.only.split(",")} if args.only else set(range(len(ROWS)))
    for i, (name, script, extra, mb_spec) in enumerate(ROWS):
        if i not in keep:
            continue
        mb = str(row_micro_batch(args, mb_spec))
        if script == "ours":
            cmd = [sys.executable, str(ROOT / "benchmarks/lm_train.py"), "--config", config, "--nproc", str(args.nproc),
                   "--compile", "on", "--micro-batch", mb, "--dry-run", *extra, *_ours_layers(args)]
        else:
            cmd = [sys.executable, str(ROOT / "benchmarks/argcheck.py"), str(HERE / script), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--micro-batch", mb, *extra,
                   *(["--layers", str(args.layers)] if args.layers else [])]
        rc, log = _run(cmd, args.timeout)
        failed += rc != 0
        print(f"{name}: {'ok' if rc == 0 else 'FAILED'}: {(log.strip().splitlines() or [''])[-1][-300:]}", flush=True)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--tuned-micro-batch", type=int, nargs="+", default=[8, 16],
                    help="micro-batches of the tuned rows of ours and of the same-batch naive row (the last)")
    ap.add_argument("--only", help="comma-separated row numbers (0 = ours, always run) to run")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per row")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny dims, compile off, no float8 / torchtitan")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--layers", type=int, default=None, help="cut every row's model to this many blocks")
    ap.add_argument("--dry-run", action="store_true",
                    help="check every row instead of running it: ours by launch --dry-run, the peers' arguments parsed")
    args = ap.parse_args()
    if args.dry_run:
        sys.exit(dry_run(args))
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.micro_batch, args.tuned_micro_batch = 2, [2, 4]
    keep = {0} | {int(i) for i in args.only.split(",")} if args.only else set(range(len(ROWS)))
    ceiling = matmul_ceiling_tflops()
    print(f"bf16 matmul ceiling (8192^3): {ceiling:.0f} TFLOP/s" if ceiling else "bf16 matmul ceiling: no GPU")
    print("| # | stack | micro-batch | tokens/s/GPU | MFU (989) | MFU (ceiling) | peak mem (GiB) | tokens/s ratio to ours | "
          "FLOP-rate ratio to ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, ours = [], None
    for i, (name, script, extra, mb_spec) in enumerate(ROWS):
        if i not in keep:
            continue
        if args.smoke:  # CPU: eager only; float8 and torchtitan need a GPU
            if script.startswith("torchtitan") or "--float8" in extra:
                continue
            extra = [e for e in extra if e != "--compile"]
        mb = row_micro_batch(args, mb_spec)
        r = run_ours(args, extra, mb) if script == "ours" else run_script(args, script, extra, mb)
        r["stack"], r["micro_batch"] = name, mb
        rows.append(r)
        if "error" in r:
            print(f"| {i} | {name} | {mb} | failed: {r['error']!r} |||||", flush=True)
            continue
        ours = ours or (r if i == 0 else None)
        tok_ratio = f"{r['tokens_per_s_per_gpu'] / ours['tokens_per_s_per_gpu']:.3f}" if ours else "n/a"
        flop_ratio = f"{r['mfu'] / ours['mfu']:.3f}" if ours else "n/a"
        if ours and "GPT" in name:
            tok_ratio += " (other model)"
        mfu_c = f"{100 * r['mfu'] * 989.0 / ceiling:.1f}%" if ceiling else "n/a"
        print(f"| {i} | {name} | {mb} | {r['tokens_per_s_per_gpu']:,.0f} | {100 * r['mfu']:.1f}% | {mfu_c} | "
              f"{r['peak_mem_gib']:.1f} | {tok_ratio} | {flop_ratio} |", flush=True)
    print_targets(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_ceiling_tflops": ceiling, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
