"""``scaleforge export``: a run's checkpoint -> a serving layout, one process, no GPU needed.

The sharded checkpoint is read straight into a full (unsharded) state dict on CPU by
``checkpoint.read_model_weights`` (DCP reshards on load), so a checkpoint written by any number of
ranks, with either engine, exports the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from scaleforge.platform.checkpoint import CheckpointError, find_latest, is_complete, read_model_weights


def load_model_state(run_dir: Path, checkpoint: str | None = None, ema: bool = False):
    """(cfg, recipe, full CPU state dict) of a run's latest (or given) checkpoint, whichever engine wrote it."""
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import load_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    ckpt = Path(checkpoint) if checkpoint else find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to export")
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (interrupted while being written)")
    cfg = load_config(cfg_path, [], recipe_config=recipe_config_class)
    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    with torch.device("meta"):
        model = recipe.build_model(torch.device("meta"))
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    return cfg, recipe, read_model_weights(ckpt, template, ema=ema)


def export_run(run_dir: Path, fmt: str, out: Path, checkpoint: str | None = None, ema: bool = False) -> Path:
    from scaleforge.platform.config import ConfigError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: already exists and is not empty; remove it or choose another folder "
                              "(an export never overwrites files)")
    cfg, recipe, state = load_model_state(run_dir, checkpoint, ema)
    if fmt not in recipe.export_formats():
        raise ConfigError(f"--format {fmt}: recipe {recipe.name!r} exports {', '.join(recipe.export_formats()) or 'nothing'}")
    out.mkdir(parents=True, exist_ok=True)
    recipe.export(state, str(out), fmt)
    return out
