"""Reading SANA weights from any of the places they live: a diffusers ``SanaTransformer2DModel`` folder
(released checkpoints, our exports, and the outputs of ``scaleforge sana grow`` / ``prune``), a training
run directory (its latest complete checkpoint) or one checkpoint step directory of a run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from scaleforge.models.sana.diffusers_io import depth_of, is_diffusers_dir, load_diffusers
from scaleforge.models.sana.model import SanaArch


def _run_and_step(path: Path) -> tuple[Path, str | None] | None:
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return path, None
    if (path / "trainer.json").is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, str(path)
    return None


def load_weights(path: str | Path, use_ema: bool = True) -> tuple[SanaArch, dict[str, torch.Tensor]]:
    """(architecture, full CPU state dict in our layout). From a run, EMA weights are preferred when
    ``use_ema`` and the checkpoint has them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SANA checkpoint (diffusers folder, run dir or checkpoint step dir)")
    if is_diffusers_dir(path):
        return load_diffusers(path)
    run = _run_and_step(path)
    if run is None:
        raise FileNotFoundError(f"{path}: not a diffusers SANA folder (config.json + safetensors), a run directory "
                                "(config.yaml + checkpoints/) or a checkpoint step directory")
    from scaleforge.launch.export import load_model_state
    from scaleforge.platform.checkpoint import CheckpointError, find_latest, has_ema

    run_dir, step = run
    ckpt = Path(step) if step else find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint")
    _, recipe, state = load_model_state(run_dir, str(ckpt), ema=use_ema and has_ema(ckpt))
    if getattr(recipe, "name", None) != "sana":
        raise ValueError(f"{path}: the run's recipe is {recipe.name!r}, not 'sana'")
    arch = dataclasses.replace(recipe.arch, depth=depth_of(state))
    return arch, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

