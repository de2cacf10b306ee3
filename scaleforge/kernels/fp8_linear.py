"""FP8 linear (coat.md §4): per-tensor E4M3 forward through ``torch._scaled_mm``, E5M2 gradients,
bf16 outputs. Registered as torch custom ops (``scaleforge::fp8_linear_fwd/bwd``) with autograd attached,
so ``torch.compile(fullgraph=True)`` traces through. Quantization uses the Triton kernels of ``fp8.py``.
Saved for backward: the FP8 input and FP8 weight plus their scales (1 byte/element instead of 2).

Layouts for ``_scaled_mm(a, b)`` (a row-major, b column-major, dims multiple of 16):
  forward  y  = x_q (M,K) · w_qᵀ           (w_q (N,K) row-major is w_qᵀ column-major: free)
  dgrad    dx = g_q (M,N) · w_q            (needs a transposed FP8 copy of w_q)
  wgrad    dw = g_qᵀ (N,M) · x_q           (needs FP8 transposes of g_q and x_q; M padded to 16)
Reference: ``reference/fp8_linear.py`` (the same quantization with fp32 GEMMs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.fp8 import quantize_fp8
from scaleforge.kernels.reference.fp8_linear import fp8_linear_ref

__all__ = ["fp8_linear"]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _pad_rows(t: torch.Tensor, mult: int = 16) -> torch.Tensor:
    pad = -t.shape[0] % mult
    if not pad:
        return t
    # fp8 has no pad kernel on every device: pad through a uint8 view (zero bytes are +0.0 in FP8)
    return F.pad(t.view(torch.uint8), (0, 0, 0, pad)).view(t.dtype)


@torch.library.custom_op("scaleforge::fp8_linear_fwd", mutates_args=())
def _fp8_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xq, sx = quantize_fp8(x, "tensor", dtype=E4M3, backend="triton")
    wq, sw = quantize_fp8(weight, "tensor", dtype=E4M3, backend="triton")
    out = torch._scaled_mm(
        xq, wq.t(), scale_a=sx, scale_b=sw, bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )  # fmt: skip
    return out, xq, sx, wq, sw


@_fp8_linear_fwd.register_fake
def _(x, weight, bias):
    m = x.shape[0]
    scalar = x.new_empty((), dtype=torch.float32)
    return (
        x.new_empty((m, weight.shape[0]), dtype=torch.bfloat16),
        x.new_empty(x.shape, dtype=E4M3),
        scalar,
        weight.new_empty(weight.shape, dtype=E4M3),
        scalar.clone(),
    )


@torch.library.custom_op("scaleforge::fp8_linear_bwd", mutates_args=())
def _fp8_linear_bwd(
    grad: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    gq, sg = quantize_fp8(grad.contiguous(), "tensor", dtype=E5M2, backend="triton")
    dx = torch._scaled_mm(gq, _col_major(wq), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
    g_t = _pad_rows(gq).t().contiguous()  # (N, M16)
    x_cm = _col_major(_pad_rows(xq))  # (M16, K) column-major
    dw = torch._scaled_mm(g_t, x_cm, scale_a=sg, scale_b=sx, out_dtype=torch.bfloat16)
    return dx, dw


@_fp8_linear_bwd.register_fake
def _(grad, xq, sx, wq, sw):
    return grad.new_empty((grad.shape[0], wq.shape[1])), grad.new_empty(wq.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    _, xq, sx, wq, sw = output
    ctx.save_for_backward(xq, sx, wq, sw)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad, *_):
    xq, sx, wq, sw = ctx.saved_tensors
    dx, dw = _fp8_linear_bwd(grad, xq, sx, wq, sw)
    db = grad.float().sum(0).to(ctx.dtypes[2]) if ctx.dtypes[2] is not None else None
    return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), db


_fp8_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    output_group_size: int | None = None,
    backend: str | None = None,
):
    """``x @ weight.T + bias`` in bf16 with per-tensor E4M3 operands and E5M2 gradients (docs/kernels.md).

    With ``output_group_size=G`` also returns the output quantized per 1×G group for the next op:
    ``(y, (y_q, y_scale))`` (COAT's FP8 precision flow; the quantization is a separate kernel here)."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} need x[..., K], weight[N, K]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fp8_linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    name = resolve(backend)
    if name == "torch":
        y = fp8_linear_ref(x, weight, bias)
    else:
        check_triton_device(x, weight)
        n, k = weight.shape
        if k % 16 or n % 16:
            raise ValueError(f"fp8_linear: torch._scaled_mm needs in/out features divisible by 16, got K={k}, N={n}")
        x2 = x.reshape(-1, k)
        y = _fp8_linear_fwd(x2, weight, bias)[0].view(*x.shape[:-1], n)
    if output_group_size is None:
        return y
    return y, quantize_fp8(y.detach(), "group", output_group_size, backend=name)


del HAS_TRITON
