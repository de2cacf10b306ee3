"""Spatial token compression (STC), the multimodal projector variants and temporal pooling.

Reference nvila.md §3 (upstream ``llava/model/multimodal_projector/base_projector.py``):

| type                     | layers                                                               | k |
|--------------------------|----------------------------------------------------------------------|---|
| ``mlp_downsample``       | STC -> LN(4dv) -> Linear(4dv->d) -> GELU -> Linear(d->d)              | 2 |
| ``mlp_downsample_2x2_fix``| same as above (NVILA video SFT)                                     | 2 |
| ``mlp_downsample_3x3_fix``| STC -> LN(9dv) -> Linear(9dv->3dv) -> GELU -> LN(3dv) -> Linear(3dv->d) -> GELU -> Linear(d->d) | 3 |
| ``mlp2x_gelu``           | Linear(dv->d) -> GELU -> Linear(d->d) (no compression; baseline)     | 1 |

STC folds each k x k block of neighbouring tokens into channels, channel index = (di*k + dj)*C + c
(the order upstream's ``DownSampleBlock`` reshapes produce); odd grids are zero-padded at the bottom /
right first, so a 32x32 tile gives 16x16 = 256 tokens (k=2) or 11x11 = 121 tokens (k=3, padded to
33x33). The layers sit in an ``nn.Sequential`` named ``layers`` with upstream's indices (index 0 is the
parameter-free STC block), so the state dict keys (``layers.1.weight`` ...) match a VILA
``mm_projector`` folder.

Temporal compression (``llava/model/encoders/video/tsp.py``, §5): mean over groups of T consecutive
frames, applied after the projector on LLM-width tokens; 256 frames, T=8 -> 32 x 256 = 8192 tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.models.nvila.siglip import init_linear_and_layernorm

PROJECTOR_TYPES = ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix", "mlp2x_gelu")


def stc_block_size(projector_type: str) -> int:
    if projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"model.projector.type: unknown projector {projector_type!r} "
                         f"(known: {', '.join(PROJECTOR_TYPES)})")
    return {"mlp_downsample_3x3_fix": 3, "mlp2x_gelu": 1}.get(projector_type, 2)


def space_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, H, W, C] -> [N, ceil(H/k), ceil(W/k), k*k*C]; zero-pads odd grids at the end."""
    if k == 1:
        return x
    n, h, w, c = x.shape
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))  # pads W then H (last dims first), zeros
    hk, wk = (h + ph) // k, (w + pw) // k
    x = x.reshape(n, hk, k, wk, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hk, wk, k * k * c)


def space_to_channel_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Loop-based reference of ``space_to_channel`` (used by tests only)."""
    n, h, w, c = x.shape
    hk, wk = -(-h // k), -(-w // k)
    out = x.new_zeros(n, hk, wk, k * k * c)
    for i in range(hk):
        for j in range(wk):
            for di in range(k):
                for dj in range(k):
                    r, s = i * k + di, j * k + dj
                    if r < h and s < w:
                        slot = (di * k + dj) * c
                        out[:, i, j, slot:slot + c] = x[:, r, s]
    return out


class SpaceToChannel(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_channel(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class MultimodalProjector(nn.Module):
    """[N, h, w, d_v] tile feature grids -> [N, ceil(h/k), ceil(w/k), d] LLM-width tokens."""

    def __init__(self, projector_type: str, vision_dim: int, llm_dim: int, device=None):
        super().__init__()
        self.projector_type = projector_type
        self.k = k = stc_block_size(projector_type)
        dv = vision_dim
        if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                SpaceToChannel(k), nn.LayerNorm(k * k * dv, device=device),
                nn.Linear(k * k * dv, llm_dim, device=device), nn.GELU(),
                nn.Linear(llm_dim, llm_dim, device=device))
        elif projector_type == "mlp_downsample_3x3_fix":
            self.layers = nn.Sequential(
                SpaceToChannel(k), nn.LayerNorm(k * k * dv, device=device),
                nn.Linear(k * k * dv, 3 * dv, device=device), nn.GELU(),
                nn.LayerNorm(3 * dv, device=device), nn.Linear(3 * dv, llm_dim, device=device), nn.GELU(),
                nn.Linear(llm_dim, llm_dim, device=device))
        else:  # mlp2x_gelu
            self.layers = nn.Sequential(
                nn.Linear(dv, llm_dim, device=device), nn.GELU(), nn.Linear(llm_dim, llm_dim, device=device))
        self.vision_dim, self.llm_dim = vision_dim, llm_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.vision_dim:
            raise ValueError(f"projector expects [N, h, w, {self.vision_dim}] feature grids, got "
                             f"{tuple(x.shape)}")
        return self.layers(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        init_linear_and_layernorm(self.layers)


def temporal_pool(tokens: torch.Tensor, t: int) -> torch.Tensor:
    """[F, n, d] per-frame tokens -> [F/t, n, d]: mean over groups of ``t`` consecutive frames."""
    f = tokens.shape[0]
    if t < 1 or f % t:
        raise ValueError(f"video of {f} frames is not divisible by the temporal pool size {t} "
                         f"(model.temporal_pool); sample a multiple of {t} frames")
    return tokens.reshape(f // t, t, *tokens.shape[1:]).mean(dim=1)
