"""Plain-PyTorch reference of the fused linear + cross-entropy loss: full fp32 logits, summed cross-entropy."""

import torch
import torch.nn.functional as F


def fused_linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """``sum_i CE(x_i @ weight^T, labels_i)`` over rows whose label is not ``ignore_index``; fp32 scalar."""
    logits = x.reshape(-1, x.shape[-1]).float() @ weight.float().t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
