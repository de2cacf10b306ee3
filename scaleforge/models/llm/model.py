"""Dense decoder-only language model in the Llama / Qwen2 family.

Architecture (matches ``transformers``' ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` numerically):
pre-norm blocks of RMSNorm -> grouped-query attention with rotary position embeddings (RoPE, the
"rotate half" layout HF checkpoints use, so weights load without permutation) -> residual, RMSNorm ->
SwiGLU MLP ``w2(silu(w1 x) * w3 x)`` -> residual; final RMSNorm and an output projection that may be
tied to the token embedding. Qwen2 adds a bias to the q/k/v projections (``qkv_bias``).

Plain single-device PyTorch: FSDP, activation checkpointing and ``torch.compile`` are applied by the
platform to each ``TransformerBlock`` in ``Transformer.layers``. The model owns no buffers (RoPE angles
are computed per forward from ``position_ids``), so building on the ``meta`` device, ``to_empty`` and
``init_weights`` give a complete model.

Packed sequences: pass ``document_ids`` (B, S) (or flash-attention style ``cu_seqlens``) and attention
never crosses a document boundary; positions restart at 0 in each document unless ``position_ids`` is
given. With ``attention="sdpa"`` this uses an explicit block-diagonal causal mask in
``F.scaled_dot_product_attention`` (any device); ``attention="flex"`` uses ``flex_attention`` with a
document block mask (sparse, for long packed rows on GPU; fused only under ``torch.compile``, i.e.
``parallel.compile=true``, otherwise flex falls back to an unfused path; no backward on CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge import fp8 as coat

# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------
#: Architecture fields a preset (or an HF ``config.json``) can supply. Fields left ``None`` in a config
#: are filled from ``init_from``'s config.json, then from the preset; explicit values always win.
ARCH_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "rope_theta",
    "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_seq_len", "max_seq_len", "norm_eps", "qkv_bias", "tied_embeddings",
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: a 2-process gloo run trains it in seconds.
    "tiny": dict(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                 rope_theta=10000.0, max_seq_len=2048, norm_eps=1e-6, qkv_bias=True,
                 tied_embeddings=False, seq_len=128),
    # ~1.03B parameters (0.92B non-embedding incl. the output projection), seq 2048: the Llama-style
    # counterpart of the 0.94B GPT-style naive FSDP2 yardstick (benchmarks/peers/naive_fsdp2.py)
    # (dim 2048, 16 layers). FLOPs/token by our formula: 6*0.925e9 + 12*16*2048*2048 = 6.35 GFLOP,
    # vs ~6.4 GFLOP implied by that measurement.
    "1b": dict(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_hidden=5632,
               rope_theta=10000.0, max_seq_len=2048, norm_eps=1e-5, qkv_bias=False,
               tied_embeddings=False, seq_len=2048),
    # Qwen2.5-7B(-Instruct): the LLM of NVILA-8B (hidden 3584, vocab 152064, see reference/nvila.md).
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       ffn_hidden=18944, rope_theta=1000000.0, max_seq_len=32768, norm_eps=1e-6,
                       qkv_bias=True, tied_embeddings=False, seq_len=4096),
    # Meta-Llama-3-8B (the torchtitan yardstick of reference/platforms.md section 2, seq 8192).
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_hidden=14336, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5,
                      qkv_bias=False, tied_embeddings=False, seq_len=8192),
}

KERNELS = ("torch", "triton")
ATTENTION = ("sdpa", "flex")
ROPE_TYPES = ("default", "llama3")


@dataclass
class LLMModelConfig:
    """The ``model`` config section of the ``llm`` recipe.

    Architecture fields default to ``None``: they come from ``preset`` (default ``"tiny"``) or, with
    ``init_from``, from the checkpoint's ``config.json``; any field set explicitly overrides both.
    ``LLMModelConfig.resolved()`` returns the config with every field filled.
    """

    recipe: str = "llm"
    preset: Optional[str] = "tiny"  # tiny | 1b | qwen2.5-7b | llama3-8b | null (set every field)
    vocab_size: Optional[int] = None
    dim: Optional[int] = None  # hidden size
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None  # None: = n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_hidden: Optional[int] = None  # SwiGLU intermediate size
    rope_theta: Optional[float] = None
    rope_type: Optional[str] = None  # default | llama3 (Llama-3.1 frequency scaling)
    rope_factor: Optional[float] = None  # llama3 rope only
    rope_low_freq_factor: Optional[float] = None
    rope_high_freq_factor: Optional[float] = None
    rope_original_max_seq_len: Optional[int] = None
    max_seq_len: Optional[int] = None  # longest position the model supports (HF max_position_embeddings)
    norm_eps: Optional[float] = None
    qkv_bias: Optional[bool] = None  # Qwen2: bias on q/k/v projections
    tied_embeddings: Optional[bool] = None
    init_std: float = 0.02
    init_from: Optional[str] = None  # HF model directory (config.json + safetensors)
    seq_len: Optional[int] = None  # training sequence length (tokens per sample)
    # torch | triton: the kernel library switch of every recipe (triton: scaleforge.kernels' fused RMSNorm,
    # SwiGLU and chunked linear + cross-entropy on GPU; their torch references elsewhere)
    kernels: str = "torch"
    attention: str = "sdpa"  # sdpa (F.scaled_dot_product_attention) | flex (flex_attention, sparse packed rows)

    # -- derived ---------------------------------------------------------------------------------
    def resolved(self) -> "LLMModelConfig":
        """A copy with every architecture field filled (explicit > init_from config.json > preset)."""
        from scaleforge.platform.config import ConfigError

        values = {}
        if self.preset is not None:
            if self.preset not in PRESETS:
                import difflib

                hint = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
                raise ConfigError(
                    f"model.preset: unknown preset {self.preset!r}"
                    + (f"; did you mean {hint[0]}?" if hint else f" (known: {', '.join(PRESETS)})")
                )
            values.update(PRESETS[self.preset])
        if self.init_from is not None:
            from scaleforge.models.llm.hf import read_hf_config

            values.update(read_hf_config(self.init_from))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None or f.name not in values:
                values[f.name] = v
        values.setdefault("rope_type", None)
        out = dataclasses.replace(self, **{k: v for k, v in values.items() if k in _FIELD_NAMES})
        if out.n_kv_heads is None:
            out.n_kv_heads = out.n_heads
        if out.rope_type is None:
            out.rope_type = "default"
        if out.head_dim is None and out.dim is not None and out.n_heads:
            out.head_dim = out.dim // out.n_heads
        if out.seq_len is None:
            out.seq_len = min(out.max_seq_len or 2048, 2048)
        required = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "rope_theta",
                    "max_seq_len", "norm_eps", "qkv_bias", "tied_embeddings")
        for name in required:
            if getattr(out, name) is None:
                raise ConfigError(f"model.{name}: required (no preset, and not given)")
        out.validate()
        return out

    def validate(self) -> None:
        from scaleforge.platform.config import ConfigError

        if self.kernels in ATTENTION:
            raise ConfigError(
                f"model.kernels={self.kernels}: model.kernels selects the kernel library ({' | '.join(KERNELS)}); "
                f"the attention implementation is model.attention ({' | '.join(ATTENTION)})"
            )
        if self.kernels not in KERNELS:
            raise ConfigError(f"model.kernels: {self.kernels!r} is not one of {', '.join(KERNELS)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention: {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"model.rope_type: {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_max_seq_len"):
                if getattr(self, k) is None:
                    raise ConfigError(f"model.{k}: required when model.rope_type=llama3")
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads: must divide model.n_heads (got n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim: must be even for RoPE, got {self.head_dim}")
        if self.seq_len > self.max_seq_len:
            raise ConfigError(
                f"model.seq_len={self.seq_len} exceeds model.max_seq_len={self.max_seq_len}"
            )


_FIELD_NAMES = {f.name for f in dataclasses.fields(LLMModelConfig)}


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------
def fused_kernels_on(kernels: str, x: torch.Tensor) -> bool:
    """Whether to call scaleforge.kernels' Triton kernels: ``model.kernels=triton`` and a CUDA tensor (or the
    Triton CPU interpreter, which the kernel tests use). Elsewhere a model configured for them computes the same
    function in torch."""
    if kernels != "triton":
        return False
    from scaleforge.kernels._backend import triton_interpreting

    return x.is_cuda or triton_interpreting()


def fused_elementwise_on(kernels: str, x: torch.Tensor) -> bool:
    """``fused_kernels_on`` for the element-wise kernels of a block (norms, SwiGLU), except inside
    ``torch.compile``: there Inductor generates the fused kernel from the torch code and also fuses it with its
    neighbours (the residual add, the casts), while a custom kernel is opaque to it; its standalone RMSNorm was
    also faster than ours and Liger-Kernel's (docs/benchmarks.md, "Our LLM kernels against Liger-Kernel")."""
    return fused_kernels_on(kernels, x) and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=1)
def liger_rms_norm():
    """Liger-Kernel's RMSNorm function, or None where it is not installed (it is optional: the ``gpu`` extra)."""
    try:
        from liger_kernel.transformers.functional import liger_rms_norm as fn
    except ImportError:
        return None
    return fn


class RMSNorm(coat.FP8Block):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in fp32 and cast back before the weight
    (the order HF's Llama/Qwen2 RMSNorm uses, so bf16 outputs match too). ``kernels="triton"``: eager on CUDA
    Liger-Kernel's RMSNorm (same order, "llama" casting; faster than ours at the LLM's widths:
    ``benchmarks/kernels/vs_liger.py``), ours (``scaleforge.kernels.rms_norm``, weight applied in fp32 before the
    cast) where Liger is not installed or on the Triton CPU interpreter (Liger's kernels do not run there), the
    torch code inside ``torch.compile`` (``fused_elementwise_on``). COAT mode: the norm kernel with its input
    saved in FP8 (scaleforge.fp8)."""

    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return coat.norm(x, self.weight, eps=self.eps)
        if fused_elementwise_on(self.kernels, x):
            if x.is_cuda and liger_rms_norm() is not None:
                # not in place: the incoming gradient may be a view another node reads
                return liger_rms_norm()(x, self.weight, self.eps, casting_mode="llama", in_place=False)
            from scaleforge.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps, backend="triton")
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: LLMModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with Llama-3.1 ("llama3") scaling if configured:
    wavelengths longer than original_max/low_freq_factor are divided by ``factor``, those shorter than
    original_max/high_freq_factor are kept, and the band between is interpolated smoothly."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    if cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (B, S, head_dim) for the rotate-half layout (angles computed in fp32)."""
    angles = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, hd); cos/sin: (B, S, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


@dataclass
class AttentionMask:
    """How the queries of one forward may attend to keys; built once per forward, shared by blocks.

    ``causal``: plain causal attention over the whole row (SDPA ``is_causal``).
    ``dense``: a boolean (B, 1, Sq, Sk) mask, True = attend (packed rows on SDPA, cached decoding).
    ``block_mask``: a flex_attention ``BlockMask`` (packed rows with ``attention="flex"``).
    """

    causal: bool = True
    dense: Optional[torch.Tensor] = None
    block_mask: Any = None


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Flash-attention style cumulative lengths (over the flattened B*S tokens, starting at 0) ->
    (B, S) document ids. Documents that would cross a row boundary are split there."""
    cu = cu_seqlens.to(torch.long)
    if cu.ndim != 1 or cu[0].item() != 0 or cu[-1].item() != batch * seq:
        raise ValueError(
            f"cu_seqlens must be 1-D, start at 0 and end at B*S={batch * seq}; got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    return doc.view(batch, seq)


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 where the document id changes along each row."""
    b, s = document_ids.shape
    idx = torch.arange(s, device=document_ids.device).expand(b, s)
    start = torch.ones_like(document_ids, dtype=torch.bool)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean block-diagonal causal mask: query q sees key k iff k <= q and both lie in
    the same document (and are in the same contiguous run of that id)."""
    s = document_ids.shape[1]
    # Number consecutive runs so that a repeated id in two separate runs still counts as two documents.
    run = torch.zeros_like(document_ids)
    run[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).long().cumsum(1)
    same = run[:, :, None] == run[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


def _flex_document_block_mask(document_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    run = torch.zeros_like(document_ids)
    run[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).long().cumsum(1)
    b, s = run.shape

    def mask_mod(bi, h, q, k):
        return (run[bi, q] == run[bi, k]) & (k <= q)

    return create_block_mask(mask_mod, b, None, s, s, device=document_ids.device)


@functools.lru_cache(maxsize=2)
def _flex(cuda: bool):
    """flex_attention is only a fused kernel when compiled; eager it falls back to a dense
    implementation that materializes (B, H, S, S) scores (69 GiB at NVILA-8B packed lengths). On
    GPU it is compiled once (the usual way to use it); on CPU the eager path serves tests."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


class KVCache:
    """Static per-layer key/value buffers for greedy decoding: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored
        # optional attention for one-token decode steps: fn(q, k, v, layer) with q (B, H, 1, D) and the
        # layer's cached k, v (B, n_kv_heads, L, D), e.g. scaleforge.kernels.sparse_attention.TwilightDecode
        self.decode_attention = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s = k.shape[2]
        if self.pos + s > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {s} > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:self.pos + s] = k
        self.v[layer][:, :, self.pos:self.pos + s] = v
        end = self.pos + s
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(coat.FP8Block):
    """Grouped-query attention with RoPE. COAT mode: the attention output, which SDPA's fused kernels save
    for their backward, is what ``wo`` keeps too (no FP8 copy of it; COAT does the same)."""

    def __init__(self, cfg: LLMModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: Optional[KVCache] = None,
                layer_idx: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None and s == 1 and cache.decode_attention is not None:
            out = cache.decode_attention(q, k, v, layer_idx)
        elif mask.block_mask is not None:
            out = _flex(q.is_cuda)(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
        elif mask.dense is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, enable_gqa=gqa)
        o = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        if self.fp8 and o.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            coat.kept_for_backward(o)  # a view of SDPA's output, not a copy
        return self.wo(o)


class FeedForward(coat.FP8Block):
    """SwiGLU: w2(silu(w1 x) * w3 x) (HF: gate_proj = w1, up_proj = w3, down_proj = w2); the gate is one fused
    kernel (``scaleforge.kernels.swiglu``; it ties Liger-Kernel's and Inductor's in time) with
    ``kernels="triton"`` on GPU, eager (inside ``torch.compile`` Inductor fuses the torch code,
    ``fused_elementwise_on``). COAT mode: the SwiGLU product's inputs are saved in FP8."""

    def __init__(self, dim: int, hidden: int, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return self.w2(coat.glu(self.w1(x), self.w3(x), "silu"))
        if fused_elementwise_on(self.kernels, x):
            from scaleforge.kernels import swiglu

            return self.w2(swiglu(self.w1(x), self.w3(x), backend="triton"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class OutputProjection(nn.Linear):
    """The LM head (an ``nn.Linear``: same parameters and state-dict keys). Called with ``labels`` it returns
    the summed cross-entropy instead of logits, through ``scaleforge.kernels.fused_linear_cross_entropy`` (chunked,
    never all logits at once) with ``kernels="triton"`` on GPU, else its full-logits fp32 reference. Called as a
    module so that FSDP gathers its weight when it is a unit of its own."""

    def __init__(self, dim: int, vocab: int, kernels: str = "torch"):
        super().__init__(dim, vocab, bias=False)
        self.kernels = kernels

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        from scaleforge.kernels import fused_linear_cross_entropy

        return fused_linear_cross_entropy(h, self.weight, labels, ignore_index=-100,
                                          backend="triton" if fused_kernels_on(self.kernels, h) else "torch")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LLMModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden, cfg.kernels)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: Optional[KVCache] = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer_idx)
        return x + self.feed_forward(self.ffn_norm(x))


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, cfg: LLMModelConfig):
        super().__init__()
        if cfg.dim is None or cfg.head_dim is None:
            cfg = cfg.resolved()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.output = OutputProjection(cfg.dim, cfg.vocab_size, cfg.kernels)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when ``tied_embeddings`` (idempotent)."""
        if self.cfg.tied_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):
        # ``to_empty`` from meta creates a new Parameter per module, which unties shared weights;
        # re-tie afterwards. (Under FSDP2 parameters are DTensors, which torch swaps in place, so the
        # tie survives and this is a no-op.)
        out = super()._apply(fn, recurse)
        self.tie_weights()
        return out

    # -- initialization --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic (given the torch RNG state) initialization with ``nn.init`` only, so it works
        on DTensor-sharded parameters: embedding and all linear weights ~ N(0, init_std) (HF's
        ``initializer_range`` convention, so a from-scratch model matches HF's in distribution),
        biases 0, norm weights 1."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for block in self.layers:
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.attention.wo,
                        block.feed_forward.w1, block.feed_forward.w2, block.feed_forward.w3):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()
        if not self.cfg.tied_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    # -- forward -----------------------------------------------------------------------------------
    def _mask(self, b: int, s: int, document_ids, cache: Optional[KVCache], device) -> AttentionMask:
        if cache is not None:
            if document_ids is not None:
                raise ValueError("packed sequences (document_ids/cu_seqlens) cannot be used with a KV cache")
            if cache.pos == 0:
                return AttentionMask(causal=True)
            if s == 1:
                return AttentionMask(causal=False)  # one new query sees every cached key
            q_pos = cache.pos + torch.arange(s, device=device)
            k_pos = torch.arange(cache.pos + s, device=device)
            return AttentionMask(causal=False, dense=(k_pos[None, :] <= q_pos[:, None])[None, None])
        if document_ids is None:
            return AttentionMask(causal=True)
        if self.cfg.attention == "flex":
            return AttentionMask(causal=False, block_mask=_flex_document_block_mask(document_ids))
        return AttentionMask(causal=False, dense=document_causal_mask(document_ids))

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, S, vocab) of ``input_ids`` (B, S) or of ``inputs_embeds`` (B, S, dim).

        ``document_ids`` (B, S) or ``cu_seqlens`` (flattened cumulative lengths) mark packed
        documents; attention stays within each. ``position_ids`` default to 0..S-1 (restarting per
        document when packed; offset by the cache length when decoding with ``cache``).
        ``return_hidden``: return the final-norm hidden states instead of logits (e.g. for a chunked
        loss). ``labels`` (B, S), aligned with the outputs (already shifted; -100 = no loss): return the
        summed cross-entropy through ``OutputProjection`` instead of logits.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = h.shape[:2]
        if cu_seqlens is not None:
            if document_ids is not None:
                raise ValueError("pass document_ids or cu_seqlens, not both")
            document_ids = document_ids_from_cu_seqlens(cu_seqlens, b, s)
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_document_ids(document_ids)
            else:
                start = cache.pos if cache is not None else 0
                position_ids = torch.arange(start, start + s, device=h.device).expand(b, s)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, h.device), position_ids, h.dtype)
        mask = self._mask(b, s, document_ids, cache, h.device)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += s
        h = self.norm(h)
        if labels is not None:
            return self.output(h, labels=labels)
        return h if return_hidden else self.output(h)

    # -- generation --------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, self.cfg.head_dim, max_len,
                       device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 16,
                 inputs_embeds: Optional[torch.Tensor] = None, eos_token_id: Optional[int] = None,
                 use_cache: bool = True, decode_attention=None) -> torch.Tensor:
        """Greedy decoding of equal-length prompts (no padding). The prompt is ``input_ids`` or
        ``inputs_embeds`` (e.g. text embeddings with visual tokens spliced in); returns only the new
        tokens (B, <= max_new_tokens). After ``eos_token_id`` a row keeps emitting eos.
        ``decode_attention`` (with the cache): the attention of the one-token steps (``KVCache.decode_attention``)."""
        prompt = input_ids if inputs_embeds is None else inputs_embeds
        b, s = prompt.shape[:2]
        device = prompt.device
        out: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=device)
        if use_cache:
            cache = self.new_cache(b, s + max_new_tokens, device=device,
                                   dtype=(inputs_embeds.dtype if inputs_embeds is not None else None))
            cache.decode_attention = decode_attention
            logits = self(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache)
        else:
            embeds = inputs_embeds if inputs_embeds is not None else self.tok_embeddings(input_ids)
            logits = self(inputs_embeds=embeds)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt)
            if len(out) == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            if use_cache:
                logits = self(input_ids=nxt[:, None], cache=cache)
            else:
                embeds = torch.cat([embeds, self.tok_embeddings(nxt[:, None]).to(embeds.dtype)], 1)
                logits = self(inputs_embeds=embeds)
        return torch.stack(out, dim=1)

    # -- accounting --------------------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts tied weights once
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


def build_transformer(cfg: LLMModelConfig, device: torch.device | str | None = None) -> Transformer:
    cfg = cfg.resolved() if cfg.dim is None or cfg.head_dim is None else cfg
    with torch.device(device or "cpu"):
        return Transformer(cfg)
