"""The launcher's checks before any worker starts (local, multi-node, Slurm and ``--dry-run`` alike), and the
one change a launch makes to an existing run directory (``--resume none`` moves the old run aside).

Every failure is a ``ConfigError`` / ``CheckpointError`` / ``DataError`` with a one-line message; nothing in
the run directory is written or moved before all checks have passed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from scaleforge.platform.checkpoint import CheckpointError, read_trainer_state, resolve_resume, world_size_problem
from scaleforge.platform.config import ConfigError, JobConfig, Layout
from scaleforge.platform.engine import engine_class


def check_job(cfg: JobConfig) -> None:
    """What the workers would find wrong in the config itself: the recipe's model (built on meta) and the
    optimizer (built over one small parameter, so its own argument checks run: name, betas, eps...)."""
    from scaleforge.models import get_recipe_class
    from scaleforge.platform.optim import build_optimizer

    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    try:
        with torch.device("meta"):
            recipe.build_model(torch.device("meta"))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model: {e}") from None
    probe = torch.nn.Parameter(torch.ones(4, 4))
    try:
        build_optimizer([{"params": [probe], "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}], cfg.optim)
    except ConfigError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ConfigError(f"optim ({cfg.optim.name}): {e} (optim.betas={list(cfg.optim.betas)}, "
                          f"optim.eps={cfg.optim.eps})") from None


def check_sources(cfg: JobConfig, layout: Layout) -> None:
    if cfg.data.kind == "webdataset":  # missing, empty or unreadable shards fail here
        from scaleforge.platform.data.loader import probe_sources

        probe_sources(cfg.data, layout.dp_size)


def check_resume(cfg: JobConfig, run_dir: Path, world_size: int) -> Path | None:
    """The checkpoint a launch would resume from (None: a fresh start), after checking that it fits the
    config and the job: same recipe, same model tensors (names and shapes), same optimizer, EMA state if
    the config keeps one, the engine's checkpoint layout, and the saving world size where the engine cannot
    reshard (DeepSpeed). A mismatch is one line naming what differs and what to do."""
    ckpt = resolve_resume(cfg.checkpoint.resume, run_dir)
    if ckpt is None:
        return None
    saved = _saved_config(ckpt)
    diffs = _config_diffs(saved, cfg) if saved is not None else []
    hint = ("resume with the checkpoint's settings, or start fresh: --resume none (the old run is moved aside) "
            "or a new run.name")
    saved_recipe = (saved or {}).get("model", {}).get("recipe")
    if saved_recipe is not None and saved_recipe != cfg.model.recipe:
        raise CheckpointError(f"--resume: {ckpt} is a {saved_recipe!r} checkpoint, the config's recipe is "
                              f"{cfg.model.recipe!r}; {hint}")
    trainer_state = read_trainer_state(ckpt)
    fmt, engine_fmt = trainer_state["format"], engine_class(cfg.parallel.engine).checkpoint_format
    if fmt != engine_fmt:
        raise CheckpointError(f"--resume: {ckpt} was written by the {fmt!r} checkpointing of another engine; "
                              f"parallel.engine={cfg.parallel.engine} writes {engine_fmt!r} (parallel.engine must "
                              f"match to resume; start a new run from the exported weights instead)")
    problem = world_size_problem(ckpt, trainer_state, world_size)
    if problem:
        raise CheckpointError(f"--resume: {problem}")
    if fmt != "dcp":  # DeepSpeed's own files: its loader checks names and shapes
        return ckpt
    shapes = _saved_shapes(ckpt)
    problems = _model_mismatch(cfg, shapes)
    if problems:
        why = f" ({'; '.join(diffs[:4])})" if diffs else ""
        raise CheckpointError(f"--resume: the model in {ckpt} differs from the config's{why}: {problems}; {hint}")
    saved_optim = (saved or {}).get("optim", {}).get("name")
    if saved_optim is not None and saved_optim != cfg.optim.name:
        raise CheckpointError(f"--resume: {ckpt} holds {saved_optim!r} optimizer state, the config asks for "
                              f"optim.name={cfg.optim.name}; {hint}")
    if cfg.optim.ema_decay > 0 and not any(k.startswith("ema.") for k in shapes):
        raise CheckpointError(f"--resume: {ckpt} has no EMA weights but optim.ema_decay={cfg.optim.ema_decay}; "
                              f"{hint}")
    return ckpt


SCHEDULE_KEYS = (("optim", "lr"), ("optim", "schedule"), ("optim", "warmup_steps"), ("optim", "min_lr_ratio"),
                 ("trainer", "max_steps"))


def saved_step(ckpt: Path) -> int:
    import json

    try:
        return int(json.loads((ckpt / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"--resume: {ckpt}/trainer.json is unreadable ({e})") from None


def schedule_change(cfg: JobConfig, ckpt: Path, step: int) -> str | None:
    """The resume rule for the LR schedule: the config wins. Base LRs, warmup, decay and trainer.max_steps
    come from the config, evaluated at the resumed step (the trainer applies it); this says what changed and
    what the LR of the next step becomes, or None when nothing did."""
    from scaleforge.platform.schedule import lr_factor

    saved = _saved_config(ckpt) or {}
    now = {"optim": cfg.optim, "trainer": cfg.trainer}
    changed, old = [], {}
    for section, key in SCHEDULE_KEYS:
        before = (saved.get(section) or {}).get(key, getattr(now[section], key))
        after = getattr(now[section], key)
        old[key] = before
        if before != after:
            changed.append(f"{section}.{key} {before} -> {after}")
    if not changed:
        return None
    o = cfg.optim
    lr_new = o.lr * lr_factor(step, o.schedule, o.warmup_steps, cfg.trainer.max_steps, o.min_lr_ratio)
    try:
        lr_old = float(old["lr"]) * lr_factor(step, str(old["schedule"]), int(old["warmup_steps"]),
                                              int(old["max_steps"]), float(old["min_lr_ratio"]))
        was = f", where the checkpoint's settings gave {lr_old:.3g}"
    except (TypeError, ValueError):
        was = ""
    return (f"resume: the config's LR schedule applies from step {step + 1} ({'; '.join(changed)}): "
            f"base LR {lr_new:.3g} at step {step + 1}{was}")


def _saved_config(ckpt: Path) -> dict[str, Any] | None:
    for path in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if path.is_file():
            try:
                return yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                return None
    return None


def _config_diffs(saved: dict[str, Any], cfg: JobConfig, section: str = "model") -> list[str]:
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(OmegaConf.structured(cfg))[section]
    old = saved.get(section, {}) or {}
    return [f"{section}.{k}: {old.get(k)!r} there, {now.get(k)!r} now"
            for k in sorted(set(now) | set(old)) if old.get(k) != now.get(k)]


def _saved_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001  (any unreadable metadata is the same problem to the user)
        raise CheckpointError(f"--resume: {ckpt}: cannot read the checkpoint's metadata ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return {k: tuple(getattr(v, "size", ())) for k, v in meta.state_dict_metadata.items()}


def _model_mismatch(cfg: JobConfig, saved: dict[str, tuple[int, ...]]) -> str:
    from scaleforge.models import get_recipe_class

    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    with torch.device("meta"):
        model = recipe.build_model(torch.device("meta"))
    want = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: v for k, v in saved.items() if k.startswith("model.")}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    reshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) not in the checkpoint ({missing[0][6:]}...)")
    if extra:
        parts.append(f"{len(extra)} checkpoint tensor(s) not in the model ({extra[0][6:]}...)")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of other shape ({k[6:]}: {list(have[k])} there, {list(want[k])} now)")
    return ", ".join(parts)


def start_fresh(run_dir: Path) -> Path | None:
    """``--resume none`` into a directory holding a run: move that run aside (nothing is deleted) so that the
    new run starts with no old metrics or checkpoints. Returns where it went."""
    if not run_dir.is_dir() or not any((run_dir / n).exists() for n in ("checkpoints", "metrics.jsonl")):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    run_dir.rename(dest)
    return dest
