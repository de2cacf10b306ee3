"""``model.recipe: ps3`` - PS3 local-contrastive pre-training on the ScaleForge runtime.

One micro-batch: the text tower encodes each sample's caption (its global caption with probability
``model.loss.global_caption_prob``, else one box's caption); the vision encoder runs the low-res pass,
selects with the text prompt (top-down) and the ground-truth box forced, encodes one look-close round
of ``max_select_num`` high-res patches, and pools the low-res tokens (global samples) or the selected
high-res tokens inside the box (local samples). Loss per image: the SigLIP sigmoid row against the
texts of all data-parallel ranks (gathered with gradient) + the selection BCE of the bottom-up and
top-down maps against the box mask (local samples). ``num_items`` = images, so the trainer's global
normalisation gives the mean per-image loss; see ``losses.py`` for what gradient accumulation means.

FLOPs per sample (MFU): ``model.pretrain_flops_per_sample`` (3 x forward of the low-res pass, one
round of selected patches attending to [729 cached || selected], the text tower, the ConvNeXt).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import nn

from scaleforge.models.ps3.config import PS3Config
from scaleforge.models.ps3.model import PS3Model, full_res_siglip_flops, pretrain_flops_per_sample
from scaleforge.platform.recipe import DataContext, LossOutput, ParallelPlan, Recipe


class PS3Recipe(Recipe):
    name = "ps3"
    config_class = PS3Config

    def __init__(self, model_cfg: PS3Config, job_cfg: Any):
        model_cfg.validate()
        super().__init__(model_cfg, job_cfg)
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from scaleforge.models.ps3.text import build_tokenizer

            self._tok = build_tokenizer(self.cfg.text)
        return self._tok

    def build_model(self, device: torch.device) -> nn.Module:
        return PS3Model(self.cfg, device)

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()

    def load_pretrained(self, model: nn.Module, path: str) -> None:
        from scaleforge.models.ps3.hf_io import load_state, read_config

        cfg, sd = read_config(path, self.cfg)
        if cfg.vision != self.cfg.vision:
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"model.init_from={path}: its vision config differs from model.vision "
                              f"({cfg.vision} vs {self.cfg.vision})")
        load_state(model, sd, path)

    def parallel_plan(self, model: nn.Module) -> ParallelPlan:
        units = list(model.vision_model.trunk.blocks) + list(model.text_model.transformer.resblocks)
        return ParallelPlan(fsdp_units=units)

    def build_data(self, ctx: DataContext):
        from scaleforge.models.ps3.data import SyntheticBoxes, collate, webdataset_sample_fn

        data_cfg = self.job_cfg.data
        if data_cfg.kind == "synthetic":
            return SyntheticBoxes(self.cfg, self.tokenizer, ctx.seed, ctx.dp_rank, ctx.dp_world_size,
                                  ctx.micro_batch_size, data_cfg.synthetic_samples)
        if data_cfg.kind == "webdataset":
            from scaleforge.platform.data import build_loader

            seed = int(data_cfg.seed if data_cfg.seed is not None else ctx.seed)
            fn = functools.partial(webdataset_sample_fn, cfg=self.cfg, tok=self.tokenizer, seed=seed)
            return build_loader(data_cfg, ctx, sample_fn=fn, batcher=collate)
        from scaleforge.platform.config import ConfigError

        raise ConfigError(f"data.kind: {data_cfg.kind!r} is not supported by the ps3 recipe (synthetic | webdataset)")

    def forward_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        images = [batch[f"pixel_values_{i}"] for i in range(len(self.cfg.vision.scales))]
        loss, metrics = model(images, batch["text"], batch["box_mask"], batch["is_global"].bool())
        return LossOutput(loss=loss, num_items=int(batch["text"].shape[0]), metrics=metrics)

    def flops_per_sample(self, batch: Mapping[str, Any] | None = None) -> float | None:
        return pretrain_flops_per_sample(self.cfg)

    def activation_bytes(self, micro_batch_size: int, activation_checkpointing: bool,
                         compiled: bool = False) -> int | None:
        """bf16 activations (Korthikanti's ~34*s*d bytes per layer, 2*s*d + one layer with full
        recomputation) of the low-res pass, the round (its queries; the 729 cached K/V per layer are
        kept: 4*729*d bytes per layer) and the text tower; plus the fp32 multi-scale input images."""
        v, t = self.cfg.vision, self.cfg.text
        b = micro_batch_size
        n0, k = v.low_res_tokens, sum(v.budget_per_scale())

        def stack(seq: int, d: int, layers: int) -> int:
            return (2 * seq * d * layers + 34 * seq * d) if activation_checkpointing else 34 * seq * d * layers

        cache = 4 * n0 * v.width * v.depth
        images = 4 * 3 * sum(s * s for s in v.scales)
        return b * (stack(n0, v.width, v.depth) + stack(k, v.width, v.depth) + cache
                    + stack(t.context_length, t.width, t.layers) + images)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        v = self.cfg.vision
        vis = sum(p.numel() for p in model.vision_model.parameters())
        txt = sum(p.numel() for p in model.text_model.parameters())
        grids = v.scale_grids()
        full = full_res_siglip_flops(self.cfg, v.scales[-1])
        return {
            "parameters": f"vision {vis / 1e6:.1f}M (incl. selection), text {txt / 1e6:.1f}M",
            "scales": f"{v.scales} -> low-res {v.low_res_tokens} tokens, high-res grids "
                      f"{[f'{g}x{g}' for g in grids]} = {sum(g * g for g in grids):,} patches",
            "look-close round": f"{sum(v.budget_per_scale())} patches/round split {v.budget_per_scale()}; "
                                f"{v.max_rounds()} rounds cover the image",
            "cost": f"{pretrain_flops_per_sample(self.cfg) / 1e12:.2f} TFLOP/sample vs "
                    f"{full / 1e12:.2f} for a full-res ViT at {v.scales[-1]} px "
                    f"({full / pretrain_flops_per_sample(self.cfg):.0f}x)",
        }

    def export_formats(self) -> tuple[str, ...]:
        return ("hf",)

    def export(self, state_dict: Mapping[str, torch.Tensor], out_dir: str, fmt: str) -> None:
        from scaleforge.models.ps3.hf_io import save_pretrained

        if fmt != "hf":
            raise NotImplementedError(f"recipe 'ps3' has no export format {fmt!r} (hf)")
        save_pretrained(dict(state_dict), out_dir, self.cfg)
