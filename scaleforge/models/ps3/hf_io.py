"""Import / export in the layout of NVlabs' ``ps3-torch`` (``PS3Config`` / ``PS3VisionModel`` /
``PS3TextModel``): ``config.json`` (``model_type: ps3`` with ``vision_config`` and ``text_config``) and
``model.safetensors`` with ``vision_model.*`` and ``text_model.*`` keys, which are our module names.

ps3-torch builds its ViT trunk from a timm architecture name (``vision_config.model_name``), so the
trunk's dimensions are not in the config: on import they are read from the weights' shapes, and the
head count from the known names below (or the ``PS3VisionConfig`` given). The SigLIP logit scale and
bias are training-only and not exported (ps3-torch has no place for them).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Optional

import torch

from scaleforge.models.ps3.config import PS3Config, PS3TextConfig, PS3VisionConfig

#: timm trunks used by released PS3 checkpoints -> attention heads
KNOWN_TRUNK_HEADS = {"vit_so400m_patch14_siglip_378": 16, "vit_so400m_patch14_siglip_384": 16,
                     "vit_so400m_patch14_siglip_gap_378": 16}
LOSS_ONLY = ("logit_scale", "logit_bias")


def hf_config(cfg: PS3Config) -> dict:
    v, t = cfg.vision, cfg.text
    vision = {"model_type": "ps3_vision_model", "model_name": v.timm_name, "hidden_size": v.width,
              "pool": "map", "pretrained": False, "dynamic_img_size": True, "ps3_scales": list(v.scales),
              "select_based_on_layer": list(v.select_layers), "max_select_num": v.max_select_num,
              "max_select_num_each_scale": None, "separate_pos_emb": v.separate_pos_emb,
              "highres_selection_feature": v.highres_selection,
              "highres_selection_module_hidden_dim": v.highres_hidden,
              "highres_selection_module_out_dim": v.highres_out,
              "highres_selection_module_depth": v.highres_depth,
              "highres_selection_module_kernel_size": v.highres_kernel}
    text = {"model_type": "ps3_text_model", "output_dim": t.output_dim, "prompt_proj_dim": t.output_dim,
            "context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
            "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_dim / t.width, "no_causal_mask": True,
            "pool_type": "last", "proj_bias": True, "pad_id": t.pad_id,
            "norm_kwargs": {"eps": t.layer_norm_eps}, "act_kwargs": {"approximate": "tanh"} if t.gelu_tanh else {}}
    return {"model_type": "ps3", "architectures": ["PS3Model"], "vision_config": vision, "text_config": text}


def save_pretrained(model_or_state, out_dir: str, cfg: Optional[PS3Config] = None) -> None:
    """Write a ps3-torch folder from a ``PS3Model`` (or a full state dict with ``cfg``)."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, torch.nn.Module):
        cfg = cfg or model_or_state.cfg
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if cfg is None:
        raise ValueError("save_pretrained: a state dict needs its PS3Config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in LOSS_ONLY}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")


def _vision_from_hf(vc: dict, sd: Mapping[str, torch.Tensor], base: Optional[PS3VisionConfig]) -> PS3VisionConfig:
    p = "vision_model.trunk."
    width = sd[p + "pos_embed"].shape[-1]
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")})
    name = vc.get("model_name") or ""
    heads = KNOWN_TRUNK_HEADS.get(name, base.num_heads if base is not None else None)
    if heads is None:
        raise ValueError(f"vision_config.model_name={name!r}: unknown timm trunk, pass a PS3VisionConfig "
                         f"with its num_heads")
    patch = sd[p + "patch_embed.proj.weight"].shape[-1]
    hr = vc.get("highres_selection_feature", True)
    kw = dict(width=width, depth=depth, num_heads=heads, mlp_dim=sd[p + "blocks.0.mlp.fc1.weight"].shape[0],
              patch_size=patch, scales=sorted(vc.get("ps3_scales", [378, 756, 1512])),
              select_layers=list(vc.get("select_based_on_layer", [0, 9, 18, 26])),
              max_select_num=vc.get("max_select_num", 1280), separate_pos_emb=vc.get("separate_pos_emb", True),
              highres_selection=hr, highres_hidden=vc.get("highres_selection_module_hidden_dim", 512),
              highres_out=vc.get("highres_selection_module_out_dim", 512),
              highres_depth=vc.get("highres_selection_module_depth", 3),
              highres_kernel=vc.get("highres_selection_module_kernel_size", 28), timm_name=name)
    if vc.get("max_select_num_each_scale") is not None:
        raise ValueError("vision_config.max_select_num_each_scale: explicit per-scale budgets are not supported")
    return dataclasses.replace(base, **kw) if base is not None else PS3VisionConfig(**kw)


def _text_from_hf(tc: dict, base: PS3TextConfig) -> PS3TextConfig:
    w = tc.get("width", 512)
    return dataclasses.replace(base, vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("context_length", 77),
                               width=w, heads=tc.get("heads", 8), layers=tc.get("layers", 12),
                               mlp_dim=int(w * tc.get("mlp_ratio", 4.0)), output_dim=tc.get("output_dim", 1152),
                               layer_norm_eps=(tc.get("norm_kwargs") or {}).get("eps", 1e-5),
                               gelu_tanh=(tc.get("act_kwargs") or {}).get("approximate") == "tanh",
                               pad_id=tc.get("pad_id", 0))


def read_config(path: str, base: Optional[PS3Config] = None) -> tuple[PS3Config, dict]:
    """(our config of a ps3-torch folder, its state dict). Vision-only folders keep ``base``'s text tower."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: not a ps3-torch folder (needs config.json and model.safetensors)")
    raw = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    vc = raw.get("vision_config", raw) if raw.get("model_type") == "ps3" else raw
    base = base or PS3Config()
    cfg = dataclasses.replace(base, vision=_vision_from_hf(vc, sd, base.vision))
    if raw.get("model_type") == "ps3" and any(k.startswith("text_model.") for k in sd):
        cfg = dataclasses.replace(cfg, text=_text_from_hf(raw.get("text_config", {}), base.text))
    return cfg, sd


def load_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    """Copy a ps3-torch state dict into ``model`` (plain or sharded by the engine), strict on the vision keys."""
    from scaleforge.platform.engine import copy_full_tensor

    targets = model.state_dict()
    own = set(targets)
    unexpected = sorted(set(sd) - own)
    missing = sorted(k for k in own - set(sd) if k.startswith("vision_model.")
                     or (k.startswith("text_model.") and any(s.startswith("text_model.") for s in sd)))
    if unexpected or missing:
        raise ValueError(f"{path}: keys do not match the model (unexpected {unexpected[:3]}, missing {missing[:3]})")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(targets[k].shape)]
    if bad:
        raise ValueError(f"{path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)} there, {tuple(targets[bad[0]].shape)} "
                         f"in the model")
    for k, v in sd.items():
        copy_full_tensor(targets[k], v)


def from_pretrained(path: str, base: Optional[PS3Config] = None):
    """A ``PS3Model`` with the weights of a ps3-torch folder (``PS3Model`` or ``PS3VisionModel``)."""
    from scaleforge.models.ps3.model import PS3Model

    cfg, sd = read_config(path, base)
    model = PS3Model(cfg, torch.device("meta"))  # built empty: the folder overwrites (nearly) everything
    model.to_empty(device="cpu")
    if set(model.state_dict()) - set(sd) - set(LOSS_ONLY):
        model.init_weights()  # a vision-only folder: the text tower starts fresh
    else:
        with torch.no_grad():
            model.logit_scale.fill_(cfg.loss.init_logit_scale)
            model.logit_bias.fill_(cfg.loss.init_logit_bias)
    load_state(model, sd, path)
    return model
