"""Distributed checkpoints: sharded model/optimizer/EMA state through torch.distributed.checkpoint,
plus per-rank state (RNG, data-loader cursor) and the trainer state.

Layout of ``<run_dir>/checkpoints/``::

    step_00000008/            a complete checkpoint (it only ever appears complete, see below)
        .metadata, *.distcp   DCP shards: model, optim, ema
        rank_state/rank_00000.pt   torch/CUDA/numpy/python RNG, data-loader state (one file per rank)
        trainer.json          step, world size, data-parallel size, schedule state
        config.yaml           the resolved config of the run that wrote it
        COMPLETE              written last: JSON with every other file's size and SHA-256
    latest                    text file naming the newest complete checkpoint

A save writes into ``step_XXXXXXXX.tmp`` and, once every rank has finished, rank 0 writes COMPLETE,
renames the folder and then replaces ``latest`` atomically. A save interrupted at any point (SIGKILL,
node failure) leaves at most a ``.tmp`` folder, which is never loaded and is removed by the next save.

Integrity: COMPLETE records each file's size and SHA-256 (the ranks hash the files between them).
``resolve_resume`` verifies a checkpoint before it is used: ``auto`` names a damaged file and falls back
to the previous complete checkpoint that verifies; an explicit path to a damaged one is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scaleforge.platform import faults

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "trainer.json").is_file()


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json: step, world size, schedule state and ``format`` (the engine's layout;
    checkpoints written before it was recorded are DCP)."""
    state = json.loads((path / "trainer.json").read_text())
    state.setdefault("format", "dcp")
    return state


# ---------------------------------------------------------------------------------------------------
# The one reader of a run's model weights (export, EMA export, a next stage's init_from_run)
# ---------------------------------------------------------------------------------------------------
def has_ema(ckpt: Path) -> bool:
    """Whether the checkpoint holds EMA weights (``optim.ema_decay`` > 0 in the run that wrote it)."""
    fmt = read_trainer_state(ckpt)["format"]
    if fmt == "dcp":
        meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        return any(k.startswith("ema.") for k in meta)
    return False


def read_model_weights(ckpt: Path, target: dict[str, torch.Tensor], ema: bool = False) -> dict[str, torch.Tensor]:
    """Fill ``target`` (a model state dict: plain CPU tensors for a full copy, or the DTensor shards of
    a sharded model) in place with the checkpoint's model weights, or with its EMA weights where it has
    them (EMA covers the trainable parameters; buffers and frozen weights come from the model's own
    state). Works in one process or in every rank of a job, whatever world size wrote the checkpoint."""
    fmt = read_trainer_state(ckpt)["format"]
    if ema and not has_ema(ckpt):
        raise CheckpointError(f"{ckpt}: no EMA weights in this checkpoint (was optim.ema_decay set?)")
    if fmt == "dcp":
        no_dist = not (dist.is_available() and dist.is_initialized())
        if ema:
            saved = {k[len("ema."):] for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
                     if k.startswith("ema.")}
            parts = {"ema": {k: v for k, v in target.items() if k in saved},
                     "model": {k: v for k, v in target.items() if k not in saved}}
            dcp.load({k: v for k, v in parts.items() if v}, checkpoint_id=str(ckpt), no_dist=no_dist)
        else:
            dcp.load({"model": target}, checkpoint_id=str(ckpt), no_dist=no_dist)
        return target
    if fmt == "deepspeed":
        from scaleforge.platform.deepspeed_engine import read_full_weights

        return _copy_full_into(target, read_full_weights(ckpt), ckpt)
    raise CheckpointError(f"{ckpt}: unknown checkpoint format {fmt!r} in trainer.json")


def _copy_full_into(target: dict[str, torch.Tensor], full: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    """Full tensors into ``target``'s tensors, through the engine's copy (plain or sharded storage)."""
    from scaleforge.platform.engine import copy_full_tensor

    missing = sorted(set(target) - set(full))
    if missing:
        raise CheckpointError(f"{ckpt}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    for name, t in target.items():
        copy_full_tensor(t, full[name])
    return target


#: a DeepSpeed step folder's universal checkpoint (``scaleforge ds-universal``), beside its own files
UNIVERSAL = "universal"


def world_size_problem(path: Path, trainer_state: dict[str, Any], world_size: int) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed by ``world_size`` processes (None: it can). DCP
    reshards to any world size; DeepSpeed's ZeRO partitions are per rank, so another world size needs the
    checkpoint's universal form (DeepSpeed's ``ds_to_universal``), which ``scaleforge ds-universal`` adds."""
    saved = int(trainer_state["world_size"])
    if trainer_state["format"] != "deepspeed" or saved == world_size or (path / UNIVERSAL).is_dir():
        return None
    return (f"{path}: a DeepSpeed checkpoint of {saved} processes cannot be resumed with {world_size} as it is "
            f"(ZeRO's partitions are per rank); convert it once with `scaleforge ds-universal {path}` "
            f"(DeepSpeed's universal checkpoint, added beside its files) and launch again, or resume with "
            f"{saved} processes")


def add_file_records(folder: Path, rel_paths: list[str]) -> None:
    """Record more files of a complete checkpoint in its COMPLETE (size and SHA-256), rewritten atomically."""
    done = json.loads((folder / COMPLETE).read_text())
    files = done.setdefault("files", {})
    for rel in rel_paths:
        files[rel] = [(folder / rel).stat().st_size, _sha256(folder / rel)]
    done["files"] = dict(sorted(files.items()))
    tmp = folder / (COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(done) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE)


def list_complete(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete; otherwise the newest complete one."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        p = ckpt_root / pointer.read_text().strip()
        if is_complete(p):
            return p
    done = list_complete(ckpt_root)
    return done[-1][1] if done else None


def resolve_resume(spec: str, run_dir: Path, warn=None) -> Path | None:
    """``checkpoint.resume``: ``auto`` (latest in the run directory, if any), ``none``, or a path to a
    checkpoint folder or to another run directory. Checkpoints are verified against the sizes and
    checksums recorded when they were saved: ``auto`` (and a run directory) falls back from a damaged
    checkpoint to the previous complete one, telling ``warn`` (default: stderr) which file is damaged;
    an explicit checkpoint folder that is damaged is an error."""
    if spec == "none":
        return None
    if spec == "auto":
        return _newest_intact(run_dir / "checkpoints", warn)
    path = Path(spec)
    if path.is_file() and path.name == "latest":  # the pointer file names the checkpoint beside it
        path = path.parent
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name == "checkpoints" or (path / "latest").exists():
        found = _newest_intact(path, warn)
        if found is None:
            raise CheckpointError(f"--resume {spec}: no complete checkpoint under {path}")
        return found
    if not path.is_dir():
        raise CheckpointError(f"--resume {spec}: no such checkpoint folder")
    if not is_complete(path):
        if path.name.endswith(".tmp") or (path / ".metadata").exists() or STEP_RE.match(path.name):
            raise CheckpointError(f"--resume {spec}: checkpoint is incomplete (no {COMPLETE} marker); "
                                  f"it was interrupted while being written and cannot be used")
        raise CheckpointError(f"--resume {spec}: not a checkpoint; --resume takes a run directory, its "
                              f"checkpoints/ folder or checkpoints/latest, or a step_NNNNNNNN folder")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"--resume {spec}: checkpoint is damaged: {problem}")
    return path


def _newest_intact(ckpt_root: Path, warn=None) -> Path | None:
    """The newest complete checkpoint that verifies (``latest`` first), or None when there is none."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    latest = find_latest(ckpt_root)
    candidates = [latest] + [p for _, p in reversed(list_complete(ckpt_root)) if p != latest] if latest else []
    damaged = []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            if damaged:
                warn(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        damaged.append(path.name)
        warn(f"checkpoint {path} is damaged ({problem}); trying the previous complete checkpoint")
    if damaged:
        raise CheckpointError(f"{ckpt_root}: every complete checkpoint is damaged ({', '.join(damaged)}); "
                              f"resume from another run with --resume PATH or start over with --resume none")
    return None


# ---------------------------------------------------------------------------------------------------
# Integrity: sizes and checksums recorded in COMPLETE
# ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def file_records(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, list]:
    """{relative path: [bytes, sha256]} of this rank's share of the folder's files (every world_size-th)."""
    return {rel: [(folder / rel).stat().st_size, _sha256(folder / rel)]
            for rel in _checkpoint_files(folder)[rank::world_size]}


def verify(folder: Path) -> str | None:
    """None when every file recorded in COMPLETE is there with its size and checksum; otherwise what is
    wrong, naming the file. Checkpoints whose COMPLETE records no files (older ones) are not checked."""
    try:
        files = json.loads((folder / COMPLETE).read_text()).get("files", {})
    except (ValueError, AttributeError):
        return None
    for rel, (size, _) in files.items():  # sizes first: cheap, and what a truncated copy gets wrong
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} when it was saved"
    for rel, (_, digest) in files.items():
        if _sha256(folder / rel) != digest:
            return f"{folder / rel} does not match the checksum recorded when it was saved"
    return None


# ---------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class PendingSave:
    step: int
    tmp: Path
    final: Path
    future: Any


class CheckpointManager:
    def __init__(self, run_dir: Path, ckpt_cfg, rank: int, world_size: int, config_yaml: str, tp: int = 1):
        self.root = run_dir / "checkpoints"
        self.cfg = ckpt_cfg
        self.rank = rank
        self.world_size = world_size
        self.tp = tp  # tensor-parallel size: the tp ranks of a group share one data-parallel position
        self.config_yaml = config_yaml
        self.pending: PendingSave | None = None
        self.on_written = None  # called on rank 0 as on_written(step, path) once a checkpoint is complete
        # Async saves run collectives from a background thread: give them their own gloo group so
        # they never interleave with the training collectives on the default group.
        self._pg = dist.new_group(backend="gloo") if (ckpt_cfg.async_save and dist.is_initialized()) else None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # -- save -------------------------------------------------------------------------------------
    def save(self, step: int, engine, rank_state: dict[str, Any], trainer_state: dict[str, Any],
             blocking: bool = False) -> None:
        """The engine's sharded state (``Engine.save_state``) plus this rank's state and the trainer
        state, under the protocol of this module's docstring; asynchronous where configured and not
        ``blocking``."""
        self.wait()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.rank == 0:
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            tmp.mkdir(parents=True)
            (tmp / "rank_state").mkdir()
        dist.barrier()
        torch.save(rank_state, tmp / "rank_state" / f"rank_{self.rank:05d}.pt")
        trainer_state = {**trainer_state, "format": engine.checkpoint_format}
        if self.rank == 0:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "config.yaml").write_text(self.config_yaml)
        fut = engine.save_state(tmp, self._pg if self.cfg.async_save and not blocking else None)
        if fut is not None:
            self.pending = PendingSave(step, tmp, final, fut)
        else:
            self._finalize(PendingSave(step, tmp, final, None))

    def wait(self) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            p.future.result()
            self._finalize(p)

    def _finalize(self, p: PendingSave) -> None:
        dist.barrier()
        if p.step in faults.steps(faults.KILL_DURING_SAVE):
            faults.kill_self()
        shares = [None] * self.world_size  # every rank hashes its share of the files
        dist.all_gather_object(shares, file_records(p.tmp, self.rank, self.world_size))
        if self.rank == 0:
            files = {k: v for share in shares for k, v in share.items()}
            with open(p.tmp / COMPLETE, "w") as f:
                f.write(json.dumps({"completed_at": time.time(), "files": dict(sorted(files.items()))}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(p.tmp, p.final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(p.final.name + "\n")
            os.replace(pointer_tmp, self.root / "latest")
            self._retain()
            if self.on_written is not None:
                self.on_written(p.step, p.final)
        dist.barrier()

    def _retain(self) -> None:
        done = list_complete(self.root)
        keep = {s for s, _ in done[-self.cfg.keep_last:]} if self.cfg.keep_last > 0 else {s for s, _ in done}
        if self.cfg.keep_every > 0:
            keep |= {s for s, _ in done if s % self.cfg.keep_every == 0}
        for s, path in done:
            if s not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------------
    def load(self, path: Path, engine) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Restore the engine's sharded state (``Engine.load_state``) and return (trainer_state, rank
        states): this rank's own when the world size and tp are the saving run's, else one per
        data-parallel rank of the saving run."""
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker)")
        trainer_state = read_trainer_state(path)
        fmt = trainer_state["format"]
        problem = world_size_problem(path, trainer_state, self.world_size)
        if problem:
            raise CheckpointError(problem)
        if fmt != engine.checkpoint_format:
            raise CheckpointError(f"{path}: written by the {fmt!r} engine's checkpointing; this run's engine "
                                  f"writes {engine.checkpoint_format!r} (parallel.engine must match to resume; "
                                  f"start a new run with model.init_from_run or export the weights instead)")
        engine.load_state(path)
        rank_files = sorted((path / "rank_state").glob("rank_*.pt"))
        if len(rank_files) != trainer_state["world_size"]:
            raise CheckpointError(f"{path}: expected {trainer_state['world_size']} rank_state files, "
                                  f"found {len(rank_files)}")
        old_tp = int(trainer_state.get("tp", 1))
        if trainer_state["world_size"] == self.world_size and old_tp == self.tp:
            own = torch.load(rank_files[self.rank], weights_only=False)
            return trainer_state, [own]
        # One state per data-parallel position of the saving run (its tp ranks hold identical data states).
        return trainer_state, [torch.load(f, weights_only=False) for f in rank_files[::old_tp]]
