"""``scaleforge nvila generate``: greedy decoding from an exported NVILA folder, through the same
model code as training (``NVILAModel.generate``: visual tokens spliced into the prompt embeddings,
then the LLM's KV cache).

    scaleforge nvila generate --model OUT --image x.png --prompt "What is in the image?"

The lead wires ``add_nvila_subcommands`` into the ``scaleforge`` command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def add_nvila_subcommands(subparsers) -> None:
    p = subparsers.add_parser("nvila", help="NVILA tools (generate)")
    sub = p.add_subparsers(dest="nvila_cmd", required=True)
    g = sub.add_parser("generate", help="greedy decoding from an exported NVILA folder")
    g.add_argument("--model", required=True, help="folder written by `scaleforge export --format hf`")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", nargs="+", help="video frame files (in order)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--sparse-attention", default="none", choices=("none", "twilight"),
                   help="twilight: decode steps attend only to the top-p tokens of an INT4 estimate (docs/inference.md)")
    g.add_argument("--top-p", type=float, default=0.85, help="attention mass Twilight keeps per head and step")
    g.add_argument("--dense-layers", type=int, default=2, help="first LLM layers Twilight leaves dense")
    g.set_defaults(func=cmd_generate)


def config_from_export_dir(model_dir: str | Path):
    """The ``NVILAConfig`` of an exported folder: ours (``scaleforge_config`` in config.json), or
    derived from a VILA-style folder's sub-configs."""
    from omegaconf import OmegaConf

    from scaleforge.models.llm.model import LLMModelConfig
    from scaleforge.models.nvila.config import NVILAConfig
    from scaleforge.models.nvila.hf_io import siglip_config_from_hf

    d = Path(model_dir)
    top_path = d / "config.json"
    if not top_path.is_file():
        raise FileNotFoundError(f"{d}: no config.json (expected a folder written by `scaleforge export --format hf`)")
    top = json.loads(top_path.read_text())
    base = OmegaConf.structured(NVILAConfig)
    if "scaleforge_config" in top:
        raw = dict(top["scaleforge_config"])
        merged = OmegaConf.merge(base, raw)
        cfg = OmegaConf.to_object(merged)
    else:  # a VILA-layout folder: read what the sub-configs say
        vcfg = json.loads((d / "vision_tower" / "config.json").read_text())
        cfg = OmegaConf.to_object(base)
        for k, v in siglip_config_from_hf(vcfg, str(d / "vision_tower" / "config.json")).items():
            setattr(cfg.vision, k, v)
        cfg.vision.select_layer = int(top.get("mm_vision_select_layer", -2))
        cfg.projector = json.loads((d / "mm_projector" / "config.json").read_text())["mm_projector_type"]
        cfg.image_mode = "dynamic_s2" if top.get("dynamic_s2") else (
            "dynamic" if top.get("image_aspect_ratio") == "dynamic" else "single")
        if top.get("s2_scales"):
            cfg.s2_scales = [int(s) for s in str(top["s2_scales"]).split(",")]
        cfg.max_tiles = int(top.get("max_tiles", 12))
        cfg.llm = LLMModelConfig(preset=None)
    # weights come from this folder; the training-time weight sources are irrelevant here
    cfg.llm.init_from = str(d / "llm")
    cfg.init_from = cfg.init_from_run = cfg.vision_init_from = None
    cfg.tokenizer = str(d / "llm")
    return cfg


def load_exported(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, cfg) from an exported folder."""
    from scaleforge.models.nvila.hf_io import load_nvila_dir
    from scaleforge.models.nvila.model import NVILAModel
    from scaleforge.models.nvila.tokens import ChatTokenizer

    cfg = config_from_export_dir(model_dir)
    with torch.device("meta"):
        model = NVILAModel(cfg, torch.device("meta"))
    model = model.to_empty(device=device)
    model.llm.tie_weights()
    load_nvila_dir(model, cfg, model_dir)
    model = model.to(dtype).eval()
    return model, ChatTokenizer.load(cfg.tokenizer), cfg


def build_prompt_batch(cfg, tok, prompt: str, images: list[Any], frames: list[Any] | None) -> dict[str, Any]:
    from scaleforge.models.nvila.data import collate_packed, process_sample
    from scaleforge.models.nvila.tokens import IMAGE_TOKEN, VIDEO_TOKEN

    text = prompt
    if images and IMAGE_TOKEN not in text:
        text = IMAGE_TOKEN * len(images) + "\n" + text
    if frames and VIDEO_TOKEN not in text:
        text = VIDEO_TOKEN + "\n" + text
    sample = {"images": images, "frames": frames or None, "conversations": [{"from": "human", "value": text}]}
    proc = process_sample(sample, cfg, tok, where="prompt")
    # process_sample encodes without a generation prompt: append "<|im_start|>assistant\n"
    proc["input_ids"] = proc["input_ids"] + [tok.im_start] + tok.encode("assistant\n")
    proc["labels"] = proc["input_ids"]
    return collate_packed([proc], tok.pad_id)


@torch.no_grad()
def generate(model, tok, cfg, prompt: str, images: list[Any] = (), frames=None, max_new_tokens: int = 64,
             device: str = "cpu", decode_attention=None) -> str:
    batch = build_prompt_batch(cfg, tok, prompt, list(images), frames)
    dtype = next(model.parameters()).dtype
    out = model.generate(batch["input_ids"].to(device), media_token_id=tok.image_id,
                         max_new_tokens=max_new_tokens, eos_token_id=tok.im_end,
                         pixel_values=batch["pixel_values"].to(device, dtype),
                         media_kind=batch["media_kind"], media_tiles=batch["media_tiles"],
                         media_grid=batch["media_grid"], decode_attention=decode_attention)
    ids = out[0].tolist()
    if tok.im_end in ids:
        ids = ids[: ids.index(tok.im_end)]
    return tok.decode(ids)


def cmd_generate(args) -> int:
    from PIL import Image

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    sparse = None
    if args.sparse_attention == "twilight":
        from scaleforge.kernels.sparse_attention import TwilightDecode

        sparse = TwilightDecode(args.top_p, args.dense_layers, track_true_mass=True)  # validates top_p before the model loads
    model, tok, cfg = load_exported(args.model, args.device, dtype)
    images = []
    for f in args.image:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--image {f}: no such file")
        images.append(Image.open(f).convert("RGB"))
    frames = [Image.open(f).convert("RGB") for f in args.video] if args.video else None
    print(generate(model, tok, cfg, args.prompt, images, frames, args.max_new_tokens, args.device, sparse))
    if sparse is not None:
        st = sparse.stats
        print(json.dumps({"twilight": {"top_p": args.top_p, "kept_fraction": st["kept"] / max(st["total"], 1),
                                       "min_est_mass": st["min_est_mass"], "min_true_mass": st["min_true_mass"]}}),
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scaleforge")
    add_nvila_subcommands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)
