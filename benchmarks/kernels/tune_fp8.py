"""GPU sweep of the FP8 quantize/dequantize kernels (scaleforge/kernels/fp8/): for each kernel, every
candidate launch config (tile size, warps, and for the quantizers and the amax pass the tile-loop variants:
persistent grid, next tile prefetched, evict_first loads; see ``fp8.launch._cfg``) launched as the library
launches it, checked against the torch reference (FP8 codes and scales bit-equal, outputs poisoned first)
and timed; then the public functions, eagerly (device time plus any host-side gaps, as run_all.py measures)
and replayed from a CUDA graph (device time only). Ends with the fp8.launch._LAUNCH entries of the fastest configs.

    PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8.py            # H200: ~90 s before the group variants
    PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8.py --only quant_group   # the group quantize configs only
    PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8.py --only tensor   # per tensor, dynamic end to end included
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels/tune_fp8.py --smoke   # CPU, tiny shapes

The group quantize sweeps add the compile-time variants of fp8.quant_kernels._quant_group_kernel (GROUP_PER_THREAD,
SATFINITE; see fp8.launch._QUANT_GROUP_OPTS) on the best plain configs of round 1 and a
persistent prefetching grid, GROUP_PER_THREAD on BLOCK = 32 x warps x group (one group per thread).
The per-tensor quantize sweeps add SATFINITE (fp8.launch._QUANT_TENSOR_OPTS) on a few plain and persistent configs
(TENSOR_BASES); the given-scale check also takes a scale that saturates codes (on a GPU: the interpreter's
conversion does not saturate). The dynamic scale is then timed end to end as the library runs it: the amax
pass, then the quantize pass on the same x, for the best few configs of each pass's sweep (the amax ones
without evict_first), the quantize pass with and without REVERSE (tiles in reverse order: the first ones it
reads are the amax pass's last, which may still be in L2); each repetition takes the next of the rotating
inputs, so only the first pass leaves x in L2 for the second. Its best pair gives the "amax" and
"quant_tensor_dynamic" entries.
``--only`` takes a comma-separated subset of tensor (amax pass, per-tensor quantize and dequantize),
quant_group, dequant_group, state, api; with ``--only quant_group`` the group quantize sweeps keep only
the plain configs the variants are crossed with (GROUP_BASES) of QUANT_CONFIGS.

Bytes are logical (bf16 quantize: read 2 B + write 1 B per element, plus scales; dequantize the reverse);
the per-tensor dynamic quantize must read the input twice: its rows give % of copy bandwidth for both the
logical 3 B/element and the 5 B/element it moves. % is of a measured 1 GiB bf16 `copy_` (read + write);
the amax pass only reads, so its rows also give % of a measured read-only bandwidth (the faster of torch's
bf16 `sum` and `amax` over 1 GiB). A copy of one 8192² bf16 tensor is also timed: the same bytes as the
kernels here, so it shows what launch ramp-up and tail cost at this size.
Writes the table to $OUT/tune_fp8.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from scaleforge.kernels import dequantize_fp8, dequantize_fp8_state, fp8, quantize_fp8, quantize_fp8_state
from scaleforge.kernels.reference.fp8 import (
    dequantize_fp8_ref,
    dequantize_fp8_state_ref,
    fp8_max,
    quantize_fp8_ref,
    quantize_fp8_state_ref,
)

from _common import DEV, bench as _bench, copy_bandwidth, graph_bench

E4M3 = torch.float8_e4m3fn
ROWS: list[tuple] = []
BEST: dict[str, tuple[float, dict]] = {}
SMOKE = False
FAILED: list[str] = []
# one tile per program (round 1's best are among these), the same with evict_first loads, and persistent
# grids (WAVES programs per SM) with and without the next tile prefetched; 1024 w4 and 2048 w8 give each
# thread one 16-byte bf16 vector per tile
PLAIN = [(4096, 4), (4096, 8), (8192, 8), (16384, 8)]
PERSISTENT = [(1024, 4, 16), (2048, 8, 8), (4096, 4, 8), (4096, 8, 4), (8192, 8, 4)]
QUANT_CONFIGS = (
    [fp8.launch._cfg(b, w) for b, w in PLAIN]
    + [fp8.launch._cfg(4096, 4, evict_first=True), fp8.launch._cfg(16384, 8, evict_first=True)]
    + [fp8.launch._cfg(b, w, k, pf, True) for b, w, k in PERSISTENT for pf in (False, True)]
)
AMAX_CONFIGS = (
    [fp8.launch._cfg(b, w) for b, w in [(8192, 8), (16384, 8), (16384, 16)]]
    + [fp8.launch._cfg(16384, 16, evict_first=True)]
    + [fp8.launch._cfg(b, w, k, pf, True) for b, w, k in PERSISTENT + [(8192, 16, 2), (16384, 16, 2)] for pf in (False, True)]
)
# group quantize: fp8.quant_kernels._quant_group_kernel's compile-time variants on the best plain configs of round 1 (the
# table's group 128 and 16 entries among them) and a persistent prefetching grid; GROUP_PER_THREAD on
# BLOCK = 32 x warps x group (one group per thread, ~160 registers: 12 warps per SM) and two persistent
# grids. Group 16's default tile at BLOCK = 512 x warps already is GROUP_PER_THREAD's: not crossed there.
GROUP_BASES = [fp8.launch._cfg(4096, 4), fp8.launch._cfg(4096, 8), fp8.launch._cfg(8192, 8), fp8.launch._cfg(4096, 8, 4, True, True)]
# per-tensor quantize: SATFINITE on the plain configs of 8 warps (the table's entry among them) and two
# persistent prefetching grids (the last one: --smoke's persistent config); REVERSE only in the end-to-end
# sweep, on the fastest configs of the dynamic quantize pass
TENSOR_BASES = [(16384, 8), (8192, 8), (4096, 8), (8192, 8, 4, True, True), (4096, 8, 4, True, True)]  # _cfg args
TENSOR_QUANT_CONFIGS = QUANT_CONFIGS + [fp8.launch._cfg(*a, satfinite=True) for a in TENSOR_BASES]
E2E_TOP = 3  # configs of each pass in the dynamic end-to-end sweep (plus the table's)
GROUP_VARIANTS = [dict(satfinite=True)]
PER_THREAD_VARIANTS = [{}, dict(satfinite=True)]
DEQUANT_CONFIGS = [dict(BLOCK=b, num_warps=w) for b, w in [(4096, 4), (4096, 8), (8192, 4)]]
# the state codec: small tiles and few warps (see the instruction count at fp8.state_kernels._state_quant_kernel)
STATE_CONFIGS = [dict(BLOCK=b, num_warps=w) for b, w in [(1024, 2), (1024, 4), (2048, 2), (2048, 4)]]
SECTIONS = ("tensor", "quant_group", "dequant_group", "state", "api")
# fp8.launch._cfg's keyword options (the quantizers' compile-time variants): config key -> keyword
OPTS = {"GROUP_PER_THREAD": "group_per_thread", "SATFINITE": "satfinite", "REVERSE": "reverse"}
# sweep name -> fp8.launch._LAUNCH key
TABLE_KEYS = {
    "amax pass (per-tensor dynamic, 1/2)": "amax",
    "quantize per-tensor, given scale": "quant_tensor",
    "dynamic per-tensor end to end": ("amax", "quant_tensor_dynamic"),  # a pair of configs
    "dequantize per-tensor": "dequant_tensor",
    "quantize group 128": "quant_group/128",
    "dequantize group 128": "dequant_group/128",
    "quantize group 16": "quant_group/16",
    "dequantize group 16": "dequant_group/16",
    "quantize_fp8_state (COAT expand)": "state_quant",
    "dequantize_fp8_state": "state_dequant",
}


def group_quant_configs(gs: int, base: list[dict]) -> list[dict]:
    """base, then the variants on GROUP_BASES and (groups over 16) GROUP_PER_THREAD's configs."""
    out = base + [fp8.launch._cfg(*cfg_args(c), **v) for c in GROUP_BASES for v in GROUP_VARIANTS]
    if gs > 16:
        # (a prefetching grid would need ~2 x 128 values per thread: 255 registers and spills)
        per_thread = [(32 * w * gs, w) for w in (1, 2, 4)] + [(32 * 4 * gs, 4, 3), (32 * gs, 1, 12)]
        out += [fp8.launch._cfg(*a, group_per_thread=True, **v) for a in per_thread for v in PER_THREAD_VARIANTS]
    return out


def cfg_args(cfg: dict) -> tuple:
    """fp8.launch._cfg's positional arguments for cfg."""
    return cfg["BLOCK"], cfg["num_warps"], cfg["WAVES"], cfg["PREFETCH"], cfg["EVICT_FIRST"]


def cfg_str(cfg: dict | tuple) -> str:
    if isinstance(cfg, tuple):  # the dynamic end-to-end sweep's (amax, quantize) pair
        return f"amax {cfg_str(cfg[0])}; quant {cfg_str(cfg[1])}"
    out = f"BLOCK={cfg['BLOCK']} w{cfg['num_warps']}"
    if cfg.get("WAVES"):
        out += f" persistent x{cfg['WAVES']}/SM" + (" prefetch" if cfg["PREFETCH"] else "")
    if cfg.get("EVICT_FIRST"):
        out += " evict_first"
    return out + "".join(f" {kw}" for key, kw in OPTS.items() if cfg.get(key))


def cfg_code(cfg: dict) -> str:
    """The fp8.launch._LAUNCH entry for cfg."""
    if "WAVES" not in cfg:
        return f"dict(BLOCK={cfg['BLOCK']}, num_warps={cfg['num_warps']})"
    args = [str(cfg["BLOCK"]), str(cfg["num_warps"])]
    if cfg["WAVES"] or cfg["PREFETCH"] or cfg["EVICT_FIRST"]:
        args += [str(cfg["WAVES"]), str(cfg["PREFETCH"]), str(cfg["EVICT_FIRST"])]
    args += [f"{kw}=True" for key, kw in OPTS.items() if cfg.get(key)]
    return f"_cfg({', '.join(args)})"


def bench(fn) -> float:
    """Median ms (do_bench flushes L2 between runs; every input here is larger than the 50 MB L2)."""
    return _bench(fn, warmup=5, rep=25)


def poison(shape, dtype):
    t = torch.empty(shape, dtype=dtype, device=DEV)
    (t.view(torch.uint8).fill_(0xFF) if dtype.itemsize == 1 else t.fill_(float("nan")))  # 0xFF: FP8 NaN
    return t


def same(a, b) -> bool:
    """Bit-equal; the interpreter's fp32 -> fp8/bf16 conversions are not round-to-nearest, so --smoke
    only asks for 90% equal FP8 codes and 1e-2 relative error elsewhere."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.reshape(-1), b.reshape(-1)  # 0-d tensors cannot be viewed as another element size
    if not SMOKE:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if a.dtype.itemsize == 1:
        return (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item() >= 0.9
    return bool(torch.isfinite(a).all()) and ((a.double() - b.double()).norm() <= 1e-2 * b.double().norm()).item()


def row(kernel, config, ok, ms, nbytes, roof, moved=None, read_roof=None, cfg=None):
    pct = 100 * nbytes / (ms * 1e-3) / roof
    extra = f" ({100 * moved / (ms * 1e-3) / roof:.0f}% of moved)" if moved else ""
    if read_roof:
        extra += f" ({100 * nbytes / (ms * 1e-3) / read_roof:.0f}% of read-only)"
    ROWS.append((kernel, config, "ok" if ok else "FAIL", f"{ms:.4f}", f"{nbytes / (ms * 1e-3) / 1e9:.0f}", f"{pct:.0f}%{extra}"))
    print(f"{kernel:38s} {config:44s} {'ok' if ok else 'FAIL':4s} {ms:8.4f} ms {pct:5.0f}%{extra}", flush=True)
    if not ok:
        FAILED.append(f"{kernel} {config}")
    elif cfg is not None and (kernel not in BEST or ms < BEST[kernel][0]):
        BEST[kernel] = (ms, cfg)


def sweep(kernel, configs, launch, check, nbytes, roof, moved=None, read_roof=None) -> list[tuple[float, dict]]:
    """launch(cfg) runs one config on rotating inputs; check(cfg) runs it on the reference input. Returns
    the (ms, config) of the configs that passed the check, fastest first."""
    passed = []
    for cfg in configs:
        name = cfg_str(cfg)
        try:
            ok = check(cfg)
            # kernel time alone: a CUDA graph of 10 launches (an eager launch through fp8.launch._launch goes
            # through wrap_triton's higher-order op, ~0.3 ms of host time, longer than these kernels)
            ms = graph_bench(lambda: launch(cfg), n=10)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
            print(f"{kernel} {name}: {type(e).__name__}: {str(e)[:200]}")
            ROWS.append((kernel, name, "error", "-", "-", "-"))
            FAILED.append(f"{kernel} {name} (error)")
            continue
        row(kernel, name, ok, ms, nbytes, roof, moved, read_roof, cfg)
        if ok:
            passed.append((ms, cfg))
    return sorted(passed, key=lambda r: r[0])


def dedup(configs: list) -> list:
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def launch_entries() -> list[str]:
    """The fp8.launch._LAUNCH entries of the best configs, each with the table's current entry in its comment. The
    dynamic end-to-end sweep gives a pair, "amax" among them: the amax pass alone's best is then only a
    comment (the library's amax pass is the first half of the dynamic quantize)."""
    pair = TABLE_KEYS["dynamic per-tensor end to end"]
    out = []
    for k, (ms, cfg) in BEST.items():
        if k not in TABLE_KEYS:
            continue
        keys, cfgs = (TABLE_KEYS[k], cfg) if isinstance(cfg, tuple) else ((TABLE_KEYS[k],), (cfg,))
        note = " end to end" if isinstance(cfg, tuple) else ""
        for key, c in zip(keys, cfgs):
            line = f'"{key}": {cfg_code(c)},  # {ms:.4f} ms{note}; current {cfg_code(fp8.launch._LAUNCH[key])}'
            alone = key in pair and not isinstance(cfg, tuple) and "dynamic per-tensor end to end" in BEST
            out.append(f"# {line} (alone)" if alone else line)
    return out


def rooflines(smoke, s) -> tuple[float, float]:
    """Copy (read + write) and read-only bandwidth over 1 GiB of bf16; also a copy of one s x s tensor."""
    bw = copy_bandwidth(smoke)
    a = torch.randn((1 << 20) if smoke else (1 << 29), device=DEV, dtype=torch.bfloat16)
    nbytes = a.numel() * 2
    reads = {name: nbytes / (bench(fn) * 1e-3) for name, fn in (("sum", a.sum), ("amax", a.amax))}
    read_bw = max(reads.values())
    print(f"[roofline] copy {bw / 1e12:.3f} TB/s (read+write); read-only "
          + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in reads.items()))  # fmt: skip
    del a
    x, y = torch.randn(s, s, device=DEV, dtype=torch.bfloat16), torch.empty(s, s, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: y.copy_(x))
    row(f"torch copy_ {s}x{s} bf16 (size-matched)", "", True, ms, 4 * s * s, bw)
    return bw, read_bw


def torch_scale_rounding():
    """fp8.py assumes torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal."""
    a = torch.rand(1 << 20, device=DEV) * 100
    t = (a + 1e-10) / 448.0
    recip = torch.equal(t, (a + 1e-10) * fp8.launch._INV_QMAX[E4M3])
    exact = torch.equal(t, ((a + 1e-10).double() / 448.0).float())
    print(f"[info] torch (a + eps) / qmax on {DEV}: equals fp32-reciprocal multiply {recip}, true division {exact}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU with TRITON_INTERPRET=1")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not only <= set(SECTIONS):
        ap.error(f"--only: unknown {','.join(sorted(only - set(SECTIONS)))}; choose from {','.join(SECTIONS)}")
    torch.manual_seed(0)
    global SMOKE
    SMOKE = smoke = args.smoke

    def pick(configs):  # --smoke: the first config and the last (a persistent, prefetching one if any)
        return [configs[0], configs[-1]] if smoke else configs

    def pick_group(gs):  # --smoke: also the first config of each variant
        configs = group_quant_configs(gs, GROUP_BASES if only == {"quant_group"} else QUANT_CONFIGS)
        firsts = {}
        for cfg in configs:
            firsts.setdefault(tuple(k for k in OPTS if cfg.get(k)), cfg)
        return [c for c in configs if c is configs[-1] or c in firsts.values()] if smoke else configs

    s = 256 if smoke else 8192
    n = s * s
    roof, read_roof = rooflines(smoke, s)
    torch_scale_rounding()
    recip = DEV == "cuda"
    dev = torch.device(DEV)
    qmax, inv = fp8_max(E4M3), fp8.launch._INV_QMAX[E4M3]
    xs = [torch.randn(s, s, device=DEV, dtype=torch.bfloat16) * 3 for _ in range(2)]  # 2 x 128 MB: rotate
    x = xs[0]
    it = iter(range(1 << 62))

    def rot():
        return xs[next(it) % 2]

    def tiles(cfg):
        return triton.cdiv(n, cfg["BLOCK"])

    # ---- per tensor
    if "tensor" in only:
        qr, sr = quantize_fp8_ref(x, "tensor", dtype=E4M3)
        amax_bits = torch.zeros((), dtype=torch.int32, device=DEV)

        def amax_launch(cfg, xx=None):
            amax_bits.zero_()
            fp8.launch._launch(fp8.quant_kernels._amax_kernel, cfg, tiles(cfg), dev, xx if xx is not None else rot(), amax_bits, n)

        amax_passed = sweep(
            "amax pass (per-tensor dynamic, 1/2)", pick(AMAX_CONFIGS), amax_launch,
            lambda cfg: (amax_launch(cfg, x), amax_bits.view(torch.float32).item() == x.float().abs().amax().item())[1],
            n * 2, roof, read_roof=read_roof,
        )  # fmt: skip
        amax_bits.copy_(x.float().abs().amax().view(torch.int32))
        q, so = poison((s, s), E4M3), poison((), torch.float32)

        def quant(cfg, src, from_amax, xx=None):
            fp8.launch._launch(fp8.quant_kernels._quant_tensor_kernel, cfg, tiles(cfg), dev, xx if xx is not None else rot(), q, src, so, n,
                        qmax, inv, FROM_AMAX=from_amax, RECIP=recip)  # fmt: skip

        def quant_check(cfg, src, from_amax, qref, sref):
            q.view(torch.uint8).fill_(0xFF)
            so.fill_(float("nan"))
            quant(cfg, src, from_amax, x)
            return same(q, qref) and same(so, sref)

        quant_passed = sweep(
            "quantize pass (per-tensor dynamic, 2/2)", pick(TENSOR_QUANT_CONFIGS),
            lambda cfg: quant(cfg, amax_bits, True), lambda cfg: quant_check(cfg, amax_bits, True, qr, sr), n * 3, roof,
        )  # fmt: skip
        given = sr * 1.5
        qg, _ = quantize_fp8_ref(x, "tensor", dtype=E4M3, scale=given)
        # also a scale that saturates codes (|x / s| up to ~4 qmax: beyond the clamp's 2 qmax too), where
        # SATFINITE leaves it to the conversion; the interpreter's does not saturate (--smoke: not checked)
        given_sat = sr / 4
        qg_sat, _ = quantize_fp8_ref(x, "tensor", dtype=E4M3, scale=given_sat)

        def given_check(cfg):
            ok = quant_check(cfg, given, False, qg, given)
            return ok and (SMOKE or quant_check(cfg, given_sat, False, qg_sat, given_sat))

        sweep("quantize per-tensor, given scale", pick(TENSOR_QUANT_CONFIGS), lambda cfg: quant(cfg, given, False),
              given_check, n * 3, roof)  # fmt: skip

        # The dynamic scale end to end, as fp8.op._quantize_tensor runs it: the amax pass, then the quantize pass
        # on the same x. The fastest few of each pass's sweep (the amax pass without evict_first, whose lines
        # REVERSE wants in L2) and the table's, the quantize pass with and without REVERSE. Each repetition
        # takes the next of the two rotating 128 MB inputs: one last read two repetitions before, 320 MB of
        # traffic ago, so only a repetition's own amax pass can leave its x in the 50 MB L2.
        amaxes = dedup([dict(c, EVICT_FIRST=False) for _, c in amax_passed[:E2E_TOP]] + [fp8.launch._LAUNCH["amax"]])
        quants = [c for _, c in quant_passed[:E2E_TOP]] + [fp8.launch._LAUNCH["quant_tensor_dynamic"]]
        quants = [{k: v for k, v in c.items() if k != "REVERSE"} for c in quants]
        quants = dedup([c | r for c in quants for r in ({}, {"REVERSE": True})])

        def dynamic(pair, xx=None):
            xx = xx if xx is not None else rot()
            amax_launch(pair[0], xx)
            quant(pair[1], amax_bits, True, xx)

        def dynamic_check(pair):
            q.view(torch.uint8).fill_(0xFF)
            so.fill_(float("nan"))
            dynamic(pair, x)
            return same(q, qr) and same(so, sr)

        sweep("dynamic per-tensor end to end", [(a, c) for a in amaxes for c in quants], dynamic, dynamic_check,
              n * 3, roof, moved=n * 5)  # fmt: skip
        y = poison((s, s), torch.bfloat16)
        yr = dequantize_fp8_ref(qr, sr, out_dtype=torch.bfloat16)

        def dequant(cfg):
            fp8.launch._launch(fp8.quant_kernels._dequant_tensor_kernel, cfg, tiles(cfg), dev, qr, sr, y, n)

        sweep("dequantize per-tensor", pick(DEQUANT_CONFIGS), dequant,
              lambda cfg: (y.fill_(float("nan")), dequant(cfg), same(y, yr))[2], n * 3, roof)  # fmt: skip

    # ---- per group
    for gs in (128, 16) if only & {"quant_group", "dequant_group"} else ():
        g = n // gs
        qr_g, sr_g = quantize_fp8_ref(x, "group", gs, E4M3)
        q_g, s_g = poison((s, s), E4M3), poison((s, s // gs), torch.float32)

        def quant_group(cfg, xx=None, gs=gs, g=g, q_g=q_g, s_g=s_g):
            fp8.launch._launch(fp8.quant_kernels._quant_group_kernel, cfg, fp8.launch._group_tiles(g, gs, cfg["BLOCK"]), dev,
                        xx if xx is not None else rot(), q_g, s_g, g, s // gs, s, qmax, inv,
                        GS=gs, EVEN=True, RECIP=recip)  # fmt: skip

        def quant_group_check(cfg, q_g=q_g, s_g=s_g, qr_g=qr_g, sr_g=sr_g, f=quant_group):
            q_g.view(torch.uint8).fill_(0xFF)
            s_g.fill_(float("nan"))
            f(cfg, x)
            return same(q_g, qr_g) and same(s_g, sr_g)

        if "quant_group" in only:
            sweep(f"quantize group {gs}", pick_group(gs), quant_group, quant_group_check, n * 3 + 4 * g, roof)
        if "dequant_group" not in only:
            continue
        y_g = poison((s, s), torch.bfloat16)
        yr_g = dequantize_fp8_ref(qr_g, sr_g, group_size=gs, out_dtype=torch.bfloat16)

        def dequant_group(cfg, gs=gs, g=g, qr_g=qr_g, sr_g=sr_g, y_g=y_g):
            fp8.launch._launch(fp8.quant_kernels._dequant_group_kernel, cfg, fp8.launch._group_tiles(g, gs, cfg["BLOCK"]), dev,
                        qr_g, sr_g, y_g, g, s // gs, s, GS=gs, EVEN=True)  # fmt: skip

        sweep(f"dequantize group {gs}", pick(DEQUANT_CONFIGS), dequant_group,
              lambda cfg, y_g=y_g, yr_g=yr_g, f=dequant_group: (y_g.fill_(float("nan")), f(cfg), same(y_g, yr_g))[2],
              n * 3 + 4 * g, roof)  # fmt: skip

    # ---- COAT optimizer-state codec (fp32 state, groups of 128)
    ns, gst = n // 4, triton.cdiv(n // 4, 128)
    if only & {"state", "api"}:
        m = torch.randn(ns, device=DEV) * torch.rand(ns, device=DEV) * 1e-3  # 67 MB for s = 8192
        ref = quantize_fp8_state_ref(m)
        y_ref = dequantize_fp8_state_ref(ref)
        outs = [poison((gst * 128,), E4M3)] + [poison((gst,), torch.float32) for _ in range(3)]

    def state_q(cfg):
        fp8.launch._launch(fp8.state_kernels._state_quant_kernel, cfg, fp8.launch._group_tiles(gst, 128, cfg["BLOCK"]), dev,
                    m, *outs, ns, gst, qmax, math.log2(qmax * qmax / 2), 16.0, GS=128)  # fmt: skip

    def state_ok(cfg):
        state_q(cfg)
        st = fp8.FP8State(*outs, m.shape)
        e, e_ref = (torch.linalg.vector_norm((dequantize_fp8_state_ref(t) - m).double()).item() for t in (st, ref))
        codes = (outs[0].view(torch.uint8) == ref.q.view(torch.uint8)).float().mean().item()
        print(f"  state codec: identical codes {codes:.5f}, roundtrip error / reference's {e / e_ref:.5f}")
        return torch.equal(outs[2], ref.expand) and e <= (5 if SMOKE else 1.01) * e_ref

    if "state" in only:
        sweep("quantize_fp8_state (COAT expand)", pick(STATE_CONFIGS), state_q, state_ok, ns * 5 + gst * 12, roof)
        yst = poison((ns,), torch.float32)

        def state_dq(cfg):
            fp8.launch._launch(fp8.state_kernels._state_dequant_kernel, cfg, fp8.launch._group_tiles(gst, 128, cfg["BLOCK"]), dev,
                        ref.q, ref.scale, ref.expand, ref.sqrt_minmax, yst, ns, gst, GS=128)  # fmt: skip

        sweep("dequantize_fp8_state", pick(STATE_CONFIGS), state_dq,
              lambda cfg: (yst.fill_(float("nan")), state_dq(cfg), torch.allclose(yst, y_ref, rtol=1e-5, atol=0))[2],
              ns * 5 + gst * 12, roof)  # fmt: skip

    # ---- public functions (fp8.launch._LAUNCH's configs): eager (as run_all.py times them) and graph-replayed
    if "api" in only:
        q_t, s_t = quantize_fp8(x, "tensor", backend="triton")
        q_128, s_128 = quantize_fp8(x, "group", 128, backend="triton")
        api = [
            ("API quantize tensor dynamic", lambda: quantize_fp8(rot(), "tensor", backend="triton"), n * 3 + 4, n * 5 + 4),
            ("API quantize tensor given scale", lambda: quantize_fp8(rot(), "tensor", scale=s_t, backend="triton"), n * 3 + 4, None),
            ("API dequantize tensor", lambda: dequantize_fp8(q_t, s_t, backend="triton"), n * 3 + 4, None),
            ("API quantize group 128", lambda: quantize_fp8(rot(), "group", 128, backend="triton"), n * 3 + n // 32, None),
            ("API dequantize group 128", lambda: dequantize_fp8(q_128, s_128, group_size=128, backend="triton"), n * 3 + n // 32, None),
            ("API quantize group 16", lambda: quantize_fp8(rot(), "group", 16, backend="triton"), n * 3 + n // 4, None),
            ("API quantize_fp8_state", lambda: quantize_fp8_state(m, backend="triton"), ns * 5 + gst * 12, None),
            ("API dequantize_fp8_state", lambda: dequantize_fp8_state(ref, backend="triton"), ns * 5 + gst * 12, None),
        ]
        for name, fn, nbytes, moved in api:
            fn()  # compile outside the timings
            row(name, "eager", True, bench(fn), nbytes, roof, moved)
            if DEV == "cuda":
                row(name, "CUDA graph", True, graph_bench(fn), nbytes, roof, moved)
        if DEV == "cuda":  # host cost per call, on a tensor small enough that the device is never the limit
            xs_small = torch.randn(64, 1024, device=DEV, dtype=torch.bfloat16)
            for name, fn in (("tensor dynamic", lambda: quantize_fp8(xs_small, "tensor", backend="triton")),
                             ("group 128", lambda: quantize_fp8(xs_small, "group", 128, backend="triton"))):  # fmt: skip
                fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                torch.cuda.synchronize()
                print(f"[host] quantize_fp8 {name}: {(time.perf_counter() - t) / 200 * 1e6:.1f} us per call")

    lines = [
        f"Device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (smoke)'}; torch {torch.__version__}, "
        f"triton {triton.__version__}; copy {roof / 1e12:.2f} TB/s, read-only {read_roof / 1e12:.2f} TB/s; "
        f"{s}x{s} bf16, state {ns} fp32",
        "",
        "| kernel | config | check | ms | GB/s | % copy BW |",
        "|---|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in ROWS),
        "",
        "Best config per kernel (the dynamic scale's entries, amax and quant_tensor_dynamic, are the best pair",
        "end to end), then as fp8.launch._LAUNCH entries (each with the table's current entry in its comment):",
        "",
        *(f"- {k}: {cfg_str(cfg)} ({ms:.4f} ms)" for k, (ms, cfg) in BEST.items()),
        "",
        "```python",
        *launch_entries(),
        "```",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "tune_fp8.md"), "w") as f:
            f.write(table + "\n")
    if FAILED:
        raise SystemExit(f"correctness FAILED: {FAILED}")


if __name__ == "__main__":
    import triton

    main()
