"""The ``model`` config section of the NVILA recipe (``model.recipe: nvila``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from scaleforge.models.llm.model import LLMModelConfig
from scaleforge.models.nvila.siglip import SiglipConfig
from scaleforge.models.ps3.config import PS3VisionConfig

COMPONENTS = ("vision_tower", "mm_projector", "llm")
IMAGE_MODES = ("dynamic_s2", "dynamic", "single")
VISION_TOWERS = ("siglip", "ps3")


@dataclass
class LRMultConfig:
    """Per-module learning-rate multipliers of ``optim.lr`` (independent of each other, unlike
    upstream's exclusive ``mm_projector_lr`` / ``vision_tower_lr``)."""

    vision_tower: float = 1.0
    mm_projector: float = 1.0
    llm: float = 1.0


@dataclass
class SyntheticConfig:
    """Deterministic synthetic conversations (``data.kind: synthetic``)."""

    image_min_side: int = 32  # image sides are drawn in [min, max] (pixels)
    image_max_side: int = 96
    max_images: int = 1  # images per conversation: 0..max_images
    image_prob: float = 0.75  # probability that a conversation has images at all
    video_prob: float = 0.0  # probability of one video clip instead of images
    turns: int = 2  # user/assistant rounds


def _llm_default() -> LLMModelConfig:
    return LLMModelConfig(recipe="llm", preset="tiny")


@dataclass
class NVILAConfig:
    recipe: str = "nvila"
    stage: str = "image_sft"  # informative name of the training stage
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    #: siglip (NVILA) | ps3 (VILA-HD: low-res tokens + bottom-up selected high-res patches, docs/ps3.md)
    vision_tower: str = "siglip"
    ps3: PS3VisionConfig = field(default_factory=PS3VisionConfig)  # used when vision_tower = ps3
    ps3_num_look_close: int = 1  # look-close rounds per image (VILA-HD-4K default: 6)
    llm: LLMModelConfig = field(default_factory=_llm_default)
    projector: str = "mlp_downsample"  # mlp_downsample | mlp_downsample_2x2_fix | mlp_downsample_3x3_fix | mlp2x_gelu
    image_mode: str = "dynamic_s2"  # dynamic_s2 (NVILA) | dynamic (NVILA-Lite) | single (one tile)
    s2_scales: list[int] = field(default_factory=lambda: [448, 896, 1344])
    max_tiles: int = 12
    video_frames: int = 8  # frames sampled per video
    temporal_pool: int = 1  # T: mean over groups of T frames after the projector (8 for video SFT)
    max_length: int = 8192  # tokens per sample (longer samples are truncated)
    tokenizer: str = "byte"  # byte (built-in, tiny/test configs) | path to a local HF tokenizer folder
    trainable: list[str] = field(default_factory=lambda: list(COMPONENTS))
    lr_mult: LRMultConfig = field(default_factory=LRMultConfig)
    init_from: Optional[str] = None  # exported NVILA folder (llm/ vision_tower/ mm_projector/)
    vision_init_from: Optional[str] = None  # HF SiglipVisionModel folder
    init_from_run: Optional[str] = None  # previous stage's run dir: its latest checkpoint's model weights
    loss_chunk: int = 0  # > 0: cross-entropy over chunks of this many tokens (torch: recomputed in backward)
    # torch | triton: the kernel library switch for the vision tower (fused LayerNorm) and the LLM (fused RMSNorm,
    # SwiGLU, linear + cross-entropy); model.llm.kernels follows it
    kernels: str = "torch"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def channel_multiplier(self) -> int:
        """Vision channels entering the projector per ViT channel (3 for Dynamic-S2 with 3 scales)."""
        return len(self.s2_scales) if self.image_mode == "dynamic_s2" else 1

    def _validate_ps3(self) -> None:
        from scaleforge.platform.config import ConfigError

        p = self.ps3
        p.validate()
        if self.image_mode != "single":
            raise ConfigError("model.image_mode must be 'single' with model.vision_tower=ps3 (PS3 takes the "
                              "whole image at its largest scale)")
        if self.vision.image_size != p.scales[-1] or self.vision.hidden_size != p.width:
            raise ConfigError(f"model.vision.image_size / hidden_size ({self.vision.image_size} / "
                              f"{self.vision.hidden_size}) must equal model.ps3.scales[-1] / width "
                              f"({p.scales[-1]} / {p.width}) with model.vision_tower=ps3")
        if not 0 <= self.ps3_num_look_close <= p.max_rounds():
            raise ConfigError(f"model.ps3_num_look_close={self.ps3_num_look_close} is outside 0..{p.max_rounds()}")
        if self.synthetic.video_prob:
            raise ConfigError("model.synthetic.video_prob: videos are not supported with model.vision_tower=ps3")

    def validate(self) -> None:
        from scaleforge.platform.config import ConfigError

        from scaleforge.models.nvila.projector import PROJECTOR_TYPES

        from scaleforge.models.llm.model import ATTENTION, KERNELS

        if self.kernels not in KERNELS:
            raise ConfigError(f"model.kernels: {self.kernels!r} is not one of {', '.join(KERNELS)}")
        if self.llm.kernels in ATTENTION:
            raise ConfigError(f"model.llm.kernels={self.llm.kernels}: the attention implementation is "
                              f"model.llm.attention ({' | '.join(ATTENTION)}); the kernel library is model.kernels")
        if self.llm.kernels not in ("torch", self.kernels):
            raise ConfigError(f"model.llm.kernels={self.llm.kernels}: NVILA's kernel switch is model.kernels "
                              "(vision tower and LLM together)")
        self.llm.kernels = self.kernels
        if self.projector not in PROJECTOR_TYPES:
            raise ConfigError(f"model.projector: {self.projector!r} is not one of {', '.join(PROJECTOR_TYPES)}")
        if self.vision_tower not in VISION_TOWERS:
            raise ConfigError(f"model.vision_tower: {self.vision_tower!r} is not one of {', '.join(VISION_TOWERS)}")
        if self.vision_tower == "ps3":
            self._validate_ps3()
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"model.image_mode: {self.image_mode!r} is not one of {', '.join(IMAGE_MODES)}")
        bad = [t for t in self.trainable if t not in COMPONENTS]
        if bad:
            raise ConfigError(f"model.trainable: unknown component {bad[0]!r} (known: {', '.join(COMPONENTS)})")
        if self.image_mode == "dynamic_s2":
            if any(s % self.vision.image_size for s in self.s2_scales):
                raise ConfigError(f"model.s2_scales={self.s2_scales}: every scale must be a multiple of "
                                  f"model.vision.image_size={self.vision.image_size}")
            if (self.s2_scales[-1] // self.vision.image_size) ** 2 > self.max_tiles:
                raise ConfigError(f"model.max_tiles={self.max_tiles} is below the tiles of the largest "
                                  f"scale {self.s2_scales[-1]}")
        if self.temporal_pool < 1 or self.video_frames % self.temporal_pool:
            raise ConfigError(f"model.video_frames={self.video_frames} is not divisible by "
                              f"model.temporal_pool={self.temporal_pool}")
        try:
            self.vision.validate()
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
