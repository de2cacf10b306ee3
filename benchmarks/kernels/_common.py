"""Helpers shared by the kernel benchmark scripts of this folder (run as scripts, so this folder is on
sys.path): timing, the measured rooflines, relative error and PASS/FAIL bookkeeping."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAILURES: list[str] = []  # names of failed checks; the scripts exit non-zero when it is not empty


def log(*a):
    print(*a, flush=True)


def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, ok, detail):
    log(f"[check] {'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILURES.append(name)


def bench(fn, grad_to_none=None, warmup=25, rep=100) -> float:
    """Median milliseconds of triton.testing.do_bench (L2 flushed between calls); on CPU (--smoke) one
    timed call after a warm-up call, only to exercise the scripts."""
    if DEV == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def graph_bench(fn, n=1) -> float:
    """Milliseconds per call of fn on the device alone: a CUDA graph of n back-to-back calls (no launch
    gaps, no host overhead), its replays timed by ``bench``. Warmed up on a side stream before capture."""
    if DEV != "cuda":
        return bench(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return bench(graph.replay) / n


def copy_bandwidth(smoke: bool) -> float:
    """Measured copy bandwidth in bytes/s (read + write) of a 1 GiB bf16 device copy: the bandwidth roofline."""
    a = torch.empty((1 << 20) if smoke else (1 << 29), dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / (bench(lambda: b.copy_(a)) * 1e-3)


def matmul_rooflines(smoke: bool) -> tuple[float, float]:
    """Measured FLOP/s of an s³ bf16 matmul and of an s³ fp8 ``torch._scaled_mm`` (s = 8192; NaN on CPU,
    where _scaled_mm does not run): the compute rooflines."""
    s = 256 if smoke else 8192
    x, y = (torch.randn(s, s, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    bf16 = 2 * s**3 / (bench(lambda: x @ y) * 1e-3)
    fp8 = float("nan")
    if DEV == "cuda":
        xq, yq = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=DEV)
        fp8 = 2 * s**3 / (bench(lambda: torch._scaled_mm(xq, yq, scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16)) * 1e-3)
    return bf16, fp8


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every check/bench script here takes: --smoke (tiny shapes, CPU interpreter) and --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    return ap


def start(smoke: bool) -> str:
    """Refuses to run the full script without a GPU, logs the environment; returns the device name."""
    if DEV == "cpu" and not smoke:
        sys.exit("no CUDA device: use --smoke (with TRITON_INTERPRET=1) to test the script on CPU")
    device_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (triton interpreter)"
    log(f"[env] {device_name}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    return device_name


def run_step(name: str, fn) -> None:
    """Runs one part of a script; a crash is printed and recorded as a failure, and the script goes on."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        FAILURES.append(f"{name} crashed")


def finish() -> None:
    log(f"[done] failures: {FAILURES or 'none'}")
    sys.exit(1 if FAILURES else 0)
