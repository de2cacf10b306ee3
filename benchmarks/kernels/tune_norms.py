"""Sweep the launch shapes of the fused norm kernels (scaleforge/kernels/norms/) on the GPU.

    PYTHONPATH=$PWD python benchmarks/kernels/tune_norms.py            # GPU, ~90-120 s
    PYTHONPATH=$PWD python benchmarks/kernels/tune_norms.py --cases res --shapes 16x4096x2240 --passes bwd
    PYTHONPATH=$PWD python benchmarks/kernels/tune_norms.py --cases res --shapes 16x4096x2240 --passes fwd --wide
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels/tune_norms.py --smoke   # CPU, logic only

Cases as in run_all.py (bf16, no affine, adaLN shift/scale per (batch, channel), gate per (batch, channel)):
layer_norm + modulate, rms_norm + modulate, layer_norm + gated residual + modulate, at 16x4096x2240 (SANA-1.6B),
8x4096x1152 and 4x8192x4096. Two phases per case, shape and pass (fwd / bwd):
  A: the layouts: split rows (r1, forward only) and one power-of-two block with r rows per tile, over warps,
     each with one tile per program (k0, forward only) and persistent programs (k = programs per SM);
  B: the two best of A over k = 0/1/2/4/8/16 and evict_first ("ef") loads of the read-once tensors;
  C (timed with B): the two best of A with the row loop software-pipelined, num_stages 2/3/4 ("s2"; a
     one-tile-per-program forward config is made persistent at k4 first) and, backward only, with the next
     row tile prefetched ("pf"; also at twice the warps: the prefetched tiles cost registers).
  D (--wide, after B/C): the three best so far crossed with k = 2/4/8/16, stages 0/2/3/4 and evict_first
     (the combinations B and C do not try: B varies k and evict_first without stages, C stages alone).
--cases / --shapes / --passes restrict the run (e.g. just the backward at one shape); --configs times a given
list of configs (and the default) instead of the phases.
Every config is checked against the fp32 reference (forward outputs and every gradient, relative error < 1e-2),
then timed: a CUDA graph of 10 back-to-back calls (no launch gaps), its replays timed by do_bench (median; each
tensor is > 50 MB = L2 and read once in order). The bandwidth roofline is the 1 GiB device copy of run_all.py. Kernels are compiled first,
in parallel worker processes on tiny problems with the same specialization (filling Triton's cache).

Bytes are the kernel's logical I/O, each tensor once: forward reads x (+ residual), writes y (+ h) and the
fp32 mean/rstd; backward reads dy (+ dh), h or x (+ x for the gate), mean/rstd and writes dx (+ dresidual).
The O(B*C) modulation traffic and the fp32 partial rows (~#SMs*k rows of C) are left out. "bwd" is the
backward op alone (kernel + partial sums). x eager: the PyTorch reference in bf16, eager, timed with
triton.testing.do_bench (bwd: eager fwd+bwd minus eager fwd); the "autograd" rows time the public function
(default configs) the same way. The end prints the best config per case, shape and pass, and the _DEFAULTS
table of norms/launch.py that those bests give (paste it to adopt them).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

from scaleforge.kernels import norms
from scaleforge.kernels.norms.launch import NormConfig
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

from _common import DEV, bench, copy_bandwidth, graph_bench, rel_err

TOL = 1e-2
CASES = {"layer": ("layer_norm + modulate", False, False), "rms": ("rms_norm + modulate", True, False),
         "res": ("layer_norm + gated residual + modulate", False, True)}  # fmt: skip
C_CLASS = {1152: 1536, 2240: 3072, 4096: 4096, 80: 1536, 48: 1536, 128: 1536}  # shape's C -> _DEFAULTS class


def pow2(n):
    return 1 << (n - 1).bit_length()


def per_thread(c, r, w, split):
    a, b = norms.launch._blocks(c, split)
    return r * (a + b) / (32 * w)


def phase_a(c, bwd, smoke=False):
    """Layouts x warps x rows, elements per thread 4..40 (more spill, fewer waste issue slots)."""
    if smoke:  # every code path once, at tiny C
        return [NormConfig(2, 2, False, 2), NormConfig(1, 1, False, 4)] if bwd else \
            [NormConfig(1, 1, True, 0), NormConfig(2, 2, False, 4)]  # fmt: skip
    out = []
    if not bwd and c & (c - 1):
        out += [NormConfig(1, w, True, k) for w in (1, 2, 4, 8) if 4 <= per_thread(c, 1, w, True) <= 40
                for k in (0, 4, 8)]  # fmt: skip
    for r in (1, 2, 4, 8):
        for w in (2, 4, 8, 16):
            if 8 <= per_thread(c, r, w, False) <= 32:
                out += [NormConfig(r, w, False, k) for k in ((2, 4) if bwd else (0, 4))]
    return out


def phase_b(top, bwd, smoke=False):
    ks = (1, 2, 4, 8, 16) if bwd else (0, 1, 2, 4, 8, 16)
    return [cfg._replace(progs_per_sm=k, evict_first=ef) for cfg in top for ef in (False, True)
            for k in (ks[1:4:2] if smoke else ks)]  # fmt: skip


def phase_c(top, bwd, smoke=False):
    """Latency hiding on the best layouts: pipeliner stages (persistent programs only: a one-tile program
    has no loop to pipeline) and, backward, prefetch (same and 2x warps)."""
    out = []
    for cfg in top:
        if bwd:
            out += [cfg._replace(prefetch=True)]
            if not smoke and cfg.num_warps < 16:
                out += [cfg._replace(prefetch=True, num_warps=2 * cfg.num_warps)]
        base = cfg if cfg.progs_per_sm else cfg._replace(progs_per_sm=4)
        out += [base._replace(stages=st) for st in ((2,) if smoke else (2, 3, 4))]
    return out


def phase_d(top, smoke=False):
    """The best layouts crossed with persistence, pipeline stages and evict_first together."""
    ks, sts = ((2,), (0, 2)) if smoke else ((2, 4, 8, 16), (0, 2, 3, 4))
    return [cfg._replace(progs_per_sm=k, stages=st, evict_first=ef, prefetch=False)
            for cfg in top for k in ks for st in sts for ef in (False, True)]  # fmt: skip


def label(cfg, default=None):
    s = f"r{cfg.block_r} w{cfg.num_warps} {'split' if cfg.split else 'pow2'} k{cfg.progs_per_sm}"
    s += (" ef" if cfg.evict_first else "") + (" pf" if cfg.prefetch else "")
    s += f" s{cfg.stages}" if cfg.stages else ""
    return s + (" (default)" if cfg == default else "")


def cfg_repr(cfg):
    """NormConfig(...) as in the _DEFAULTS table: the first five fields, later ones only when not default."""
    vals, n = list(cfg), 5
    for i, f in enumerate(NormConfig._fields[5:], 5):
        if vals[i] != NormConfig._field_defaults[f]:
            n = i + 1
    return f"NormConfig({', '.join(map(repr, vals[:n]))})"


def bench_eager(fn, grad_to_none=None) -> float:
    """Public functions and the eager reference, as a model calls them (host launch included)."""
    return bench(fn, grad_to_none, warmup=10, rep=40)


class Case:
    """Inputs, kernel calls and checks of one case at one shape."""

    def __init__(self, key, shape, reference=True):
        self.key, self.shape = key, shape
        self.name, self.is_rms, self.res = CASES[key]
        b, n, c = shape
        dt = torch.bfloat16 if DEV == "cuda" else torch.float32  # the interpreter has no bf16 rounding
        self.x, self.r = (torch.randn(b, n, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(2))
        self.sh, self.sc, self.gt = (torch.randn(b, 1, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
        self.gy, self.gh = torch.randn_like(self.x), torch.randn_like(self.x)
        self.ref_fn = rms_norm_ref if self.is_rms else layer_norm_ref
        self.kw = dict(shift=self.sh, scale=self.sc) | (dict(residual=self.r, gate=self.gt) if self.res else {})
        self.leaves = [self.x, self.sh, self.sc] + ([self.r, self.gt] if self.res else [])
        m = b * n
        self.m, self.c, self.n = m, c, n
        self.x2, self.r2 = self.x.detach().view(m, c), self.r.detach().view(m, c)
        self.g2, self.sh2, self.sc2 = (t.detach().view(b, c) for t in (self.gt, self.sh, self.sc))
        e = self.x.numel() * self.x.element_size()
        self.bytes = {"fwd": (4 if self.res else 2) * e + 8 * m, "bwd": (6 if self.res else 3) * e + 8 * m}
        if reference:  # fp32 reference of the same (bf16-valued) inputs
            f32 = [t.detach().float().requires_grad_() for t in self.leaves]
            fkw = dict(shift=f32[1], scale=f32[2]) | (dict(residual=f32[3], gate=f32[4]) if self.res else {})
            out = self.ref_fn(f32[0], **fkw)
            out = out if isinstance(out, tuple) else (out,)
            self.g_ref = torch.autograd.grad(out, f32, (self.gy.float(), self.gh.float())[: len(out)])
            self.out_ref = [o.detach() for o in out]

    def fwd(self, cfg):
        res, n = self.res, self.n
        return norms.op.norm_fwd_impl(self.x2, self.r2 if res else None, self.g2 if res else None, None, None,
                                   self.sh2, self.sc2, n if res else 0, n, n, 1e-6, self.is_rms, cfg=cfg)  # fmt: skip

    def bwd(self, cfg, saved):
        m, c, n, res = self.m, self.c, self.n, self.res
        _, h, mean, rstd, _ = saved
        return norms.op.norm_bwd_impl(self.gy.view(m, c), self.gh.view(m, c) if res else None, h if res else self.x2,
                                   self.x2 if res else None, self.g2 if res else None, None, None, self.sc2, mean,
                                   rstd, res, True, n if res else 0, n, n, self.is_rms, cfg=cfg)  # fmt: skip

    def fwd_err(self, saved):
        outs = [saved[0]] + ([saved[1]] if self.res else [])
        return max(rel_err(o.view(-1, self.c), ref.view(-1, self.c)) for o, ref in zip(outs, self.out_ref))

    def bwd_err(self, gr):
        # ours: [dx, dr, dg, dw, db, dsh, dsc]; reference order: x, shift, scale (, residual, gate)
        pairs = [(gr[0], self.g_ref[0]), (gr[5], self.g_ref[1]), (gr[6], self.g_ref[2])]
        if self.res:
            pairs += [(gr[1], self.g_ref[3]), (gr[2], self.g_ref[4])]
        return max(rel_err(a.reshape(-1, self.c).float(), b.reshape(-1, self.c)) for a, b in pairs)


def _warm(job):
    """Compile one (case, C, pass, config) on a tiny problem; errors show up again in the timed run."""
    key, c, pas, cfg = job
    try:
        case = Case(key, (2, 64, c), reference=False)
        saved = case.fwd(cfg if pas == "fwd" else None)
        if pas == "bwd":
            case.bwd(cfg, saved)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def warm(jobs, procs):
    if DEV != "cuda" or not jobs:
        return
    with mp.get_context("spawn").Pool(procs) as pool:
        try:  # a crashed worker loses its job and would hang map(): what is not warm compiles when timed
            pool.map_async(_warm, jobs, chunksize=1).get(timeout=150)
        except mp.TimeoutError:
            print("warm-up compile timed out; the rest compiles when timed", flush=True)


class Sweep:
    def __init__(self, bw):
        self.bw, self.rows, self.done, self.best = bw, [], {}, {}

    def run(self, case, pas, cfg, default):
        shape_s = "x".join(map(str, case.shape))
        key = (case.key, shape_s, pas, cfg)
        if key in self.done:
            return
        nan = float("nan")
        try:
            if pas == "fwd":
                err = case.fwd_err(case.fwd(cfg))
                ms = graph_bench(lambda: case.fwd(cfg), n=10)
            else:
                saved = case.fwd(None)
                err = case.bwd_err(case.bwd(cfg, saved))
                ms = graph_bench(lambda: case.bwd(cfg, saved), n=10)
        except Exception as ex:  # noqa: BLE001 - a config that fails to compile is a row, not a crash
            self.rows.append((case.name, shape_s, pas, label(cfg, default), nan, nan, nan, nan, nan,
                              f"ERROR {type(ex).__name__}: {str(ex)[:80]}"))  # fmt: skip
            self.done[key] = nan
            return
        ok = err < TOL
        gbs = case.bytes[pas] / ms / 1e6
        pct, xe = 100 * gbs * 1e9 / self.bw, case.eager[pas] / ms
        self.rows.append((case.name, shape_s, pas, label(cfg, default), ms, gbs, pct, xe, err, "ok" if ok else "FAIL"))
        self.done[key] = ms if ok else nan
        bkey = (case.key, case.c, pas)
        if ok and (bkey not in self.best or ms < self.best[bkey][0]):
            self.best[bkey] = (ms, cfg, pct, xe, case.name, shape_s)

    def top(self, key, shape, pas, n=2):
        shape_s = "x".join(map(str, shape))
        mine = [(ms, k[3]) for k, ms in self.done.items() if k[:3] == (key, shape_s, pas) and ms == ms]
        return [cfg for _, cfg in sorted(mine)[:n]]


def eager_times(case):
    with torch.no_grad():
        fwd = bench_eager(lambda: case.ref_fn(case.x, **case.kw))

    def step():
        out = case.ref_fn(case.x, **case.kw)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [case.gy, case.gh][: len(out)])

    return {"fwd": fwd, "bwd": bench_eager(step, case.leaves) - fwd, "full": bench_eager(step, case.leaves)}


def autograd_rows(case, sweep):
    fn = norms.rms_norm if case.is_rms else norms.layer_norm

    def step():
        out = fn(case.x, **case.kw, backend="triton")
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [case.gy, case.gh][: len(out)])

    ms_fwd = bench_eager(lambda: fn(case.x, **case.kw, backend="triton"))
    ms_full = bench_eager(step, case.leaves)
    shape_s = "x".join(map(str, case.shape))
    for pas, ms, nbytes, eager in (("autograd fwd", ms_fwd, case.bytes["fwd"], case.eager["fwd"]),
                                   ("autograd fwd+bwd", ms_full, case.bytes["fwd"] + case.bytes["bwd"],
                                    case.eager["full"])):  # fmt: skip
        gbs = nbytes / ms / 1e6
        sweep.rows.append((case.name, shape_s, pas, "default", ms, gbs, 100 * gbs * 1e9 / sweep.bw, eager / ms,
                           float("nan"), ""))  # fmt: skip


def defaults(c, key):
    return norms.launch._default_config(c, False, key), norms.launch._default_config(c, True, key)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU with TRITON_INTERPRET=1")
    ap.add_argument("--procs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile workers")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--shapes", default=None, help="comma-separated BxNxC shapes (default: the standard three; "
                    "with --smoke two tiny ones)")  # fmt: skip
    ap.add_argument("--passes", default="fwd,bwd", help="comma-separated subset of fwd,bwd")
    ap.add_argument("--wide", action="store_true", help="phase D: the three best x k x stages x evict_first")
    ap.add_argument("--configs", default=None, help="time only these NormConfigs (and the default), no phases: "
                    "';'-separated field lists, e.g. '1,4,True,16,False,False,3;2,8,False,16' (block_r, num_warps, "
                    "split, progs_per_sm, evict_first, prefetch, stages)")  # fmt: skip
    args = ap.parse_args()
    if DEV == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: use --smoke with TRITON_INTERPRET=1")
    keys = [k for k in args.cases.split(",") if k]
    passes = tuple(p for p in ("fwd", "bwd") if p in args.passes.split(","))
    if not keys or set(keys) - set(CASES) or not passes or set(args.passes.split(",")) - {"fwd", "bwd"}:
        raise SystemExit(f"--cases takes {','.join(CASES)}; --passes takes fwd,bwd")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 3 for s in shapes):
            raise SystemExit("--shapes takes BxNxC, e.g. 16x4096x2240")
    else:
        shapes = [(2, 24, 80), (1, 32, 128)] if args.smoke else [(16, 4096, 2240), (8, 4096, 1152), (4, 8192, 4096)]
    torch.manual_seed(0)
    t0 = time.time()
    bw = copy_bandwidth(args.smoke)
    sweep = Sweep(bw)
    plan = [(shape, key) for shape in shapes for key in keys]

    explicit = None
    if args.configs:
        def field(v):
            return v == "True" if v in ("True", "False") else int(v)

        explicit = [NormConfig(*map(field, c.split(","))) for c in args.configs.split(";") if c.strip()]

    def warm_phase(cfgs):
        """Compile a phase's configs {(shape, case key, pass): [NormConfig]} in parallel workers."""
        warm([(key, shape[2], pas, cfg) for (shape, key, pas), phase in cfgs.items() for cfg in phase], args.procs)

    def time_phase(cfgs, after_case=None):
        """Time a phase's configs, one case (inputs and reference) at a time; after_case(case) then runs."""
        for shape, key in plan:
            case = Case(key, shape)
            case.eager = eager_times(case)
            for pas in passes:
                d = defaults(shape[2], key)[pas == "bwd"]
                for cfg in cfgs[(shape, key, pas)]:
                    sweep.run(case, pas, cfg, d)
            if after_case is not None:
                after_case(case)
            del case
            if DEV == "cuda":
                torch.cuda.empty_cache()

    # phase A (or the --configs list): the default first
    a_cfgs = {}
    for shape, key in plan:
        for pas in passes:
            d = defaults(shape[2], key)[pas == "bwd"]
            listed = explicit if explicit is not None else phase_a(shape[2], pas == "bwd", args.smoke)
            a_cfgs[(shape, key, pas)] = [d] + [x for x in listed if x != d]
    warm_phase(a_cfgs)
    t_a = time.time()
    time_phase(a_cfgs)
    b_cfgs = {}
    for shape, key in plan:
        for pas in passes:
            top = sweep.top(key, shape, pas)
            b_cfgs[(shape, key, pas)] = [] if explicit is not None else (
                phase_b(top, pas == "bwd", args.smoke) + phase_c(top, pas == "bwd", args.smoke))

    warm_phase(b_cfgs)
    t_b = time.time()
    # phase B and the public functions
    time_phase(b_cfgs, (lambda case: autograd_rows(case, sweep)) if len(passes) == 2 else None)

    if args.wide:  # phase D
        d_cfgs = {}
        for shape, key in plan:
            for pas in passes:
                d_cfgs[(shape, key, pas)] = [c for c in phase_d(sweep.top(key, shape, pas, 3), args.smoke)
                                             if (key, "x".join(map(str, shape)), pas, c) not in sweep.done]
        warm_phase(d_cfgs)
        time_phase(d_cfgs)

    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (triton interpreter)"
    lines = [f"Device: {dev}; measured copy {bw / 1e12:.2f} TB/s (read+write); targets: fwd >= 80%, bwd >= 70% "
             "of copy, >= 2x eager", "",
             "| case | shape | pass | config | ms | GB/s | % copy | x eager | max rel err | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = sorted(sweep.rows, key=lambda r: (r[1], r[0], r[2], r[4] if r[4] == r[4] else 1e9))
    for nm, sh, pas, cfg, ms, gbs, pct, xe, err, ok in rows:
        lines.append(
            f"| {nm} | {sh} | {pas} | {cfg} | {ms:.3f} | {gbs:.0f} | {pct:.0f}% | {xe:.2f} | {err:.1e} | {ok} |"
        )
    lines += ["", "Best checked config per case, shape and pass (vs the current default):", ""]
    table = {}
    for (key, c, pas), (ms, cfg, pct, xe, nm, sh) in sorted(sweep.best.items(), key=lambda kv: (kv[0][1], kv[0])):
        d = defaults(c, key)[pas == "bwd"]
        d_ms = sweep.done.get((key, sh, pas, d), float("nan"))
        lines.append(f"- {nm} {sh} {pas}: {label(cfg)}: {ms:.3f} ms, {pct:.0f}% of copy, x{xe:.2f} eager "
                     f"(default {label(d)}: {d_ms:.3f} ms)")  # fmt: skip
        table.setdefault((C_CLASS.get(c, c), key), {})[pas] = cfg
    lines += ["", "_DEFAULTS from these bests (norms/launch.py):", "```"]
    for (cc, key), v in sorted(table.items()):  # a pass not measured keeps its current default
        f, b = (cfg_repr(v.get(p, defaults(cc, key)[p == "bwd"])) for p in ("fwd", "bwd"))
        kept = [p for p in ("fwd", "bwd") if p not in v]
        lines.append(f"    ({cc}, {key!r}): ({f}, {b}),{'  # ' + ' and '.join(kept) + ' kept' if kept else ''}")
    lines.append("```")
    fails = [r for r in rows if r[-1] not in ("ok", "")]
    lines.append(f"\n{len(fails)} failing configs; {len(sweep.done)} configs; total {time.time() - t0:.0f} s "
                 f"(compile A {t_a - t0:.0f} s, compile B {t_b - t_a:.0f} s incl. phase A)")  # fmt: skip
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "tune_norms.md"), "w") as f:
            f.write(text + "\n")
    raise SystemExit(1 if fails else 0)


if __name__ == "__main__":
    main()
