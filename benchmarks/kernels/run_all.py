"""Kernel checks and benchmarks for scaleforge.kernels (one script for the GPU machine).

    PYTHONPATH=$PWD python benchmarks/kernels/run_all.py --check --bench --out DIR

--check: bf16/fp16/fp8 numerics against the fp32 references and torch.compile(fullgraph=True) through
         every op (the parts the CPU interpreter cannot test).
--bench: per kernel and shape, median time of triton.testing.do_bench, achieved GB/s or TFLOP/s, percent
         of the roofline measured here (large device copy; large bf16 / fp8 matmul) and of the datasheet,
         and the speedup over the PyTorch reference, eager and torch.compile'd. Prints a markdown table
         and writes it (plus CSV) under --out.
--smoke: tiny shapes, CPU allowed (TRITON_INTERPRET=1), to test this script's logic without a GPU.
"""

from __future__ import annotations

import csv
import math
import os
import traceback

import torch
import torch.nn.functional as F

import scaleforge.kernels as K
from scaleforge.kernels.reference import (
    dequantize_fp8_ref,
    fp8_linear_ref,
    layer_norm_ref,
    quantize_fp8_ref,
    quantize_fp8_state_ref,
    relu_linear_attention_ref,
    rms_norm_ref,
)

from _common import (DEV, FAILURES, bench, check, copy_bandwidth, finish, graph_bench, log, matmul_rooflines,
                     rel_err, run_step, script_parser, start)

ROWS: list[dict] = []
DATASHEET = {  # kernels.md §1 (dense)
    "H100": dict(bw=3.35e12, bf16=989.4e12, fp8=1979e12),
    "H200": dict(bw=4.8e12, bf16=989.4e12, fp8=1979e12),
}


# ------------------------------------------------------------------------------------------ checks


def run_checks(smoke: bool):
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    # linear attention, bf16 and fp16, forward + backward vs fp32 reference
    shape = (2, 4, 97, 32) if smoke else (2, 70, 1025, 32)
    for dt in ([torch.float32] if smoke else [bf16, torch.float16]):
        q, k, v = (torch.randn(shape, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
        out = K.relu_linear_attention(q, k, v, backend="triton")
        ref = relu_linear_attention_ref(*(t.float() for t in (q, k, v)))
        low = relu_linear_attention_ref(q, k, v).float()  # the reference run in the low precision I/O
        e, e_low = rel_err(out, ref), rel_err(low, ref)
        check(f"rla fwd {dt}", e <= max(2 * e_low, 1e-5), f"rel err {e:.2e} (torch ref in {dt}: {e_low:.2e})")
        g = torch.randn_like(out)
        ga = torch.autograd.grad(out, (q, k, v), g)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        gb = torch.autograd.grad(relu_linear_attention_ref(qf, kf, vf), (qf, kf, vf), g.float())
        gl = torch.autograd.grad(relu_linear_attention_ref(q, k, v), (q, k, v), g)
        for n, a, b, c in zip("qkv", ga, gb, gl):
            e, e_low = rel_err(a, b), rel_err(c, b)
            check(f"rla d{n} {dt}", e <= max(2 * e_low, 1e-5), f"rel err {e:.2e} (torch ref: {e_low:.2e})")
    # QK-norm path in bf16
    q, k, v = (torch.randn(shape, device=DEV, dtype=bf16 if not smoke else torch.float32) for _ in range(3))
    w = 1 + 0.1 * torch.randn(shape[1] * shape[3], device=DEV)
    out = K.relu_linear_attention(q, k, v, qk_norm_weight_q=w, qk_norm_weight_k=w, backend="triton")
    ref = relu_linear_attention_ref(q.float(), k.float(), v.float(), qk_norm_weight_q=w, qk_norm_weight_k=w)
    check("rla qk-norm fwd", rel_err(out, ref) < 1e-2, f"rel err {rel_err(out, ref):.2e}")

    # norms, bf16 forward + backward vs fp32 reference
    b, n, c = (2, 13, 96) if smoke else (4, 1025, 2240)
    dt = torch.float32 if smoke else bf16
    for fn, rfn in ((K.layer_norm, layer_norm_ref), (K.rms_norm, rms_norm_ref)):
        x, r = (torch.randn(b, n, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(2))
        sh, sc, gt = (torch.randn(b, 1, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
        kw = dict(shift=sh, scale=sc, residual=r, gate=gt)
        y, h = fn(x, **kw, backend="triton")
        f32 = [t.detach().float().requires_grad_() for t in (x, sh, sc, r, gt)]
        yr, hr = rfn(f32[0], shift=f32[1], scale=f32[2], residual=f32[3], gate=f32[4])
        check(f"{fn.__name__} fwd {dt}", rel_err(y, yr) < 1e-2 and rel_err(h, hr) < 1e-2, f"{rel_err(y, yr):.2e}")
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        ga = torch.autograd.grad((y, h), (x, sh, sc, r, gt), (gy, gh))
        gb = torch.autograd.grad((yr, hr), f32, (gy.float(), gh.float()))
        errs = [rel_err(a, b) for a, b in zip(ga, gb[:1] + gb[1:])]
        check(f"{fn.__name__} bwd {dt}", max(errs) < 2e-2, "rel errs " + " ".join(f"{e:.1e}" for e in errs))

    # norms in fp32, per-sample and per-token modulation at the tuned C classes: the tuned bf16 launch configs
    # pipeline their row loops through shared memory, and fp32 tiles (twice the bytes) or per-token modulation
    # (more streamed tensors) would overflow it at the tuned stage counts; norms.launch._fit_stages lowers them
    for c in ((96,) if smoke else (1152, 2240, 4096)):
        nb, nn = (2, 13) if smoke else (2, 333)
        for per_token in (False, True):
            for fn, rfn, res in ((K.layer_norm, layer_norm_ref, False), (K.rms_norm, rms_norm_ref, False),
                                 (K.layer_norm, layer_norm_ref, True)):  # fmt: skip
                mshape = (nb, nn, c) if per_token else (nb, 1, c)
                x, r = (torch.randn(nb, nn, c, device=DEV, requires_grad=True) for _ in range(2))
                sh, sc, gt = (torch.randn(mshape, device=DEV, requires_grad=True) for _ in range(3))
                kw = dict(shift=sh, scale=sc) | (dict(residual=r, gate=gt) if res else {})
                leaves = [x, sh, sc] + ([r, gt] if res else [])
                out = fn(x, **kw, backend="triton")
                ref = rfn(x, **kw)
                out, ref = (o if isinstance(o, tuple) else (o,) for o in (out, ref))
                gs = [torch.randn_like(o) for o in out]
                ga = torch.autograd.grad(out, leaves, gs)
                gb = torch.autograd.grad(ref, leaves, gs)
                errs = [rel_err(a, b) for a, b in zip(out + ga, ref + gb)]
                name = f"{fn.__name__}{' + residual' if res else ''} fp32 C={c} {'per-token' if per_token else 'per-sample'}"
                check(name, max(errs) < 1e-4, f"max rel err (outputs, grads) {max(errs):.1e}")

    # FP8 quantizers: codes bit-identical to torch's conversion on GPU
    x = torch.randn(513, 1000, device=DEV, dtype=torch.float32 if smoke else bf16) * 4
    for gran, gs in (("tensor", 128), ("group", 128), ("group", 16)):
        for fdt in (torch.float8_e4m3fn, torch.float8_e5m2):
            q, s = K.quantize_fp8(x, gran, gs, fdt, backend="triton")
            qr, sr = quantize_fp8_ref(x, gran, gs, fdt)
            same = (q.view(torch.uint8) == qr.view(torch.uint8)).float().mean().item()
            se = rel_err(s, sr)
            check(f"quantize {gran}{gs if gran == 'group' else ''} {fdt}", (same == 1.0 or smoke) and se < 1e-6,
                  f"identical codes {same:.6f}, scale rel err {se:.1e}")  # fmt: skip
            d = K.dequantize_fp8(q, s, group_size=gs, out_dtype=bf16, backend="triton")
            dr = dequantize_fp8_ref(qr, sr, group_size=gs, out_dtype=bf16)
            check(f"dequantize {gran} {fdt}", smoke or torch.equal(d, dr), f"rel err {rel_err(d, dr):.1e}")
    st = K.quantize_fp8_state(x.float(), backend="triton")
    sr = quantize_fp8_state_ref(x.float())
    same = (st.q.view(torch.uint8) == sr.q.view(torch.uint8)).float().mean().item()
    y, yr = K.dequantize_fp8_state(st, backend="triton"), K.dequantize_fp8_state(sr, backend="torch")
    check("state codec", torch.equal(st.expand, sr.expand) and rel_err(y, x.float()) < 1.01 * rel_err(yr, x.float()) + 1e-6,
          f"identical codes {same:.4f}, roundtrip rel err {rel_err(y, x.float()):.2e} (ref {rel_err(yr, x.float()):.2e})")  # fmt: skip

    # FP8 linear vs its reference and vs bf16
    m, kk, nn = (64, 128, 96) if smoke else (4096, 4096, 4096)
    x = torch.randn(m, kk, device=DEV, dtype=bf16, requires_grad=True)
    w = (torch.randn(nn, kk, device=DEV, dtype=bf16) / math.sqrt(kk)).requires_grad_()
    y = K.fp8_linear(x, w, backend="triton")
    yr = fp8_linear_ref(x, w)
    yb = F.linear(x, w)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, w), g)
    gr = torch.autograd.grad(yr, (x, w), g)
    gb = torch.autograd.grad(yb, (x, w), g)
    check("fp8_linear fwd vs fp8 reference", rel_err(y, yr) < 1e-2, f"{rel_err(y, yr):.2e}")
    for name, a, b in zip(("dx", "dw"), ga, gr):
        check(f"fp8_linear {name} vs fp8 reference", rel_err(a, b) < 1e-2, f"{rel_err(a, b):.2e}")
    log(f"[info] fp8_linear error vs bf16 linear: y {rel_err(y, yb):.3e}, dx {rel_err(ga[0], gb[0]):.3e}, "
        f"dw {rel_err(ga[1], gb[1]):.3e}")  # fmt: skip

    # the amax a norm computes as it writes y (return_amax) is max|y| exactly, and the per-tensor quantizers
    # given it produce the codes of their own amax pass (bf16 on the tuned default configs)
    b, n, c = (2, 13, 96) if smoke else (4, 1025, 2240)
    x, r = (torch.randn(b, n, c, device=DEV, dtype=dt) + 3 for _ in range(2))
    sh, sc, gt = (torch.randn(b, 1, c, device=DEV, dtype=dt) for _ in range(3))
    for name, fn, kw in (("layer_norm", K.layer_norm, dict(shift=sh, scale=sc)),
                         ("rms_norm", K.rms_norm, dict(shift=sh, scale=sc)),
                         ("gated residual", K.layer_norm, dict(shift=sh, scale=sc, residual=r, gate=gt))):  # fmt: skip
        *outs, amax = fn(x, **kw, return_amax=True, backend="triton")
        y = outs[0]
        ok = torch.equal(amax, y.abs().amax().float())
        q, s = K.quantize_fp8(y, "tensor", amax=amax, backend="triton")
        q0, s0 = K.quantize_fp8(y, "tensor", backend="triton")
        ok_q = torch.equal(s, s0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8))
        check(f"{name} return_amax {dt}", ok and ok_q, f"amax {amax.item():.4f} == max|y|: {ok}; quantize_fp8 "
              f"with it == its own amax pass (codes, scale): {ok_q}")  # fmt: skip
    if not smoke:
        w = torch.randn(512, c, device=DEV, dtype=dt)
        y2 = y.reshape(-1, c)
        ok = torch.equal(K.fp8_linear(y2, w, x_amax=amax, backend="triton"), K.fp8_linear(y2, w, backend="triton"))
        check("fp8_linear x_amax", ok, f"output with the producer's amax == with its own amax pass: {ok}")

    if smoke:
        return
    # torch.compile(fullgraph=True) through every op, compared with eager
    def compiled_ok(name, fn, *args):
        """Forward torch.compile(fullgraph=True)'d; backward through AOTAutograd outside the compiled call."""
        try:
            torch._dynamo.reset()
            outs = []
            for f in (fn, torch.compile(fn, fullgraph=True)):
                out = f(*args)
                out = out if isinstance(out, tuple) else (out,)
                leaves = [a for a in args if a.requires_grad]
                grads = torch.autograd.grad(sum(o.float().square().sum() for o in out), leaves) if leaves else ()
                outs.append([*out, *grads])
            errs = [rel_err(a.float(), b.float()) for a, b in zip(outs[1], outs[0])]
            check(f"compile {name}", max(errs) < 1e-2, f"compiled vs eager rel err (outputs, grads) {max(errs):.1e}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            check(f"compile {name}", False, f"{type(e).__name__}: {str(e)[:600]}")

    q, k, v = (torch.randn(2, 8, 256, 32, device=DEV, dtype=bf16, requires_grad=True) for _ in range(3))
    compiled_ok("relu_linear_attention", lambda q, k, v: K.relu_linear_attention(q, k, v, backend="triton"), q, k, v)
    x = torch.randn(4, 64, 256, device=DEV, dtype=bf16, requires_grad=True)
    mods = [torch.randn(4, 1, 256, device=DEV, dtype=bf16, requires_grad=True) for _ in range(3)]

    def norm_fwd(x, sh, sc, gt):
        y, h = K.layer_norm(x, shift=sh, scale=sc, residual=x * 2, gate=gt, backend="triton")
        return K.rms_norm(y, backend="triton"), h

    compiled_ok("layer_norm/rms_norm", norm_fwd, x, *mods)
    wb = [torch.randn(256, device=DEV, dtype=bf16, requires_grad=True) for _ in range(2)]
    tok = torch.randn(4, 64, 256, device=DEV, dtype=bf16, requires_grad=True)

    def norm_params(x, w, b, sc, tok):  # weight and bias, a per-channel (C,) scale, a per-token shift and gate
        y, h = K.layer_norm(x, w, b, shift=tok, scale=sc, residual=x * 2, gate=tok, backend="triton")
        return K.rms_norm(y, w, backend="triton"), h

    sc_c = (wb[0] * 0.5).detach().requires_grad_()  # a leaf: the eager pass's backward frees a non-leaf's graph
    compiled_ok("layer_norm/rms_norm with weight, bias, per-channel and per-token modulation", norm_params, x, *wb,
                sc_c, tok)  # fmt: skip
    xa = torch.randn(4, 64, 256, device=DEV, dtype=bf16, requires_grad=True)
    wa = torch.randn(128, 256, device=DEV, dtype=bf16, requires_grad=True)

    def producer_amax(x, w):  # the norm's amax feeding fp8_linear's and quantize_fp8's per-tensor scale
        y, a = K.layer_norm(x, return_amax=True, backend="triton")
        q = K.quantize_fp8(y.detach(), "tensor", amax=a, backend="triton")[0]  # codes: no gradient
        return K.fp8_linear(y, w, x_amax=a, backend="triton"), q.float()

    compiled_ok("layer_norm(return_amax) -> fp8_linear(x_amax) / quantize_fp8(amax)", producer_amax, xa, wa)
    xq = torch.randn(256, 512, device=DEV, dtype=bf16)
    compiled_ok("quantize/dequantize group", lambda x: K.dequantize_fp8(*K.quantize_fp8(x, "group", 128, backend="triton"), backend="triton"), xq)
    compiled_ok("quantize/dequantize tensor", lambda x: K.dequantize_fp8(*K.quantize_fp8(x, "tensor", backend="triton"), backend="triton"), xq)
    xl = torch.randn(256, 512, device=DEV, dtype=bf16, requires_grad=True)
    wl = torch.randn(384, 512, device=DEV, dtype=bf16, requires_grad=True)
    compiled_ok("fp8_linear", lambda x, w: K.fp8_linear(x, w, backend="triton"), xl, wl)
    try:
        from scaleforge.kernels import fp8, linear_attention, norms  # noqa: F401

        torch.library.opcheck(torch.ops.scaleforge.relu_linear_attention_fwd.default, (q, k, v, 1e-8))
        torch.library.opcheck(torch.ops.scaleforge.quantize_fp8_group.default, (xl.detach(), 128, torch.float8_e4m3fn))
        check("opcheck rla fwd / quantize group", True, "ok")
    except Exception as e:  # noqa: BLE001
        check("opcheck", False, f"{type(e).__name__}: {str(e)[:300]}")


# ------------------------------------------------------------------------------------------ benchmarks


def roofline(smoke):
    bw = copy_bandwidth(smoke)
    bf16_flops, fp8_flops = matmul_rooflines(smoke)
    log(f"[roofline] copy {bw / 1e12:.3f} TB/s (read+write), bf16 matmul {bf16_flops / 1e12:.1f} TFLOP/s, "
        f"fp8 _scaled_mm {fp8_flops / 1e12:.1f} TFLOP/s")  # fmt: skip
    return dict(bw=bw, bf16=bf16_flops, fp8=fp8_flops)


def add_row(kernel, shape, ms, amount, kind, roof, sheet, ref_eager=None, ref_comp=None, extra=""):
    rate = amount / ms / 1e-3
    peak = roof["bw"] if kind == "GB/s" else roof[kind]
    peak_ds = sheet.get("bw" if kind == "GB/s" else kind, float("nan"))
    row = dict(
        kernel=kernel, shape=shape, ms=ms,
        rate=f"{rate / 1e9:.0f} GB/s" if kind == "GB/s" else f"{rate / 1e12:.0f} TFLOP/s ({kind})",
        pct_measured=100 * rate / peak, pct_datasheet=100 * rate / peak_ds,
        vs_eager=(ref_eager / ms) if ref_eager else float("nan"),
        vs_compiled=(ref_comp / ms) if ref_comp else float("nan"), note=extra,
    )  # fmt: skip
    ROWS.append(row)
    log(f"[bench] {kernel} {shape}: {ms:.3f} ms, {row['rate']}, {row['pct_measured']:.0f}% of measured roofline "
        f"({row['pct_datasheet']:.0f}% datasheet), x{row['vs_eager']:.2f} vs eager ref, x{row['vs_compiled']:.2f} "
        f"vs compiled ref {extra}")  # fmt: skip


def ref_times(fn, *args, grad_to_none=None):
    eager = bench(lambda: fn(*args), grad_to_none)
    try:
        torch._dynamo.reset()
        comp = torch.compile(fn, fullgraph=True)
        comp(*args)
        compiled = bench(lambda: comp(*args), grad_to_none)
    except Exception as e:  # noqa: BLE001
        log(f"[warn] torch.compile of the reference failed: {type(e).__name__}: {str(e)[:200]}")
        compiled = None
    return eager, compiled


def full_ref_times(step, ref_fn, leaves):
    """fwd+bwd of a reference: eager, and with the forward torch.compile'd (backward by AOTAutograd)."""
    eager = bench(lambda: step(ref_fn), leaves)
    try:
        torch._dynamo.reset()
        comp = torch.compile(ref_fn, fullgraph=True)
        step(comp)
        compiled = bench(lambda: step(comp), leaves)
    except Exception as e:  # noqa: BLE001
        log(f"[warn] torch.compile of the reference failed: {type(e).__name__}: {str(e)[:200]}")
        compiled = None
    return eager, compiled


def bench_quant(roof, sheet, smoke):
    s = 512 if smoke else 8192
    x = torch.randn(s, s, device=DEV, dtype=torch.bfloat16)
    n = x.numel()
    for gran, gs in (("tensor", 128), ("group", 128), ("group", 16)):
        nbytes = n * 3 + (4 if gran == "tensor" else 4 * n // gs)  # logical I/O: read bf16, write fp8 + scales
        ms = bench(lambda: K.quantize_fp8(x, gran, gs, backend="triton"))
        e, c = ref_times(lambda t: quantize_fp8_ref(t, gran, gs), x)
        note = "two passes (amax, then quantize): 5 B/elem moved" if gran == "tensor" else ""
        add_row(f"quantize_fp8 {gran}{gs if gran == 'group' else ''}", f"{s}x{s} bf16", ms, nbytes, "GB/s", roof, sheet, e, c, note)
        q, sc = K.quantize_fp8(x, gran, gs, backend="triton")
        if gran == "tensor":
            ms = bench(lambda: K.quantize_fp8(x, "tensor", scale=sc, backend="triton"))
            add_row("quantize_fp8 tensor, given scale", f"{s}x{s} bf16", ms, nbytes, "GB/s", roof, sheet)
        ms = bench(lambda: K.dequantize_fp8(q, sc, group_size=gs, backend="triton"))
        e, c = ref_times(lambda a, b: dequantize_fp8_ref(a, b, group_size=gs), q, sc)
        add_row(f"dequantize_fp8 {gran}{gs if gran == 'group' else ''}", f"{s}x{s} ->bf16", ms, nbytes, "GB/s", roof, sheet, e, c)
    m = torch.randn(s * s // 4 if not smoke else 4096, device=DEV)  # optimizer state fp32
    ms = bench(lambda: K.quantize_fp8_state(m, backend="triton"))
    e, c = ref_times(lambda t: quantize_fp8_state_ref(t), m)
    add_row("quantize_fp8_state (COAT expand)", f"{m.numel()} fp32", ms, m.numel() * (4 + 1) + m.numel() // 128 * 12, "GB/s", roof, sheet, e, c)


def bench_fp8_linear(roof, sheet, smoke):
    s = 256 if smoke else 8192
    x = torch.randn(s, s, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(s, s, device=DEV, dtype=torch.bfloat16) / math.sqrt(s)).requires_grad_()
    g = torch.randn(s, s, device=DEV, dtype=torch.bfloat16)
    flops = 3 * 2 * s**3

    def step(fn):
        return lambda: fn(x, w).backward(g)

    ms8 = bench(step(lambda a, b: K.fp8_linear(a, b, backend="triton")), [x, w])
    ms16 = bench(step(F.linear), [x, w])
    ms8f = bench(lambda: K.fp8_linear(x, w, backend="triton"))
    ms16f = bench(lambda: F.linear(x, w))
    y8, yb = K.fp8_linear(x, w, backend="triton"), F.linear(x, w)
    err = rel_err(y8, yb)
    add_row("fp8_linear fwd", f"{s}^3", ms8f, 2 * s**3, "fp8", roof, sheet, extra=f"bf16 F.linear fwd {ms16f:.3f} ms: x{ms16f / ms8f:.2f}")
    add_row("fp8_linear fwd+bwd", f"{s}^3", ms8, flops, "fp8", roof, sheet,
            extra=f"bf16 F.linear fwd+bwd {ms16:.3f} ms: x{ms16 / ms8:.2f}; out rel err vs bf16 {err:.2e}")  # fmt: skip


def bench_norms(roof, sheet, smoke):
    b, n, c = (2, 64, 256) if smoke else (16, 4096, 2240)  # SANA-1.6B width, 4096 tokens
    dt = torch.bfloat16
    x, r = (torch.randn(b, n, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(2))
    sh, sc, gt = (torch.randn(b, 1, c, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
    e = x.numel() * 2
    cases = [
        ("layer_norm + adaLN modulate", K.layer_norm, layer_norm_ref, dict(shift=sh, scale=sc), 2 * e, 3 * e),
        ("rms_norm + adaLN modulate", K.rms_norm, rms_norm_ref, dict(shift=sh, scale=sc), 2 * e, 3 * e),
        ("layer_norm + gated residual + modulate", K.layer_norm, layer_norm_ref,
         dict(shift=sh, scale=sc, residual=r, gate=gt), 4 * e, 6 * e),
    ]  # fmt: skip
    # bytes (bf16), each tensor once: fwd reads x (+ residual) and writes y (+ h = x + gate * residual);
    # bwd reads dy (+ dh) and x (+ residual) and writes dx (+ dresidual); mean/rstd are fp32 per row.
    # Modulation/parameter traffic is O(B*C) and left out. The output gradients are made before timing.
    for name, fn, rfn, kw, fwd_bytes, bwd_bytes in cases:
        def fwd(fn=fn, kw=kw):
            return fn(x, **kw)

        with K.use_backend("triton"):
            ms = bench(fwd)
        e_ms, c_ms = ref_times(lambda t, fn=rfn, kw=kw: fn(t, **kw), x)
        add_row(f"{name} fwd", f"{b}x{n}x{c}", ms, fwd_bytes, "GB/s", roof, sheet, e_ms, c_ms)
        leaves = [x, r, sh, sc, gt]
        outs = rfn(x, **kw)
        grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]

        def full(fn, kw=kw, grads=grads):
            out = fn(x, **kw)
            torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

        with K.use_backend("triton"):
            ms_full = bench(lambda: full(fn), leaves)
        e_full, c_full = full_ref_times(full, rfn, leaves)
        ms_bwd = ms_full - ms
        add_row(f"{name} bwd (fwd+bwd minus fwd)", f"{b}x{n}x{c}", ms_bwd, bwd_bytes, "GB/s", roof, sheet,
                e_full - e_ms, (c_full - c_ms) if c_full and c_ms else None)  # fmt: skip
        add_row(f"{name} fwd+bwd", f"{b}x{n}x{c}", ms_full, fwd_bytes + bwd_bytes, "GB/s", roof, sheet, e_full, c_full)


def bench_producer_amax(roof, sheet, smoke):
    """COAT's producer-fused per-tensor scaling (coat.md §3): the norm folds max|y| into one scalar as it writes
    y (return_amax), and the per-tensor quantizer given that amax reads y once instead of twice. Eager single
    calls as elsewhere, and device time alone (CUDA graphs of 10 calls) in the notes."""
    b, n, c = (2, 64, 256) if smoke else (16, 4096, 2240)
    dt = torch.bfloat16
    x = torch.randn(b, n, c, device=DEV, dtype=dt)
    sh, sc = (torch.randn(b, 1, c, device=DEV, dtype=dt) for _ in range(2))
    e = x.numel() * 2
    with K.use_backend("triton"):
        plain = lambda: K.layer_norm(x, shift=sh, scale=sc)  # noqa: E731
        with_amax = lambda: K.layer_norm(x, shift=sh, scale=sc, return_amax=True)  # noqa: E731
        ms, g_plain, g_amax = bench(with_amax), graph_bench(plain, 10), graph_bench(with_amax, 10)
        add_row("layer_norm + adaLN modulate fwd, return_amax", f"{b}x{n}x{c}", ms, 2 * e, "GB/s", roof, sheet,
                extra=f"device time: {g_amax:.4f} ms with the amax, {g_plain:.4f} ms without")  # fmt: skip
        # the pair a COAT linear input goes through: norm, then the per-tensor quantize of its output
        pair_own = lambda: K.quantize_fp8(plain(), "tensor")  # noqa: E731
        pair_fused = lambda: _quant_with(with_amax())  # noqa: E731
        pair_bytes = 2 * e + x.numel() * 3  # the norm's read and write, the quantize's logical 3 B/element
        for label, fn in (("own amax pass", pair_own), ("the norm's amax", pair_fused)):
            ms, g = bench(fn), graph_bench(fn, 10)
            add_row(f"layer_norm + modulate fwd -> quantize_fp8 tensor ({label})", f"{b}x{n}x{c}", ms, pair_bytes,
                    "GB/s", roof, sheet, extra=f"device time {g:.4f} ms ({_pct_of_copy(pair_bytes, g, roof):.0f}% "
                    "of copy)")  # fmt: skip
    s2 = 512 if smoke else 8192
    xq = torch.randn(s2, s2, device=DEV, dtype=dt)
    a = xq.abs().amax().float()
    nbytes = xq.numel() * 3 + 4
    fn = lambda: K.quantize_fp8(xq, "tensor", amax=a, backend="triton")  # noqa: E731
    ms, g = bench(fn), graph_bench(fn, 10)
    add_row("quantize_fp8 tensor, amax from the producer", f"{s2}x{s2} bf16", ms, nbytes, "GB/s", roof, sheet,
            extra=f"one pass; device time {g:.4f} ms ({_pct_of_copy(nbytes, g, roof):.0f}% of copy)")  # fmt: skip


def _pct_of_copy(nbytes, ms, roof):
    """Percent of the measured copy bandwidth for nbytes moved in ms (a device time from graph_bench)."""
    return 100 * nbytes / (ms * 1e-3) / roof["bw"]


def _quant_with(y_amax):
    y, amax = y_amax
    return K.quantize_fp8(y, "tensor", amax=amax)


def bench_linear_attention(roof, sheet, smoke):
    shapes = [(2, 4, 256, 32)] if smoke else [(32, 70, 1024, 32), (8, 70, 4096, 32), (16, 70, 4096, 32)]
    dt = torch.float32 if smoke else torch.bfloat16
    for shape in shapes:
        q, k, v = (torch.randn(shape, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
        g = torch.randn(shape, device=DEV, dtype=dt)
        tensor_bytes = q.numel() * q.element_size()
        ms = bench(lambda: K.relu_linear_attention(q, k, v, backend="triton"))
        e, c = ref_times(lambda a, b_, c_: relu_linear_attention_ref(a, b_, c_), q, k, v)
        bsz, h, n, d = shape
        add_row("relu_linear_attention fwd", f"B{bsz} H{h} N{n} D{d}", ms, 4 * tensor_bytes, "GB/s", roof, sheet, e, c,
                f"{4 * bsz * h * n * d * d / ms / 1e9:.1f} TFLOP/s core")  # fmt: skip

        def full(fn):
            fn(q, k, v).backward(g)

        ms_f = bench(lambda: full(lambda a, b_, c_: K.relu_linear_attention(a, b_, c_, backend="triton")), [q, k, v])
        e_f, c_f = full_ref_times(full, relu_linear_attention_ref, [q, k, v])
        add_row("relu_linear_attention fwd+bwd", f"B{bsz} H{h} N{n} D{d}", ms_f, 11 * tensor_bytes, "GB/s", roof, sheet, e_f, c_f)


def write_tables(out_dir, roof, device_name):
    lines = [
        f"Device: {device_name}; torch {torch.__version__}; measured copy {roof['bw'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {roof['bf16'] / 1e12:.0f} TFLOP/s, fp8 matmul {roof['fp8'] / 1e12:.0f} TFLOP/s",
        "",
        "| kernel | shape | ms | achieved | % measured roofline | % datasheet | x vs eager ref | x vs compiled ref | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['ms']:.3f} | {r['rate']} | {r['pct_measured']:.0f}% | "
                     f"{r['pct_datasheet']:.0f}% | {r['vs_eager']:.2f} | {r['vs_compiled']:.2f} | {r['note']} |")  # fmt: skip
    text = "\n".join(lines)
    log("\n" + text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "kernels_table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, "kernels.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(ROWS[0]) if ROWS else ["kernel"])
            wr.writeheader()
            wr.writerows(ROWS)


def main():
    ap = script_parser(__doc__)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--only", default="", help="comma list of: quant,amax,linear,norms,attention")
    args = ap.parse_args()
    device_name = start(args.smoke)
    if args.check:
        run_step("checks", lambda: run_checks(args.smoke))
    if args.bench:
        sheet = next((v for k, v in DATASHEET.items() if k in device_name), {})
        roof = roofline(args.smoke)
        only = set(filter(None, args.only.split(","))) or {"quant", "amax", "linear", "norms", "attention"}
        for key, fn in (("attention", bench_linear_attention), ("norms", bench_norms), ("quant", bench_quant),
                        ("amax", bench_producer_amax), ("linear", bench_fp8_linear)):  # fmt: skip
            if key in only:
                run_step(f"bench {key}", lambda fn=fn: fn(roof, sheet, args.smoke))
        write_tables(args.out, roof, device_name)
    finish()


if __name__ == "__main__":
    main()
