"""Host (CPU) time per call of the public kernel functions on a GPU, against the time with a final
synchronization, plus a cProfile of the launch path: shows when a kernel call is bound by its launch path
rather than by the GPU (docs/benchmarks.md, Kernels).

    PYTHONPATH=$PWD python benchmarks/kernels/host_overhead.py
"""
import cProfile, pstats, io, time, torch, scaleforge.kernels as K
dev = "cuda"
q = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
x = torch.randn(16, 4096, 2240, device=dev, dtype=torch.bfloat16, requires_grad=True)
sh, sc = (torch.randn(16, 1, 2240, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
g = torch.randn_like(x)
def grp(): K.quantize_fp8(q, "group", 128, backend="triton")
def giv(): K.quantize_fp8(q, "tensor", scale=torch.ones((), device=dev), backend="triton")
def ln():
    y = K.layer_norm(x, shift=sh, scale=sc, backend="triton"); y.backward(g); x.grad = sh.grad = sc.grad = None
for name, fn in [("group128", grp), ("given", giv), ("ln fwd+bwd", ln)]:
    for _ in range(3): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20): fn()
    host = (time.perf_counter() - t) / 20
    torch.cuda.synchronize(); tot = (time.perf_counter() - t) / 20
    print(f"{name}: host {host*1e6:.0f} us/call, with sync {tot*1e6:.0f} us/call")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(20): fn()
    pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12); print(s.getvalue()[:3000])
