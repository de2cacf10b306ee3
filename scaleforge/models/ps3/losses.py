"""PS3 pre-training losses (SigLIP sigmoid contrastive + selection BCE), with plain references in tests.

Contrastive: every image row of this rank against the text features of ALL data-parallel ranks,
gathered with gradient (``torch.distributed.nn.functional.all_gather``: the backward sums each rank's
text gradients back to it). Summed over ranks, the rows cover the full global-batch logit matrix, the
same loss as SigLIP's neighbour exchange. The loss of one image is the SUM over its row (SigLIP's
normalisation per image); the trainer divides the summed rows by the global image count.

Gradient accumulation (not allowed upstream): the negatives of a micro-batch are the texts of the same
micro-step on every rank (micro_batch_size x dp ranks), not the whole global batch, so a step with
``grad_accum = k`` averages k SigLIP losses of batch B/k instead of one of batch B.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """-> (concatenation over data-parallel ranks, offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, 0), dist.get_rank() * x.shape[0]


def siglip_rows(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                offset: int = 0) -> torch.Tensor:
    """Per image row i: sum_j -log sigmoid(z_ij * (exp(scale) * <img_i, txt_j> + bias)), z = +1 on the
    pair (column offset + i), -1 elsewhere. ``img`` [b, D], ``txt`` [N, D], both L2-normalised."""
    logits = img.float() @ txt.float().t() * logit_scale.float().exp() + logit_bias.float()
    labels = -torch.ones_like(logits)
    rows = torch.arange(img.shape[0], device=img.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum(1)


def selection_bce(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample mean BCE of a selection map [B, h, w] against a box mask of the same grid."""
    p = probs.float().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(p, target.float(), reduction="none").flatten(1).mean(1)
