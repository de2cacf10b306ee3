"""Correctness and timing of fp8_linear (scaleforge/kernels/fp8_linear.py) against bf16 F.linear and the
previous FP8 path, with the time split into its parts (one script for the GPU machine).

    PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8_linear.py              # H200, ~1 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8_linear.py --smoke   # CPU

1. roofline here: 1 GiB bf16 copy (read+write bytes), 8192³ bf16 matmul and fp8 ``_scaled_mm``;
2. checks: the fused quantize+transpose codes vs ``quantize_fp8_ref`` (bit-identical on GPU), fp8_linear
   y/dx/dw/db vs ``fp8_linear_ref`` (fp32 GEMMs, odd M), the old path vs the same reference,
   torch.compile(fullgraph=True) vs eager, and the error of both FP8 paths against bf16 F.linear;
3. per shape (M, N, K): fwd and fwd+bwd of bf16 F.linear, the old path (fp8.py two-pass quantize_fp8,
   backward re-quantizes nothing but transposes FP8 g, x, w with ``.t().contiguous()``) and the new one;
   then each part of the new one alone: amax pass (fp8.py's, shared with quantize_fp8), quantize+transpose
   pass (per tensor), each _scaled_mm;
4. a config sweep of the quantize+transpose kernel at 8192x8192 bf16 (the amax pass is swept by
   tune_fp8.py).
Timings: ``triton.testing.do_bench`` median, which also zeroes a 256 MB buffer before every call; inputs are
random and rotate over two sets of tensors, each tensor >= 32 MB (the sets together exceed the 50 MB L2).
--smoke: tiny shapes on CPU under TRITON_INTERPRET=1 with inputs exact in FP8 (the interpreter's fp32 -> fp8
rounding is not torch's); _scaled_mm runs on CPU there, timings are meaningless.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

import scaleforge.kernels as K
from scaleforge.kernels import fp8
from scaleforge.kernels.reference import fp8_linear_ref, quantize_fp8_ref
from scaleforge.kernels.reference.fp8 import fp8_max

from _common import (DEV, FAILURES, bench as bench_one, check, copy_bandwidth, finish, log, matmul_rooflines,
                     rel_err, run_step, script_parser, start)

fl = sys.modules["scaleforge.kernels.fp8_linear"]  # the package re-exports the function under that name
E4M3, E5M2, BF16 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16
ROWS: list[dict] = []


def bench(fns, grad_to_none=None) -> float:
    """Median ms of calling the closures in turn (one per input set)."""
    it = itertools.cycle(fns if isinstance(fns, (list, tuple)) else [fns])
    return bench_one(lambda: next(it)(), grad_to_none)


def row(section, variant, shape, ms, amount, kind, roof, config="", note=""):
    """kind: 'GB/s' (amount = bytes) or 'fp8'/'bf16' (amount = FLOPs)."""
    rate = amount / ms / 1e-3
    peak = roof["bw"] if kind == "GB/s" else roof[kind]
    r = dict(section=section, variant=variant, shape=shape, config=config, ms=ms,
             rate=f"{rate / 1e9:.0f} GB/s" if kind == "GB/s" else f"{rate / 1e12:.0f} TFLOP/s",
             pct=100 * rate / peak, note=note)  # fmt: skip
    ROWS.append(r)
    log(f"[bench] {section} | {variant} | {shape} | {config} | {ms:.4f} ms | {r['rate']} | {r['pct']:.0f}% | {note}")


def cfg_str(cfg) -> str:
    return f"{' '.join(f'{k}={v}' for k, v in cfg.kwargs.items())} w{cfg.num_warps}" if cfg else ""


def exact_fp8(shape, dtype, mult=1024.0):
    """fp32 values exact in FP8 after per-tensor scaling (amax = fp8_max·mult, scale = mult)."""
    qmax = fp8_max(dtype)
    t = (torch.randn(shape, device=DEV) * qmax / 4).clamp(-qmax / 2, qmax / 2).to(dtype).float()
    t.view(-1)[-1] = qmax
    return t * mult


def rand(shape, smoke, dtype=E4M3, scale=1.0):
    return exact_fp8(shape, dtype) if smoke else (torch.randn(shape, device=DEV, dtype=BF16) * scale)


# ------------------------------------------------------------------------------------- old path


class OldFP8Linear(torch.autograd.Function):
    """The previous fp8_linear, for comparison: fp8.py per-tensor quantize_fp8 (amax pass + quantize pass)
    of x, w, g, and FP8 ``.t().contiguous()`` copies of w, g, x around the backward _scaled_mm calls."""

    @staticmethod
    def forward(ctx, x, w):
        xq, sx = K.quantize_fp8(x, "tensor", dtype=E4M3, backend="triton")
        wq, sw = K.quantize_fp8(w, "tensor", dtype=E4M3, backend="triton")
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.dtypes = (x.dtype, w.dtype)
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=BF16)

    @staticmethod
    def backward(ctx, g):
        xq, sx, wq, sw = ctx.saved_tensors
        gq, sg = K.quantize_fp8(g.contiguous(), "tensor", dtype=E5M2, backend="triton")
        dx = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=BF16)
        pad = -gq.shape[0] % 16
        if pad:
            gq = F.pad(gq.view(torch.uint8), (0, 0, 0, pad)).view(E5M2)
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
        dw = torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=sg, scale_b=sx, out_dtype=BF16)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


def old_linear(x, w):
    return OldFP8Linear.apply(x, w)


def new_linear(x, w):
    return K.fp8_linear(x, w, backend="triton")


# ------------------------------------------------------------------------------------- roofline


def roofline(smoke):
    bw = copy_bandwidth(smoke)
    bf16, fp8 = matmul_rooflines(smoke)
    log(f"[roofline] copy {bw / 1e12:.3f} TB/s (read+write), bf16 matmul {bf16 / 1e12:.0f} TFLOP/s, "
        f"fp8 _scaled_mm {fp8 / 1e12:.0f} TFLOP/s")  # fmt: skip
    return dict(bw=bw, bf16=bf16, fp8=fp8)


# ------------------------------------------------------------------------------------- checks


def check_quantize_transpose(shapes, smoke):
    for (r, c), dtype in itertools.product(shapes, (E4M3, E5M2)):
        x = exact_fp8((r, c), dtype) if smoke else torch.randn(r, c, device=DEV, dtype=BF16) * 3
        q, qt, s = fl._quantize_transpose(x, dtype)
        qr, sr = quantize_fp8_ref(x, "tensor", dtype=dtype)
        u, ur, ut = q.view(torch.uint8), qr.view(torch.uint8), qt.view(torch.uint8)
        same = (u == ur).float().mean().item()
        ok = same == 1.0 and torch.equal(s, sr) and torch.equal(ut[:, :r], u.t()) and not ut[:, r:].any()
        detail = f"identical codes {same:.6f}, scale {s.item():.4e} vs {sr.item():.4e}, qT == q.T, zero padding"
        check(f"quantize+transpose {r}x{c} {dtype}", ok, detail)


def check_linear_vs_reference(smoke):
    """y, dx, dw, db of both FP8 paths vs the fp32-GEMM reference at an M that needs padding."""
    m, n, k = (40, 48, 64) if smoke else (1000, 1536, 1024)
    x = rand((m, k), smoke).requires_grad_()
    w = rand((n, k), smoke, scale=1 / math.sqrt(k)).requires_grad_()
    b = torch.randn(n, device=DEV, requires_grad=True)
    g = rand((m, n), smoke, dtype=E5M2).to(BF16)
    y = K.fp8_linear(x, w, b, backend="triton")
    yr = fp8_linear_ref(x, w, b)
    ga, gr = torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(yr, (x, w, b), g)
    errs = [rel_err(y, yr)] + [rel_err(a, c) for a, c in zip(ga, gr)]
    check(f"fp8_linear (new) vs fp8 reference {m}x{n}x{k}", max(errs) < 1e-2,
          "rel err y/dx/dw/db " + " ".join(f"{e:.1e}" for e in errs))  # fmt: skip
    yo = old_linear(x, w) + b.to(BF16)
    go = torch.autograd.grad(yo, (x, w), g)
    errs = [rel_err(yo, yr)] + [rel_err(a, c) for a, c in zip(go, gr)]
    check("old fp8 path vs fp8 reference", max(errs) < 1e-2, "rel err y/dx/dw " + " ".join(f"{e:.1e}" for e in errs))


def check_compile():
    x = torch.randn(300, 512, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.randn(384, 512, device=DEV, dtype=BF16, requires_grad=True)
    try:
        torch._dynamo.reset()
        outs = []
        for f in (new_linear, torch.compile(new_linear, fullgraph=True)):
            y = f(x, w)
            outs.append([y, *torch.autograd.grad(y.float().square().sum(), (x, w))])
        errs = [rel_err(a, b) for a, b in zip(outs[1], outs[0])]
        check("torch.compile(fullgraph=True) fp8_linear fwd+bwd", max(errs) < 1e-2, f"vs eager rel err {max(errs):.1e}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        check("torch.compile(fullgraph=True) fp8_linear", False, f"{type(e).__name__}: {str(e)[:400]}")


def errors_vs_bf16(x, w, g):
    out = {}
    yb = F.linear(x, w)
    gb = torch.autograd.grad(yb, (x, w), g)
    for name, fn in (("new", new_linear), ("old", old_linear)):
        y = fn(x, w)
        ga = torch.autograd.grad(y, (x, w), g)
        out[name] = (rel_err(y, yb), rel_err(ga[0], gb[0]), rel_err(ga[1], gb[1]))
    return out


# ------------------------------------------------------------------------------------- benchmarks


def bench_shape(m, n, k, roof, smoke):
    shape = f"M{m} N{n} K{k}"
    sets = []
    for _ in range(2):
        x = rand((m, k), smoke).requires_grad_()
        w = rand((n, k), smoke, scale=1 / math.sqrt(k)).requires_grad_()
        sets.append((x, w, rand((m, n), smoke, dtype=E5M2).to(BF16)))
    leaves = [t for s in sets for t in s[:2]]
    flops = 2 * m * n * k

    e = errors_vs_bf16(*sets[0])
    for name, (ey, edx, edw) in e.items():
        log(f"[info] {shape} {name} fp8_linear rel err vs bf16 F.linear: y {ey:.3e}, dx {edx:.3e}, dw {edw:.3e}")
        check(f"{name} fp8_linear error vs bf16 {shape}", max(ey, edx, edw) < 0.1, f"{ey:.2e} {edx:.2e} {edw:.2e}")
    err_note = "rel err vs bf16 y/dx/dw {:.1e}/{:.1e}/{:.1e}".format(*e["new"])

    res = {}
    for name, fn in (("bf16 F.linear", F.linear), ("old fp8 path", old_linear), ("new fp8_linear", new_linear)):
        fwd = bench([lambda s=s, fn=fn: fn(s[0], s[1]) for s in sets])
        full = bench([lambda s=s, fn=fn: fn(s[0], s[1]).backward(s[2]) for s in sets], leaves)
        res[name] = (fwd, full)
    base_f, base_t = res["bf16 F.linear"]
    for name, (fwd, full) in res.items():
        kind = "bf16" if name.startswith("bf16") else "fp8"
        row("end to end", f"{name} fwd", shape, fwd, flops, kind, roof, note=f"x{base_f / fwd:.2f} vs bf16")
        extra = f"; {err_note}" if name.startswith("new") else ""
        note = f"x{base_t / full:.2f} vs bf16{extra}"
        row("end to end", f"{name} fwd+bwd", shape, full, 3 * flops, kind, roof, note=note)
    target = base_t / 1.4
    new_t = res["new fp8_linear"][1]
    check(f"new fwd+bwd >= 1.4x bf16 {shape}", new_t <= target or smoke,
          f"{new_t:.3f} ms vs target {target:.3f} ms (bf16 {base_t:.3f} ms): x{base_t / new_t:.2f}")  # fmt: skip

    # the parts of the new path, each alone (operands prepared outside the timed call)
    parts = []
    for x, w, g in sets:
        x, w = x.detach(), w.detach()
        p = dict(x=x, w=w, g=g)
        for name, t, dt in (("x", x, E4M3), ("w", w, E4M3), ("g", g, E5M2)):
            p[f"amax_{name}"] = fp8.op._amax_bits(t)
            p[f"q_{name}"] = fl._quantize_transpose(t, dt)
        parts.append(p)

    def qt_only(p, name, dt):
        t, amax = p[name], p[f"amax_{name}"]
        q, qt, s = p[f"q_{name}"]
        r, c = t.shape
        rp = qt.shape[1]
        fl._quant_transpose_kernel[lambda meta: (math.ceil(rp / meta["BR"]), math.ceil(c / meta["BC"]))](
            t, q, qt, s, amax, r, c, rp, fp8_max(dt), RELOAD_T=t.dtype == torch.float32
        )

    fwd_sum = bwd_sum = 0.0
    for name, dt in (("x", E4M3), ("w", E4M3), ("g", E5M2)):
        numel = parts[0][name].numel()
        ms = bench([lambda p=p, name=name: fp8.op._amax_bits(p[name]) for p in parts])
        row("part", f"amax pass {name}", f"{tuple(parts[0][name].shape)}", ms, 2 * numel, "GB/s", roof)
        ms2 = bench([lambda p=p, name=name, dt=dt: qt_only(p, name, dt) for p in parts])
        cfg = getattr(fl._quant_transpose_kernel, "best_config", None)  # the autotuner's pick for this shape
        rp = parts[0][f"q_{name}"][1].shape[1]
        nbytes = 2 * numel + numel + parts[0][name].shape[1] * rp
        row("part", f"quantize+transpose {name} ({dt})", f"{tuple(parts[0][name].shape)}", ms2, nbytes, "GB/s", roof,
            config=cfg_str(cfg), note="2 B read + 1 + 1 B written /elem")  # fmt: skip
        if name == "g":
            bwd_sum += ms + ms2
        else:
            fwd_sum += ms + ms2
    mms = (
        ("_scaled_mm fwd x_q·w_qᵀ", lambda p: torch._scaled_mm(p["q_x"][0], p["q_w"][0].t(), scale_a=p["q_x"][2],
                                                              scale_b=p["q_w"][2], out_dtype=BF16)),
        ("_scaled_mm dgrad g_q·w_q", lambda p: torch._scaled_mm(p["q_g"][0], p["q_w"][1].t(), scale_a=p["q_g"][2],
                                                               scale_b=p["q_w"][2], out_dtype=BF16)),
        ("_scaled_mm wgrad g_qᵀ·x_q", lambda p: torch._scaled_mm(p["q_g"][1], p["q_x"][1].t(), scale_a=p["q_g"][2],
                                                                scale_b=p["q_x"][2], out_dtype=BF16)),
    )  # fmt: skip
    for i, (name, fn) in enumerate(mms):
        ms = bench([lambda p=p, fn=fn: fn(p) for p in parts])
        row("part", name, shape, ms, flops, "fp8", roof)
        if i == 0:
            fwd_sum += ms
        else:
            bwd_sum += ms
    fwd, full = res["new fp8_linear"]
    row("part", "sum of parts fwd", shape, fwd_sum, flops, "fp8", roof, note=f"measured fwd {fwd:.3f} ms")
    note = f"measured fwd+bwd - fwd {full - fwd:.3f} ms"
    row("part", "sum of parts bwd", shape, bwd_sum, 2 * flops, "fp8", roof, note=note)
    # what the old path spends on the same work
    ms = bench([lambda p=p: K.quantize_fp8(p["x"], "tensor", dtype=E4M3, backend="triton") for p in parts])
    row("old part", "fp8.py quantize_fp8 tensor x", f"({m}, {k})", ms, 5 * m * k, "GB/s", roof,
        note="amax pass + quantize pass: 2 + 2 + 1 B/elem")  # fmt: skip
    ms = bench([lambda p=p: p["q_g"][0].t().contiguous() for p in parts])
    row("old part", "FP8 g_q.t().contiguous()", f"({m}, {n})", ms, 2 * m * n, "GB/s", roof)


def sweep_configs(roof, smoke):
    """Every config of the quantize+transpose kernel at one large tensor, launched directly (no autotuner)."""
    import triton

    s = 256 if smoke else 8192
    x = rand((s, s), smoke)
    amax = fp8.op._amax_bits(x)
    qref, qtref, _ = fl._quantize_transpose(x, E4M3)
    qmax = fp8_max(E4M3)
    for cfg in fl._quant_transpose_kernel.configs:
        q, qt, sc = torch.empty_like(qref), torch.empty_like(qtref), torch.empty((), device=DEV)
        grid = (triton.cdiv(s, cfg.kwargs["BR"]), triton.cdiv(s, cfg.kwargs["BC"]))

        def qtk(cfg=cfg, q=q, qt=qt, sc=sc, grid=grid):
            fl._quant_transpose_kernel.fn[grid](x, q, qt, sc, amax, s, s, s, qmax, RELOAD_T=x.dtype == torch.float32, **cfg.kwargs,
                                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip

        qtk()
        ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in ((q, qref), (qt, qtref)))
        conf = cfg_str(cfg)
        ms = bench(qtk)
        row("sweep", "quantize+transpose", f"{s}x{s}", ms, 4 * x.numel(), "GB/s", roof, conf, "" if ok else "WRONG")
        if not ok:
            FAILURES.append(f"quantize+transpose config {conf}")


def write_table(out_dir, roof, device_name):
    lines = [
        f"Device: {device_name}; torch {torch.__version__}; measured copy {roof['bw'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {roof['bf16'] / 1e12:.0f} TFLOP/s, fp8 _scaled_mm {roof['fp8'] / 1e12:.0f} TFLOP/s",
        "",
        "| section | variant | shape | config | ms | achieved | % measured roofline | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['section']} | {r['variant']} | {r['shape']} | {r['config']} | {r['ms']:.4f} | {r['rate']} | "
              f"{r['pct']:.0f}% | {r['note']} |" for r in ROWS]  # fmt: skip
    text = "\n".join(lines)
    log("\n" + text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "tune_fp8_linear.md"), "w") as f:
            f.write(text + "\n")


def main():
    args = script_parser(__doc__).parse_args()
    device_name = start(args.smoke)
    torch.manual_seed(0)
    roof = roofline(args.smoke)
    steps = [
        ("quantize+transpose check", lambda: check_quantize_transpose(
            [(40, 48), (300, 520)] if args.smoke else [(1000, 1544), (8192, 8192)], args.smoke)),
        ("fp8_linear vs reference", lambda: check_linear_vs_reference(args.smoke)),
    ]  # fmt: skip
    if not args.smoke:
        steps.append(("compile", check_compile))
    shapes = [(40, 48, 64)] if args.smoke else [(8192, 8192, 8192), (4096, 8192, 8192)]
    steps += [(f"bench {s}", lambda s=s: bench_shape(*s, roof, args.smoke)) for s in shapes]
    steps.append(("config sweep", lambda: sweep_configs(roof, args.smoke)))
    for name, fn in steps:
        run_step(name, fn)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    write_table(args.out, roof, device_name)
    finish()


if __name__ == "__main__":
    main()
