"""Reference FP8 linear: the same per-tensor E4M3 (forward) / E5M2 (gradient) quantization as the kernel
path (the bias gradient uses the unquantized grad_output), with the GEMMs emulated in fp32 (coat.md §4)."""

from __future__ import annotations

import torch

from scaleforge.kernels.reference.fp8 import dequantize_fp8_ref, quantize_fp8_ref


def _qdq(t: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None = None) -> torch.Tensor:
    q, s = quantize_fp8_ref(t, "tensor", dtype=dtype, amax=amax)
    return dequantize_fp8_ref(q, s, "tensor", out_dtype=torch.float32)


class _FP8LinearRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_amax):
        xq = _qdq(x, torch.float8_e4m3fn, x_amax)
        wq = _qdq(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(xq, wq)
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        out = xq @ wq.t()
        if bias is not None:
            out = out + bias.float()
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        g = _qdq(grad_out, torch.float8_e5m2)
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g @ wq).to(torch.bfloat16).to(ctx.dtypes[0])
        dw = (g2.t() @ xq.reshape(-1, xq.shape[-1])).to(torch.bfloat16).to(ctx.dtypes[1])
        db = grad_out.float().reshape(-1, g.shape[-1]).sum(0).to(ctx.dtypes[2]) if ctx.has_bias else None
        return dx, dw, db, None


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, x_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """bf16 output of x @ weight.T (+ bias) with x, weight per-tensor E4M3 and grad_output E5M2; x_amax: max|x|
    given by x's producer (x's scale comes from it)."""
    return _FP8LinearRef.apply(x, weight, bias, x_amax)
