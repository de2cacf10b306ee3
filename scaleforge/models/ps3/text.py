"""SigLIP text tower of PS3 (ps3-torch's ``TextTransformer``, open_clip layout), plain PyTorch.

Bidirectional pre-LN transformer over a fixed-length token row, the LAST position pooled (SigLIP),
``ln_final`` -> ``text_projection`` (Linear) -> the text feature; ``prompt_proj`` (MLP with LayerNorm)
of the normalised feature is the top-down selection prompt. Parameter names match ps3-torch's
``text_model.`` keys (``transformer.resblocks.N.attn.in_proj_weight`` ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat
from scaleforge.models.nvila.siglip import init_linear_and_layernorm
from scaleforge.models.ps3.config import PS3TextConfig
from scaleforge.models.ps3.vision import Mlp


class TextAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (in_proj_weight/bias, out_proj) computed with SDPA."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class TextMlp(coat.FP8Block):
    """c_fc -> GELU -> c_proj. COAT mode: the GELU input saved in FP8."""

    def __init__(self, d: int, hidden: int, tanh: bool):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden)
        self.c_proj = nn.Linear(hidden, d)
        self.approximate = "tanh" if tanh else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.fp8:
            return self.c_proj(coat.act(h, "gelu_tanh" if self.approximate == "tanh" else "gelu"))
        return self.c_proj(F.gelu(h, approximate=self.approximate))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: PS3TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = TextAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = TextMlp(cfg.width, cfg.mlp_dim, cfg.gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextStack(nn.Module):
    def __init__(self, cfg: PS3TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: PS3TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = TextStack(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.width, cfg.output_dim)
        self.prompt_proj = Mlp(cfg.output_dim, cfg.output_dim, cfg.output_dim, norm=True)

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's text init (normal embeddings, width-scaled projections)."""
        init_linear_and_layernorm(self.modules())
        w, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=w ** -0.5)
            nn.init.zeros_(blk.attn.in_proj_bias)
            nn.init.normal_(blk.attn.out_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
            nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(blk.mlp.c_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=w ** -0.5)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, L] token ids -> (feature [B, output_dim], top-down prompt [B, output_dim])."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        for blk in self.transformer.resblocks:
            x = blk(x)
        pooled = self.text_projection(self.ln_final(x)[:, -1])
        return pooled, self.prompt_proj(F.normalize(pooled, dim=-1))


class ByteTokenizer:
    """Built-in tokenizer of the test configs: UTF-8 bytes + 1, padded with 0 to ``context_length``
    (the last position, which SigLIP pools, is a pad for every caption shorter than the row)."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.vocab_size = 257

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = list(t.encode("utf-8")[: self.context_length - 1])
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
        return out


class HFTokenizer:
    """A local HF tokenizer folder (e.g. SigLIP's), padded / truncated to ``context_length``."""

    def __init__(self, path: str, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.context_length = context_length
        self.vocab_size = len(self.tok)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")["input_ids"]


def build_tokenizer(cfg: PS3TextConfig):
    from scaleforge.platform.config import ConfigError

    tok = ByteTokenizer(cfg.context_length) if cfg.tokenizer == "byte" else HFTokenizer(cfg.tokenizer, cfg.context_length)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"model.text.tokenizer={cfg.tokenizer!r} has {tok.vocab_size} tokens but "
                          f"model.text.vocab_size is {cfg.vocab_size}")
    return tok
