"""FP8 linear (coat.md §4): per-tensor E4M3 forward through ``torch._scaled_mm``, E5M2 gradients,
bf16 outputs. Registered as torch custom ops (``scaleforge::fp8_linear_fwd/bwd``) with autograd attached,
so ``torch.compile(fullgraph=True)`` traces through.

``_scaled_mm(a, b)`` on Hopper takes only a row-major ``a`` and a column-major ``b`` (dims multiple of 16),
i.e. both operands contiguous along the contracted dim. Each operand is contracted along K in one GEMM and
along its other dim in another, so each of x, w and g is needed in both layouts:
  forward  y  = x_q (M,K) · w_qᵀ        x_q row-major; w_q (N,K) row-major is w_qᵀ column-major
  dgrad    dx = g_q (M,N) · w_q         g_q row-major; w_q column-major = w_qᵀ (K,N) row-major
  wgrad    dw = g_qᵀ (N,M) · x_q        g_qᵀ (N,M16) row-major; x_q column-major = x_qᵀ (K,M16) row-major
One quantize kernel per tensor reads a bf16 tile once and writes its FP8 codes in both layouts (COAT's
fused quantize+transpose), the transposed copy with M zero-padded to a multiple of 16 for the wgrad
contraction. x is quantized by its own op (``fp8_quantize_input``), so linears that read the same x share its
codes (``x_fp8``). The forward saves x_qᵀ and its scale (1 byte/element) -- or, with ``save_x="input"``, x
itself when another op keeps it anyway -- and the weight as given: backward quantizes the weight again (the
same codes) instead of keeping an FP8 copy of every layer's weight from forward to backward.
Per-tensor scale ``(amax + 1e-10) / fp8_max``: fp8.py's amax pass (the one the per-tensor ``quantize_fp8``
uses) leaves max|x| on the device, and every program of the quantize pass turns it into the scale itself, so
the scale never leaves the device and no extra kernel runs. HBM traffic per tensor: 2 B/elem (amax) + 2 + 1
+ 1 B/elem.
Reference: ``reference/fp8_linear.py`` (the same quantization with fp32 GEMMs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.fp8 import _checked_amax, quantize_fp8
from scaleforge.kernels.reference.fp8 import fp8_max, quantize_fp8_ref
from scaleforge.kernels.reference.fp8_linear import fp8_linear_ref

__all__ = ["FP8Input", "fp8_linear", "quantize_fp8_input"]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def _pad16(n):
    return (n + 15) // 16 * 16  # also works on SymInts (fake tensors)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import autotune_configs, cdiv, direct_launch
    from scaleforge.kernels.fp8.op import _amax_bits

    @triton.autotune(
        configs=autotune_configs(
            [
                triton.Config({"BR": 64, "BC": 64}, num_warps=4),
                triton.Config({"BR": 128, "BC": 64}, num_warps=4),
                triton.Config({"BR": 64, "BC": 128}, num_warps=4),
                triton.Config({"BR": 128, "BC": 128}, num_warps=8),
                triton.Config({"BR": 128, "BC": 128}, num_warps=4),
                triton.Config({"BR": 256, "BC": 64}, num_warps=8),
            ]
        ),
        key=["R", "C"],
    )
    @triton.jit
    def _quant_transpose_kernel(
        X, Q, QT, SCALE, AMAX, R, C, RP, qmax, BR: tl.constexpr, BC: tl.constexpr, RELOAD_T: tl.constexpr
    ):
        """x (R, C) -> q (R, C) and qᵀ (C, RP) with rows R..RP of x read as zeros; the scale comes from
        AMAX, the int32 bits of max|x| (fp8.py's amax pass). RELOAD_T (fp32 x): qᵀ is quantized from the
        tile read again in qᵀ's order instead of re-laid out from q: Triton 3.6 compiles the re-layout of
        an fp32-loaded tile's FP8 codes wrongly on sm_90 (qᵀ differed from q's codes at every tested shape and the
        wgrad had zero columns on an H200, tests/kernels/test_fp8_linear.py; bf16 and fp16 x are right);
        the second read hits L1/L2, and its codes are q's."""
        qmax = tl.cast(qmax, tl.float32)  # Inductor passes Python floats as fp64
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r.to(tl.int64) * BR + tl.arange(0, BR)
        cols = pid_c.to(tl.int64) * BC + tl.arange(0, BC)
        m = (rows < R)[:, None] & (cols < C)[None, :]
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.load(AMAX).to(tl.float32, bitcast=True)
        scale = (amax + 1e-10) / qmax  # AMAX_EPS
        q = tl.clamp(x / scale, -qmax, qmax).to(Q.dtype.element_ty)
        tl.store(Q + rows[:, None] * C + cols[None, :], q, mask=m)
        if RELOAD_T:
            mt = (cols < C)[:, None] & (rows < R)[None, :]
            xt = tl.load(X + rows[None, :] * C + cols[:, None], mask=mt, other=0.0).to(tl.float32)
            qt = tl.clamp(xt / scale, -qmax, qmax).to(QT.dtype.element_ty)
            tl.store(QT + rows[None, :] + cols[:, None] * RP, qt, mask=(cols < C)[:, None] & (rows < RP)[None, :])
        else:
            # qᵀ through transposed addresses, not tl.trans: tl.trans of FP8 tiles has been seen to corrupt them
            # (triton-lang/triton#11111, mlc-ai/pith-train#74); Triton's coalescing pass re-lays q out for this
            # store so that each thread writes along rows of qᵀ
            tl.store(QT + rows[:, None] + cols[None, :] * RP, q, mask=(rows < RP)[:, None] & (cols < C)[None, :])
        if (pid_r == 0) & (pid_c == 0):
            tl.store(SCALE, scale)


def _quantize_transpose(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 quantization of a 2-D x (R, C): ``(q (R, C), qᵀ (C, R16) zero-padded, scale)``, with the
    codes and scale of ``quantize_fp8(x, "tensor", dtype=dtype)``; ``amax`` (fp32 0-d, max|x| from x's
    producer) replaces the amax pass."""
    x = x.contiguous()
    r, c = x.shape
    rp = _pad16(r)
    amax = _amax_bits(x) if amax is None else amax  # fp32 or the amax pass's int32 bits: the kernel bitcasts
    q = _backend.new_output((r, c), dtype, x.device)
    qt = _backend.new_output((c, rp), dtype, x.device)
    scale = _backend.new_output((), torch.float32, x.device)
    _quant_transpose_kernel[lambda meta: (cdiv(rp, meta["BR"]), cdiv(c, meta["BC"]))](
        x, q, qt, scale, amax, r, c, rp, fp8_max(dtype), RELOAD_T=x.dtype == torch.float32
    )
    return q, qt, scale


class FP8Input(NamedTuple):
    """x's per-tensor E4M3 codes as :func:`fp8_linear` uses them (:func:`quantize_fp8_input`): ``q`` (M, K)
    row-major for the forward GEMM, ``qt`` (K, M16) transposed and zero-padded for the weight gradient (None
    on the torch reference, whose GEMMs take any layout), ``scale`` fp32 0-d. Linears that read the same x
    (q, k and v; gate and up) share one: one quantization and one saved copy instead of one per linear."""

    q: torch.Tensor
    qt: torch.Tensor | None
    scale: torch.Tensor


@torch.library.custom_op("scaleforge::fp8_quantize_input", mutates_args=())
def _fp8_quantize_input(x: torch.Tensor, x_amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with direct_launch():  # an opaque custom op always runs on real tensors: plain kernel launches
        return _quantize_transpose(x, E4M3, x_amax)


@_fp8_quantize_input.register_fake
def _(x, x_amax):
    m, k = x.shape
    return x.new_empty((m, k), dtype=E4M3), x.new_empty((k, _pad16(m)), dtype=E4M3), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("scaleforge::fp8_linear_fwd", mutates_args=())
def _fp8_linear_fwd(
    x: torch.Tensor, xq: torch.Tensor, xt: torch.Tensor | None, sx: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, x_amax: torch.Tensor | None,
) -> torch.Tensor:
    """``x_q · w_qᵀ`` from x's codes; x (its gradient's owner), xt and x_amax are there for the backward: it
    gets xt and sx, or x itself (``xt=None``: x is kept by another op anyway) and re-quantizes it."""
    with direct_launch():
        wq, _, sw = _quantize_transpose(weight, E4M3)
    return torch._scaled_mm(
        xq, wq.t(), scale_a=sx, scale_b=sw, bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )  # fmt: skip


@_fp8_linear_fwd.register_fake
def _(x, xq, xt, sx, weight, bias, x_amax):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("scaleforge::fp8_linear_bwd", mutates_args=())
def _fp8_linear_bwd(
    grad: torch.Tensor, xt: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight is quantized again here rather than saved as codes: under FSDP2 it is the gathered bf16
    parameter, which FSDP frees after forward and gathers again for backward, so no FP8 copy of every
    layer's weight stays alive from forward to backward (1 B per parameter); the codes are the forward's."""
    with direct_launch():
        _, wt, sw = _quantize_transpose(weight, E4M3)
        gq, gt, sg = _quantize_transpose(grad, E5M2)
    dx = torch._scaled_mm(gq, wt.t(), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
    # the zero-padded columns M..M16 of gᵀ and xᵀ add nothing to the contraction over M
    dw = torch._scaled_mm(gt, xt.t(), scale_a=sg, scale_b=sx, out_dtype=torch.bfloat16)
    return dx, dw


@_fp8_linear_bwd.register_fake
def _(grad, xt, sx, weight):
    n, k = weight.shape
    return grad.new_empty((grad.shape[0], k), dtype=torch.bfloat16), grad.new_empty((n, k), dtype=torch.bfloat16)


def _setup_context(ctx, inputs, output):
    x, _, xt, sx, weight, bias, x_amax = inputs
    ctx.keep_x = xt is None
    ctx.save_for_backward(x if ctx.keep_x else xt, x_amax if ctx.keep_x else sx, weight)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad, *_):
    xs, s, weight = ctx.saved_tensors
    if ctx.keep_x:
        _, xt, sx = _fp8_quantize_input(xs, s)
    else:
        xt, sx = xs, s
    dx, dw = _fp8_linear_bwd(grad, xt, sx, weight)
    # fp32 accumulation without materializing an fp32 copy of grad
    db = grad.sum(0, dtype=torch.float32).to(ctx.dtypes[2]) if ctx.dtypes[2] is not None else None
    return dx.to(ctx.dtypes[0]), None, None, None, dw.to(ctx.dtypes[1]), db, None


_fp8_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def quantize_fp8_input(x: torch.Tensor, *, x_amax: torch.Tensor | None = None, backend: str | None = None) -> FP8Input:
    """x's per-tensor E4M3 codes for :func:`fp8_linear` (``x_fp8=``), to share them between linears that read
    the same x; ``x_amax`` as in :func:`fp8_linear`."""
    if x_amax is not None:
        x_amax = _checked_amax(x_amax, x, "quantize_fp8_input: x_amax")
    x = x.detach()
    if resolve(backend) == "torch":
        q, s = quantize_fp8_ref(x, "tensor", dtype=E4M3, amax=x_amax)
        return FP8Input(q, None, s)
    check_triton_device(x)
    return FP8Input(*_fp8_quantize_input(x.reshape(-1, x.shape[-1]), x_amax))


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_amax: torch.Tensor | None = None,
    x_fp8: FP8Input | None = None,
    save_x: str = "fp8",
    output_group_size: int | None = None,
    backend: str | None = None,
):
    """``x @ weight.T + bias`` in bf16 with per-tensor E4M3 operands and E5M2 gradients (docs/kernels.md).

    ``x_amax``: max|x| as an fp32 one-element tensor from the kernel that produced x (e.g.
    ``layer_norm(..., return_amax=True)``): x's scale then comes from it and x's amax pass is skipped
    (COAT's producer-fused scaling, coat.md §3); codes saturate should it be smaller than max|x|.

    ``x_fp8``: x's codes from :func:`quantize_fp8_input` (same backend), shared with other linears of x.

    ``save_x``: what backward keeps of x: ``"fp8"`` its codes (1 B per element), ``"input"`` x itself,
    quantized again in backward (for an x that another op saves anyway, e.g. the attention output that
    SDPA keeps: then x costs no bytes here). The weight is kept as given, not as codes (see
    ``_fp8_linear_bwd``).

    With ``output_group_size=G`` also returns the output quantized per 1×G group for the next op:
    ``(y, (y_q, y_scale))`` (COAT's FP8 precision flow; the quantization is a separate kernel here)."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} need x[..., K], weight[N, K]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fp8_linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if save_x not in ("fp8", "input"):
        raise ValueError(f"fp8_linear: save_x={save_x!r}; choose 'fp8' or 'input'")
    if x_amax is not None:
        x_amax = _checked_amax(x_amax, x, "fp8_linear: x_amax")
    name = resolve(backend)
    if x_fp8 is None:
        x_fp8 = quantize_fp8_input(x, x_amax=x_amax, backend=name)
    elif (x_fp8.qt is None) != (name == "torch"):
        raise ValueError(f"fp8_linear: x_fp8 was quantized for the other backend than {name!r}")
    if name == "torch":
        y = fp8_linear_ref(x, weight, bias, x_amax, x_fp8=(x_fp8.q, x_fp8.scale), save_x=save_x)
    else:
        check_triton_device(x, weight)
        n, k = weight.shape
        if k % 16 or n % 16:
            raise ValueError(f"fp8_linear: torch._scaled_mm needs in/out features divisible by 16, got K={k}, N={n}")
        xt = x_fp8.qt if save_x == "fp8" else None
        y = _fp8_linear_fwd(x.reshape(-1, k), x_fp8.q, xt, x_fp8.scale, weight, bias, x_amax)
        y = y.view(*x.shape[:-1], n)
    if output_group_size is None:
        return y
    return y, quantize_fp8(y.detach(), "group", output_group_size, backend=name)


del HAS_TRITON
