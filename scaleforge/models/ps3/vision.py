"""PS3 vision encoder (Scaling Vision Pre-Training to 4K Resolution), plain single-device PyTorch.

A SigLIP-so400m-shaped ViT that sees the image twice:

1. low-res pass at ``scales[0]`` (378 px -> 27 x 27 tokens); every block's keys and values are cached;
2. patch selection: the hidden states of ``select_layers`` go through an MLP to one feature map per
   high-res scale, the light ConvNeXt encoder adds a high-res feature map; the cosine with a prompt
   (the learned ``prior_prompt`` = bottom-up, or a text / LLM embedding = top-down), x5, clamped to
   +-10, through a sigmoid gives the selection probability (scale 0's map for every scale, as
   upstream does), nearest-upsampled to each scale's grid; ground-truth boxes force 1 inside;
3. look-close rounds: per round the top ``budget_per_scale`` patches of each scale that no earlier
   round took are embedded (gather + matmul, interpolated position embedding + per-scale residual)
   and run through the same blocks, attending to [cached low-res K/V || the selected tokens], so a
   round costs the same at 1512 px as at 3780 px.

Module and parameter names follow NVlabs' ``ps3-torch`` (its timm trunk: ``trunk.blocks.N.attn.qkv``,
``trunk.attn_pool`` ...), so a state dict maps 1:1 to that package's ``vision_model.`` keys. The blocks
are ours rather than ``siglip.py``'s: timm's SigLIP fuses q/k/v and uses erf GELU, and the blocks take a
K/V cache; ``siglip.init_linear_and_layernorm`` is shared. Selection is vectorised over the batch: every
image of a batch has the same grids, so every round takes the same count per scale from each image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat
from scaleforge.models.nvila.siglip import init_linear_and_layernorm
from scaleforge.models.ps3.config import PS3VisionConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class Mlp(coat.FP8Block):
    """timm's ``Mlp``: fc1 -> GELU (erf) -> [norm] -> fc2. COAT mode: the GELU input saved in FP8."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None, norm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden, eps=norm_eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(d_hidden, d_out or d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.norm(coat.act(h, "gelu") if self.fp8 else F.gelu(h)))


class Attention(coat.FP8Block):
    """Multi-head attention with a K/V cache. COAT mode: ``proj`` keeps SDPA's bf16 output (which SDPA's fused
    kernels save anyway) instead of an FP8 copy of it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """-> (output, (k, v) of ``x``). With ``cache`` the queries attend to [cache || x]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        kk, vv = (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)) if cache is not None else (k, v)
        o = F.scaled_dot_product_attention(q, kk, vv)
        o2 = o.transpose(1, 2).reshape(b, n, d)
        if self.fp8 and o2.untyped_storage().data_ptr() == o.untyped_storage().data_ptr():
            coat.kept_for_backward(o2)  # a view of SDPA's output, not a copy
        return self.proj(o2), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        a, kv = self.attn(self.norm1(x), cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class AttentionPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (SigLIP's MAP head, one latent query), with a key mask."""

    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, D], mask [B, N] (True = pooled; a row without any True pools every token)."""
        b, n, d = x.shape
        h = self.heads
        q = self.q(self.latent).view(1, h, 1, d // h).expand(b, -1, -1, -1)
        k, v = self.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            mask = mask.bool() | ~mask.bool().any(-1, keepdim=True)
            attn_mask = mask.view(b, 1, 1, n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, 1, d)
        o = self.proj(o)
        return (o + self.mlp(self.norm(o)))[:, 0]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def selected(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Embed only patches ``idx`` [B, K] (row-major over the patch grid) of ``x`` [B, 3, H, W]."""
        p = self.proj.kernel_size[0]
        b, c = x.shape[:2]
        w = x.shape[-1] // p
        patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, H/p, W/p, p, p], a view
        bi = torch.arange(b, device=x.device).unsqueeze(1)
        sel = patches[bi, :, idx // w, idx % w]  # [B, K, C, p, p]: only the selected pixels are copied
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(sel.reshape(b, idx.shape[1], c * p * p).to(weight.dtype), weight, self.proj.bias)


class Trunk(nn.Module):
    """The ViT (timm ``VisionTransformer`` names): patch_embed, pos_embed, blocks, norm, attn_pool."""

    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.low_res_tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn_pool = AttentionPool(cfg)


def resample_pos_embed(pos: torch.Tensor, grid: int, new_h: int, new_w: int) -> torch.Tensor:
    """[1, g*g, D] -> [new_h * new_w, D]: bicubic (antialiased) to max(new_h, new_w) square, then the
    top-left crop (timm's ``resample_abs_pos_embed`` as ps3-torch patches it)."""
    if new_h == new_w == grid:
        return pos[0]
    d = pos.shape[-1]
    p = pos.float().reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    s = max(new_h, new_w)
    p = F.interpolate(p, size=(s, s), mode="bicubic", antialias=True)[:, :, :new_h, :new_w]
    return p.permute(0, 2, 3, 1).reshape(new_h * new_w, d).to(pos.dtype)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm ``ConvNeXtBlock`` (7x7 depthwise, LN, MLP x4, layer scale named ``weight`` as ps3-torch)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.weight
        return x + y.permute(0, 3, 1, 2)


class SelectionConvNet(nn.Module):
    """The light high-res selection encoder: stride-k conv stem, ConvNeXt blocks, 1x1 out projection."""

    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        k = cfg.highres_kernel
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.highres_hidden, k, stride=k), LayerNorm2d(cfg.highres_hidden, eps=1e-6))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(cfg.highres_hidden) for _ in range(cfg.highres_depth)))
        self.out_proj = nn.Conv2d(cfg.highres_hidden, cfg.highres_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.blocks(self.stem(x)))


@dataclass
class PS3VisionOutput:
    """ps3-torch's ``PS3VisionModelOutput`` fields that callers use."""

    last_hidden_state: torch.Tensor  # [B, low-res + selected high-res tokens, D] (last block, no norm)
    hidden_states: Optional[list[torch.Tensor]] = None
    selection_maps: Optional[list[torch.Tensor]] = None  # per high-res scale [B, h, w], 1 = encoded
    selection_probs: Optional[list[torch.Tensor]] = None
    pooled_output: Optional[torch.Tensor] = None
    bottomup_selection_probs: Optional[list[torch.Tensor]] = None
    topdown_selection_probs: Optional[list[torch.Tensor]] = None


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bicubic").to(x.dtype)


class PS3VisionEncoder(nn.Module):
    def __init__(self, cfg: PS3VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ns, d = len(cfg.scales) - 1, cfg.width
        self.trunk = Trunk(cfg)
        nl = len(cfg.select_layers)
        self.selection_feature_proj = Mlp(d * nl, d * nl, d * ns, norm=True)
        self.prior_prompt = nn.Parameter(torch.zeros(d))
        if cfg.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(nn.Parameter(torch.zeros(1, g * g, d))
                                                     for g in cfg.scale_grids())
        if cfg.highres_selection:
            self.highres_selection_feature_module = SelectionConvNet(cfg)
            self.prompt_proj_for_highres = nn.Linear(d, cfg.highres_out * ns)

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        init_linear_and_layernorm(self.modules())
        pe = self.trunk.patch_embed.proj
        nn.init.normal_(pe.weight, std=(1.0 / (3 * cfg.patch_size ** 2)) ** 0.5)
        nn.init.zeros_(pe.bias)
        nn.init.normal_(self.trunk.pos_embed, std=cfg.width ** -0.5)
        nn.init.normal_(self.trunk.attn_pool.latent, std=cfg.width ** -0.5)
        nn.init.normal_(self.prior_prompt)
        if cfg.separate_pos_emb:
            for p in self.pos_emb_residual:
                nn.init.zeros_(p)
        if cfg.highres_selection:
            for m in self.highres_selection_feature_module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=(1.0 / (m.in_channels // m.groups * m.kernel_size[0] ** 2)) ** 0.5)
                    nn.init.zeros_(m.bias)
            for b in self.highres_selection_feature_module.blocks:
                nn.init.constant_(b.weight, 1e-6)

    # -- geometry ----------------------------------------------------------------------------------
    def grid_hw(self, hw: tuple[int, int], scale_idx: int) -> tuple[int, int]:
        """Token grid of scale ``scale_idx`` for an image of ``hw`` (aspect kept as ps3-torch does)."""
        s0, p = self.cfg.scales[0], self.cfg.patch_size
        if scale_idx == 0:
            return s0 // p, s0 // p
        zoom = self.cfg.scales[scale_idx] // s0
        h, w = hw
        short = max(int(s0 / max(h, w) * min(h, w)) // p, 1) * zoom
        return (s0 // p * zoom, short) if h >= w else (short, s0 // p * zoom)

    def scale_images(self, pixel_values) -> list[torch.Tensor]:
        """One image tensor per scale: given as a list (resized by the loader) or resized here."""
        if isinstance(pixel_values, (list, tuple)):
            if len(pixel_values) != len(self.cfg.scales):
                raise ValueError(f"pixel_values: got {len(pixel_values)} scales, the model has {self.cfg.scales}")
            return list(pixel_values)
        hw = tuple(pixel_values.shape[-2:])
        p = self.cfg.patch_size
        return [_resize(pixel_values, tuple(g * p for g in self.grid_hw(hw, i))) for i in range(len(self.cfg.scales))]

    # -- low-res pass --------------------------------------------------------------------------------
    def forward_low_res(self, image: torch.Tensor) -> tuple[list[torch.Tensor], KVCache]:
        """-> (every block's output, every block's (k, v)) at the lowest scale."""
        t = self.trunk
        x = t.patch_embed.proj(image.to(t.pos_embed.dtype)).flatten(2).transpose(1, 2)
        x = x + t.pos_embed  # scale 0 is square at the table's own grid
        hidden, cache = [], []
        for blk in t.blocks:
            x, kv = blk(x)
            hidden.append(x)
            cache.append(kv)
        return hidden, cache

    # -- selection -----------------------------------------------------------------------------------
    def _probs(self, feats: torch.Tensor, hr: Optional[torch.Tensor], prompt: torch.Tensor) -> torch.Tensor:
        """Selection probability [B, g, g] on the low-res grid (scale 0's map, used for every scale)."""
        logits = (F.normalize(feats[:, 0], dim=-1) * F.normalize(prompt, dim=-1)[:, None, None]).sum(-1)
        if hr is not None:
            ns = len(self.cfg.scales) - 1
            hp = self.prompt_proj_for_highres(prompt).view(prompt.shape[0], ns, -1)[:, 0]
            hl = (F.normalize(hr, dim=1) * F.normalize(hp, dim=-1)[..., None, None]).sum(1)
            logits = (logits + F.adaptive_max_pool2d(hl.unsqueeze(1), logits.shape[-2:]).squeeze(1)) / 2
        return torch.sigmoid((logits * 5.0).clamp(-10, 10))

    def selection_probs(self, hidden: list[torch.Tensor], hr_image: Optional[torch.Tensor],
                        prompt: Optional[torch.Tensor], hw: tuple[int, int]):
        """-> (prior [B, g, g], posterior [B, g, g] or None) on the low-res grid."""
        cfg = self.cfg
        b = hidden[0].shape[0]
        g = self.grid_hw(hw, 0)
        f = torch.cat([hidden[i] for i in cfg.select_layers], -1)
        f = self.selection_feature_proj(f).view(b, g[0], g[1], len(cfg.scales) - 1, cfg.width)
        feats = f.permute(0, 3, 1, 2, 4)  # [B, ns, g, g, D]
        hr = self.highres_selection_feature_module(hr_image.to(f.dtype)) if cfg.highres_selection else None
        prior = self._probs(feats, hr, self.prior_prompt.expand(b, -1))
        post = self._probs(feats, hr, prompt) if prompt is not None else None
        return prior, post

    def per_scale(self, probs: torch.Tensor, hw: tuple[int, int]) -> list[torch.Tensor]:
        return [F.interpolate(probs.unsqueeze(1).float(), size=self.grid_hw(hw, i + 1), mode="nearest")
                .squeeze(1).to(probs.dtype) for i in range(len(self.cfg.scales) - 1)]

    def force_gt(self, probs: list[torch.Tensor], gt: torch.Tensor, hw: tuple[int, int]) -> list[torch.Tensor]:
        """Probability 1 wherever the ground-truth map ``gt`` [B, H, W] (any size) covers a patch."""
        g1 = F.interpolate(gt.unsqueeze(1).float(), size=self.grid_hw(hw, 1), mode="area")
        out = []
        for i, p in enumerate(probs):
            m = F.interpolate(g1, size=p.shape[-2:], mode="nearest").squeeze(1) > 0
            out.append(torch.where(m, torch.ones_like(p), p))
        return out

    def round_counts(self, sizes: Sequence[int], taken: Sequence[int], num_tokens: Optional[int]) -> list[int]:
        """Patches each scale gives in one round: the budget split (scaled to ``num_tokens`` when
        given), with what a scale cannot give (too few untaken patches) moved to the next scale."""
        budget = self.cfg.budget_per_scale()
        if num_tokens is not None:
            total = sum(budget)
            if num_tokens > total:
                raise ValueError(f"num_tokens={num_tokens} exceeds the per-round budget {total}")
            budget = [int(x * num_tokens / total) for x in budget]
        counts, carry = [], 0
        for i, (n, t) in enumerate(zip(sizes, taken)):
            want = budget[i] + carry
            got = min(want, n - t)
            carry = want - got if i < len(sizes) - 1 else 0
            counts.append(got)
        return counts

    @torch.no_grad()
    def select_round(self, probs: list[torch.Tensor], taken: list[torch.Tensor],
                     num_tokens: Optional[int] = None) -> list[torch.Tensor]:
        """Sorted indices [B, k_i] per scale of the next round's patches; ``taken`` [B, N_i] bool
        marks patches of earlier rounds (updated in place). Vectorised over the batch."""
        counts = self.round_counts([p[0].numel() for p in probs], [int(t[0].sum()) for t in taken], num_tokens)
        out = []
        for p, t, k in zip(probs, taken, counts):
            flat = p.flatten(1).masked_fill(t, -1.0)
            idx = flat.topk(k, dim=-1).indices.sort(-1).values
            t.scatter_(1, idx, True)
            out.append(idx)
        return out

    # -- high-res pass ---------------------------------------------------------------------------------
    def embed_selected(self, images: list[torch.Tensor], idx: list[torch.Tensor], hw) -> torch.Tensor:
        t, cfg = self.trunk, self.cfg
        parts = []
        for i, ix in enumerate(idx):
            if ix.shape[1] == 0:
                continue
            gh, gw = self.grid_hw(hw, i + 1)
            x = t.patch_embed.selected(images[i + 1], ix)
            pos = resample_pos_embed(t.pos_embed, cfg.grid, gh, gw)
            if cfg.separate_pos_emb:
                g = cfg.scale_grids()[i]
                pos = pos + self.pos_emb_residual[i][0].view(g, g, -1)[:gh, :gw].reshape(gh * gw, -1)
            parts.append(x + pos[ix])
        return torch.cat(parts, 1)

    def forward_high_res(self, x: torch.Tensor, cache: KVCache) -> list[torch.Tensor]:
        hidden = []
        for blk, kv in zip(self.trunk.blocks, cache):
            x, _ = blk(x, kv)
            hidden.append(x)
        return hidden

    def pool(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.trunk.attn_pool(self.trunk.norm(x), mask)

    # -- entry points ----------------------------------------------------------------------------------
    def prepare(self, pixel_values, prompt, gt_selection_maps):
        """Low-res pass and selection probabilities shared by both entry points."""
        images = self.scale_images(pixel_values)
        hw = tuple(images[-1].shape[-2:])
        hidden, cache = self.forward_low_res(images[0])
        hr_in = None
        if self.cfg.highres_selection:
            side = self.cfg.highres_input
            hr_in = next((im for im in images if tuple(im.shape[-2:]) == (side, side)), None)
            hr_in = hr_in if hr_in is not None else _resize(images[-1], (side, side))
        prior, post = self.selection_probs(hidden, hr_in, prompt, hw)
        probs = self.per_scale(post if post is not None else prior, hw)
        if gt_selection_maps is not None:
            probs = self.force_gt(probs, gt_selection_maps, hw)
        return images, hw, hidden, cache, prior, post, probs

    def forward(self, pixel_values, num_look_close=None, num_token_look_close=None,
                prompt: Optional[torch.Tensor] = None, gt_selection_maps: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False) -> PS3VisionOutput:
        """ps3-torch's inference forward: ``num_look_close`` rounds (int or ``"all"``) or
        ``num_token_look_close`` high-res tokens; 0 = low-res only."""
        images, hw, hidden, cache, prior, post, probs = self.prepare(pixel_values, prompt, gt_selection_maps)
        if num_look_close == 0 or num_token_look_close == 0:
            return PS3VisionOutput(hidden[-1], hidden if output_hidden_states else None, None, probs)
        rounds, token_plan = self.plan_rounds(probs, num_look_close, num_token_look_close)
        taken = [torch.zeros(p.shape[0], p[0].numel(), dtype=torch.bool, device=p.device) for p in probs]
        offsets = [0]
        for p in probs[:-1]:
            offsets.append(offsets[-1] + p[0].numel())
        pos, feats = [], []
        for r in range(rounds):
            idx = self.select_round(probs, taken, token_plan[r])
            h = self.forward_high_res(self.embed_selected(images, idx, hw), cache)
            feats.append(h if output_hidden_states else h[-1:])
            pos.append(torch.cat([ix + o for ix, o in zip(idx, offsets)], 1))
        order = torch.cat(pos, 1).argsort(1)  # the high-res tokens of all rounds in scale-major grid order
        layers = list(zip(*feats))
        out = [torch.cat([lo, torch.cat(hs, 1).gather(1, order.unsqueeze(-1).expand(-1, -1, lo.shape[-1]))], 1)
               for lo, hs in zip(hidden[-len(layers):], layers)]
        maps = [t.view_as(p).to(p.dtype) for t, p in zip(taken, probs)]
        return PS3VisionOutput(out[-1], out if output_hidden_states else None, maps, probs,
                               bottomup_selection_probs=self.per_scale(prior, hw),
                               topdown_selection_probs=self.per_scale(post, hw) if post is not None else None)

    def plan_rounds(self, probs, num_look_close, num_token_look_close) -> tuple[int, list[Optional[int]]]:
        """(rounds, per-round token count or None = full budget), ps3-torch's rules."""
        total = sum(p[0].numel() for p in probs)
        budget = sum(self.cfg.budget_per_scale())
        max_rounds = math.ceil(total / budget)
        if num_look_close == "all" or num_token_look_close == "all":
            return max_rounds, [None] * max_rounds
        if num_look_close is not None and num_look_close > 0:
            n = min(int(num_look_close), max_rounds)
            return n, [None] * n
        if num_token_look_close is not None and num_token_look_close > 0:
            ntok = min(int(num_token_look_close), total)
            n = math.ceil(ntok / budget)
            last = ntok % budget or budget
            return n, [None] * (n - 1) + [last]
        raise ValueError(f"num_look_close={num_look_close!r}, num_token_look_close={num_token_look_close!r}: "
                         f"give a round count, a token count, 'all' or 0")

    def forward_pretrain(self, pixel_values, prompt: torch.Tensor, gt_selection_maps: torch.Tensor,
                         is_global: torch.Tensor) -> PS3VisionOutput:
        """The pre-training forward: one look-close round at the full budget with ground-truth forcing;
        pooled = the low-res MAP feature for global-caption samples, else the MAP feature of the
        selected high-res tokens inside the box."""
        images, hw, hidden, cache, prior, post, probs = self.prepare(pixel_values, prompt, gt_selection_maps)
        taken = [torch.zeros(p.shape[0], p[0].numel(), dtype=torch.bool, device=p.device) for p in probs]
        idx = self.select_round(probs, taken)
        high = self.forward_high_res(self.embed_selected(images, idx, hw), cache)[-1]
        gt = gt_selection_maps.unsqueeze(1).float()
        inside = [F.interpolate(gt, size=p.shape[-2:], mode="area").flatten(1).gather(1, ix) > 0
                  for p, ix in zip(probs, idx)]
        pooled_high = self.pool(high, torch.cat(inside, 1))
        pooled_low = self.pool(hidden[-1])
        pooled = torch.where(is_global.view(-1, 1), pooled_low, pooled_high)
        return PS3VisionOutput(high, None, [t.view_as(p) for t, p in zip(taken, probs)], probs, pooled,
                               self.per_scale(prior, hw), self.per_scale(post, hw) if post is not None else None)
