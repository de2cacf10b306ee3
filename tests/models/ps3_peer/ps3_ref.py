"""Runs inside the ps3-torch venv (see env.py): builds / loads NVlabs' own ``PS3Model`` and writes its
outputs for the parity test. Usage: ``python ps3_ref.py SPEC.json`` with

  {"mode": "build" | "load", "dir": ps3-torch folder (written by build, read by load), "out": outputs file,
   "trunk": {"name", "img_size", "patch_size", "width", "depth", "heads", "mlp_ratio"} (build only;
   names timm already knows are not re-registered), "config": PS3Config dict (build only),
   "inputs": safetensors file with "pixel_values", "text", "prompt", "cases": [[num_look_close, use_prompt]...],
   "vision_only": build a ``PS3VisionModel`` only (no text outputs)}

Outputs (safetensors): per case c: ``c{i}.last_hidden_state``, ``c{i}.map{s}``, ``c{i}.prob{s}``, and
``text.pooled`` / ``text.prompt``; a JSON line on stdout with the missing / unexpected keys of a load.
"""
import json
import sys

import torch


def register_trunk(t: dict) -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(t["name"]):
        return

    def build(pretrained=False, **kwargs):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        args = dict(img_size=t["img_size"], patch_size=t["patch_size"], embed_dim=t["width"], depth=t["depth"],
                    num_heads=t["heads"], mlp_ratio=t["mlp_ratio"], class_token=False, global_pool="map")
        args.update(kwargs)
        return VisionTransformer(**args)

    build.__name__ = t["name"]
    register_model(build)


def main(spec_path: str) -> None:
    from safetensors.torch import load_file, save_file

    from ps3 import PS3Config, PS3Model, PS3VisionConfig, PS3VisionModel

    spec = json.loads(open(spec_path).read())
    report = {}
    if spec["mode"] == "build":
        register_trunk(spec["trunk"])
        torch.manual_seed(0)
        if spec.get("vision_only"):
            model = PS3VisionModel(PS3VisionConfig(**spec["config"]["vision_config"])).eval()
        else:
            model = PS3Model(PS3Config(**spec["config"])).eval()
        with torch.no_grad():  # timm leaves some tensors at zero / one: make every weight matter
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(spec["dir"], safe_serialization=True)
    else:
        if "trunk" in spec:
            register_trunk(spec["trunk"])
        model, info = PS3Model.from_pretrained(spec["dir"], output_loading_info=True)
        model = model.eval()
        report = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}
    inputs = load_file(spec["inputs"])
    out = {}
    with torch.no_grad():
        if not spec.get("vision_only"):
            t = model.text_model(inputs["text"])
            out["text.pooled"], out["text.prompt"] = t.pooled_output, t.prompt
        for i, (n, use_prompt) in enumerate(spec["cases"]):
            o = model.vision_model(inputs["pixel_values"], num_look_close=n, output_hidden_states=True,
                                   prompt=inputs["prompt"] if use_prompt else None)
            out[f"c{i}.last_hidden_state"] = o.last_hidden_state
            for s, p in enumerate(o.selection_probs):
                out[f"c{i}.prob{s}"] = p
            for s, m in enumerate(o.selection_maps or []):
                out[f"c{i}.map{s}"] = m.float()
    save_file({k: v.contiguous() for k, v in out.items()}, spec["out"])
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
