"""``PS3Model``: vision encoder + text tower + SigLIP logit scale/bias, and the pre-training loss."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.models.ps3.config import PS3Config
from scaleforge.models.ps3.losses import gather_with_grad, selection_bce, siglip_rows
from scaleforge.models.ps3.text import TextTransformer
from scaleforge.models.ps3.vision import PS3VisionEncoder


class PS3Model(nn.Module):
    """Names as ps3-torch's ``PS3Model`` (``vision_model.``, ``text_model.``) plus the loss scalars."""

    def __init__(self, cfg: PS3Config, device: Optional[torch.device] = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        with torch.device(device or "cpu"):
            self.vision_model = PS3VisionEncoder(cfg.vision)
            self.text_model = TextTransformer(cfg.text)
            self.logit_scale = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no scalars
            self.logit_bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def init_weights(self) -> None:
        self.vision_model.init_weights()
        self.text_model.init_weights()
        self.logit_scale.fill_(self.cfg.loss.init_logit_scale)
        self.logit_bias.fill_(self.cfg.loss.init_logit_bias)

    def forward(self, pixel_values, text: torch.Tensor, box_mask: torch.Tensor, is_global: torch.Tensor):
        """Pre-training loss of a micro-batch: -> (summed per-image loss, metrics).

        ``pixel_values``: one [B, 3, s, s] tensor per scale; ``text`` [B, L]: per sample the global
        caption (``is_global``) or one box's caption; ``box_mask`` [B, H, W]: that box on any grid
        (zeros for global samples: no forcing, no selection loss)."""
        cfg = self.cfg.loss
        txt, prompt = self.text_model(text)
        out = self.vision_model.forward_pretrain(pixel_values, prompt, box_mask, is_global)
        img = F.normalize(out.pooled_output, dim=-1)
        all_txt, offset = gather_with_grad(F.normalize(txt, dim=-1))
        contrast = siglip_rows(img, all_txt, self.logit_scale, self.logit_bias, offset)
        local = (~is_global).float()
        g = box_mask.unsqueeze(1).float()
        target = (F.interpolate(g, size=out.bottomup_selection_probs[0].shape[-2:], mode="area").squeeze(1) > 0)
        prior = selection_bce(out.bottomup_selection_probs[0], target)
        post = selection_bce(out.topdown_selection_probs[0], target)
        sel = cfg.prior_selection_weight * prior + cfg.posterior_selection_weight * post
        loss = contrast + local * sel
        metrics = {"contrastive": contrast.detach().sum(), "selection_bce": (local * sel).detach().sum(),
                   "global_fraction": is_global.float().mean().detach(),
                   "logit_scale": self.logit_scale.detach().exp().sum()}
        return loss.sum(), metrics


def vit_forward_flops(width: int, mlp: int, depth: int, queries: int, keys: int) -> float:
    """Forward FLOPs (multiply-add = 2) of ``depth`` blocks: q tokens through the linears and
    attention over ``keys`` keys."""
    linear = 2 * queries * (4 * width * width + 2 * width * mlp)
    attn = 4 * queries * keys * width
    return depth * (linear + attn)


def pretrain_flops_per_sample(cfg: PS3Config) -> float:
    """Training FLOPs (3 x forward) of one pre-training sample: low-res pass (729 queries), one
    look-close round (max_select_num queries, 729 + max_select_num keys), text tower, and the
    selection encoder's stem / ConvNeXt blocks (the MAP heads and MLPs of selection are < 1%)."""
    v, t = cfg.vision, cfg.text
    n0, k = v.low_res_tokens, sum(v.budget_per_scale())
    vit = vit_forward_flops(v.width, v.mlp_dim, v.depth, n0, n0) + vit_forward_flops(v.width, v.mlp_dim, v.depth, k, n0 + k)
    text = vit_forward_flops(t.width, t.mlp_dim, t.layers, t.context_length, t.context_length)
    conv = 0.0
    if v.highres_selection:
        g = v.highres_input // v.highres_kernel
        h = v.highres_hidden
        conv = 2 * g * g * (3 * v.highres_kernel ** 2 * h + v.highres_depth * (49 * h + 8 * h * h) + h * v.highres_out)
    return 3.0 * (vit + text + conv)


def full_res_siglip_flops(cfg: PS3Config, side: int) -> float:
    """Training FLOPs of the same ViT run on every patch of a ``side`` x ``side`` image (baseline)."""
    v = cfg.vision
    n = (side // v.patch_size) ** 2
    return 3.0 * vit_forward_flops(v.width, v.mlp_dim, v.depth, n, n)


__all__ = ["PS3Model", "pretrain_flops_per_sample", "full_res_siglip_flops", "math"]
