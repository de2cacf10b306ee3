"""Conversion between our ``SanaTransformer`` state dict and diffusers' ``SanaTransformer2DModel`` layout.

Key mapping (as NVlabs/Sana ``convert_sana_to_diffusers.py``, sana.md §13): fused qkv -> ``attn1.to_q/to_k/to_v``;
cross-attention ``q_linear``/``kv_linear``/``proj`` -> ``attn2.to_q``/``to_k``+``to_v``/``to_out.0``; Mix-FFN
-> ``ff.conv_inverted/conv_depth/conv_point`` (our 1x1 convs are Linear: weights gain two trailing unit
dims); shared timestep projection -> ``time_embed.linear``; text RMSNorm -> ``caption_norm``; q/k norms ->
``norm_q``/``norm_k`` (``qk_norm="rms_norm_across_heads"``). Both directions assert that every key is
consumed. Depth is read from the state dict, so grown and pruned models export with their real depth.

diffusers has no place for the null caption used for classifier-free guidance (its pipelines encode a
negative prompt instead); the export writes it to an extra file, ``sana_null_caption.safetensors``, that
diffusers ignores and the import reads back, so a round trip is exact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from scaleforge.models.sana.model import SanaArch, SanaTransformer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
NULL_CAPTION_FILE = "sana_null_caption.safetensors"
MAX_SHARD = "5GB"

_SIMPLE = {  # ours -> diffusers (non-block keys)
    "patch_embed.bias": "patch_embed.proj.bias",
    "t_embedder.linear_1.weight": "time_embed.emb.timestep_embedder.linear_1.weight",
    "t_embedder.linear_1.bias": "time_embed.emb.timestep_embedder.linear_1.bias",
    "t_embedder.linear_2.weight": "time_embed.emb.timestep_embedder.linear_2.weight",
    "t_embedder.linear_2.bias": "time_embed.emb.timestep_embedder.linear_2.bias",
    "t_block.weight": "time_embed.linear.weight",
    "t_block.bias": "time_embed.linear.bias",
    "caption_projection.linear_1.weight": "caption_projection.linear_1.weight",
    "caption_projection.linear_1.bias": "caption_projection.linear_1.bias",
    "caption_projection.linear_2.weight": "caption_projection.linear_2.weight",
    "caption_projection.linear_2.bias": "caption_projection.linear_2.bias",
    "caption_norm.weight": "caption_norm.weight",
    "final_scale_shift_table": "scale_shift_table",
    "proj_out.weight": "proj_out.weight",
    "proj_out.bias": "proj_out.bias",
}
_BLOCK_SIMPLE = {  # ours -> diffusers (inside block i)
    "scale_shift_table": "scale_shift_table",
    "attn.q_norm.weight": "attn1.norm_q.weight",
    "attn.k_norm.weight": "attn1.norm_k.weight",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "cross_attn.q_linear.weight": "attn2.to_q.weight",
    "cross_attn.q_linear.bias": "attn2.to_q.bias",
    "cross_attn.q_norm.weight": "attn2.norm_q.weight",
    "cross_attn.k_norm.weight": "attn2.norm_k.weight",
    "cross_attn.proj.weight": "attn2.to_out.0.weight",
    "cross_attn.proj.bias": "attn2.to_out.0.bias",
    "mlp.inverted_conv.bias": "ff.conv_inverted.bias",
    "mlp.depth_conv.weight": "ff.conv_depth.weight",
    "mlp.depth_conv.bias": "ff.conv_depth.bias",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DBLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    pass


def depth_of(state_dict: Mapping[str, torch.Tensor], pattern: re.Pattern = _BLOCK_RE) -> int:
    idx = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not idx:
        raise ConversionError("state dict has no transformer blocks")
    if idx != set(range(len(idx))):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def arch_from_state_dict(sd: Mapping[str, torch.Tensor], **extra) -> SanaArch:
    """Infer the architecture of one of our state dicts (depth, width, caption channels, norms, patch)."""
    c, fan_in = sd["patch_embed.weight"].shape
    out = sd["proj_out.weight"].shape[0]
    in_ch = extra.pop("in_channels", 32)
    p = int(round((fan_in / in_ch) ** 0.5))
    if p * p * in_ch != fan_in or out != fan_in:
        raise ConversionError(f"cannot infer patch size from patch_embed {tuple(sd['patch_embed.weight'].shape)}")
    return SanaArch(
        depth=depth_of(sd), hidden_size=c, in_channels=in_ch, patch_size=p,
        caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
        mlp_ratio=sd["blocks.0.mlp.point_conv.weight"].shape[1] / c,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, cross_norm="blocks.0.cross_attn.q_norm.weight" in sd,
        text_len=sd["null_caption"].shape[0] if "null_caption" in sd else 300,
        **extra,
    )


def diffusers_config(arch: SanaArch, depth: int | None = None) -> dict:
    if arch.qk_norm != arch.cross_norm:
        raise ConversionError("diffusers' SanaTransformer2DModel has one qk_norm switch for both attentions; "
                              f"this model has qk_norm={arch.qk_norm}, cross_norm={arch.cross_norm}")
    # diffusers hard-codes the linear-attention eps to 1e-15 (ours: 1e-8, as the SANA blocks); the normaliser
    # is many orders larger unless relu(q) or relu(k) vanishes, where both give 0.
    c = arch.hidden_size
    return {
        "_class_name": "SanaTransformer2DModel",
        "_diffusers_version": "0.32.0",
        "in_channels": arch.in_channels,
        "out_channels": arch.in_channels,
        "num_attention_heads": arch.self_heads,
        "attention_head_dim": arch.self_head_dim,
        "num_layers": depth if depth is not None else arch.depth,
        "num_cross_attention_heads": arch.cross_heads,
        "cross_attention_head_dim": c // arch.cross_heads,
        "cross_attention_dim": c,
        "caption_channels": arch.caption_channels,
        "mlp_ratio": arch.mlp_ratio,
        "dropout": 0.0,
        "attention_bias": False,
        "sample_size": arch.sample_size,
        "patch_size": arch.patch_size,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": arch.pe_interpolation if arch.use_pe else None,
        "guidance_embeds": False,
        "qk_norm": "rms_norm_across_heads" if arch.qk_norm else None,
        "timestep_scale": 1.0,
    }


def arch_from_diffusers_config(cfg: Mapping) -> SanaArch:
    bad = {k: cfg.get(k) for k in ("guidance_embeds", "attention_bias", "norm_elementwise_affine")
           if cfg.get(k)}
    if bad:
        raise ConversionError(f"unsupported diffusers SANA config values: {bad}")
    if cfg.get("timestep_scale", 1.0) != 1.0:
        raise ConversionError(f"unsupported timestep_scale {cfg['timestep_scale']} (SANA-Sprint); only 1.0")
    heads, hd = cfg.get("num_attention_heads", 70), cfg.get("attention_head_dim", 32)
    c = heads * hd
    if cfg.get("cross_attention_dim", c) != c:
        raise ConversionError(f"cross_attention_dim {cfg['cross_attention_dim']} != inner dim {c}")
    qk = cfg.get("qk_norm")
    if qk not in (None, "rms_norm_across_heads"):
        raise ConversionError(f"unsupported qk_norm {qk!r}")
    out_ch = cfg.get("out_channels") or cfg.get("in_channels", 32)
    if out_ch != cfg.get("in_channels", 32):
        raise ConversionError("out_channels != in_channels is not supported")
    interp = cfg.get("interpolation_scale")
    return SanaArch(
        depth=cfg.get("num_layers", 20), hidden_size=c, self_head_dim=hd,
        cross_heads=cfg.get("num_cross_attention_heads", 20), mlp_ratio=cfg.get("mlp_ratio", 2.5),
        in_channels=cfg.get("in_channels", 32), patch_size=cfg.get("patch_size", 1),
        caption_channels=cfg.get("caption_channels", 2304), qk_norm=qk is not None, cross_norm=qk is not None,
        use_pe=interp is not None, pe_interpolation=float(interp) if interp is not None else 1.0,
        sample_size=cfg.get("sample_size", 32),
    )


def to_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers keys (the null caption is returned separately by ``export_diffusers``)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(src: str, dst: str, t: torch.Tensor | None = None) -> None:
        out[dst] = (sd[src] if t is None else t).contiguous()
        used.add(src)

    for k, v in _SIMPLE.items():
        if k in sd:
            put(k, v)
    w = sd["patch_embed.weight"]
    c = w.shape[0]
    cin = sd["proj_out.weight"].shape[0]
    p = int(round((w.shape[1] / cin) ** 0.5))
    # our patch features are ordered (cin, ph, pw) exactly like Conv2d's weight (C, cin, p, p)
    put("patch_embed.weight", "patch_embed.proj.weight", w.reshape(c, cin, p, p))
    for i in range(depth_of(sd)):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for k, v in _BLOCK_SIMPLE.items():
            if src + k in sd:
                put(src + k, dst + v)
        q, k_, v_ = sd[src + "attn.qkv.weight"].chunk(3, dim=0)
        for name, t in (("to_q", q), ("to_k", k_), ("to_v", v_)):
            out[dst + f"attn1.{name}.weight"] = t.contiguous()
        used.add(src + "attn.qkv.weight")
        kw, vw = sd[src + "cross_attn.kv_linear.weight"].chunk(2, dim=0)
        kb, vb = sd[src + "cross_attn.kv_linear.bias"].chunk(2, dim=0)
        out[dst + "attn2.to_k.weight"], out[dst + "attn2.to_v.weight"] = kw.contiguous(), vw.contiguous()
        out[dst + "attn2.to_k.bias"], out[dst + "attn2.to_v.bias"] = kb.contiguous(), vb.contiguous()
        used |= {src + "cross_attn.kv_linear.weight", src + "cross_attn.kv_linear.bias"}
        put(src + "mlp.inverted_conv.weight", dst + "ff.conv_inverted.weight",
            sd[src + "mlp.inverted_conv.weight"][:, :, None, None])
        put(src + "mlp.point_conv.weight", dst + "ff.conv_point.weight",
            sd[src + "mlp.point_conv.weight"][:, :, None, None])
    left = set(sd) - used - {"null_caption"}
    if left:
        raise ConversionError(f"keys not converted to diffusers: {sorted(left)}")
    return out


def from_diffusers_state_dict(dsd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> our keys. Every diffusers key must be consumed."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    inv = {v: k for k, v in _SIMPLE.items()}
    for dk, ok in inv.items():
        if dk in dsd:
            out[ok] = dsd[dk]
            used.add(dk)
    w = dsd["patch_embed.proj.weight"]
    out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    used.add("patch_embed.proj.weight")
    binv = {v: k for k, v in _BLOCK_SIMPLE.items()}
    for i in range(depth_of(dsd, _DBLOCK_RE)):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for dk, ok in binv.items():
            if src + dk in dsd:
                out[dst + ok] = dsd[src + dk]
                used.add(src + dk)
        names = [src + f"attn1.{n}.weight" for n in ("to_q", "to_k", "to_v")]
        out[dst + "attn.qkv.weight"] = torch.cat([dsd[n] for n in names], dim=0)
        used |= set(names)
        kv_w = [src + "attn2.to_k.weight", src + "attn2.to_v.weight"]
        kv_b = [src + "attn2.to_k.bias", src + "attn2.to_v.bias"]
        out[dst + "cross_attn.kv_linear.weight"] = torch.cat([dsd[n] for n in kv_w], dim=0)
        out[dst + "cross_attn.kv_linear.bias"] = torch.cat([dsd[n] for n in kv_b], dim=0)
        used |= set(kv_w) | set(kv_b)
        for ok, dk in (("mlp.inverted_conv.weight", "ff.conv_inverted.weight"),
                       ("mlp.point_conv.weight", "ff.conv_point.weight")):
            t = dsd[src + dk]
            if t.shape[2:] != (1, 1):
                raise ConversionError(f"{src + dk}: expected a 1x1 conv, got shape {tuple(t.shape)}")
            out[dst + ok] = t[:, :, 0, 0]
            used.add(src + dk)
    left = set(dsd) - used
    if left:
        raise ConversionError(f"diffusers keys not consumed: {sorted(left)}")
    return out


def export_diffusers(state_dict: Mapping[str, torch.Tensor], out_dir: str | Path, arch: SanaArch | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + safetensors (5 GB shards with an index when larger) that
    ``diffusers.SanaTransformer2DModel.from_pretrained(out_dir)`` loads."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    if arch is None:
        arch = arch_from_state_dict(sd)
    depth = depth_of(sd)
    dsd = to_diffusers_state_dict(sd)
    if dtype is not None:
        dsd = {k: v.to(dtype) for k, v in dsd.items()}
    split = split_torch_state_dict_into_shards(dsd, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size=MAX_SHARD)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: dsd[k] for k in keys}, str(out_dir / fname), metadata={"format": "pt"})
    if split.is_sharded:
        (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": split.metadata,
                                                      "weight_map": split.tensor_to_filename}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(diffusers_config(arch, depth), indent=2))
    if "null_caption" in sd:
        save_file({"null_caption": sd["null_caption"].contiguous()}, str(out_dir / NULL_CAPTION_FILE))
    return out_dir


def load_diffusers_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (not a diffusers SANA transformer folder)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return sd


def is_diffusers_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        # a full pipeline folder: the transformer lives in transformer/
        return (Path(path) / "transformer" / "config.json").is_file()
    return json.loads(cfg.read_text()).get("_class_name") == "SanaTransformer2DModel"


def load_diffusers(path: str | Path) -> tuple[SanaArch, dict[str, torch.Tensor]]:
    """(architecture, our state dict) from a diffusers folder (transformer folder or full pipeline)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers SANA transformer folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("_class_name") not in (None, "SanaTransformer2DModel"):
        raise ConversionError(f"{cfg_file}: _class_name {cfg.get('_class_name')!r} is not SanaTransformer2DModel")
    arch = arch_from_diffusers_config(cfg)
    sd = from_diffusers_state_dict(load_diffusers_state_dict(path))
    if (path / NULL_CAPTION_FILE).is_file():
        null = load_file(str(path / NULL_CAPTION_FILE))["null_caption"]
        sd["null_caption"] = null
        arch.text_len = null.shape[0]
    return arch, sd


def from_diffusers(path: str | Path, dtype: torch.dtype = torch.float32) -> SanaTransformer:
    """Our model with the weights of a diffusers ``SanaTransformer2DModel`` folder. Without a stored null
    caption (released checkpoints), the null caption keeps its random init; sampling with CFG should then
    use an encoded empty prompt as the negative (as diffusers' pipeline does)."""
    arch, sd = load_diffusers(path)
    with torch.device("meta"):
        model = SanaTransformer(arch)
    model = model.to_empty(device="cpu")
    model.init_weights()  # only for the null caption when absent
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "null_caption"]
    if missing or unexpected:
        raise ConversionError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    return model.to(dtype)
