"""Hugging Face <-> ScaleForge conversion for Llama / Qwen2 causal LMs.

Reads and writes the layout ``transformers`` uses for ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``:
``config.json`` plus ``model.safetensors`` or sharded ``model-0000i-of-0000n.safetensors`` with a
``model.safetensors.index.json``. Tensors are converted and written one at a time (peak extra memory:
one output shard), and read lazily with ``safe_open``.

Both config.json flavours are understood: transformers 5.x (``rope_parameters``) and 4.x (top-level
``rope_theta`` + ``rope_scaling``). Unsupported features (other RoPE scalings, sliding-window
attention, MLP / output-projection biases, non-SiLU activations) raise a ``ValueError`` naming the
config.json key.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from scaleforge.models.llm.model import LLMModelConfig, Transformer, build_transformer

SUPPORTED_ARCHS = ("qwen2", "llama")
_HF_ARCH_CLASS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# our FQN suffix inside a block -> HF FQN suffix inside model.layers.{i}
_BLOCK_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_BLOCK_KEYS_INV = {v: k for k, v in _BLOCK_KEYS.items()}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TOP_KEYS_INV = {v: k for k, v in _TOP_KEYS.items()}
_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------
def to_hf_key(fqn: str) -> str:
    """Our FQN -> HF FQN (e.g. ``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if fqn in _TOP_KEYS:
        return _TOP_KEYS[fqn]
    m = _OURS_BLOCK.match(fqn)
    if m and m.group(2) in _BLOCK_KEYS:
        return f"model.layers.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {fqn!r}")


def from_hf_key(key: str) -> str:
    """HF FQN -> our FQN (inverse of ``to_hf_key``)."""
    if key in _TOP_KEYS_INV:
        return _TOP_KEYS_INV[key]
    m = _HF_BLOCK.match(key)
    if m and m.group(2) in _BLOCK_KEYS_INV:
        return f"layers.{m.group(1)}.{_BLOCK_KEYS_INV[m.group(2)]}"
    raise KeyError(f"unsupported Hugging Face tensor {key!r}")


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], tied: bool,
                     dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (hf_name, tensor) pairs; drops ``output.weight`` when tied (HF re-ties on load)."""
    for fqn, t in state_dict.items():
        if tied and fqn == "output.weight":
            continue
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        yield to_hf_key(fqn), t.contiguous()


def from_hf_state_dict(hf_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (our_fqn, tensor) pairs; with ``tied`` the embedding is also yielded as ``output.weight``
    (an ``lm_head.weight`` present in a tied checkpoint is skipped: it duplicates the embedding)."""
    items = hf_tensors.items() if isinstance(hf_tensors, Mapping) else hf_tensors
    for key, t in items:
        if tied and key == "lm_head.weight":
            continue
        fqn = from_hf_key(key)
        yield fqn, t
        if tied and fqn == "tok_embeddings.weight":
            yield "output.weight", t


# ---------------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def hf_arch(hf: Mapping[str, Any], where: str = "config.json") -> str:
    mt = hf.get("model_type")
    if mt not in SUPPORTED_ARCHS:
        archs = hf.get("architectures")
        raise ValueError(
            f"{where}: model_type={mt!r} (architectures={archs}) is not supported; "
            f"supported: {', '.join(_HF_ARCH_CLASS.values())}"
        )
    return mt


def hf_config_to_ours(hf: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """A transformers Llama/Qwen2 config dict -> our architecture fields (``LLMModelConfig`` keys)."""
    arch = hf_arch(hf, where)

    def bad(key: str, why: str):
        raise ValueError(f"{where}: {key}={hf.get(key)!r}: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", "only SiLU (SwiGLU) MLPs are supported")
    if hf.get("mlp_bias"):
        bad("mlp_bias", "MLP biases are not supported")
    if arch == "llama" and hf.get("attention_bias"):
        bad("attention_bias", "Llama attention_bias also adds an o_proj bias, which is not supported")
    if arch == "qwen2":
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") and (
            not layer_types or any(t != "full_attention" for t in layer_types)
        ):
            bad("use_sliding_window", "sliding-window attention is not supported")
    if any(t != "full_attention" for t in (hf.get("layer_types") or [])):
        bad("layer_types", "only full_attention layers are supported")
    if (hf.get("pretraining_tp") or 1) != 1:
        bad("pretraining_tp", "only pretraining_tp=1 is supported")

    # RoPE: transformers 5 nests everything in rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        bad("rope_parameters", "per-layer-type RoPE parameters are not supported")
    legacy = hf.get("rope_scaling") or {}
    for k, v in legacy.items():
        rope.setdefault(k, v)
    if "rope_theta" in hf and "rope_theta" not in rope:
        rope["rope_theta"] = hf["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {}
    if rope_type == "llama3":
        out.update(
            rope_type="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        out["rope_type"] = "default"
    else:
        raise ValueError(f"{where}: RoPE type {rope_type!r} is not supported (supported: default, llama3)")

    n_heads = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    out.update(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or dim // n_heads),
        ffn_hidden=int(hf["intermediate_size"]),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=(arch == "qwen2"),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return out


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Architecture fields of the HF model in ``hf_dir`` (its config.json)."""
    path = Path(hf_dir) / "config.json"
    return hf_config_to_ours(_load_json(path), where=str(path))


def ours_to_hf_config(cfg: LLMModelConfig, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch={arch!r}: must be one of {', '.join(SUPPORTED_ARCHS)}")
    if arch == "qwen2" and not cfg.qkv_bias:
        raise ValueError("arch='qwen2' needs qkv_bias=True (Qwen2 always has q/k/v biases); use arch='llama'")
    if arch == "llama" and cfg.qkv_bias:
        raise ValueError("arch='llama' cannot hold q/k/v biases (qkv_bias=True); use arch='qwen2'")
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    out: dict[str, Any] = {
        "architectures": [_HF_ARCH_CLASS[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tied_embeddings),
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim, pretraining_tp=1)
    else:
        if cfg.head_dim != cfg.dim // cfg.n_heads:
            raise ValueError(
                f"Qwen2 derives head_dim from hidden_size/num_attention_heads = {cfg.dim // cfg.n_heads}, "
                f"but the model has head_dim={cfg.head_dim}"
            )
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    return out


# ---------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------
class HFCheckpoint:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            self.weight_map: dict[str, str] = weight_map
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise FileNotFoundError(f"{index} lists shard {shard!r}, which is missing in {self.dir}")
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            hint = " (only safetensors checkpoints are supported)" if any(
                (self.dir / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
            ) else ""
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {key!r} not in checkpoint")
        shard = self.dir / self.weight_map[key]
        with safe_open(str(shard), "pt") as f:
            return f.get_tensor(key)


def expected_hf_keys(cfg: LLMModelConfig) -> set[str]:
    model_keys = _model_keys(cfg)
    return {to_hf_key(k) for k in model_keys if not (cfg.tied_embeddings and k == "output.weight")}


def _model_keys(cfg: LLMModelConfig) -> list[str]:
    with torch.device("meta"):
        return list(Transformer(cfg).state_dict().keys())


def load_hf_weights(model: Transformer, hf_dir: str | os.PathLike, strict: bool = True) -> None:
    """Copy the HF checkpoint's tensors into ``model`` (whatever storage the engine gave its parameters),
    one tensor at a time. Every parameter must be covered and shapes must match; errors name the
    tensor and file."""
    ckpt = HFCheckpoint(hf_dir)
    cfg = model.cfg
    expected = expected_hf_keys(cfg)
    present = set(ckpt.keys())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"{hf_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    extra = sorted(present - expected - ({"lm_head.weight"} if cfg.tied_embeddings else set()))
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]
    if extra and strict:
        raise ValueError(f"{hf_dir}: checkpoint has {len(extra)} tensors the model does not, e.g. {extra[:3]}")
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key in sorted(expected):
            fqn = from_hf_key(key)
            src = ckpt.get(key)
            targets = [fqn] + (["output.weight"] if cfg.tied_embeddings and fqn == "tok_embeddings.weight" else [])
            for t in targets:
                _copy_into(params[t], src, f"{hf_dir}: {key} -> {t}")


def _copy_into(param: torch.Tensor, full: torch.Tensor, what: str) -> None:
    """One full checkpoint tensor into a model tensor, through the engine's copy (plain or sharded storage)."""
    from scaleforge.platform.engine import copy_full_tensor

    shape = tuple(getattr(param, "shape"))
    if tuple(full.shape) != shape:
        raise ValueError(f"{what}: shape {tuple(full.shape)} in checkpoint, {shape} in model")
    copy_full_tensor(param, full)


def from_pretrained(hf_dir: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                    device: torch.device | str = "cpu", **overrides: Any) -> Transformer:
    """Build our ``Transformer`` from an HF Llama/Qwen2 directory and load its weights.
    ``overrides``: non-architecture config fields (e.g. ``attention="flex"``)."""
    cfg = LLMModelConfig(preset=None, init_from=str(hf_dir), **overrides).resolved()
    with torch.device("meta"):
        model = Transformer(cfg)
    ckpt_dtype = dtype
    if ckpt_dtype is None:
        hf = _load_json(Path(hf_dir) / "config.json")
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        ckpt_dtype = getattr(torch, name, torch.float32)
    model = model.to_empty(device=device).to(ckpt_dtype)
    load_hf_weights(model, hf_dir)
    return model


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def _size_bytes(t: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    itemsize = (dtype or t.dtype).itemsize
    return t.numel() * itemsize


def export_hf(state_dict: Mapping[str, torch.Tensor], model_cfg: LLMModelConfig, out_dir: str | os.PathLike,
              arch: Optional[str] = None, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write a full state dict (our FQNs) as an HF checkpoint: config.json + safetensors shards.

    Tensors are converted one at a time and written shard by shard (peak extra memory: one shard).
    ``arch`` defaults to ``qwen2`` if the model has q/k/v biases, else ``llama``. ``dtype`` defaults to
    the state dict's dtype. Returns the written file names.
    """
    from safetensors.torch import save_file

    cfg = model_cfg if model_cfg.dim is not None and model_cfg.head_dim is not None else model_cfg.resolved()
    arch = arch or ("qwen2" if cfg.qkv_bias else "llama")
    expected = set(_model_keys(cfg))
    got = set(state_dict.keys())
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(
            f"state dict does not match the model config: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    first = next(iter(state_dict.values()))
    out_dtype = dtype or first.dtype
    hf_cfg = ours_to_hf_config(cfg, arch, out_dtype)

    # Plan shards from sizes only, so names are known before anything is written.
    keys = [k for k in state_dict if not (cfg.tied_embeddings and k == "output.weight")]
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = _size_bytes(state_dict[k], out_dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard_keys in zip(names, shards):
        tensors = dict(to_hf_state_dict({k: state_dict[k] for k in shard_keys}, tied=False, dtype=out_dtype))
        tensors = {k: v.cpu() for k, v in tensors.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del tensors
    written = list(names)
    if len(names) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        written.append("model.safetensors.index.json")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    written.append("config.json")
    return written


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, arch: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write ``model`` in the HF layout that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    return export_hf(model.state_dict(), model.cfg, out_dir, arch=arch, dtype=dtype,
                     max_shard_bytes=max_shard_bytes)
