"""The SANA / SANA-1.5 training recipe: flow matching of the Linear DiT on DC-AE latents with text
embeddings from a decoder LLM (sana.md §7).

Batches (``data.kind: synthetic`` or ``webdataset``) carry ``latents`` (B, 32, h, w) (already multiplied
by the DC-AE scaling factor), ``text_embeddings`` (B, L, D) and ``text_mask`` (B, L). Raw image-text shards
are encoded on the fly (``encode_online``); the usual production path reads shards written by
``scaleforge sana precompute``. Each micro-batch also gets its flow noise, noise levels and CFG-drop flags
from a generator seeded by (seed, data-parallel rank, micro-batch index), so a resumed run draws exactly
the noise an uninterrupted one would.

FLOPs per training sample (forward x 3; N = h*w/p^2 image tokens, L text tokens, C width, d = 32 linear-
attention head dim, Hd = 2.5 C, Ct caption channels, Cin = 32 p^2; multiply-add = 2 FLOPs)::

    per block:  qkv 6NC^2 + linear attention 4NC(d+1) + attn proj 2NC^2
              + cross q 2NC^2 + cross kv 4LC^2 + scores and AV 4NLC + cross proj 2NC^2
              + MixFFN 1x1 convs 10NC^2 + 5NC^2, depthwise 3x3 2*9*N*2Hd = 90NC
    outside:    patch embed 2N*Cin*C + caption MLP 2L(Ct*C + C^2) + final 2N*C*Cin
                + timestep MLP and adaLN-single 2(256C + 7C^2)
    training = 3 x forward (backward = 2 x forward); the elementwise work (norms, modulation) is ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.models.sana import flow
from scaleforge.models.sana.model import SanaArch, SanaTransformer, count_params, preset_arch
from scaleforge.platform.data.base import StatefulIterator
from scaleforge.platform.recipe import DataContext, LossOutput, ParallelPlan, Recipe

DCAE_SCALING_FACTOR = 0.41407  # DC-AE f32c32 (sana.md §6)
VAE_DOWNSAMPLE = 32


@dataclass
class GrowConfig:
    """SANA-1.5 depth growth applied when ``init_from`` has fewer blocks than this model (sana.md §9)."""

    strategy: str = "constant"  # constant | cyclic | block_expand
    source_num_layers: int = 0  # 0: all blocks of the source; the paper grows from the first 18 of 1.6B
    expand_ratio: int = 3  # block_expand only
    zero_gate: bool = True  # cyclic / block_expand: zero-gate the repeats so the grown model starts equal
    noise_scale: float = 0.02  # std of the random init of new blocks (constant strategy)


@dataclass
class SanaModelConfig:
    recipe: str = "sana"
    preset: str = "tiny"  # 0.6b | 1.6b | 2.4b | 3.2b | 4.8b | tiny
    depth: int | None = None  # overrides of the preset
    hidden_size: int | None = None
    cross_heads: int | None = None
    caption_channels: int | None = None
    text_len: int | None = None
    qk_norm: bool = True
    cross_norm: bool = True
    use_pe: bool = False  # sincos PE (the 2K/4K configs switch it on)
    pe_interpolation: float = 1.0
    fp32_attention: bool = True
    kernels: str = "torch"  # torch | triton: the kernel library switch (linear attention, fused norms)

    # flow matching
    flow_shift: float = 3.0  # 3.0 for 1.6B at 512/1024, 4.0 for 600M at 1024, 6.0 at 4K
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout_prob: float = 0.1

    # conditioning
    text_encoder: str = "Efficient-Large-Model/gemma-2-2b-it"
    use_chi: bool = True  # complex human instruction prefix
    vae: str = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
    vae_scaling_factor: float = DCAE_SCALING_FACTOR
    encode_online: bool = False  # webdataset of raw images + captions: encode them in the training step

    # data shaping
    image_size: int = 1024  # pixels; base size of the aspect-ratio buckets; latents are image_size/32
    aspect_buckets: bool = True
    synthetic_classes: int = 8

    # initialisation
    init_from: str = ""  # diffusers folder, our run dir / checkpoint step dir
    init_use_ema: bool = True  # take EMA weights from a run checkpoint when it has them
    grow: GrowConfig = field(default_factory=GrowConfig)


def arch_from_config(cfg: SanaModelConfig) -> SanaArch:
    arch = preset_arch(cfg.preset, depth=cfg.depth, hidden_size=cfg.hidden_size, cross_heads=cfg.cross_heads,
                       caption_channels=cfg.caption_channels, text_len=cfg.text_len)
    arch.qk_norm, arch.cross_norm, arch.use_pe = cfg.qk_norm, cfg.cross_norm, cfg.use_pe
    arch.pe_interpolation, arch.fp32_attention = cfg.pe_interpolation, cfg.fp32_attention
    arch.sample_size = cfg.image_size // VAE_DOWNSAMPLE
    return arch


def flops_per_sample(arch: SanaArch, n_tokens: int, text_len: int) -> float:
    """Training FLOPs of one sample; the formula is in the module docstring."""
    N, L, C, d = n_tokens, text_len, arch.hidden_size, arch.self_head_dim
    hd, ct, cin = arch.ffn_hidden, arch.caption_channels, arch.in_channels * arch.patch_size ** 2
    block = (6 * N * C * C + 4 * N * C * (d + 1) + 2 * N * C * C
             + 2 * N * C * C + 4 * L * C * C + 4 * N * L * C + 2 * N * C * C
             + 2 * N * C * 2 * hd + 2 * N * hd * C + 2 * 9 * N * 2 * hd)
    outside = 2 * N * cin * C + 2 * L * (ct * C + C * C) + 2 * N * C * cin + 2 * (256 * C + 7 * C * C)
    return 3.0 * (arch.depth * block + outside)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def _seed_of(*ints: int) -> int:
    h = hashlib.blake2b(",".join(map(str, ints)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SyntheticLatentText(StatefulIterator):
    """Deterministic synthetic latents + text embeddings: sample i is a pure function of (seed, i).

    Learnable structure: K classes; class k has a fixed text embedding (L x D) and a fixed smooth latent
    pattern (random low-resolution field upsampled to h x w). A sample is its class's pair plus small
    noise, with a random number of padded text tokens, so predicting the velocity needs the text.
    """

    def __init__(self, seed: int, dp_rank: int, dp_world: int, micro_batch: int, latent_hw: tuple[int, int],
                 text_len: int, caption_channels: int, num_classes: int = 8, epoch_size: int = 4096,
                 channels: int = 32):
        self.seed, self.rank, self.world, self.mb = seed, dp_rank, dp_world, micro_batch
        self.hw, self.L, self.D, self.K, self.epoch, self.C = latent_hw, text_len, caption_channels, num_classes, \
            epoch_size, channels
        g = torch.Generator().manual_seed(_seed_of(seed, 17))
        h, w = latent_hw
        low = torch.randn(num_classes, channels, max(1, h // 4), max(1, w // 4), generator=g)
        self.latent_protos = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * 1.5
        self.text_protos = torch.randn(num_classes, text_len, caption_channels, generator=g)
        self.cursor = 0

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        i = index % self.epoch
        g = torch.Generator().manual_seed(_seed_of(self.seed, 29, i))
        k = int(torch.randint(self.K, (1,), generator=g))
        latent = self.latent_protos[k] + 0.1 * torch.randn(self.latent_protos[k].shape, generator=g)
        text = self.text_protos[k] + 0.1 * torch.randn(self.L, self.D, generator=g)
        n_valid = int(torch.randint(max(1, self.L // 2), self.L + 1, (1,), generator=g))
        mask = torch.zeros(self.L)
        mask[:n_valid] = 1
        text = text * mask[:, None]
        return {"latents": latent, "text_embeddings": text, "text_mask": mask, "label": torch.tensor(k)}

    def __next__(self) -> dict[str, Any]:
        base = (self.cursor * self.world + self.rank) * self.mb
        samples = [self.sample(base + j) for j in range(self.mb)]
        self.cursor += 1
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])

    def load_resharded_state_dict(self, states: list[dict[str, Any]]) -> str:
        # every rank advanced the same cursor; continue after the samples the old run consumed
        consumed = int(states[0]["cursor"]) * len(states) * self.mb
        self.cursor = -(-consumed // (self.world * self.mb))
        return f"synthetic SANA data continues at global sample {self.cursor * self.world * self.mb}"


class FlowNoise(StatefulIterator):
    """Adds ``noise``, ``sigmas`` and ``drop_text`` to every micro-batch from a generator seeded by
    (seed, rank, micro-batch index): resumable and different on every data-parallel rank."""

    def __init__(self, inner: StatefulIterator, seed: int, dp_rank: int, shift: float, drop_prob: float,
                 logit_mean: float = 0.0, logit_std: float = 1.0, latent_channels: int = 32):
        self.inner, self.seed, self.rank = inner, seed, dp_rank
        self.latent_channels = latent_channels
        self.shift, self.drop_prob, self.mean, self.std = shift, drop_prob, logit_mean, logit_std
        self.count = 0

    def __next__(self) -> dict[str, Any]:
        batch = next(self.inner)
        g = torch.Generator().manual_seed(_seed_of(self.seed, 101, self.rank, self.count))
        self.count += 1
        if "latents" in batch:
            shape = tuple(batch["latents"].shape)
        else:  # raw images, encoded in the training step: the latent shape follows from the image size
            b_, _, h, w = batch["image"].shape
            shape = (b_, self.latent_channels, h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE)
        b = shape[0]
        batch["noise"] = torch.randn(shape, generator=g)
        batch["sigmas"] = flow.sample_sigmas(b, self.shift, g, self.mean, self.std)
        batch["drop_text"] = torch.rand(b, generator=g) < self.drop_prob
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.count = int(state["count"])

    def load_resharded_state_dict(self, states: list[dict[str, Any]]) -> str:
        self.count = int(states[0]["count"])  # noise streams are per rank: a new stream per new rank
        return self.inner.load_resharded_state_dict([s["inner"] for s in states])

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def close(self) -> None:
        self.inner.close()


def _latent_text_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A precomputed shard sample (``scaleforge sana precompute``): latent.npy, text_emb.npy, text_mask.npy."""
    import numpy as np

    from scaleforge.platform.data import BadSample

    try:
        lat = torch.from_numpy(np.load(_bytes_io(raw["latent.npy"])).astype("float32"))
        emb = torch.from_numpy(np.load(_bytes_io(raw["text_emb.npy"])).astype("float32"))
        mask = torch.from_numpy(np.load(_bytes_io(raw["text_mask.npy"])).astype("float32"))
    except KeyError as e:
        raise BadSample(f"missing field {e} (expected latent.npy, text_emb.npy, text_mask.npy)") from None
    if lat.ndim != 3 or emb.ndim != 2 or mask.shape != emb.shape[:1]:
        raise BadSample(f"bad shapes latent {tuple(lat.shape)}, text_emb {tuple(emb.shape)}, "
                        f"text_mask {tuple(mask.shape)}")
    return {"latents": lat, "text_embeddings": emb, "text_mask": mask}


def _bytes_io(b: bytes):
    import io

    return io.BytesIO(b)


def sana_buckets(image_size: int) -> dict[float, tuple[int, int]]:
    """The loader's aspect-ratio table around ``image_size`` with sides snapped to multiples of the DC-AE
    factor 32 (the loader's table steps by image_size/16, a multiple of 32 only from 512 px up)."""
    from scaleforge.platform.data import aspect_ratio_buckets

    out: dict[float, tuple[int, int]] = {}
    for _, (h, w) in aspect_ratio_buckets(image_size).items():
        hh = max(VAE_DOWNSAMPLE, round(h / VAE_DOWNSAMPLE) * VAE_DOWNSAMPLE)
        ww = max(VAE_DOWNSAMPLE, round(w / VAE_DOWNSAMPLE) * VAE_DOWNSAMPLE)
        out.setdefault(round(hh / ww, 2), (hh, ww))
    return dict(sorted(out.items()))


def _latent_aspect(sample: dict[str, Any]) -> float:
    lat = sample["latents"]
    return lat.shape[-2] / lat.shape[-1]


def _finalize_latents(samples: list[dict[str, Any]], hw: tuple[int, int]) -> dict[str, Any]:
    """Stack the latents of one bucket; a latent written at another size than the bucket's is resized."""
    h, w = hw[0] // VAE_DOWNSAMPLE, hw[1] // VAE_DOWNSAMPLE
    lats = []
    for s in samples:
        lat = s["latents"]
        if lat.shape[-2:] != (h, w):
            lat = F.interpolate(lat[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        lats.append(lat)
    return {"latents": torch.stack(lats), "text_embeddings": torch.stack([s["text_embeddings"] for s in samples]),
            "text_mask": torch.stack([s["text_mask"] for s in samples]), "bucket_hw": hw}


def _image_caption_sample(raw: dict[str, Any]) -> dict[str, Any]:
    from scaleforge.platform.data import decode_image_text

    return decode_image_text(raw)


def _collate_images_fixed(size: int):
    import functools

    return functools.partial(_finalize_fixed_images, size=size)


def _finalize_fixed_images(samples, size):
    from scaleforge.platform.data.batching import finalize_images

    return finalize_images(samples, (size, size))


# ---------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------
class SanaRecipe(Recipe):
    name = "sana"
    config_class = SanaModelConfig

    def __init__(self, model_cfg: SanaModelConfig, job_cfg: Any):
        super().__init__(model_cfg, job_cfg)
        if model_cfg.kernels not in ("torch", "triton"):
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"model.kernels: {model_cfg.kernels!r} is not one of torch, triton")
        if model_cfg.grow.strategy not in ("constant", "cyclic", "block_expand"):
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"model.grow.strategy: {model_cfg.grow.strategy!r} is not one of "
                              "constant, cyclic, block_expand")
        try:
            self.arch = arch_from_config(model_cfg)
        except ValueError as e:
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"model: {e}") from None
        self._encoders = None
        self._activation_probes: dict[tuple[bool, str], tuple[Any, Any]] = {}

    # -- model ---------------------------------------------------------------------------------------
    def build_model(self, device: torch.device) -> nn.Module:
        with torch.device(device):
            model = SanaTransformer(self.arch)
        model.set_kernels(self.cfg.kernels)
        return model

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()

    def parallel_plan(self, model: nn.Module) -> ParallelPlan:
        # COAT: embedders, the adaLN modulation (t_block) and the output projection stay in high precision
        keep = ("patch_embed", "t_embedder", "t_block", "caption_projection", "proj_out")
        return ParallelPlan(fsdp_units=list(model.blocks), fp8_keep=keep)

    def load_pretrained(self, model: nn.Module, path: str) -> None:
        from scaleforge.models.sana.checkpoint_io import load_weights
        from scaleforge.models.sana.grow import grow_state_dict

        src_arch, sd = load_weights(path, use_ema=self.cfg.init_use_ema)
        from scaleforge.models.sana.diffusers_io import depth_of

        src_depth, depth = depth_of(sd), self.arch.depth
        g = self.cfg.grow
        if src_depth != depth or (g.source_num_layers and g.source_num_layers != src_depth):
            sd = grow_state_dict(sd, depth, strategy=g.strategy, source_num_layers=g.source_num_layers or None,
                                 expand_ratio=g.expand_ratio, zero_gate=g.zero_gate, noise_scale=g.noise_scale,
                                 generator=torch.Generator().manual_seed(self.job_cfg.run.seed
                                                                         if self.job_cfg is not None else 0))
        if "null_caption" not in sd:  # released diffusers weights carry none: keep our initialised one
            sd["null_caption"] = model.null_caption.detach().cpu().clone()
        _load_full_state_dict(model, sd, where=path)

    # -- data ------------------------------------------------------------------------------------------
    def build_data(self, ctx: DataContext) -> StatefulIterator:
        dcfg = self.job_cfg.data
        seed = dcfg.seed if dcfg.seed is not None else self.job_cfg.run.seed
        if dcfg.kind == "synthetic":
            side = self.cfg.image_size // VAE_DOWNSAMPLE
            inner: StatefulIterator = SyntheticLatentText(
                seed, ctx.dp_rank, ctx.dp_world_size, ctx.micro_batch_size, (side, side), self.arch.text_len,
                self.arch.caption_channels, self.cfg.synthetic_classes, dcfg.synthetic_samples,
                self.arch.in_channels)
        elif dcfg.kind == "webdataset":
            from scaleforge.platform.data import AspectRatioBucketBatcher, build_loader, collate_samples

            if self.cfg.encode_online:
                batcher = (AspectRatioBucketBatcher(ctx.micro_batch_size, sana_buckets(self.cfg.image_size))
                           if self.cfg.aspect_buckets else _collate_images_fixed(self.cfg.image_size))
                inner = build_loader(dcfg, ctx, sample_fn=_image_caption_sample, batcher=batcher)
            else:
                batcher = (AspectRatioBucketBatcher(ctx.micro_batch_size, sana_buckets(self.cfg.image_size),
                                                    aspect_fn=_latent_aspect, finalize=_finalize_latents)
                           if self.cfg.aspect_buckets else collate_samples)
                inner = build_loader(dcfg, ctx, sample_fn=_latent_text_sample, batcher=batcher)
        else:
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"data.kind: {dcfg.kind!r} is not one of synthetic, webdataset")
        return FlowNoise(inner, seed, ctx.dp_rank, self.cfg.flow_shift, self.cfg.cfg_dropout_prob,
                         self.cfg.logit_mean, self.cfg.logit_std, self.arch.in_channels)

    def _encode_online(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        from scaleforge.models.sana.text import load_text_encoder, load_vae

        if self._encoders is None:
            self._encoders = (load_text_encoder(self.cfg.text_encoder, device=device, use_chi=self.cfg.use_chi,
                                                max_length=self.arch.text_len),
                              load_vae(self.cfg.vae, device=device))
        te, vae = self._encoders
        with torch.no_grad():
            emb, mask = te.encode(list(batch["caption"]))
            img = batch["image"].to(device=device, dtype=next(vae.parameters()).dtype)
            lat = vae.encode(img).latent * self.cfg.vae_scaling_factor
        return {"latents": lat.float(), "text_embeddings": emb.float(), "text_mask": mask.float()}

    def forward_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        device = next(p.device for p in model.parameters())
        if "latents" not in batch:
            if "image" not in batch:
                raise KeyError("SANA batch has neither 'latents' nor 'image' (check data.kind / encode_online)")
            enc = self._encode_online(batch, device)
        else:
            enc = batch
        x0 = enc["latents"].to(device, torch.float32)
        text = enc["text_embeddings"].to(device, torch.float32)
        mask = enc["text_mask"].to(device, torch.float32)
        noise = batch["noise"].to(device, torch.float32)
        if noise.shape != x0.shape:
            raise ValueError(f"flow noise {tuple(noise.shape)} does not match latents {tuple(x0.shape)}")
        sigmas = batch["sigmas"].to(device, torch.float32)
        # always through torch.where: branching on drop.any() would make the host wait for the device every step
        text, mask = apply_text_dropout(model, text, mask, batch["drop_text"].to(device))
        xt = flow.add_noise(x0, noise, sigmas)
        pred = model(xt, sigmas * flow.NUM_TRAIN_TIMESTEPS, text, mask)
        per_sample = flow.flow_loss(pred, x0, noise)
        return LossOutput(loss=per_sample.sum(), num_items=x0.shape[0],
                          num_tokens=int(x0.shape[0] * x0.shape[-2] * x0.shape[-1] // self.arch.patch_size ** 2))

    # -- accounting ------------------------------------------------------------------------------------
    def flops_per_sample(self, batch: Mapping[str, Any] | None = None) -> float | None:
        if batch is not None and "latents" in batch:
            h, w = batch["latents"].shape[-2:]
        else:
            h = w = self.cfg.image_size // VAE_DOWNSAMPLE
        n = (h // self.arch.patch_size) * (w // self.arch.patch_size)
        return flops_per_sample(self.arch, n, self.arch.text_len)

    activation_fp8_modes = ("coat",)

    def activation_bytes(self, micro_batch_size: int, activation_checkpointing: bool,
                         compiled: bool = False, fp8: str = "none", tp: int = 1) -> int:
        """Activation memory of one micro-batch, measured rather than guessed: probe training forwards
        (``forward_loss``) of this architecture at its real width and text length, with 1 and 2 blocks, on
        two small square latent grids (the depthwise conv sees a real grid), on CPU in the compute dtype
        (``parallel.mixed_precision``), counted by ``saved_tensor_bytes``. Two blocks minus one gives a
        block's bytes, one block minus that the rest (embedders, caption projection and norm, final layer,
        loss; the caption tokens every block reads are saved once, so they count here); both are linear in
        the image tokens (linear self-attention, cross-attention to a fixed number of caption tokens,
        token-wise MixFFN), so a + b * tokens per image is fitted on the two grids and extrapolated to
        ``image_size``. With
        activation checkpointing a block keeps only its input, plus one block's activations during
        recompute.

        ``compiled``: the blocks are compiled as the engine compiles them, with backend
        ``aot_eager_decomp_partition`` (AOTAutograd's min-cut partitioner, no code generation), so the probe
        counts what the compiled blocks save. ``fp8="coat"``: the probe model is converted as the engine
        converts it (``convert_to_coat`` with the plan's ``fp8_keep``).

        The probe runs the model's torch path (``model.kernels=torch``, the kernel library's torch
        references): with ``model.kernels=triton`` the fused linear attention keeps bf16 q, k, v instead of
        the reference's fp32 copies, so the estimate is somewhat high there. SANA has no tensor-parallel
        plan, so ``tp`` is never more than 1."""
        a = self.arch
        # COAT runs eager (the config rejects parallel.compile with it)
        per_image_block, per_image_rest = self._probe_activations(compiled and fp8 != "coat", fp8)
        n = (self.cfg.image_size // VAE_DOWNSAMPLE // a.patch_size) ** 2
        block, rest = per_image_block(n), per_image_rest(n)
        if activation_checkpointing:
            itemsize = torch.empty((), dtype=self._compute_dtype()).element_size()
            blocks = a.depth * n * a.hidden_size * itemsize + block
        else:
            blocks = a.depth * block
        return int(micro_batch_size * (blocks + rest))

    def _compute_dtype(self) -> torch.dtype:
        mp = getattr(getattr(self.job_cfg, "parallel", None), "mixed_precision", "bf16")
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(mp, torch.bfloat16)

    def _probe_activations(self, compiled: bool, fp8: str):
        """(block bytes, other bytes) per image as functions of the image tokens; measured once per
        (compiled, fp8) and kept, since neither depends on the micro-batch or on checkpointing."""
        key = (bool(compiled), fp8)
        if key in self._activation_probes:
            return self._activation_probes[key]
        from scaleforge.kernels import use_backend
        from scaleforge.platform.memory import saved_tensor_bytes

        a, dtype = self.arch, self._compute_dtype()
        arch = dataclasses.replace(a, depth=2)
        with torch.device("meta"):
            model = SanaTransformer(arch).to(dtype)
        # what autograd saves does not depend on the values: uninitialised memory zeroed, no init pass
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.zero_()
        model.set_kernels("torch")
        if fp8 == "coat":
            from scaleforge.fp8 import convert_to_coat

            convert_to_coat(model, self.parallel_plan(model).fp8_keep)
        blocks = model.blocks
        if compiled:
            for blk in blocks:
                blk.compile(backend="aot_eager_decomp_partition")
        params = list(model.parameters())
        g = torch.Generator().manual_seed(0)

        # two images: with one, some batched matmuls fold (B, heads) without the copy they save from two on
        images = 2

        def measure(depth: int, side: int) -> float:
            hw = side * a.patch_size
            mask = torch.ones(images, a.text_len)
            mask[:, a.text_len // 2:] = 0  # padded caption tokens, as real captions have
            batch = {"latents": torch.randn(images, a.in_channels, hw, hw, generator=g),
                     "noise": torch.randn(images, a.in_channels, hw, hw, generator=g),
                     "text_embeddings": torch.randn(images, a.text_len, a.caption_channels, generator=g),
                     "text_mask": mask, "sigmas": torch.full((images,), 0.5),
                     "drop_text": torch.zeros(images, dtype=torch.bool)}
            # each grid compiles with static shapes (quicker than the symbolic recompile, same partition);
            # past the recompile limit dynamo would run the blocks eagerly and the probe count eager bytes
            dynamo = (torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64)
                      if compiled else contextlib.nullcontext())
            model.blocks = blocks[:depth]
            try:
                with use_backend("torch"), dynamo:
                    return saved_tensor_bytes(lambda: self.forward_loss(model, batch).loss, params=params) / images
            finally:
                model.blocks = blocks

        sides = (4, 8)
        toks = [s * s for s in sides]
        one = [measure(1, s) for s in sides]
        two = [measure(2, s) for s in sides]
        block = [t - o for t, o in zip(two, one)]
        rest = [o - b for o, b in zip(one, block)]

        def fit(ys: list[float]):
            slope = (ys[1] - ys[0]) / (toks[1] - toks[0])
            return lambda n: ys[0] + slope * (n - toks[0])

        self._activation_probes[key] = (fit(block), fit(rest))
        return self._activation_probes[key]

    def describe(self, model: nn.Module) -> dict[str, Any]:
        blocks = sum(p.numel() for p in model.blocks.parameters())
        total = count_params(model)
        return {"params_total": total, "params_blocks": blocks, "params_other": total - blocks,
                "depth": self.arch.depth, "width": self.arch.hidden_size,
                "tokens_per_sample": (self.cfg.image_size // VAE_DOWNSAMPLE) ** 2,
                "text_tokens": self.arch.text_len}

    # -- export ----------------------------------------------------------------------------------------
    def export_formats(self) -> tuple[str, ...]:
        return ("diffusers",)

    def export(self, state_dict: Mapping[str, torch.Tensor], out_dir: str, fmt: str) -> None:
        if fmt != "diffusers":
            raise NotImplementedError(f"recipe 'sana' has no export format {fmt!r} (known: diffusers)")
        from scaleforge.models.sana.diffusers_io import depth_of, export_diffusers

        arch = dataclasses.replace(self.arch, depth=depth_of(state_dict))
        export_diffusers(state_dict, out_dir, arch)


def apply_text_dropout(model: nn.Module, text: torch.Tensor, mask: torch.Tensor,
                       drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the captions of ``drop`` samples by the model's null caption (all tokens valid)."""
    L = text.shape[1]
    null = model.null_caption
    if null.shape[0] < L:
        raise ValueError(f"text length {L} exceeds the null caption length {null.shape[0]} (model text_len)")
    null = null[:L].to(text.dtype)
    d = drop.view(-1, 1, 1)
    return torch.where(d, null[None], text), torch.where(drop.view(-1, 1), torch.ones_like(mask), mask)


def _load_full_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a full (unsharded, CPU) state dict into the model (plain or sharded by the engine)."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    own = model.state_dict()
    bad = [k for k in expected if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{where}: shape mismatch for {k}: checkpoint {tuple(sd[k].shape)} vs model "
                         f"{tuple(own[k].shape)} (check model.preset / depth / hidden_size)")
    from scaleforge.platform.engine import copy_full_tensor

    for k, t in own.items():
        copy_full_tensor(t, sd[k])
