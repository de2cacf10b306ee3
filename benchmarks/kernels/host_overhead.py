"""Host (CPU) cost of the kernel launch path, layer by layer, on a GPU: shows when a call is bound by its
launch path rather than by the GPU, and which layer costs what (docs/benchmarks.md, Kernels).

    PYTHONPATH=$PWD python benchmarks/kernels/host_overhead.py

Per case it prints host microseconds per call at a tiny shape (the GPU work is then negligible, so the
figure is the launch path alone) for: a 3-argument Triton kernel (the launcher floor), our kernel launched
through ``JITFunction.run`` directly, the implementation function (allocation + launch), the
``torch.ops.scaleforge`` custom op, and the public function (no grad; forward with grad; forward +
backward), each with the direct eager path (``KernelOp``, the default) and with ``EAGER_DIRECT=False``
(every call through the op). Then the CUDA runtime calls of one public call from torch.profiler (a runtime call that
blocks, e.g. a synchronizing copy or an allocation, shows here) and a cProfile of the public call.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import scaleforge.kernels as K
from scaleforge.kernels import fp8 as F8
from scaleforge.kernels import norms as NM

dev = "cuda"


@triton.jit
def _touch(X, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def host_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e6


def runtime_calls(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and (e.name.startswith("cu") or e.name.startswith("cuda")):
            r = rows.setdefault(e.name, [0.0, 0])
            r[0] += e.cpu_time_total / 10
            r[1] += 1
    out = [f"    {name}: {us:.1f} us/call of the public function ({n / 10:.1f} calls)"
           for name, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:8]]
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return "\n".join(out) + "\n" + ops


def profile_py(fn) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    return s.getvalue()[:3500]


def main() -> None:
    tiny = torch.randn(4096, device=dev)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"3-argument triton kernel, kernel[grid](...): {host_us(lambda: _touch[(4,)](tiny, 4096, BLOCK=1024)):.1f} us")

    # layer_norm + adaLN modulation at a tiny shape (2 samples x 8 tokens x 2240)
    x = torch.randn(2, 8, 2240, device=dev, dtype=torch.bfloat16, requires_grad=True)
    sh, sc = (torch.randn(2, 1, 2240, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(x)
    x2, sh2, sc2 = x.detach().reshape(-1, 2240), sh.detach().reshape(2, 2240), sc.detach().reshape(2, 2240)
    args = (x2, None, None, None, None, sh2, sc2, 0, 8, 8, 1e-6, False, False)
    from scaleforge.kernels import _triton_utils as TU

    def direct_impl():
        with TU.direct_launch():
            NM.op.norm_fwd_impl(*args)

    cases = {
        "norm_fwd_impl, wrap_triton left on (higher-order-op launch)": lambda: NM.op.norm_fwd_impl(*args),
        "norm_fwd_impl under direct_launch (alloc + launch)": direct_impl,
        "torch.ops.scaleforge.norm_fwd (custom-op dispatch)": lambda: torch.ops.scaleforge.norm_fwd(*args),
    }

    def ln_nograd():
        with torch.no_grad():
            K.layer_norm(x, shift=sh, scale=sc, backend="triton")

    def ln_fwd():
        K.layer_norm(x, shift=sh, scale=sc, backend="triton")

    def ln_fwd_bwd():
        K.layer_norm(x, shift=sh, scale=sc, backend="triton").backward(g)
        x.grad = sh.grad = sc.grad = None

    cases.update({"layer_norm public, no grad": ln_nograd, "layer_norm public, forward with grad": ln_fwd,
                  "layer_norm public, forward + backward": ln_fwd_bwd})
    q = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    cases.update({
        "quantize_fp8_group op (64x256)": lambda: torch.ops.scaleforge.quantize_fp8_group(q, 128, torch.float8_e4m3fn),
        "quantize_fp8 group public (64x256)": lambda: K.quantize_fp8(q, "group", 128, backend="triton"),
        "quantize_fp8 tensor public (64x256)": lambda: K.quantize_fp8(q, "tensor", backend="triton"),
    })
    print("\n| launch path | host us/call (direct eager path) | host us/call (EAGER_DIRECT=False: via the op) |")
    print("|---|---|---|")
    for name, fn in cases.items():
        direct = host_us(fn)
        TU.EAGER_DIRECT = False
        via_op = host_us(fn)
        TU.EAGER_DIRECT = True
        print(f"| {name} | {direct:.1f} | {via_op:.1f} |")

    # What the backward costs outside our code: the autograd engine runs CUDA backward functions on its
    # device thread (a thread handoff each way), which a CPU run of this path never shows.
    class _AllocOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.empty_like(t)

        @staticmethod
        def backward(ctx, grad):
            return torch.empty_like(grad)

    def floor_fwd_bwd():
        _AllocOnly.apply(x).backward(g)
        x.grad = None

    w_ln, b_ln = (torch.randn(2240, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def native_ln_fwd_bwd():
        F.layer_norm(x, (2240,), w_ln, b_ln).backward(g)
        x.grad = w_ln.grad = b_ln.grad = None

    y0, _, mean0, rstd0, _ = NM.op.norm_fwd_impl(*args)
    bwd_args = (g.reshape(-1, 2240), None, x2, None, None, None, None, sc2, mean0, rstd0,
                False, True, 0, 8, 8, False)

    def bwd_fn_direct():
        with TU.direct_launch():
            NM.op._norm_bwd(*bwd_args)

    print("\n| backward floor (tiny) | host us/call |")
    print("|---|---|")
    for name, fn in {"autograd.Function, alloc-only forward and backward, fwd + bwd": floor_fwd_bwd,
                     "torch F.layer_norm (native) with weight and bias, fwd + bwd": native_ln_fwd_bwd,
                     "our backward op called directly (no autograd engine)": bwd_fn_direct,
                     "layer_norm public, forward + backward": ln_fwd_bwd}.items():
        print(f"| {name} | {host_us(fn):.1f} |")

    # the launch alone: JITFunction.run with the arguments norm_fwd_impl passes (captured once)
    captured = {}
    real = NM.triton_kernels._norm_fwd_kernel.run

    def capture(*a, **kw):
        captured.update(args=a, kwargs=kw)
        return real(*a, **kw)

    NM.triton_kernels._norm_fwd_kernel.run = capture
    NM.op.norm_fwd_impl(*args)
    NM.triton_kernels._norm_fwd_kernel.run = real
    print(f"| _norm_fwd_kernel.run(...) alone | {host_us(lambda: real(*captured['args'], **captured['kwargs'])):.1f} |")
    device = torch.cuda.current_device()
    binder = NM.triton_kernels._norm_fwd_kernel.device_caches[device][-1]  # (..., binder) in triton 3.x
    bind_kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("grid", "warmup")}
    print(f"| its argument binder alone | {host_us(lambda: binder(*captured['args'], **bind_kwargs)):.1f} |")

    print("\nCUDA runtime calls and host ops, layer_norm forward + backward (tiny):")
    print(runtime_calls(ln_fwd_bwd))
    print("cProfile, layer_norm forward + backward (tiny), 50 calls:")
    print(profile_py(ln_fwd_bwd))
    print("cProfile, quantize_fp8 group public (tiny), 50 calls:")
    print(profile_py(cases["quantize_fp8 group public (64x256)"]))


if __name__ == "__main__":
    main()
