"""SANA / SANA-1.5 Linear DiT (``SanaMS`` in NVlabs/Sana), plain single-device PyTorch.

Structure (numbers from docs/reference sana.md §1-§6):

- patch embedding: a Linear over p x p x 32 latent patches (p = 1 for every released model, DC-AE f32c32
  latents), equivalent to upstream's Conv2d(32, C, p, stride p); optional 2-D sincos positional embedding
  (``use_pe``; off by default: NoPE at 512/1024, on for the 2K/4K configs);
- adaLN-single: timestep -> 256-d sinusoid -> Linear(256, C) -> SiLU -> Linear(C, C) = t; one shared
  SiLU -> Linear(C, 6C) = t0 for all blocks; each block adds its own (6, C) table (init randn / sqrt(C));
- caption projection 2304 -> C -> C (GELU-tanh), then RMSNorm(C) (``y_norm``, weight initialised to 0.01);
- ``depth`` blocks, each::

      x = x + gate_msa * LinearAttn(LN(x) * (1 + scale_msa) + shift_msa)
      x = x + CrossAttn(x, text)                           # not modulated, no pre-norm
      x = x + gate_mlp * MixFFN(LN(x) * (1 + scale_mlp) + shift_mlp)

  LinearAttn: fused qkv Linear(C, 3C, no bias), RMSNorm across all heads on q and k (SANA-1.5 ``qk_norm``,
  eps 1e-5), ReLU, padded-ones trick with accumulation and division in fp32 (eps 1e-8), head dim 32,
  out Linear(C, C, bias). CrossAttn: q Linear(C, C) and kv Linear(C, 2C) with bias, optional RMSNorm
  across heads on q and k (``cross_norm``), softmax attention with a -1e4 additive mask on padded text
  tokens, out Linear(C, C, bias). MixFFN (GLUMBConv): 1x1 C -> 2*Hd (bias) + SiLU, 3x3 depthwise on 2*Hd
  (bias), split, x * SiLU(gate), 1x1 Hd -> C (no bias); Hd = 2.5 C. The 1x1 convolutions are Linear
  layers on the token layout (upstream's ``GLUMBConvLinear``), which keeps them 2-D for the optimizer's
  factored statistics and avoids two layout transposes.
- final layer: (2, C) table + t -> shift, scale; LN; modulate; Linear(C, p*p*32); unpatchify.

``forward(latents, timesteps, text_embeddings, text_mask)`` mirrors diffusers' ``SanaTransformer2DModel``
(latents (B, 32, H, W); timesteps (B,) in [0, 1000), i.e. 1000 x the shifted noise level sigma; text
(B, L, 2304); mask (B, L) with 1 = real token) and returns the flow velocity (B, 32, H, W).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat

ATTN_EPS = 1e-8  # the blocks construct LiteLA with eps=1e-8 (sana.md §3)
NORM_EPS = 1e-6  # affine-free LayerNorms of the blocks and the final layer
QK_NORM_EPS = 1e-5


@dataclass
class SanaArch:
    """Shape of a Linear DiT. ``presets()`` lists the registered sizes (sana.md §1)."""

    depth: int = 20
    hidden_size: int = 2240
    self_head_dim: int = 32  # self-attention heads = hidden_size / 32 (fixed head dim)
    cross_heads: int = 20
    mlp_ratio: float = 2.5
    in_channels: int = 32  # DC-AE f32c32
    patch_size: int = 1
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    text_len: int = 300  # text tokens per caption (length of the null caption embedding)
    qk_norm: bool = True  # SANA-1.5 RMSNorm on q, k of the linear attention
    cross_norm: bool = True  # SANA-1.5 RMSNorm on q, k of the cross-attention
    use_pe: bool = False  # sincos positional embedding (NoPE by default)
    sample_size: int = 32  # base latent size for the sincos PE (1024 px / 32)
    pe_interpolation: float = 1.0
    attn_eps: float = ATTN_EPS
    fp32_attention: bool = True  # upcast q, k, v of the linear attention (SANA-1.5 configs)

    @property
    def self_heads(self) -> int:
        return self.hidden_size // self.self_head_dim

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    def validate(self) -> None:
        if self.hidden_size % self.self_head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of self_head_dim {self.self_head_dim}")
        if self.hidden_size % self.cross_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of cross_heads {self.cross_heads}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SanaArch":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SANA architecture keys: {sorted(unknown)}")
        return cls(**d)


#: sana.md §1. 0.6B = SanaMS_600M_P1_D28, 1.6B = SanaMS_1600M_P1_D20, 4.8B = SanaMS_4800M_P1_D60 (1.6B at 3x depth).
PRESETS: dict[str, dict[str, Any]] = {
    "0.6b": dict(depth=28, hidden_size=1152, cross_heads=16),
    "1.6b": dict(depth=20, hidden_size=2240, cross_heads=20),
    "2.4b": dict(depth=30, hidden_size=2240, cross_heads=20),
    "3.2b": dict(depth=40, hidden_size=2240, cross_heads=20),
    "4.8b": dict(depth=60, hidden_size=2240, cross_heads=20),
    # CPU tests and the tiny config: 2 self-attention heads of 32, 4 cross heads of 16.
    "tiny": dict(depth=4, hidden_size=64, cross_heads=4, caption_channels=32, text_len=16),
}


def preset_arch(name: str, **overrides: Any) -> SanaArch:
    if name not in PRESETS:
        raise ValueError(f"unknown SANA preset {name!r} (known: {', '.join(PRESETS)})")
    arch = SanaArch(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
    arch.validate()
    return arch


# ---------------------------------------------------------------------------------------------------
# Functional pieces (also the plain-PyTorch references of the kernel library)
# ---------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] embedding of (possibly fractional) timesteps, freqs exp(-ln(P) * i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, h: int, w: int, base_size: int, interpolation: float,
                     device: torch.device | None = None) -> torch.Tensor:
    """2-D sincos table (h*w, dim) as PixArt/SANA (and diffusers' ``get_2d_sincos_pos_embed``) build it:
    positions scaled by base_size / size / interpolation; first half of channels encode w, second h."""
    gh = torch.arange(h, dtype=torch.float64, device=device) / (h / base_size) / interpolation
    gw = torch.arange(w, dtype=torch.float64, device=device) / (w / base_size) / interpolation
    grid_w, grid_h = torch.meshgrid(gw, gh, indexing="xy")  # (h, w) each

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], dim=1)
    return emb.float()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def relu_linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = ATTN_EPS) -> torch.Tensor:
    """SANA ``LiteLA`` on (B, H, N, D) inputs (q, k already normalised, not yet ReLU'd).

    Padded-ones trick: one product [v, 1]^T relu(k) gives the (D+1) x D state whose last row is
    sum_j relu(k_j); multiplying by relu(q) yields numerator and normaliser together; the division is in
    fp32. Output in v's dtype.
    """
    out_dtype = v.dtype
    q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
    v = F.pad(v, (0, 1), value=1.0)  # (B, H, N, D+1)
    kv = torch.matmul(k.transpose(-1, -2), v)  # (B, H, D, D+1)
    out = torch.matmul(q, kv)  # (B, H, N, D+1)
    out = out[..., :-1] / (out[..., -1:] + eps)
    return out.to(out_dtype)


def _kernels():
    try:
        # imported on the CPU device: a model built under torch.device("meta") (the planner, meta init) would
        # otherwise make the library's module-level constants meta tensors
        with torch.device("cpu"):
            from scaleforge import kernels  # noqa: F401
        return kernels if hasattr(kernels, "relu_linear_attention") else None
    except Exception:  # the kernel library is optional; the torch path is the reference
        return None


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------
class RMSNorm(coat.FP8Block):
    """The q/k RMSNorm. COAT mode: the kernel library's norm with its input saved in FP8 (the same function)."""

    def __init__(self, dim: int, eps: float = QK_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return coat.norm(x, self.weight, eps=self.eps)
        return rms_norm_ref(x, self.weight, self.eps)


class LinearSelfAttention(nn.Module):
    def __init__(self, arch: SanaArch):
        super().__init__()
        c = arch.hidden_size
        self.heads, self.head_dim = arch.self_heads, arch.self_head_dim
        self.eps = arch.attn_eps
        self.fp32 = arch.fp32_attention
        self.kernels = "torch"
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_norm = RMSNorm(c) if arch.qk_norm else None
        self.k_norm = RMSNorm(c) if arch.qk_norm else None
        self.proj = nn.Linear(c, c, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Triton kernels run on GPU; a model configured for them still evaluates on CPU through the reference
        kern = _kernels() if self.kernels == "triton" and x.is_cuda else None
        if kern is not None:
            # the kernel accumulates and divides in fp32 itself, so no upcast of q, k, v is needed
            split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
            o = kern.relu_linear_attention(
                split(q), split(k), split(v), self.eps,
                qk_norm_weight_q=self.q_norm.weight if self.q_norm is not None else None,
                qk_norm_weight_k=self.k_norm.weight if self.k_norm is not None else None,
                qk_norm_eps=QK_NORM_EPS, backend="triton")
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
            if self.fp32:
                q, k, v = q.float(), k.float(), v.float()
            o = relu_linear_attention_ref(split(q), split(k), split(v), self.eps)
        o = o.transpose(1, 2).reshape(b, n, c).to(x.dtype)
        o = self.proj(o)
        if o.dtype == torch.float16:
            o = o.clamp(-65504, 65504)
        return o


class CrossAttention(coat.FP8Block):
    """Attention of the image tokens to the caption tokens. COAT mode: ``proj`` keeps SDPA's bf16 output (which
    SDPA's fused kernels save anyway) instead of an FP8 copy of it."""

    def __init__(self, arch: SanaArch):
        super().__init__()
        c = arch.hidden_size
        self.heads = arch.cross_heads
        self.q_linear = nn.Linear(c, c, bias=True)
        self.kv_linear = nn.Linear(c, 2 * c, bias=True)
        self.q_norm = RMSNorm(c) if arch.cross_norm else None
        self.k_norm = RMSNorm(c) if arch.cross_norm else None
        self.proj = nn.Linear(c, c, bias=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x)
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        hd = c // self.heads
        q = q.view(b, n, self.heads, hd).transpose(1, 2)
        k = k.view(b, -1, self.heads, hd).transpose(1, 2)
        v = v.view(b, -1, self.heads, hd).transpose(1, 2)
        attn_mask = None if mask_bias is None else mask_bias.to(q.dtype)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o2 = o.transpose(1, 2).reshape(b, n, c)
        if self.fp8 and o2.untyped_storage().data_ptr() == o.untyped_storage().data_ptr():
            coat.kept_for_backward(o2)  # a view of SDPA's output, not a copy
        return self.proj(o2)


def depthwise_conv3x3_tokens(h: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor,
                             bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 depthwise convolution (padding 1) on tokens (B, H*W, C) in their own layout, as the sum of nine
    shifted products: under ``torch.compile`` one fused element-wise kernel forward (and fused reductions for the
    weight gradient), with neither of the two layout transposes ``nn.Conv2d`` needs here. Same function as
    ``F.conv2d(x, weight (C, 1, 3, 3), bias, padding=1, groups=C)`` on the (B, C, H, W) view."""
    b, n, c = h.shape
    rows, cols = hw
    x = F.pad(h.view(b, rows, cols, c), (0, 0, 1, 1, 1, 1))
    w = weight.view(c, 9).to(h.dtype)
    out = sum(x[:, i:i + rows, j:j + cols] * w[:, 3 * i + j] for i in range(3) for j in range(3))
    if bias is not None:
        out = out + bias.to(h.dtype)
    return out.view(b, n, c)


class MixFFN(coat.FP8Block):
    """GLUMBConv: 1x1 -> SiLU -> depthwise 3x3 -> x * SiLU(gate) -> 1x1 (GLU after the depthwise conv).
    COAT mode: the SiLU and GLU inputs are saved in FP8, and the depthwise conv's input (SiLU's output) is not
    saved at all: recomputed in backward from SiLU's FP8-saved input (``coat.act_then``)."""

    def __init__(self, arch: SanaArch):
        super().__init__()
        c, hd = arch.hidden_size, arch.ffn_hidden
        self.inverted_conv = nn.Linear(c, 2 * hd, bias=True)
        self.depth_conv = nn.Conv2d(2 * hd, 2 * hd, 3, padding=1, groups=2 * hd, bias=True)
        self.point_conv = nn.Linear(hd, c, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = self.inverted_conv(x)
        if self.fp8:  # the conv's bf16 input is recomputed in backward from SiLU's FP8-saved input
            conv = self.depth_conv
            h = coat.act_then(h, "silu", lambda a, w, bias: self._conv(a, hw, w, bias), conv.weight, conv.bias)
        else:
            b = h.shape[0]
            h = F.silu(h).transpose(1, 2).reshape(b, -1, hw[0], hw[1])
            h = self.depth_conv(h).flatten(2).transpose(1, 2)
        h, gate = h.chunk(2, dim=-1)
        if self.fp8:
            return self.point_conv(coat.glu(gate, h, "silu"))
        return self.point_conv(h * F.silu(gate))

    @staticmethod
    def _conv(h: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The depthwise 3x3 conv on tokens (B, H*W, C) through their (B, C, H, W) view."""
        b = h.shape[0]
        h = h.transpose(1, 2).reshape(b, -1, hw[0], hw[1])
        return F.conv2d(h, weight, bias, padding=1, groups=h.shape[1]).flatten(2).transpose(1, 2)


def _modulated_ln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """LayerNorm without affine, then adaLN modulation x_hat * (1 + scale) + shift. With
    ``kernels == "triton"`` on GPU, eager, one fused kernel (scaleforge.kernels.layer_norm) does it in one pass;
    inside ``torch.compile`` Inductor fuses the torch code (with the residual adds and casts around it, which
    the opaque kernel would keep apart)."""
    kern = _kernels() if kernels == "triton" and x.is_cuda and not torch.compiler.is_compiling() else None
    if kern is not None:
        return kern.layer_norm(x, None, None, eps=NORM_EPS, shift=shift, scale=scale, backend="triton")
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS) * (1 + scale) + shift


class SanaBlock(coat.FP8Block):
    def __init__(self, arch: SanaArch):
        super().__init__()
        c = arch.hidden_size
        self.attn = LinearSelfAttention(arch)
        self.cross_attn = CrossAttention(arch)
        self.mlp = MixFFN(arch)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c ** 0.5)

    def forward(self, x: torch.Tensor, t0: torch.Tensor, y: torch.Tensor, mask_bias: torch.Tensor | None,
                hw: tuple[int, int]) -> torch.Tensor:
        b = x.shape[0]
        mod = self.scale_shift_table[None].to(t0.dtype) + t0.reshape(b, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        k = self.attn.kernels
        # COAT mode: the modulated norms save their input in FP8 and hand max|y| to the FP8 linear after them
        norm = self._fp8_norm if self.fp8 else (lambda x, shift, scale: _modulated_ln(x, shift, scale, k).to(x.dtype))
        x = x + gate_msa * self.attn(norm(x, shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask_bias)
        x = x + gate_mlp * self.mlp(norm(x, shift_mlp, scale_mlp), hw)
        return x


    @staticmethod
    def _fp8_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return coat.norm(x, None, None, NORM_EPS, rms=False, shift=shift.to(x.dtype), scale=scale.to(x.dtype))


class TimestepEmbedder(nn.Module):
    def __init__(self, c: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, c)
        self.linear_2 = nn.Linear(c, c)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = timestep_sinusoid(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(e)))


class CaptionProjection(nn.Module):
    def __init__(self, in_ch: int, c: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_ch, c)
        self.linear_2 = nn.Linear(c, c)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


class SanaTransformer(nn.Module):
    """The Linear DiT. Blocks live in ``self.blocks`` (the platform FSDP-wraps and checkpoints each)."""

    def __init__(self, arch: SanaArch):
        super().__init__()
        arch.validate()
        self.arch = arch
        c, p = arch.hidden_size, arch.patch_size
        self.patch_embed = nn.Linear(arch.in_channels * p * p, c)
        self.t_embedder = TimestepEmbedder(c)
        self.t_block = nn.Linear(c, 6 * c)  # shared SiLU -> Linear(C, 6C) of adaLN-single
        self.caption_projection = CaptionProjection(arch.caption_channels, c)
        self.caption_norm = RMSNorm(c)  # "y_norm"
        # The null caption used for classifier-free guidance (upstream ``y_embedding``: a fixed random
        # buffer of text_len x caption_channels, saved with the weights).
        self.register_buffer("null_caption", torch.randn(arch.text_len, arch.caption_channels)
                             / arch.caption_channels ** 0.5)
        self.blocks = nn.ModuleList(SanaBlock(arch) for _ in range(arch.depth))
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, c) / c ** 0.5)
        self.proj_out = nn.Linear(c, p * p * arch.in_channels)

    # -- kernels switch ---------------------------------------------------------------------------------
    def set_kernels(self, backend: str) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"model.kernels: {backend!r} is not one of torch, triton")
        if backend == "triton" and _kernels() is None:
            raise ValueError("model.kernels=triton but scaleforge.kernels.relu_linear_attention is not available")
        for blk in self.blocks:
            blk.attn.kernels = backend

    # -- init (sana.md §2: Xavier on Linear, zero biases; normal(0.02) on t-embedder, t_block, caption MLP;
    #    modulation tables randn/sqrt(C); no adaLN-Zero) -------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        c = self.arch.hidden_size
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if ".mlp." in f".{name}.":
                    # the 1x1 convs of GLUMBConv are Conv2d upstream and keep torch's Conv2d default init
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                    if m.bias is not None:
                        bound = 1 / math.sqrt(m.in_features)
                        nn.init.uniform_(m.bias, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):  # depthwise conv: torch default
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                fan_in = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                nn.init.uniform_(m.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for lin in (self.t_embedder.linear_1, self.t_embedder.linear_2, self.t_block,
                    self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.constant_(self.caption_norm.weight, 0.01)
        for blk in self.blocks:
            nn.init.normal_(blk.scale_shift_table, std=1 / c ** 0.5)
        nn.init.normal_(self.final_scale_shift_table, std=1 / c ** 0.5)
        self.null_caption.copy_(torch.randn(self.null_caption.shape, device=self.null_caption.device)
                                / self.arch.caption_channels ** 0.5)

    # -- forward ------------------------------------------------------------------------------------------
    def embed(self, latents: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor,
              text_mask: torch.Tensor | None):
        """Everything before the blocks: returns (x, t, t0, y, mask_bias, (h, w))."""
        b, cin, H, W = latents.shape
        p = self.arch.patch_size
        if cin != self.arch.in_channels or H % p or W % p:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit in_channels={self.arch.in_channels}, "
                             f"patch_size={p}")
        h, w = H // p, W // p
        dtype = self.patch_embed.weight.dtype
        x = latents.reshape(b, cin, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, cin * p * p)
        x = self.patch_embed(x.to(dtype))
        if self.arch.use_pe:
            pe = sincos_pos_embed(x.shape[-1], h, w, self.arch.sample_size // p, self.arch.pe_interpolation, x.device)
            x = x + pe.to(x.dtype)[None]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        t = self.t_embedder(timesteps)
        t0 = self.t_block(F.silu(t))
        y = self.caption_norm(self.caption_projection(text_embeddings.to(dtype)))
        mask_bias = None
        if text_mask is not None:
            mask_bias = (1.0 - text_mask.to(torch.float32)) * -10000.0
        return x, t, t0, y, mask_bias, (h, w)

    def final(self, x: torch.Tensor, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b = x.shape[0]
        h, w = hw
        p, cout = self.arch.patch_size, self.arch.in_channels
        shift, scale = (self.final_scale_shift_table[None].to(t.dtype) + t[:, None]).chunk(2, dim=1)
        x = self.proj_out(_modulated_ln(x, shift, scale).to(x.dtype))
        x = x.reshape(b, h, w, p, p, cout).permute(0, 5, 1, 3, 2, 4)
        # a fresh tensor, not a view of proj_out's output: FSDP2 hooks the root module's output for backward
        # and warns that an in-place op on a returned view would skip them
        return x.reshape(b, cout, h * p, w * p).contiguous()

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, t, t0, y, mask_bias, hw = self.embed(latents, timesteps, text_embeddings, text_mask)
        for blk in self.blocks:
            x = blk(x, t0, y, mask_bias, hw)
        return self.final(x, t, hw)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
