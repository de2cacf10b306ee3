"""``scaleforge sana {precompute, sample, prune, grow}``. ``add_sana_subcommands(subparsers)`` registers them
(as ``func``, what the ``scaleforge`` entry point calls); each handler takes the parsed namespace and returns an
exit code (0 on success). Bad arguments, checkpoints and conversions end in one ``error:`` line, exit 2."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch


class SanaCliError(ValueError):
    """A bad argument or input of a ``scaleforge sana`` command."""


def _guarded(handler):
    """The tools' known failures print one line and exit 2, whoever calls the handler."""

    @functools.wraps(handler)
    def run_handler(args: argparse.Namespace) -> int:
        from scaleforge.models.sana.diffusers_io import ConversionError
        from scaleforge.models.sana.grow import GrowError
        from scaleforge.platform.checkpoint import CheckpointError
        from scaleforge.platform.config import ConfigError
        from scaleforge.platform.data import DataError

        try:
            return handler(args)
        except (SanaCliError, GrowError, ConversionError, CheckpointError, ConfigError, DataError,
                FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run_handler


def add_sana_subcommands(subparsers) -> argparse.ArgumentParser:
    sana = subparsers.add_parser("sana", help="SANA tools: precompute, sample, prune, grow")
    sub = sana.add_subparsers(dest="sana_cmd", required=True)

    p = sub.add_parser("precompute", help="image-text shards -> latent + text-embedding shards")
    p.add_argument("--shards", required=True, nargs="+", help="input tar shards (brace patterns allowed)")
    p.add_argument("--out", required=True, help="output folder for shard-%%06d.tar")
    p.add_argument("--config", help="training config whose model section gives the defaults of the options "
                   "below (text encoder, DC-AE, image size, text length, CHI, scaling factor)")
    p.add_argument("--text-encoder", help="default: the config's, else Efficient-Large-Model/gemma-2-2b-it")
    p.add_argument("--vae", help="default: the config's, else mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers")
    p.add_argument("--image-size", type=int, help="base size of the aspect-ratio buckets (default 1024)")
    p.add_argument("--text-len", type=int, help="text tokens per caption (default 300)")
    p.add_argument("--no-chi", action="store_true", help="no complex-human-instruction prefix")
    p.add_argument("--scaling-factor", type=float, help="DC-AE latent scaling (default 0.41407)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=_guarded(cmd_precompute))

    p = sub.add_parser("sample", help="generate images from a checkpoint")
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint step dir or diffusers folder")
    p.add_argument("--prompt", required=True, nargs="+")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", choices=("flow_dpm_solver", "euler"), default="flow_dpm_solver")
    p.add_argument("--cfg-scale", type=float, default=4.5)
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: the run's model.flow_shift or 3)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", default=None, help="default: the run's model.text_encoder")
    p.add_argument("--vae", default=None, help="default: the run's model.vae")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=_guarded(cmd_sample))

    p = sub.add_parser("prune", help="block-importance depth pruning")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--keep", type=int, required=True, help="number of blocks to keep")
    p.add_argument("--out", required=True)
    p.add_argument("--calib-shards", nargs="*", default=None,
                   help="precomputed latent/text shards for calibration (default: the run's synthetic data)")
    p.add_argument("--calib-samples", type=int, default=100)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--metric", choices=("1-cos",), default="1-cos")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_guarded(cmd_prune))

    p = sub.add_parser("grow", help="SANA-1.5 depth growth of a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--depth", type=int, required=True, help="target number of blocks")
    p.add_argument("--strategy", choices=("constant", "cyclic", "block_expand"), default="constant")
    p.add_argument("--source-layers", type=int, default=0, help="use only the first N source blocks (0: all)")
    p.add_argument("--expand-ratio", type=int, default=3)
    p.add_argument("--no-zero-gate", action="store_true")
    p.add_argument("--noise-scale", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_guarded(cmd_grow))
    return sana


# ---------------------------------------------------------------------------------------------------
def _run_model_cfg(ckpt: Path):
    """The run's model section when ``ckpt`` is (inside) a run directory, else None."""
    from scaleforge.models.sana.checkpoint_io import _run_and_step

    run = _run_and_step(ckpt)
    if run is None:
        return None
    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import load_config

    return load_config(run[0] / "config.yaml", [], recipe_config=recipe_config_class).model


def _load_model(ckpt: str, use_ema: bool = True, device: str = "cpu"):
    from scaleforge.models.sana.checkpoint_io import load_weights
    from scaleforge.models.sana.model import SanaTransformer

    arch, sd = load_weights(ckpt, use_ema=use_ema)
    with torch.device("meta"):
        model = SanaTransformer(arch)
    model = model.to_empty(device="cpu")
    model.init_weights()
    if "null_caption" not in sd:
        sd["null_caption"] = model.null_caption.clone()
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), arch, sd


def cmd_grow(args) -> int:
    from scaleforge.models.sana.checkpoint_io import load_weights
    from scaleforge.models.sana.diffusers_io import depth_of, export_diffusers
    from scaleforge.models.sana.grow import grow_state_dict

    if args.depth < 1:
        raise SanaCliError(f"--depth {args.depth}: must be >= 1")
    arch, sd = load_weights(args.ckpt)
    grown = grow_state_dict(sd, args.depth, strategy=args.strategy, source_num_layers=args.source_layers or None,
                            expand_ratio=args.expand_ratio, zero_gate=not args.no_zero_gate,
                            noise_scale=args.noise_scale, generator=torch.Generator().manual_seed(args.seed))
    arch.depth = depth_of(grown)
    export_diffusers(grown, args.out, arch)
    print(f"grew {depth_of(sd)} -> {arch.depth} blocks ({args.strategy}); wrote {args.out}")
    return 0


def _calibration_batches(args, arch, run_cfg, n: int, batch: int = 8):
    if args.calib_shards:
        import webdataset as wds

        from scaleforge.models.sana.recipe import _latent_text_sample
        from scaleforge.platform.data.shards import expand_patterns

        urls = expand_patterns(args.calib_shards, where="--calib-shards")
        samples = []
        for raw in wds.WebDataset(urls, shardshuffle=False):
            samples.append(_latent_text_sample({k: v for k, v in raw.items()}))
            if len(samples) == n:
                break
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            shapes = {tuple(s["latents"].shape) for s in chunk}
            for shp in shapes:  # one batch per latent size
                part = [s for s in chunk if tuple(s["latents"].shape) == shp]
                yield {k: torch.stack([s[k] for s in part]) for k in part[0]}
        return
    from scaleforge.models.sana.recipe import SyntheticLatentText

    side = (run_cfg.image_size if run_cfg is not None else 512) // 32
    data = SyntheticLatentText(args.seed + 12345, 0, 1, batch, (side, side), arch.text_len, arch.caption_channels)
    for _ in range(max(1, n // batch)):
        yield next(data)


def cmd_prune(args) -> int:
    from scaleforge.models.sana.diffusers_io import export_diffusers
    from scaleforge.models.sana.prune import METRICS, block_importance, prune_state_dict, select_blocks, write_report

    model, arch, sd = _load_model(args.ckpt)
    if not 1 <= args.keep <= arch.depth:
        raise SanaCliError(f"--keep {args.keep}: must be between 1 and the model's depth {arch.depth}")
    if args.calib_samples < 1:
        raise SanaCliError(f"--calib-samples {args.calib_samples}: must be >= 1")
    run_cfg = _run_model_cfg(Path(args.ckpt))
    calib = list(_calibration_batches(args, arch, run_cfg, args.calib_samples))
    if not calib:
        raise SanaCliError(f"--calib-shards {' '.join(args.calib_shards)}: no calibration samples in them")
    n = sum(b["latents"].shape[0] for b in calib)
    imp = block_importance(model, calib, args.sigmas, METRICS[args.metric], args.seed)
    kept = select_blocks(imp, args.keep)
    pruned = prune_state_dict(sd, kept)
    arch.depth = len(kept)
    out = Path(args.out)
    export_diffusers(pruned, out / "model", arch)
    files = write_report(out, imp, kept, args.metric, args.sigmas, n)
    print(f"kept blocks {kept}; checkpoint {out / 'model'}; report {files['report']}, chart {files['png']}")
    return 0


def cmd_sample(args) -> int:
    from PIL import Image

    from scaleforge.models.sana import flow
    from scaleforge.models.sana.text import latents_to_images, load_text_encoder, load_vae

    run_cfg = _run_model_cfg(Path(args.ckpt))
    model, arch, _ = _load_model(args.ckpt, use_ema=not args.no_ema, device=args.device)
    te_name = args.text_encoder or (run_cfg.text_encoder if run_cfg else None)
    vae_name = args.vae or (run_cfg.vae if run_cfg else None)
    if not te_name or not vae_name:
        raise SanaCliError("--text-encoder and --vae are needed for a checkpoint outside a run directory")
    use_chi = run_cfg.use_chi if run_cfg else True
    scale = run_cfg.vae_scaling_factor if run_cfg else 0.41407
    shift = args.shift if args.shift is not None else (run_cfg.flow_shift if run_cfg else 3.0)
    size = run_cfg.image_size if run_cfg else 1024
    h, w = (args.height or size) // 32, (args.width or size) // 32
    te = load_text_encoder(te_name, device=args.device, max_length=arch.text_len, use_chi=use_chi)
    if te.hidden_size != arch.caption_channels:
        raise SanaCliError(f"text encoder {te_name!r} has hidden size {te.hidden_size}, the model's "
                           f"caption_channels is {arch.caption_channels}")
    vae = load_vae(vae_name, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emb, mask = te.encode(args.prompt)
    b = emb.shape[0]
    null = model.null_caption[: emb.shape[1]].to(emb)[None].expand(b, -1, -1)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(b, arch.in_channels, h, w, generator=g).to(args.device)
    vel = flow.cfg_velocity(model, emb.to(args.device), mask.to(args.device), null, None, args.cfg_scale)
    lat = flow.SAMPLERS[args.sampler](vel, noise, steps=args.steps, shift=shift)
    with torch.no_grad():
        imgs = latents_to_images(vae, lat, scale)
    paths = []
    for i, img in enumerate(imgs):
        arr = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        path = out / f"{i:04d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    (out / "prompts.json").write_text(json.dumps({p.name: pr for p, pr in zip(paths, args.prompt)}, indent=2))
    print(f"wrote {len(paths)} images to {out}")
    return 0


def _precompute_options(args) -> dict:
    """The encoder options: the flags, else the ``--config`` training config's model section, else SANA's."""
    from scaleforge.models.sana.recipe import SanaModelConfig, arch_from_config

    model = SanaModelConfig(preset="1.6b")
    if args.config:
        from scaleforge.models import recipe_config_class
        from scaleforge.platform.config import load_config

        model = load_config(args.config, [], recipe_config=recipe_config_class).model
        if getattr(model, "recipe", None) != "sana":
            raise SanaCliError(f"--config {args.config}: model.recipe is {model.recipe!r}, not 'sana'")
    opts = {"text_encoder": args.text_encoder or model.text_encoder, "vae": args.vae or model.vae,
            "image_size": args.image_size or model.image_size,
            "text_len": args.text_len or arch_from_config(model).text_len,
            "use_chi": model.use_chi and not args.no_chi,
            "scaling_factor": args.scaling_factor or model.vae_scaling_factor}
    if opts["image_size"] % 32 or opts["image_size"] < 32:
        raise SanaCliError(f"--image-size {opts['image_size']}: must be a positive multiple of 32")
    if opts["text_len"] < 2:
        raise SanaCliError(f"--text-len {opts['text_len']}: must be >= 2")
    if args.per_shard < 1:
        raise SanaCliError(f"--per-shard {args.per_shard}: must be >= 1")
    return opts


def cmd_precompute(args) -> int:
    import io

    import numpy as np
    import webdataset as wds

    from scaleforge.models.sana.text import images_to_latents, load_text_encoder, load_vae
    from scaleforge.platform.data import decode_image_text
    from scaleforge.platform.data.batching import image_to_tensor, resize_center_crop
    from scaleforge.platform.data.shards import expand_patterns

    urls = expand_patterns(args.shards, where="--shards")
    opts = _precompute_options(args)
    te = load_text_encoder(opts["text_encoder"], device=args.device, max_length=opts["text_len"],
                           use_chi=opts["use_chi"])
    vae = load_vae(opts["vae"], device=args.device)
    from scaleforge.models.sana.recipe import sana_buckets

    buckets = sana_buckets(opts["image_size"])
    ratios = sorted(buckets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def npy(a) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    n = bad = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=args.per_shard, verbose=0) as sink:
        for raw in wds.WebDataset(urls, shardshuffle=False):
            try:
                s = decode_image_text(raw)
            except (KeyError, ValueError, OSError) as e:
                bad += 1
                print(f"skipping {raw.get('__url__')}/{raw.get('__key__')}: {e!r}")
                continue
            img = s["image"]
            ratio = img.height / img.width
            hw = buckets[min(ratios, key=lambda r: abs(r - ratio))]
            x = image_to_tensor(resize_center_crop(img, hw))[None].to(args.device)
            with torch.no_grad():
                lat = images_to_latents(vae, x, opts["scaling_factor"])[0].cpu()
            emb, mask = te.encode([s["caption"]])
            sink.write({"__key__": raw["__key__"], "latent.npy": npy(lat.numpy().astype(np.float32)),
                        "text_emb.npy": npy(emb[0].cpu().numpy().astype(np.float16)),
                        "text_mask.npy": npy(mask[0].cpu().numpy().astype(np.uint8)),
                        "txt": s["caption"].encode()})
            n += 1
    print(f"wrote {n} samples to {out} ({bad} skipped)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scaleforge")
    add_sana_subcommands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
