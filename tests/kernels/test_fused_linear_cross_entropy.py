"""Fused linear + cross-entropy against the full-logits fp32 reference: loss, dx, dweight, ignored rows,
chunking that does not divide the tokens, a vocabulary wider than one block, and a scaled upstream gradient."""
import pytest
import torch

from scaleforge.kernels import fused_linear_cross_entropy
from scaleforge.kernels.fused_linear_cross_entropy import default_chunk
from scaleforge.kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_ref
from tests.kernels._kernel_testing import DEVICE, needs_triton, rel_err

pytestmark = needs_triton


@pytest.mark.parametrize("tokens,dim,vocab,chunk", [(37, 16, 97, 8), (64, 32, 5000, None), (5, 8, 33, 64)])
def test_flce_matches_reference(tokens, dim, vocab, chunk):
    x = torch.randn(tokens, dim, device=DEVICE, requires_grad=True)
    w = (0.5 * torch.randn(vocab, dim, device=DEVICE)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    labels[::3] = -100  # ignored rows: no loss, no gradient
    loss = fused_linear_cross_entropy(x, w, labels, chunk_size=chunk, backend="triton")
    dx, dw = torch.autograd.grad(2.5 * loss, (x, w))
    ref = fused_linear_cross_entropy_ref(x, w, labels)
    dx_ref, dw_ref = torch.autograd.grad(2.5 * ref, (x, w))
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5
    assert torch.all(dx[::3] == 0)


def test_flce_batched_shape_and_errors():
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE)
    labels = torch.randint(0, 40, (2, 9), device=DEVICE)
    loss = fused_linear_cross_entropy(x, w, labels, chunk_size=4, backend="triton")
    assert rel_err(loss, fused_linear_cross_entropy_ref(x, w, labels)) < 1e-5
    with pytest.raises(ValueError, match="fused_linear_cross_entropy: x"):
        fused_linear_cross_entropy(x, w, labels[:, :-1], backend="torch")


def test_default_chunk_keeps_chunk_logits_near_four_times_x():
    assert default_chunk(8192, 2048, 50304) == 2048  # lm_1b at micro-batch 4: 4 chunks of 2048 tokens
    assert default_chunk(3, 2048, 50304) == 3
