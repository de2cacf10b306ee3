"""Import / export of NVILA weights in the Hugging Face layouts VILA and SGLang read.

Export folder (reference nvila.md §9)::

    OUT/
      config.json      top-level LlavaLlamaConfig: architectures=["LlavaLlamaModel"], model_type
                       "llava_llama", llm_cfg / vision_tower_cfg / mm_projector_cfg and the model args
      llm/             Qwen2ForCausalLM (config.json + safetensors) + tokenizer files
      vision_tower/    SiglipVisionModel (config.json + model.safetensors, keys ``vision_model.*``)
                       + preprocessor_config.json (SigLIP image processor)
      mm_projector/    v2l_projector (config.json + model.safetensors, keys ``layers.N.*``)

Vision-tower key names are pinned to the ``vision_model.`` prefix that transformers 4.x wrote and
VILA / SGLang loaders expect (newer transformers flattened the names, which broke SGLang - nvila.md
§9); transformers 5 still loads the prefixed names. Import accepts both spellings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

VISION_PREFIX = "vision_model."


# ---------------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------------
def siglip_to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tower's state dict -> HF ``SiglipVisionModel`` keys (``vision_model.*``)."""
    return {VISION_PREFIX + k: v for k, v in sd.items()}


def siglip_from_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``SiglipVisionModel`` keys (prefixed or transformers-5 flat) -> our keys. The pooling head
    (``head.*``), which NVILA never uses, is dropped; position_ids buffers are ignored."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix(VISION_PREFIX)
        if k.startswith("head.") or k.endswith("position_ids"):
            continue
        out[k] = v
    return out


def siglip_hf_config(cfg) -> dict[str, Any]:
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": False,
    }


def siglip_config_from_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF SigLIP(-vision) config dict -> our ``SiglipConfig`` fields."""
    if hf.get("model_type") == "siglip":  # a full SigLIP (text + vision) config
        hf = hf.get("vision_config", {})
    if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: hidden_act={hf.get('hidden_act')!r}: only gelu_pytorch_tanh is supported")
    try:
        return dict(hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
                    num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
                    patch_size=int(hf["patch_size"]), image_size=int(hf["image_size"]),
                    num_channels=int(hf.get("num_channels", 3)),
                    layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)))
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} in a SigLIP vision config") from None


# ---------------------------------------------------------------------------------------------------
# Generic helpers
# ---------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    return json.loads(path.read_text())


def read_safetensors_dir(d: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (model.safetensors or an index of shards)."""
    from safetensors.torch import load_file

    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            out.update(load_file(str(d / shard)))
        return out
    single = d / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    return load_file(str(single))


def copy_into_module(module: nn.Module, tensors: Mapping[str, torch.Tensor], where: str,
                     ignore_missing: tuple[str, ...] = ()) -> None:
    """Copy full tensors into a module (plain or sharded by the engine); strict on names and shapes."""
    from scaleforge.models.llm.hf import _copy_into

    params = dict(module.state_dict(keep_vars=True))
    missing = sorted(k for k in params if k not in tensors and not k.startswith(ignore_missing))
    extra = sorted(k for k in tensors if k not in params)
    if missing or extra:
        raise ValueError(f"{where}: tensor names do not match the model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    with torch.no_grad():
        for k, t in tensors.items():
            _copy_into(params[k], t, f"{where}: {k}")


def _save_safetensors(tensors: Mapping[str, torch.Tensor], out: Path, dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    data = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).cpu().contiguous()
            for k, v in tensors.items()}
    save_file(data, str(out / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------
def split_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"vision_tower": {}, "mm_projector": {}, "llm": {}}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head not in parts:
            raise ValueError(f"state dict key {k!r} belongs to no NVILA component "
                             f"(expected vision_tower.*, mm_projector.*, llm.*)")
        parts[head][rest] = v
    return parts


def export_hf_layout(state_dict: Mapping[str, torch.Tensor], cfg, out_dir: str | os.PathLike,
                     tokenizer=None, dtype: torch.dtype | None = None) -> list[str]:
    """Write ``llm/``, ``vision_tower/``, ``mm_projector/`` and the top-level ``config.json``.

    ``cfg``: the recipe's ``NVILAConfig``; ``state_dict``: full (unsharded) NVILA state dict.
    """
    from scaleforge.models.llm.hf import export_hf, ours_to_hf_config

    out = Path(out_dir)
    parts = split_state_dict(state_dict)
    llm_cfg = cfg.llm.resolved()
    export_hf(parts["llm"], llm_cfg, out / "llm", arch="qwen2" if llm_cfg.qkv_bias else "llama", dtype=dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "llm"))

    vt = out / "vision_tower"
    if cfg.vision_tower == "ps3":  # a ps3-torch PS3VisionModel folder (docs/ps3.md)
        from scaleforge.models.ps3.config import PS3Config
        from scaleforge.models.ps3.hf_io import hf_config

        _save_safetensors({f"vision_model.{k}": v for k, v in parts["vision_tower"].items()}, vt, dtype)
        vcfg = hf_config(PS3Config(vision=cfg.ps3))["vision_config"]
    else:
        _save_safetensors(siglip_to_hf_state_dict(parts["vision_tower"]), vt, dtype)
        vcfg = siglip_hf_config(cfg.vision)
    (vt / "config.json").write_text(json.dumps(vcfg, indent=2) + "\n")
    (vt / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "rescale_factor": 1 / 255, "resample": 3,
        "size": {"height": cfg.vision.image_size, "width": cfg.vision.image_size},
        "image_mean": list(cfg.vision.image_mean), "image_std": list(cfg.vision.image_std)}, indent=2) + "\n")

    mp = out / "mm_projector"
    _save_safetensors(parts["mm_projector"], mp, dtype)
    pcfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
            "mm_projector_type": cfg.projector}
    (mp / "config.json").write_text(json.dumps(pcfg, indent=2) + "\n")

    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": ours_to_hf_config(llm_cfg, "qwen2" if llm_cfg.qkv_bias else "llama",
                                     dtype or next(iter(parts["llm"].values())).dtype),
        "vision_tower_cfg": vcfg,
        "mm_projector_cfg": pcfg,
        "hidden_size": llm_cfg.dim,
        "mm_hidden_size": cfg.vision.hidden_size * cfg.channel_multiplier,
        "mm_vision_select_layer": cfg.vision.select_layer,
        "mm_vision_select_feature": "cls_patch",
        "mm_projector_type": cfg.projector,
        "image_aspect_ratio": cfg.image_mode,
        "dynamic_s2": cfg.image_mode == "dynamic_s2",
        "s2": cfg.image_mode == "dynamic_s2",
        "s2_scales": ",".join(str(s) for s in cfg.s2_scales),
        "s2_max_split_size": cfg.vision.image_size,
        "s2_resize_output_to_scale_idx": -1,
        "max_tiles": cfg.max_tiles,
        "num_video_frames": cfg.video_frames,
        "video_encoder": {"_target_": "llava.model.encoders.TSPVideoEncoder",
                          "pool_sizes": [[cfg.temporal_pool, 1, 1]]},
        "model_max_length": cfg.max_length,
        "tokenizer_padding_side": "right",
        "chat_template": "qwen2",
        "scaleforge_config": dataclasses.asdict(cfg),
    }
    (out / "config.json").write_text(json.dumps(top, indent=2, default=str) + "\n")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------
def load_vision_tower(tower: nn.Module, hf_dir: str | os.PathLike) -> None:
    """Load an HF ``SiglipVisionModel`` folder (or a full SigLIP ``vision_model.*``) into our tower;
    a PS3 tower takes a ps3-torch folder (``vision_model.*`` keys)."""
    from scaleforge.models.ps3.vision import PS3VisionEncoder

    if isinstance(tower, PS3VisionEncoder):
        from scaleforge.models.ps3.hf_io import load_state

        sd = {k[len("vision_model."):]: v for k, v in read_safetensors_dir(hf_dir).items()
              if k.startswith("vision_model.")}
        missing = sorted(set(tower.state_dict()) - set(sd))
        if missing:
            raise ValueError(f"{hf_dir}: not a PS3 vision folder of this shape (missing {missing[:3]})")
        load_state(tower, sd, str(hf_dir))
        return
    tensors = siglip_from_hf_state_dict(
        {k: v for k, v in read_safetensors_dir(hf_dir).items()
         if not k.startswith(("text_model.", "logit_", "text_projection"))})
    copy_into_module(tower, tensors, str(hf_dir))


def load_projector(projector: nn.Module, hf_dir: str | os.PathLike, expected_type: str) -> None:
    cfg = _read_json(Path(hf_dir) / "config.json")
    got = cfg.get("mm_projector_type")
    if got != expected_type:
        raise ValueError(f"{hf_dir}/config.json: mm_projector_type={got!r} but the config asks for "
                         f"model.projector={expected_type!r}")
    copy_into_module(projector, read_safetensors_dir(hf_dir), str(hf_dir))


def load_nvila_dir(model: nn.Module, cfg, path: str | os.PathLike) -> None:
    """Load every component present in an exported NVILA folder (``llm/``, ``vision_tower/``,
    ``mm_projector/``); components missing there keep their current weights (e.g. stage 1 starts
    from SigLIP + Qwen2 folders and a fresh projector)."""
    from scaleforge.models.llm.hf import load_hf_weights

    p = Path(path)
    found = [c for c in ("llm", "vision_tower", "mm_projector") if (p / c).is_dir()]
    if not found:
        raise FileNotFoundError(f"model.init_from={path}: no llm/, vision_tower/ or mm_projector/ folder "
                                f"(expected an exported NVILA folder)")
    if "llm" in found:
        load_hf_weights(model.llm, p / "llm")
    if "vision_tower" in found:
        load_vision_tower(model.vision_tower, p / "vision_tower")
    if "mm_projector" in found:
        load_projector(model.mm_projector, p / "mm_projector", cfg.projector)
