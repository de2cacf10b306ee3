"""``model.recipe: nvila`` - NVILA training stages on the ScaleForge runtime.

Stages (reference nvila.md §7) are configs that pick the trainable components (``model.trainable``),
per-component LR multipliers (``model.lr_mult``, independent of each other), global batch and max
length; each stage starts from the previous one with ``model.init_from_run=PREV_RUN_DIR`` (its latest
DCP checkpoint's model weights; optimizer state starts fresh) or ``model.init_from=EXPORTED_DIR``.

Frozen components go to ``ParallelPlan.frozen`` (``requires_grad=False``: not in the optimizer, so
never stepped or decayed) but are still sharded by FSDP2, so they cost 1/dp_shard of their size per
GPU; a frozen ViT / projector is also kept in ``eval()`` as upstream does.

FLOPs per sample (for MFU), forward + backward = 3 x forward, counting multiply-adds as 2 FLOPs:
  ViT:  per tile 2 * N_vit_used * 1024 + 4 * L_used * 1024^2 * d_v (attention scores and values)
  projector: 2 * N_proj per output token of the compressed grid (x4 input tokens folded)
  LLM:  per token 2 * N_llm_nonembedding + 2 * d * V (output projection) + 4 * L * S_doc * d / 2 (causal)
The trainable-only case (frozen ViT, no weight gradients there) is not discounted: MFU counts the
work of a full fine-tune, as is customary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import torch
from torch import nn

from scaleforge.models.nvila import dynamic_s2 as ds2
from scaleforge.models.nvila.config import COMPONENTS, NVILAConfig
from scaleforge.models.nvila.model import NVILAModel, tokens_per_tile
from scaleforge.models.nvila.projector import stc_block_size
from scaleforge.models.nvila.tokens import ChatTokenizer
from scaleforge.models.llm.recipe import decoder_tensor_parallel_plan
from scaleforge.platform.recipe import DataContext, LossOutput, ParallelPlan, ParamGroupRule, Recipe, TensorParallelPlan

_COMPONENT_SOURCES = "<component sources: see model.init_from_run / vision_init_from / llm.init_from>"


class NVILARecipe(Recipe):
    name = "nvila"
    config_class = NVILAConfig

    def __init__(self, model_cfg: NVILAConfig, job_cfg: Any):
        model_cfg.validate()
        self.user_init_from = model_cfg.init_from
        super().__init__(model_cfg, job_cfg)
        self._tok: ChatTokenizer | None = None

    @property
    def tokenizer(self) -> ChatTokenizer:
        if self._tok is None:
            self._tok = ChatTokenizer.load(self.cfg.tokenizer)
            vocab = self.cfg.llm.resolved().vocab_size
            if len(self._tok) > vocab:
                from scaleforge.platform.config import ConfigError

                raise ConfigError(f"model.tokenizer={self.cfg.tokenizer!r} has {len(self._tok)} tokens but "
                                  f"model.llm.vocab_size is {vocab}")
        return self._tok

    # -- model ---------------------------------------------------------------------------------------
    def build_model(self, device: torch.device) -> nn.Module:
        return NVILAModel(self.cfg, device)

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()

    def pretrained_source(self) -> str | None:
        c = self.cfg
        if c.init_from or c.init_from_run or c.vision_init_from or c.llm.init_from:
            return _COMPONENT_SOURCES
        return None

    def load_pretrained(self, model: nn.Module, path: str) -> None:
        """Weight sources, applied in this order (later ones overwrite): ``init_from_run`` (previous
        stage's checkpoint, all components), ``init_from`` (exported NVILA folder: whichever of llm/,
        vision_tower/, mm_projector/ it has), ``vision_init_from`` (HF SigLIP), ``llm.init_from`` (HF
        Qwen2)."""
        from scaleforge.models.llm.hf import load_hf_weights
        from scaleforge.models.nvila.hf_io import load_nvila_dir, load_vision_tower

        cfg = self.cfg
        if cfg.init_from_run:
            load_run_checkpoint(model, cfg.init_from_run)
        if self.user_init_from:
            load_nvila_dir(model, cfg, self.user_init_from)
        if cfg.vision_init_from:
            load_vision_tower(model.vision_tower, cfg.vision_init_from)
        if cfg.llm.init_from:
            load_hf_weights(model.llm, cfg.llm.init_from)

    def parallel_plan(self, model: nn.Module) -> ParallelPlan:
        cfg = self.cfg
        if cfg.vision_tower == "ps3":
            from scaleforge.models.nvila.ps3_tower import UNUSED_PS3_PREFIXES

            vision_units, unused = list(model.vision_tower.trunk.blocks), UNUSED_PS3_PREFIXES
        else:
            vision_units = list(model.vision_tower.encoder.layers[:cfg.vision.num_used_layers])
            unused = model.vision_tower.unused_parameter_prefixes()
        units = vision_units + list(model.llm.layers)
        frozen = [c for c in COMPONENTS if c not in cfg.trainable]
        if "vision_tower" in cfg.trainable:
            # parameters that never get a gradient (layers above select_layer, post_layernorm; PS3's
            # selection modules and MAP head): freeze them explicitly
            frozen += [f"vision_tower.{p}" for p in unused]
        rules = [ParamGroupRule(name=c, prefixes=(c,), lr_mult=getattr(cfg.lr_mult, c)) for c in COMPONENTS]
        eval_modules = tuple(c for c in ("vision_tower", "mm_projector") if c not in cfg.trainable)
        # COAT: the LLM's output head stays in high precision (the patch embedding is a conv: not converted)
        return ParallelPlan(fsdp_units=units, frozen=tuple(frozen), param_groups=rules, eval_modules=eval_modules,
                            fp8_keep=("llm.output",))

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        """The LLM tensor-parallel as in the llm recipe (``llm.`` prefix); the vision tower and projector are
        replicated over the tp ranks (FSDP2 shards them over the data-parallel ranks only): every tp rank
        encodes the same media, the visual tokens are merged into the full sequence of embeddings, and the
        sequence is split over tp at the first LLM block. Rows are padded to a multiple of tp by the data."""
        return decoder_tensor_parallel_plan(self.cfg.llm.resolved(), prefix="llm.")

    # -- data and loss ---------------------------------------------------------------------------------
    def build_data(self, ctx: DataContext):
        from scaleforge.models.nvila.data import SyntheticConversations, collate_packed, webdataset_sample_fn

        data_cfg = self.job_cfg.data
        tok = self.tokenizer
        # parallel.tp > 1: sequence parallelism splits each packed row over the tp ranks (one padding segment)
        pad = self.job_cfg.parallel.tp
        if data_cfg.kind == "synthetic":
            return SyntheticConversations(self.cfg, tok, ctx.seed, ctx.dp_rank, ctx.dp_world_size,
                                          ctx.micro_batch_size, data_cfg.synthetic_samples, pad_to_multiple=pad)
        if data_cfg.kind == "webdataset":
            from scaleforge.platform.data import build_loader

            return build_loader(data_cfg, ctx,
                                sample_fn=functools.partial(webdataset_sample_fn, cfg=self.cfg, tok=tok),
                                batcher=functools.partial(collate_packed, pad_id=tok.pad_id, pad_to_multiple=pad))
        from scaleforge.platform.config import ConfigError

        raise ConfigError(f"data.kind: {data_cfg.kind!r} is not supported by the nvila recipe "
                          f"(synthetic | webdataset)")

    def forward_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        loss, n = model(input_ids=batch["input_ids"], media_token_id=self.tokenizer.image_id,
                        labels=batch["labels"], position_ids=batch["position_ids"],
                        cu_seqlens=batch["cu_seqlens"], pixel_values=batch["pixel_values"],
                        media_kind=batch["media_kind"], media_tiles=batch["media_tiles"],
                        media_grid=batch["media_grid"])
        visual = int((batch["input_ids"] == self.tokenizer.image_id).sum())
        text = int(batch["num_text_tokens"])
        samples = max(int(batch["num_samples"]), 1)
        return LossOutput(loss=loss, num_items=n, num_tokens=text,
                          metrics={"visual_tokens_per_sample": visual / samples,
                                   "tiles_per_sample": int(batch["pixel_values"].shape[0]) / samples})

    # -- accounting ----------------------------------------------------------------------------------------
    def _nominal_sample(self) -> tuple[int, int, int]:
        """(tiles, visual tokens, tokens) of a nominal image-SFT sample: one image at the largest tile grid, and the
        text filling the sample to max_length (or 512 text tokens when max_length is larger)."""
        cfg = self.cfg
        if cfg.image_mode == "dynamic_s2":
            tile = cfg.vision.image_size
            rows_cols = cfg.max_tiles
            tiles = sum((s // tile) ** 2 for s in cfg.s2_scales[:-1]) + rows_cols
            visual = rows_cols * tokens_per_tile(cfg)
        else:
            tiles, visual = 1, tokens_per_tile(cfg)
        return tiles, visual, min(cfg.max_length, visual + 512)

    def flops_per_sample(self, batch: Mapping[str, Any] | None = None) -> float | None:
        cfg = self.cfg
        llm = cfg.llm.resolved()
        v = cfg.vision
        if batch is not None:
            tiles = int(batch["pixel_values"].shape[0])
            lens = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).tolist()
            n = max(int(batch["num_samples"]), 1)
        else:
            tiles, _, tokens = self._nominal_sample()
            lens, n = [tokens], 1
        d, L = llm.dim, llm.n_layers
        kv = llm.n_kv_heads * llm.head_dim
        per_layer = 2 * d * (llm.n_heads * llm.head_dim) * 2 + 2 * d * kv * 2 + 3 * 2 * d * llm.ffn_hidden
        llm_fwd = sum(t * (L * per_layer + 2 * d * llm.vocab_size) + L * 2 * t * t * llm.n_heads * llm.head_dim
                      for t in lens)
        p = v.num_patches
        vit_layer = 2 * p * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * p * p * v.hidden_size
        vit_fwd = tiles * v.num_used_layers * vit_layer
        if cfg.vision_tower == "ps3":
            vit_fwd = tiles * ps3_forward_flops(cfg)
        k = stc_block_size(cfg.projector)
        proj_params = sum(x.numel() for x in NVILAModel_projector_meta(cfg).parameters())
        proj_fwd = 2 * proj_params * tiles * ds2.tokens_per_tile(v.grid, k)
        return 3.0 * (llm_fwd + vit_fwd + proj_fwd) / n

    def activation_bytes(self, micro_batch_size: int, activation_checkpointing: bool,
                         compiled: bool = False, tp: int = 1) -> int | None:
        """bf16 activations of one micro-batch of nominal samples packed in one row (Korthikanti et
        al.'s ~34*s*d bytes per transformer layer without recomputation, 2*s*d with full
        recomputation plus one layer's full set), for the LLM over the packed row and the ViT over the
        tiles; plus the fp32 logits of one loss chunk (or the whole row) x 2 for the softmax grad. Under
        tensor parallelism (``tp``) the LLM's activations and logits are split over the tp ranks, the ViT's
        (replicated: every tp rank encodes the same media) are not."""
        cfg = self.cfg
        llm = cfg.llm.resolved()
        tiles, _, tokens = self._nominal_sample()
        s, t = tokens * micro_batch_size, tiles * micro_batch_size * cfg.vision.num_patches
        if cfg.vision_tower == "ps3":  # low-res tokens + the selected patches of every round
            t = tiles * micro_batch_size * (cfg.ps3.low_res_tokens + cfg.ps3_num_look_close * sum(cfg.ps3.budget_per_scale()))

        def stack(seq: int, d: int, layers: int) -> int:
            if activation_checkpointing:
                return 2 * seq * d * layers + 34 * seq * d
            return 34 * seq * d * layers

        chunk = cfg.loss_chunk if cfg.loss_chunk > 0 else s
        logits = 2 * 4 * min(chunk, s) * llm.vocab_size
        return (stack(s, llm.dim, llm.n_layers) + logits) // tp + stack(t, cfg.vision.hidden_size, cfg.vision.num_used_layers)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        tpt = tokens_per_tile(cfg)
        gbs = self.job_cfg.trainer.global_batch_size
        tiles, visual, tokens = self._nominal_sample()
        visual = min(visual, tokens)
        if cfg.image_mode == "dynamic_s2":
            lo = (cfg.s2_scales[-1] // cfg.vision.image_size) ** 2
            vis_line = (f"Dynamic-S2 {cfg.s2_scales}, {lo + sum((s // cfg.vision.image_size) ** 2 for s in cfg.s2_scales[:-1])}"
                        f"-{tiles} tiles/image -> {lo * tpt}-{cfg.max_tiles * tpt} visual tokens/image "
                        f"({tpt}/tile, {cfg.projector})")
        elif cfg.vision_tower == "ps3":
            vis_line = (f"PS3 {cfg.ps3.scales}: {cfg.ps3_num_look_close} look-close round(s) of "
                        f"{sum(cfg.ps3.budget_per_scale())} patches -> {tpt} visual tokens/image ({cfg.projector})")
        else:
            vis_line = f"{cfg.image_mode}: {tpt} visual tokens per tile ({cfg.projector})"
        return {
            "stage": f"{cfg.stage}: trainable {', '.join(cfg.trainable)}; lr_mult " + ", ".join(
                f"{c}={getattr(cfg.lr_mult, c)}" for c in COMPONENTS),
            "visual tokens": vis_line,
            "tokens / step": f"~{visual * gbs:,} visual + ~{(tokens - visual) * gbs:,} text "
                             f"(global batch {gbs} x nominal sample: {visual} visual + {tokens - visual} text, "
                             f"max_length {cfg.max_length})",
            "video": f"{cfg.video_frames} frames, temporal pool {cfg.temporal_pool} -> "
                     f"{cfg.video_frames // cfg.temporal_pool * tpt} tokens/video",
        }

    # -- export --------------------------------------------------------------------------------------------
    def export_formats(self) -> tuple[str, ...]:
        return ("hf",)

    def export(self, state_dict: Mapping[str, torch.Tensor], out_dir: str, fmt: str) -> None:
        from scaleforge.models.nvila.hf_io import export_hf_layout

        if fmt != "hf":
            raise NotImplementedError(f"recipe 'nvila' has no export format {fmt!r} (hf)")
        cfg = dataclasses.replace(self.cfg, init_from=self.user_init_from)
        export_hf_layout(state_dict, cfg, out_dir, tokenizer=self.tokenizer.hf)


def ps3_forward_flops(cfg: NVILAConfig) -> float:
    """Forward FLOPs of the PS3 tower for one image: low-res pass + each round's selected patches
    attending to [low-res || selected] (selection modules excluded, < 2%)."""
    from scaleforge.models.ps3.model import vit_forward_flops

    p = cfg.ps3
    n0, k = p.low_res_tokens, sum(p.budget_per_scale())
    return (vit_forward_flops(p.width, p.mlp_dim, p.depth, n0, n0)
            + cfg.ps3_num_look_close * vit_forward_flops(p.width, p.mlp_dim, p.depth, k, n0 + k))


def NVILAModel_projector_meta(cfg: NVILAConfig) -> nn.Module:
    from scaleforge.models.nvila.projector import MultimodalProjector

    return MultimodalProjector(cfg.projector, cfg.vision.hidden_size * cfg.channel_multiplier,
                               cfg.llm.resolved().dim, device="meta")


def load_run_checkpoint(model: nn.Module, run_dir: str) -> None:
    """Model weights of a previous stage's latest complete checkpoint into ``model`` (plain or sharded;
    the checkpoint reader reshards). The optimizer is not restored: a new stage starts a new schedule."""
    from pathlib import Path

    from scaleforge.platform.checkpoint import find_latest, read_model_weights

    ckpt = find_latest(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"model.init_from_run={run_dir}: no complete checkpoint under "
                                f"{run_dir}/checkpoints (did the previous stage finish?)")
    read_model_weights(ckpt, model.state_dict())  # in place: the state dict's tensors are the model's storage
