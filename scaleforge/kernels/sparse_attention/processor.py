"""SVG2 as a diffusers attention processor for video transformers whose self-attention follows
``WanAttnProcessor`` (``WanTransformer3DModel``): the same projections, QK-norms and rotary embedding, then
SVG2 attention instead of dense attention; cross-attention is left to the stock processor.

    from scaleforge.kernels.sparse_attention import SVG2Config, apply_svg2
    processors = apply_svg2(pipe.transformer, SVG2Config(top_p=0.9))

diffusers is imported only when a processor runs (the kernel library depends on torch alone)."""

from __future__ import annotations

import torch

from scaleforge.kernels.sparse_attention.svg2 import SVG2Config, SVG2State, svg2_attention


class SVG2AttnProcessor:
    """Self-attention processor of one layer (``layer_index``): dense for that layer's first
    ``cfg.dense_steps`` calls (one call per denoising step) and for layers below ``cfg.dense_layers``, SVG2
    afterwards, with the layer's centroids cached in ``self.state`` between steps. :meth:`reset` starts a new
    video (the next call counts as step 0 and re-runs the full k-means)."""

    def __init__(self, cfg: SVG2Config | None = None, layer_index: int = 0, *, backend: str | None = None):
        self.cfg = SVG2Config() if cfg is None else cfg
        self.layer_index, self.backend = layer_index, backend
        self.state = SVG2State()
        self.step = 0

    def reset(self) -> None:
        self.state, self.step = SVG2State(), 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SVG2AttnProcessor serves self-attention without a mask (set it on attn1 only)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotary(query, *rotary_emb), _rotary(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
        dense = self.step < self.cfg.dense_steps or self.layer_index < self.cfg.dense_layers
        self.step += 1
        if dense:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = svg2_attention(q, k, v, self.cfg, self.state, backend=self.backend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (x (B, S, H, D); cos / sin (1, S, 1, D) repeated per pair)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def apply_svg2(transformer, cfg: SVG2Config | None = None, *, backend: str | None = None) -> list[SVG2AttnProcessor]:
    """Set an :class:`SVG2AttnProcessor` on the self-attention (``attn1``) of every block of a diffusers video
    transformer (``transformer.blocks``, as ``WanTransformer3DModel`` has); returns them in layer order."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise ValueError(f"apply_svg2: {type(transformer).__name__} has no .blocks[i].attn1 self-attention")
    cfg = SVG2Config() if cfg is None else cfg
    procs = [SVG2AttnProcessor(cfg, i, backend=backend) for i in range(len(blocks))]
    for block, proc in zip(blocks, procs):
        block.attn1.set_processor(proc)
    return procs
