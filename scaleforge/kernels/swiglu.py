"""Fused SwiGLU gate: ``y = silu(gate) * up`` (the Llama / Qwen2 MLP between ``w1``/``w3`` and ``w2``).

One elementwise pass each way, in fp32 registers. Unfused, eager torch reads and writes an extra silu(gate)
tensor forward and recomputes it backward; here the forward reads gate and up and writes y (3 tensors), and
the backward reads dy, gate and up and writes dgate and dup (5 tensors), recomputing the sigmoid:

    s = sigmoid(g),  dup = dy * g * s,  dgate = dy * up * s * (1 + g * (1 - s))

Memory-bound: the roofline is bytes moved / HBM bandwidth (3 and 5 tensors of the input dtype).
Reference: ``reference/swiglu.py``.
"""

from __future__ import annotations

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.swiglu import swiglu_ref

__all__ = ["swiglu", "swiglu_ref"]

BLOCK = 2048

if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import cdiv, kernel_op

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)

    @kernel_op("scaleforge::swiglu_fwd")
    def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        y = _backend.new_output(gate.shape, gate.dtype, gate.device)
        n = gate.numel()
        torch.library.wrap_triton(_swiglu_fwd_kernel)[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
        return y

    @kernel_op("scaleforge::swiglu_bwd")
    def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dg = _backend.new_output(gate.shape, gate.dtype, gate.device)
        du = _backend.new_output(up.shape, up.dtype, up.device)
        n = gate.numel()
        torch.library.wrap_triton(_swiglu_bwd_kernel)[(cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
        return dg, du

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, dy):
        if dy is None:
            return None, None
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy.contiguous(), gate, up)

    _swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in fp32, returned in the inputs' dtype; same-shape, same-dtype inputs (docs/kernels.md)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up need one shape and dtype; got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    if resolve(backend) == "torch":
        return swiglu_ref(gate, up)
    check_triton_device(gate, up)
    return _swiglu_fwd(gate.contiguous(), up.contiguous())
