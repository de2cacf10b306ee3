"""NVILA: SigLIP vision tower -> Dynamic-S2 merge -> STC projector -> (temporal pooling) -> dense LLM.

Media in a micro-batch are described by flat tensors so they travel like any other batch field:

* ``pixel_values`` [N, 3, S, S]: every tile of every media item, in order (Dynamic-S2 images: their
  14-17 tiles; single-tile images: 1; videos: one tile per frame);
* ``media_kind`` [M]: 0 = image, 1 = video; ``media_tiles`` [M]: tiles (frames) per item;
* ``media_grid`` [M, 2]: (rows, cols) of the largest-scale grid of a Dynamic-S2 image, (1, 1) else.

The text carries ``media_token_id`` once per visual token (see ``tokens.py``); ``embed`` replaces
those embeddings by the visual tokens in order.

Dummy-forward rule (nvila.md §6): under FSDP every rank must run the same sharded modules the same
number of times per step. ``encode_media`` therefore always makes exactly ONE vision-tower call and
ONE projector call per micro-batch: all tiles of all media kinds are batched together, and a
micro-batch without any media runs both on one all-zero tile and returns ``0 * sum(output)`` as a
term the caller adds to the loss (so the backward reduce-scatters match too).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaleforge.models.llm.model import OutputProjection, Transformer, fused_kernels_on
from scaleforge.models.nvila import dynamic_s2 as ds2
from scaleforge.models.nvila.config import NVILAConfig
from scaleforge.models.nvila.projector import MultimodalProjector, stc_block_size, temporal_pool
from scaleforge.models.nvila.siglip import SiglipVisionTower

IGNORE_INDEX = -100
KIND_IMAGE, KIND_VIDEO = 0, 1


def tokens_per_tile(cfg: NVILAConfig) -> int:
    if cfg.vision_tower == "ps3":
        from scaleforge.models.nvila.ps3_tower import ps3_visual_tokens

        return ps3_visual_tokens(cfg, stc_block_size(cfg.projector))
    return ds2.tokens_per_tile(cfg.vision.grid, stc_block_size(cfg.projector))


def media_token_count(cfg: NVILAConfig, kind: int, num_tiles: int, grid: tuple[int, int]) -> int:
    """Visual tokens one media item becomes (the trailing "\\n" is a text token, not counted)."""
    tpt = tokens_per_tile(cfg)
    if kind == KIND_VIDEO:
        return ds2.video_visual_tokens(num_tiles, cfg.vision.grid, stc_block_size(cfg.projector),
                                       cfg.temporal_pool)
    if num_tiles == 1:
        return tpt
    return grid[0] * grid[1] * tpt


def s2_scale_grids(cfg: NVILAConfig, grid: tuple[int, int]) -> list[tuple[int, int]]:
    tile = cfg.vision.image_size
    return [(s // tile, s // tile) for s in cfg.s2_scales[:-1]] + [tuple(grid)]


class NVILAModel(nn.Module):
    def __init__(self, cfg: NVILAConfig, device: torch.device | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        llm_cfg = cfg.llm.resolved()
        with torch.device(device or "cpu"):
            if cfg.vision_tower == "ps3":
                from scaleforge.models.ps3.vision import PS3VisionEncoder

                self.vision_tower = PS3VisionEncoder(cfg.ps3)
            else:
                self.vision_tower = SiglipVisionTower(cfg.vision, kernels=cfg.kernels)
            self.mm_projector = MultimodalProjector(cfg.projector, cfg.vision.hidden_size * cfg.channel_multiplier,
                                                    llm_cfg.dim)
            self.llm = Transformer(llm_cfg)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.vision_tower.init_weights()
        self.mm_projector.init_weights()
        self.llm.init_weights()

    # -- vision ------------------------------------------------------------------------------------
    def encode_media(self, pixel_values: Optional[torch.Tensor], media_kind: Optional[torch.Tensor],
                     media_tiles: Optional[torch.Tensor], media_grid: Optional[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """-> (per-item visual tokens [n_i, d], dummy term or None). One tower and one projector call."""
        cfg = self.cfg
        if cfg.vision_tower == "ps3":
            return self._encode_media_ps3(pixel_values, media_kind)
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        if pixel_values is None or pixel_values.shape[0] == 0:
            s = cfg.vision.image_size
            dev = self.vision_tower.embeddings.patch_embedding.weight.device
            dummy = torch.zeros(1, cfg.vision.num_channels, s, s, device=dev, dtype=dtype)
            feats = self.vision_tower(dummy)
            out = self.mm_projector(ds2.single_scale_features(feats, cfg.channel_multiplier))
            return [], out.sum() * 0.0
        kinds, tiles, grids = media_kind.tolist(), media_tiles.tolist(), media_grid.tolist()
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(f"media_tiles sum to {sum(tiles)} but pixel_values has {pixel_values.shape[0]} tiles")
        feats = self.vision_tower(pixel_values)  # [N, g*g, C]
        proj_in, start = [], 0
        for kind, n, grid in zip(kinds, tiles, grids):
            f = feats[start:start + n]
            start += n
            if kind == KIND_IMAGE and n > 1:
                scale_grids = s2_scale_grids(cfg, grid)
                if cfg.image_mode != "dynamic_s2" or sum(r * c for r, c in scale_grids) != n:
                    raise ValueError(f"image with {n} tiles and grid {grid} does not fit the Dynamic-S2 "
                                     f"scales {cfg.s2_scales}")
                proj_in.append(ds2.merge_s2_features(f, scale_grids))
            else:
                proj_in.append(ds2.single_scale_features(f, cfg.channel_multiplier))
        projected = self.mm_projector(torch.cat(proj_in))  # [sum tiles', h', w', d]
        d = projected.shape[-1]
        out, start = [], 0
        for kind, p_in, grid in zip(kinds, proj_in, grids):
            n = p_in.shape[0]
            p = projected[start:start + n]
            start += n
            if kind == KIND_VIDEO:
                out.append(temporal_pool(p.reshape(n, -1, d), cfg.temporal_pool).reshape(-1, d))
            elif n > 1:
                out.append(ds2.stitch(p, grid[0], grid[1]).reshape(-1, d))
            else:
                out.append(p.reshape(-1, d))
        return out, None

    def _encode_media_ps3(self, pixel_values, media_kind) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """PS3 tower (VILA-HD): one image per item; a micro-batch without images runs one zero image."""
        from scaleforge.models.nvila.ps3_tower import encode_ps3

        w = self.vision_tower.trunk.pos_embed
        if pixel_values is None or pixel_values.shape[0] == 0:
            s = self.cfg.ps3.scales[-1]
            out = encode_ps3(self.vision_tower, self.mm_projector, w.new_zeros(1, 3, s, s), self.cfg)
            return [], out.sum() * 0.0
        if bool((media_kind != KIND_IMAGE).any()):
            raise ValueError("videos are not supported with model.vision_tower=ps3")
        out = encode_ps3(self.vision_tower, self.mm_projector, pixel_values.to(w.dtype), self.cfg)
        return list(out.unbind(0)), None

    def embed(self, input_ids: torch.Tensor, media_token_id: int, visual: list[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with every ``media_token_id`` slot replaced by the visual tokens in order."""
        mask = input_ids == media_token_id
        ids = input_ids.masked_fill(mask, 0)
        h = self.llm.tok_embeddings(ids)
        n_slots = int(mask.sum())
        n_vis = sum(v.shape[0] for v in visual)
        if n_slots != n_vis:
            raise ValueError(f"the text has {n_slots} media placeholder tokens but the media produced "
                             f"{n_vis} visual tokens (truncated sample or mismatched media?)")
        if n_vis:
            h = h.masked_scatter(mask.unsqueeze(-1), torch.cat(visual).to(h.dtype))
        return h

    # -- full forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, media_token_id: int, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, media_kind: Optional[torch.Tensor] = None,
                media_tiles: Optional[torch.Tensor] = None, media_grid: Optional[torch.Tensor] = None):
        """Without ``labels``: logits [B, S, V]. With ``labels`` (IGNORE_INDEX = no loss): the SUM of
        next-token cross-entropy over labelled tokens, and their count."""
        visual, dummy = self.encode_media(pixel_values, media_kind, media_tiles, media_grid)
        h = self.embed(input_ids, media_token_id, visual)
        if labels is None:
            return self.llm(inputs_embeds=h, position_ids=position_ids, cu_seqlens=cu_seqlens)
        hidden = self.llm(inputs_embeds=h, position_ids=position_ids, cu_seqlens=cu_seqlens, return_hidden=True)
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        loss = self._lm_loss(hidden, targets)
        if dummy is not None:
            loss = loss + dummy
        return loss, (targets != IGNORE_INDEX).sum()

    def _lm_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``hidden [b, s, d]`` against ``targets [b, s]`` (already shifted)."""
        chunk = self.cfg.loss_chunk
        if not isinstance(self.llm.output, OutputProjection):
            # the platform replaced the head (tensor parallelism: split over the vocabulary, its input over
            # the sequence): it computes the summed loss itself, ``chunk`` tokens at a time
            return self.llm.output(hidden, labels=targets, chunk_size=chunk)
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        if self.cfg.kernels == "triton":  # fused, chunked head + loss (loss_chunk: its tokens per chunk)
            from scaleforge.kernels import fused_linear_cross_entropy

            return fused_linear_cross_entropy(hidden, self.llm.output.weight, targets, ignore_index=IGNORE_INDEX,
                                              chunk_size=chunk if chunk > 0 else None,
                                              backend="triton" if fused_kernels_on("triton", hidden) else "torch")
        if chunk <= 0 or hidden.shape[0] <= chunk:
            return _ce_sum(hidden, targets, self.llm.output.weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        for hs, ts in zip(hidden.split(chunk), targets.split(chunk)):
            # logits of one chunk are recomputed in backward: peak memory chunk x vocab, not S x vocab
            total = total + checkpoint(_ce_sum, hs, ts, self.llm.output.weight, use_reentrant=False)
        return total

    # -- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, media_token_id: int, max_new_tokens: int = 32,
                 eos_token_id: Optional[int] = None, decode_attention=None, **media) -> torch.Tensor:
        """Greedy decoding with the LLM's KV cache; the prompt's visual tokens are spliced in first.
        ``decode_attention``: see ``LLM.generate`` (e.g. Twilight sparse decoding)."""
        visual, _ = self.encode_media(media.get("pixel_values"), media.get("media_kind"),
                                      media.get("media_tiles"), media.get("media_grid"))
        h = self.embed(input_ids, media_token_id, visual)
        return self.llm.generate(inputs_embeds=h, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                 decode_attention=decode_attention)

    def num_params(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in getattr(self, name).parameters())
                for name in ("vision_tower", "mm_projector", "llm")}


def _ce_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
