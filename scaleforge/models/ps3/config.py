"""The ``model`` config section of the PS3 recipe (``model.recipe: ps3``) and the vision / text sizes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class PS3VisionConfig:
    """PS3 vision encoder. Defaults: PS3-1.5K-SigLIP (timm ``vit_so400m_patch14_siglip_378`` trunk)."""

    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304  # int(1152 * 3.7362), timm's so400m MLP ratio (also the MAP head's)
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    #: image sides of the scales, lowest first: the low-res pass runs at scales[0]
    scales: list[int] = field(default_factory=lambda: [378, 756, 1512])
    #: hidden states (block outputs) whose concatenation feeds the selection MLP
    select_layers: list[int] = field(default_factory=lambda: [0, 9, 18, 26])
    #: high-res patches per look-close round, split across the high-res scales in proportion to pixels
    max_select_num: int = 2560
    separate_pos_emb: bool = True  # learned per-scale residual on the interpolated position embedding
    highres_selection: bool = True  # the light ConvNeXt selection encoder
    highres_hidden: int = 512
    highres_out: int = 512
    highres_depth: int = 3
    highres_kernel: int = 28
    highres_input: int = 1512  # side the selection encoder's input is resized to (fixed in ps3-torch)
    #: the timm architecture name written into exported configs (ps3-torch builds its trunk from it)
    timm_name: str = "vit_so400m_patch14_siglip_378"

    @property
    def grid(self) -> int:
        return self.scales[0] // self.patch_size

    @property
    def low_res_tokens(self) -> int:
        return self.grid ** 2

    def scale_grids(self) -> list[int]:
        """Tokens per side of each high-res scale (square images)."""
        return [self.grid * (s // self.scales[0]) for s in self.scales[1:]]

    def budget_per_scale(self) -> list[int]:
        """Per-round patches of each high-res scale: proportional to pixels, rounded down (ps3-torch)."""
        px = [s * s for s in self.scales]
        return [int(self.max_select_num * p / sum(px[1:])) for p in px[1:]]

    def max_rounds(self) -> int:
        return math.ceil(sum(g * g for g in self.scale_grids()) / sum(self.budget_per_scale()))

    def validate(self) -> None:
        from scaleforge.platform.config import ConfigError

        if self.width % self.num_heads:
            raise ConfigError(f"model.vision.width={self.width} is not divisible by model.vision.num_heads="
                              f"{self.num_heads}")
        if len(self.scales) < 2 or sorted(self.scales) != list(self.scales):
            raise ConfigError(f"model.vision.scales={self.scales}: need at least 2 scales, ascending")
        if any(s % self.scales[0] or s % self.patch_size for s in self.scales):
            raise ConfigError(f"model.vision.scales={self.scales}: every scale must be a multiple of the "
                              f"lowest and of model.vision.patch_size={self.patch_size}")
        bad = [i for i in self.select_layers if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"model.vision.select_layers: layer {bad[0]} is outside 0..{self.depth - 1}")
        if min(self.budget_per_scale()) < 1:
            raise ConfigError(f"model.vision.max_select_num={self.max_select_num} leaves a scale without "
                              f"patches ({self.budget_per_scale()})")


@dataclass
class PS3TextConfig:
    """SigLIP text tower as ps3-torch's ``TextTransformer`` (open_clip layout). Defaults: so400m."""

    vocab_size: int = 32000
    context_length: int = 64
    width: int = 1152
    heads: int = 16
    layers: int = 27
    mlp_dim: int = 4304
    output_dim: int = 1152
    layer_norm_eps: float = 1e-6
    gelu_tanh: bool = True
    pad_id: int = 0
    #: ``byte`` (built-in, test configs) or a local folder with a HF tokenizer
    tokenizer: str = "byte"


@dataclass
class PS3LossConfig:
    global_caption_prob: float = 0.25  # per sample: contrast the low-res feature with the global caption
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    prior_selection_weight: float = 1.0  # BCE of the bottom-up map vs the box mask (local samples)
    posterior_selection_weight: float = 1.0  # BCE of the top-down map vs the box mask (local samples)


@dataclass
class PS3Config:
    recipe: str = "ps3"
    vision: PS3VisionConfig = field(default_factory=PS3VisionConfig)
    text: PS3TextConfig = field(default_factory=PS3TextConfig)
    loss: PS3LossConfig = field(default_factory=PS3LossConfig)
    init_from: Optional[str] = None  # a ps3-torch folder (config.json + model.safetensors)
    #: synthetic data (``data.kind: synthetic``): image side before the multi-scale resize
    synthetic_image_size: int = 64

    def validate(self) -> None:
        from scaleforge.platform.config import ConfigError

        self.vision.validate()
        if self.text.output_dim != self.vision.width:
            raise ConfigError(f"model.text.output_dim={self.text.output_dim} must equal model.vision.width="
                              f"{self.vision.width} (the prompt and the pooled features share that space)")
        if not 0.0 <= self.loss.global_caption_prob <= 1.0:
            raise ConfigError(f"model.loss.global_caption_prob={self.loss.global_caption_prob} is not in [0, 1]")
