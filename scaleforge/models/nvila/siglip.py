"""SigLIP vision transformer (the NVILA vision tower), plain single-device PyTorch.

Architecture of ``google/siglip-so400m-patch14-*`` / ``paligemma-siglip-so400m-patch14-448``
(reference nvila.md §1): width 1152, 27 layers, 16 heads, MLP 4304, patch 14, no CLS token,
learned absolute position embeddings, pre-LN blocks with tanh-GELU. A 448x448 tile gives 32x32 = 1024
tokens. NVILA takes the features of the penultimate layer (``mm_vision_select_layer=-2``), i.e. the
hidden state after ``num_layers - 1`` blocks, without ``post_layernorm``; the last block and
``post_layernorm`` are kept as parameters only so that weights round-trip losslessly to the HF
``SiglipVisionModel`` layout (they are frozen by the recipe since they never receive a gradient).

Module names mirror HF's ``SiglipVisionModel`` (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj`` ...) so the state dict maps 1:1 (HF files prefix every key with
``vision_model.``; see ``hf_io.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat


def init_linear_and_layernorm(modules) -> None:
    """Xavier-uniform Linear weights, zero biases, unit LayerNorms (SigLIP's and the projector's init)."""
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class SiglipConfig:
    """Vision tower sizes. Defaults: SigLIP so400m-patch14-448."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    #: which hidden state feeds the projector; -2 = penultimate (NVILA), -1 = last block output
    select_layer: int = -2
    #: SigLIP normalisation of [0, 1] pixels
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def grid(self) -> int:
        """Tokens per side of one tile (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_used_layers(self) -> int:
        """Blocks that actually run: hidden_states[select_layer] is the output of this many blocks."""
        n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"vision.select_layer={self.select_layer} is out of range for "
                             f"{self.num_layers} layers")
        return n

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size={self.hidden_size} is not divisible by "
                             f"vision.num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} is not divisible by "
                             f"vision.patch_size={self.patch_size}")
        self.num_used_layers  # noqa: B018 (range check)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, device=device)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the patch grid
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"vision tower: got {x.shape[1]} patches per tile, the position table has "
                             f"{self.position_embedding.num_embeddings} (tiles must be "
                             f"image_size x image_size)")
        return x + self.position_embedding.weight.unsqueeze(0)


class SiglipAttention(coat.FP8Block):
    """Bidirectional multi-head attention. COAT mode: ``out_proj`` keeps SDPA's bf16 output (which SDPA's fused
    kernels save anyway) instead of an FP8 copy of it."""

    def __init__(self, cfg: SiglipConfig, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d, device=device)
        self.k_proj = nn.Linear(d, d, device=device)
        self.v_proj = nn.Linear(d, d, device=device)
        self.out_proj = nn.Linear(d, d, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        # SDPA dispatches to flash / memory-efficient kernels on GPU; bidirectional, no mask.
        o = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)))
        o2 = o.transpose(1, 2).reshape(b, n, d)
        if self.fp8 and o2.untyped_storage().data_ptr() == o.untyped_storage().data_ptr():
            coat.kept_for_backward(o2)  # a view of SDPA's output, not a copy
        return self.out_proj(o2)


class SiglipMLP(coat.FP8Block):
    def __init__(self, cfg: SiglipConfig, device=None):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, device=device)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:  # COAT mode: the GELU input saved in FP8
            return self.fc2(coat.act(self.fc1(x), "gelu_tanh"))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayerNorm(nn.LayerNorm, coat.FP8Block):
    """``nn.LayerNorm`` (same parameters); one fused kernel (``scaleforge.kernels.layer_norm``) when ``kernels``
    is ``"triton"`` on GPU, eager (inside ``torch.compile`` Inductor fuses ``nn.LayerNorm``'s code with its
    neighbours: ``fused_elementwise_on``). COAT mode: the kernel library's norm with its input saved in FP8
    and its max|y| handed to the q/k/v (or fc1) FP8 linears."""

    def __init__(self, dim: int, eps: float, device=None, kernels: str = "torch"):
        super().__init__(dim, eps=eps, device=device)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from scaleforge.models.llm.model import fused_elementwise_on

        if self.fp8:
            return coat.norm(x, self.weight, self.bias, self.eps, rms=False)
        if fused_elementwise_on(self.kernels, x):
            from scaleforge.kernels import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps, backend="triton")
        return super().forward(x)


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, kernels: str = "torch"):
        super().__init__()
        self.layer_norm1 = SiglipLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, device, kernels)
        self.self_attn = SiglipAttention(cfg, device)
        self.layer_norm2 = SiglipLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, device, kernels)
        self.mlp = SiglipMLP(cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, kernels: str = "torch"):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, device, kernels) for _ in range(cfg.num_layers))


class SiglipVisionTower(nn.Module):
    """``forward(pixel_values [N, 3, S, S]) -> [N, (S/p)^2, D]`` features of ``cfg.select_layer``."""

    def __init__(self, cfg: SiglipConfig, device: torch.device | None = None, kernels: str = "torch"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg, device)
        self.encoder = SiglipEncoder(cfg, device, kernels)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device)

    def unused_parameter_prefixes(self) -> tuple[str, ...]:
        """Parameters that never see a gradient with ``select_layer`` (kept for the HF round-trip)."""
        used = self.cfg.num_used_layers
        return tuple(f"encoder.layers.{i}" for i in range(used, self.cfg.num_layers)) + ("post_layernorm",)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[: self.cfg.num_used_layers]:
            x = layer(x)
        return x

    def forward_last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All blocks + ``post_layernorm`` (HF's ``last_hidden_state``), for parity checks."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh init (SigLIP-style: normal(0.02)-ish linears, zero biases, unit LayerNorms)."""
        d = self.cfg.hidden_size
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=(1.0 / (self.cfg.num_channels *
                        self.cfg.patch_size ** 2)) ** 0.5)
        nn.init.zeros_(self.embeddings.patch_embedding.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=d ** -0.5)
        init_linear_and_layernorm(self.modules())
