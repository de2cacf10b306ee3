"""Fused linear + cross-entropy: the summed next-token loss of ``x @ weight^T`` without the full logits.

The (tokens x vocab) logits of an LM head are the largest activation of a training step (lm_1b at micro-batch
4: 8192 x 50304, 0.8 GB in bf16 plus 1.6 GB for an fp32 log-softmax and its gradient). Here the tokens go in
chunks: per chunk one GEMM makes the chunk's logits, one Triton kernel turns each row into its loss and,
in place, its gradient ``softmax - onehot`` (two passes over the row: an online max / sum-exp, then the
gradient), and two GEMMs add the chunk's share of dx and dweight. So the forward computes the gradients
(Liger-Kernel's scheme); the backward only scales them by the incoming gradient. Peak extra memory: one
chunk of logits plus dweight.

Costs beyond the three GEMMs a plain head has: the row kernel reads the chunk's logits twice and writes them
once (memory-bound: ~3 x chunk x vocab x 2 bytes), and dweight is read and written once per chunk. Reference:
``reference/fused_linear_cross_entropy.py`` (full fp32 logits).
"""

from __future__ import annotations

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_ref

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_ref"]


def default_chunk(tokens: int, dim: int, vocab: int) -> int:
    """Tokens per chunk: a chunk's logits hold about 4x the elements of x (Liger's rule, x4 for fewer, larger
    GEMMs and fewer passes over dweight), a power of two, at least 1024 (smaller GEMMs waste the GPU), at most
    all tokens."""
    per = max(1024, (tokens * dim * 4) // max(vocab, 1))
    return max(1, min(tokens, 1 << (per - 1).bit_length()))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import kernel_op, next_pow2

    @triton.jit
    def _ce_rows_kernel(LOGITS, stride, LABELS, LOSS, V, ignore_index, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride
        label = tl.load(LABELS + row)
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0)
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), 0)
        for off in range(0, V, BLOCK_V):
            x = tl.load(ptr + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_label = tl.load(ptr + safe_label).to(tl.float32)
        keep = valid.to(tl.float32)
        for off in range(0, V, BLOCK_V):
            c = off + cols
            x = tl.load(ptr + c, mask=c < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - (c == safe_label).to(tl.float32)
            tl.store(ptr + c, (g * keep).to(LOGITS.dtype.element_ty), mask=c < V)
        tl.store(LOSS + row, (lse - x_label) * keep)

    @kernel_op("scaleforge::fused_linear_cross_entropy_fwd")
    def _flce_fwd(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        n, v = x.shape[0], weight.shape[0]
        dx = _backend.new_output(x.shape, x.dtype, x.device)
        dw = _backend.new_output(weight.shape, weight.dtype, weight.device)
        losses = _backend.new_output((n,), torch.float32, x.device)
        block_v = min(next_pow2(v), 4096)
        for i, start in enumerate(range(0, n, chunk)):
            end = min(start + chunk, n)
            xc = x[start:end]
            logits = xc @ weight.t()  # becomes the chunk's logits gradient in place
            torch.library.wrap_triton(_ce_rows_kernel)[(end - start,)](
                logits, logits.stride(0), labels[start:end], losses[start:end], v, ignore_index, BLOCK_V=block_v)
            torch.mm(logits, weight, out=dx[start:end])
            if i == 0:
                torch.mm(logits.t(), xc, out=dw)
            else:
                dw.addmm_(logits.t(), xc)
        return losses.sum(), dx, dw

    def _setup_context(ctx, inputs, output):
        _, dx, dw = output
        ctx.save_for_backward(dx, dw)

    def _backward(ctx, g, _ddx, _ddw):
        if g is None:
            return None, None, None, None, None
        dx, dw = ctx.saved_tensors
        return dx * g.to(dx.dtype), dw * g.to(dw.dtype), None, None, None

    _flce_fwd.register_autograd(_backward, setup_context=_setup_context, non_differentiable=(1, 2))


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, chunk_size: int | None = None,
                               backend: str | None = None) -> torch.Tensor:
    """``sum_i CE(x_i @ weight^T, labels_i)`` over the rows of x (..., D) whose label (same leading shape) is
    not ``ignore_index``, as an fp32 scalar, without materializing all logits (module docstring). Logits
    are formed in x's dtype (as ``F.linear`` would), the softmax in fp32. ``chunk_size``: tokens per chunk
    (default :func:`default_chunk`)."""
    d = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != d or labels.shape != x.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit (x (..., D), weight (V, D), labels x.shape[:-1])")
    if resolve(backend) == "torch":
        return fused_linear_cross_entropy_ref(x, weight, labels, ignore_index)
    check_triton_device(x, weight, labels)
    x2, lab = x.reshape(-1, d).contiguous(), labels.reshape(-1).contiguous()
    chunk = chunk_size or default_chunk(x2.shape[0], d, weight.shape[0])
    return _flce_fwd(x2, weight.to(x.dtype).contiguous(), lab, int(ignore_index), int(chunk))[0]
