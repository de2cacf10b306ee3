"""Reference FP8 linear: the same per-tensor E4M3 (forward) / E5M2 (gradient) quantization as the kernel
path (the bias gradient uses the unquantized grad_output), with the GEMMs emulated in fp32 (coat.md §4).
It keeps for backward what the kernel path keeps: x's FP8 codes and scale (or x itself with
``save_x="input"``) and the weight as given, quantized again in backward."""

from __future__ import annotations

import torch

from scaleforge.kernels.reference.fp8 import dequantize_fp8_ref, quantize_fp8_ref

E4M3 = torch.float8_e4m3fn


def _qdq(t: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None = None) -> torch.Tensor:
    q, s = quantize_fp8_ref(t, "tensor", dtype=dtype, amax=amax)
    return dequantize_fp8_ref(q, s, "tensor", out_dtype=torch.float32)


class _FP8LinearRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_amax, xq, sx, save_x):
        wq = _qdq(weight, E4M3)
        out = dequantize_fp8_ref(xq, sx, "tensor", out_dtype=torch.float32) @ wq.t()
        ctx.keep_x = save_x == "input"
        if ctx.keep_x:
            ctx.save_for_backward(x, x_amax, weight)
        else:
            ctx.save_for_backward(xq, sx, weight)
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if bias is not None:
            out = out + bias.float()
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_out):
        a, b, weight = ctx.saved_tensors
        xq = _qdq(a, E4M3, b) if ctx.keep_x else dequantize_fp8_ref(a, b, "tensor", out_dtype=torch.float32)
        wq = _qdq(weight, E4M3)
        g = _qdq(grad_out, torch.float8_e5m2)
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g @ wq).to(torch.bfloat16).to(ctx.dtypes[0])
        dw = (g2.t() @ xq.reshape(-1, xq.shape[-1])).to(torch.bfloat16).to(ctx.dtypes[1])
        db = grad_out.float().reshape(-1, g.shape[-1]).sum(0).to(ctx.dtypes[2]) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, x_amax: torch.Tensor | None = None,
    *, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, save_x: str = "fp8",
) -> torch.Tensor:
    """bf16 output of x @ weight.T (+ bias) with x, weight per-tensor E4M3 and grad_output E5M2; x_amax: max|x|
    given by x's producer (x's scale comes from it); x_fp8: x's codes and scale already computed."""
    if x_fp8 is None:
        x_fp8 = quantize_fp8_ref(x.detach(), "tensor", dtype=E4M3, amax=x_amax)
    return _FP8LinearRef.apply(x, weight, bias, x_amax, *x_fp8, save_x)
