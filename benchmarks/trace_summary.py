"""Where the GPU time of a profiled training step goes, from a torch.profiler Chrome trace.

    python benchmarks/trace_summary.py runs/<name>/profile/trace_rank0_steps20-22.json --steps 3

The per-operator tables the trainer writes (``top_ops*.txt``) add kernel durations, which overlap when
streams run concurrently (NCCL beside compute), so they cannot say what is exposed. This reads the
timeline instead and prints, per profiled step: the GPU window, the time no kernel runs at all (idle),
the time compute kernels run, the time NCCL kernels run and how much of it overlaps compute (the rest is
exposed communication), a per-category table (matmul, attention, NCCL, Triton/Inductor, optimizer,
copies/fills, other), and the longest idle gaps with the host operator that launched the kernel ending
each gap (what the GPU was waiting for).
"""
from __future__ import annotations

import argparse
import bisect
import json
import re
from collections import defaultdict

CATEGORIES = [  # first match wins; names of cuBLAS / cuDNN / NCCL / Triton kernels on H100/H200
    ("nccl", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attn|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|wgmma|cublas", re.I)),
    ("optimizer", re.compile(r"adam|fused_.*optim", re.I)),
    ("triton", re.compile(r"^triton_|^_.*kernel$", re.I)),
    ("copy/fill", re.compile(r"copy|fill|memset|memcpy|cat|split|chunk", re.I)),
]


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def intersect(a, b) -> float:
    """Total overlap of two sorted, disjoint interval lists."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            tot += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def summarize(path: str, steps: int, gaps: int = 12, min_gap_us: float = 20.0) -> str:
    events = json.load(open(path))["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        return f"{path}: no GPU kernels in the trace"
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "args" in e}
    cpu_ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")),
                     key=lambda e: e["ts"])
    cpu_starts = [e["ts"] for e in cpu_ops]

    def launcher(kernel) -> str:
        """The innermost host operator around the runtime call that launched this kernel."""
        rt = launches.get(kernel.get("args", {}).get("correlation"))
        if rt is None:
            return "?"
        t = rt["ts"]
        best = None
        for k in range(bisect.bisect_right(cpu_starts, t) - 1, max(-1, bisect.bisect_right(cpu_starts, t) - 400), -1):
            op = cpu_ops[k]
            if op["ts"] <= t <= op["ts"] + op["dur"] and (best is None or op["dur"] < best["dur"]):
                best = op
        return best["name"][:70] if best else rt["name"]

    iv = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    start, end = min(s for s, _ in iv), max(e for _, e in iv)
    window = end - start
    busy = union(iv)
    nccl = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if category(e["name"]) == "nccl"])
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if category(e["name"]) != "nccl"])
    overlap = intersect(nccl, compute)
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        c = by_cat[category(e["name"])]
        c[0] += e["dur"]
        c[1] += 1
    per = 1000.0 * steps  # us -> ms per step
    lines = [f"trace: {path} ({steps} steps; ms per step)",
             f"| GPU window | busy (any kernel) | idle | compute kernels | NCCL kernels | NCCL overlapped by compute | NCCL exposed |",
             "|---|---|---|---|---|---|---|",
             f"| {window / per:.1f} | {length(busy) / per:.1f} | {(window - length(busy)) / per:.1f} "
             f"({100 * (window - length(busy)) / window:.1f}%) | {length(compute) / per:.1f} | {length(nccl) / per:.1f} "
             f"| {overlap / per:.1f} | {(length(nccl) - overlap) / per:.1f} |",
             "", "| category | kernel time (ms/step) | kernels/step |", "|---|---|---|"]
    for cat, (dur, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {cat} | {dur / per:.1f} | {n / steps:.0f} |")
    # idle gaps: between consecutive busy intervals
    gap_list = [(busy[i + 1][0] - busy[i][1], busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    gap_list = [g for g in gap_list if g[0] >= min_gap_us]
    lines += ["", f"idle gaps >= {min_gap_us:.0f} us: {len(gap_list)} ({sum(g[0] for g in gap_list) / per:.1f} ms/step); "
              f"longest {gaps}, with the host op that launched the kernel ending the gap:",
              "| gap (us) | at (ms from window start) | next kernel | launched by |", "|---|---|---|---|"]
    first_at = {}
    for e in kernels:
        first_at.setdefault(e["ts"], e)
    starts = sorted(first_at)
    for g, s, e in sorted(gap_list, reverse=True)[:gaps]:
        k = first_at[starts[bisect.bisect_left(starts, e)]]
        lines.append(f"| {g:.0f} | {(s - start) / 1000:.1f} | {k['name'][:60]} | {launcher(k)} |")
    return "\n".join(lines)


def callers(path: str, steps: int, pattern: str, depth: int = 4, top: int = 15) -> str:
    """GPU time of the kernels whose launching host operator matches ``pattern`` (e.g. ``aten::fill_``),
    grouped by the chain of host operators around the launch (innermost first, ``depth`` of them): which
    code path issues them (autograd nodes appear as ``autograd::engine::evaluate_function: XBackward0``)."""
    events = json.load(open(path))["traceEvents"]
    rx = re.compile(pattern)
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "args" in e}
    # host operators per thread, nested by a stack sweep: parent[i] = the operator that encloses i
    by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            by_tid[e.get("tid")].append(e)
    nest = {}
    for tid, ops in by_tid.items():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        parent, stack = [], []
        for i, op in enumerate(ops):
            while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] < op["ts"]:
                stack.pop()
            parent.append(stack[-1] if stack else -1)
            stack.append(i)
        nest[tid] = (ops, [op["ts"] for op in ops], parent)

    def chain(rt) -> list[str]:
        ops, starts, parent = nest.get(rt.get("tid"), ([], [], []))
        t, i = rt["ts"], bisect.bisect_right(starts, rt["ts"]) - 1
        while i >= 0 and not (ops[i]["ts"] <= t <= ops[i]["ts"] + ops[i]["dur"]):
            i = parent[i]
        out = []
        while i >= 0:
            out.append(ops[i]["name"][:60])
            i = parent[i]
        return out

    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        rt = launches.get(k.get("args", {}).get("correlation"))
        names = chain(rt) if rt is not None else []
        if not names or not rx.search(names[0]):
            continue
        g = groups[" < ".join(names[:depth])]
        g[0] += k["dur"]
        g[1] += 1
    per = 1000.0 * steps
    lines = [f"kernels launched by host ops matching {pattern!r}, by enclosing host operators (innermost first):",
             "| ms/step | kernels/step | host operators around the launch |", "|---|---|---|"]
    for key, (dur, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {dur / per:.2f} | {n / steps:.0f} | {key} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (per-step figures)")
    ap.add_argument("--gaps", type=int, default=12)
    ap.add_argument("--callers", metavar="REGEX", help="also: the host call paths of the kernels launched by "
                    "host operators matching REGEX (e.g. 'aten::fill_')")
    args = ap.parse_args()
    print(summarize(args.trace, args.steps, args.gaps))
    if args.callers:
        print()
        print(callers(args.trace, args.steps, args.callers))


if __name__ == "__main__":
    main()
