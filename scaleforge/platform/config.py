"""Typed job configuration: omegaconf YAML (+ base-config inheritance + dotlist overrides) validated
into dataclasses.

A job config has the sections ``run``, ``model``, ``data``, ``optim``, ``trainer``, ``parallel``,
``checkpoint``, ``metrics`` and ``cluster``. ``model.recipe`` names a recipe; the rest of ``model`` is
validated against that recipe's own dataclass (``Recipe.config_class``), which the launcher supplies
through ``recipe_config`` so that this module never imports a recipe.

Inheritance: a YAML file may start with ``defaults: [base.yaml, other.yaml]``; paths are relative to
the file, then to ``configs/``. Bases merge first (in order), then the file, then the command line.

Every error is a ``ConfigError`` whose message names the key's full path.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleforge.platform.data.config import DataConfig


class ConfigError(ValueError):
    """A configuration problem, reported before any worker starts."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class ModelConfig:
    """Replaced at load time by the recipe's own dataclass (which also has ``recipe``)."""

    recipe: str = MISSING


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "scaleforge"
    entity: Optional[str] = None


@dataclass
class MetricsConfig:
    jsonl: bool = True
    progress_bar: bool = True
    plot: bool = True
    profile_start_step: int = 0  # > 0: torch.profiler over steps [start, start + profile_steps)
    profile_steps: int = 3
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class OptimConfig:
    # auto (adamw_fp8 with parallel.fp8=coat, adamw otherwise) | adamw | adamw_fp8 | sgd | came | came8bit
    name: str = "auto"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | linear | constant (each after linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR / peak LR for cosine and linear
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.0  # > 0 keeps a sharded EMA of the weights (saved in checkpoints)
    fused: bool = False  # GPU: fused AdamW kernel; came / came8bit: each parameter's update torch.compile-d into fused kernels
    came_eps: list[float] = field(default_factory=lambda: [1e-30, 1e-16])  # CAME (eps1, eps2)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    log_interval: int = 1
    max_nonfinite_steps: int = 3  # stop after this many non-finite losses in a row
    gc_interval: int = 0  # > 0: automatic GC off, gc.collect(1) every N steps (torchtitan: 50); 0: automatic GC
    exit_after_steps: int = 0  # > 0: checkpoint and exit after this many steps in this job (time slicing)
    # with the device-side optimizer step: read step N's statistics after step N+1's forward/backward are
    # enqueued (no GPU drain at the step boundary); a stop request then takes effect one step later
    deferred_stats: bool = True
    collective_timeout_s: int = 600
    deterministic: bool = True  # torch.use_deterministic_algorithms(warn_only) + fixed seeds


@dataclass
class DeepSpeedConfig:
    """``parallel.engine=deepspeed``: DeepSpeed ZeRO (its config is derived from ours; see deepspeed_engine.py)."""

    zero_stage: int = 3  # 1: optimizer states partitioned, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer states and the update on the CPU (ZeRO-Offload)
    offload_param: bool = False  # parameters on the CPU between uses (ZeRO-3 only)
    bucket_size: int = 500_000_000  # elements per reduce / all-gather bucket


@dataclass
class ParallelConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    dp_shard: int = -1  # -1: world_size // dp_replicate
    dp_replicate: int = 1  # > 1: HSDP (replicate across groups, shard within)
    activation_checkpointing: str = "none"  # none | full
    compile: bool = False  # torch.compile per block
    mixed_precision: str = "bf16"  # bf16 | fp32 (parameters stay fp32; compute dtype)
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    fsdp_group_size: int = 1  # consecutive FSDP units of the recipe's plan sharded as one group
    fp8: str = "none"  # none | coat
    fp8_all_gather: bool = False  # with fp8=coat: FSDP2 gathers the FP8 linears' weights as E4M3 codes (1 B/param)
    tp: int = 1  # tensor-parallel size (megatron-core layers on CUDA, their torch.distributed equivalents on CPU; + sequence parallelism; innermost mesh dimension)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints (0: only at the end and on signals)
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step's checkpoint (0: none)
    async_save: bool = False
    resume: str = "auto"  # auto | none | PATH
    save_final: bool = True


@dataclass
class ClusterConfig:
    kind: str = "local"  # local | slurm
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0  # 0 on CPU
    cpus_per_task: int = 0  # 0: let Slurm decide
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: str = "01:00:00"
    preempt_grace_s: int = 120  # Slurm sends SIGUSR1 this many seconds before the end
    requeue: bool = True
    max_requeues: int = 20
    mem: Optional[str] = None
    constraint: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS = {f.name: f for f in dataclasses.fields(JobConfig)}
CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.engine": ("fsdp2", "deepspeed"),
    "parallel.activation_checkpointing": ("none", "full"),
    "parallel.mixed_precision": ("bf16", "fp32"),
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "parallel.fp8": ("none", "coat"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "metrics.wandb.mode": ("offline", "online", "disabled"),
    "cluster.kind": ("local", "slurm"),
    "data.kind": ("synthetic", "webdataset"),
    "data.mode": ("exact", "resampled"),
}

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def find_config(name: str) -> Path:
    """``nvila_8b.yaml`` -> ./nvila_8b.yaml if it exists, else configs/nvila_8b.yaml."""
    candidates = [Path(name)]
    if not Path(name).is_absolute():
        candidates.append(CONFIG_DIR / name)
        if not name.endswith((".yaml", ".yml")):
            candidates += [Path(name + ".yaml"), CONFIG_DIR / (name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    hint = difflib.get_close_matches(Path(name).name, shipped, n=1)
    msg = f"config file {name!r} not found (looked in . and {CONFIG_DIR})"
    if hint:
        msg += f"; did you mean {hint[0]}?"
    raise ConfigError(msg)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: circular 'defaults' inheritance via {' -> '.join(map(str, chain))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = raw.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            base_path = find_config(base)
        merged = OmegaConf.merge(merged, _read_yaml(base_path, chain + (path,)))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def _nearest(key: str, valid: list[str]) -> str:
    m = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {m[0]}?" if m else f" (valid keys: {', '.join(sorted(valid))})"


def _check_keys(node: Any, schema: Any, path: str) -> None:
    """Unknown keys, with the closest valid key, before omegaconf's own (terser) validation."""
    if not isinstance(node, DictConfig) or schema is None:
        return
    if not (dataclasses.is_dataclass(schema) and isinstance(schema, type)):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = [f"{path}.{k}" if path else k for k in fields]
            raise ConfigError(f"{full}: unknown key{_nearest(full, valid)}")
        ftype = _field_type(schema, key)
        if ftype is not None:
            _check_keys(node[key], ftype, full)


def _field_type(schema: type, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(schema)
    t = hints.get(name)
    if dataclasses.is_dataclass(t):
        return t
    return None


_YAML11_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _keep_yaml11_words(cli: DictConfig, overrides: list[str]) -> None:
    """YAML 1.1 reads ``run.name=off`` as the bool False, which a str field would then hold as "False". Keep such
    words as the text the user typed: the schema's bool fields still convert "off"/"yes" to bools, and str fields
    get the word itself."""
    for ov in overrides:
        key, _, text = ov.partition("=")
        if text.strip().lower() in _YAML11_BOOL_WORDS and isinstance(OmegaConf.select(cli, key), bool):
            OmegaConf.update(cli, key, text.strip(), merge=False)


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] = (),
    recipe_config: Callable[[str], type] | None = None,
) -> JobConfig:
    """Load, merge and validate. ``recipe_config(name)`` returns a recipe's model dataclass."""
    base = _read_yaml(find_config(str(path))) if path is not None else OmegaConf.create({})
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"bad override (not valid YAML after '='): {' '.join(l.strip() for l in first[:3])}") from None
    _keep_yaml11_words(cli, overrides)
    try:
        raw = OmegaConf.merge(base, cli)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise ConfigError(f"overrides {' '.join(overrides)}: cannot be merged into the config ({e}); "
                          f"a list is replaced as a whole (key=[a,b]), not by index") from None
    return validate(raw, recipe_config)


def validate(raw: DictConfig, recipe_config: Callable[[str], type] | None = None) -> JobConfig:
    raw = raw.copy()
    model_schema: type = ModelConfig
    recipe = OmegaConf.select(raw, "model.recipe", default=None)
    if recipe is None:
        raise ConfigError("model.recipe: missing; name the recipe (e.g. model.recipe=llm)")
    if recipe_config is not None:
        model_schema = recipe_config(str(recipe))
    schema_fields = {f.name: f for f in dataclasses.fields(JobConfig)}
    for key in raw.keys():
        if key not in schema_fields:
            raise ConfigError(f"{key}: unknown section{_nearest(str(key), list(schema_fields))}")
    for name, f in schema_fields.items():
        if name in raw:
            _check_keys(raw[name], model_schema if name == "model" else _field_type(JobConfig, name), name)

    # A source's `shards` may be one pattern or a list of them.
    for src in OmegaConf.select(raw, "data.sources", default=None) or []:
        if isinstance(src, DictConfig) and isinstance(src.get("shards"), str):
            src.shards = [src.shards]
    schema = OmegaConf.structured(JobConfig)
    OmegaConf.set_struct(schema, False)
    schema.model = OmegaConf.structured(model_schema)
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.cluster.env, False)  # free-form environment variables
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: required value missing")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e)) from None
    except (TypeError, ValueError) as e:  # e.g. a list section given as a mapping (key.0.x=...)
        raise ConfigError(f"config does not fit the schema: {e} (lists are replaced whole: key=[a,b])") from None
    check_choices(cfg)
    return cfg


_TYPE_NAMES = {"Integer": "int", "Float": "float", "Boolean": "bool", "String": "str"}


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0]
    m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        return f"{key}: expected {_TYPE_NAMES.get(m.group(3), m.group(3))}, got {m.group(1)!r} ({m.group(2)})"
    m = re.search(r"Value '(.*)' is not a valid bool", msg)
    if m:
        return f"{key}: expected bool (true/false), got {m.group(1)!r}"
    m = re.search(r"Invalid type assigned: (\w+) is not a subclass of (\w+)", msg)
    if m:
        return f"{key}: expected {m.group(2)}, got {m.group(1)}"
    return f"{key}: {msg}" if key else msg


def check_choices(cfg: JobConfig) -> None:
    for path, choices in CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), path)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}"
                              + (f"; did you mean {hint[0]}?" if hint else ""))
    if cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps: must be positive, got {cfg.trainer.max_steps}")
    if cfg.trainer.micro_batch_size <= 0 or cfg.trainer.global_batch_size <= 0:
        raise ConfigError("trainer.global_batch_size and trainer.micro_batch_size must be positive")
    if cfg.optim.lr < 0:
        raise ConfigError(f"optim.lr: must be >= 0, got {cfg.optim.lr}")
    if cfg.optim.ema_decay and not 0.0 < cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: must be in (0, 1), got {cfg.optim.ema_decay}")
    if cfg.trainer.gc_interval < 0:
        raise ConfigError(f"trainer.gc_interval: must be >= 0, got {cfg.trainer.gc_interval}")
    if cfg.parallel.fsdp_group_size < 1:
        raise ConfigError(f"parallel.fsdp_group_size: must be >= 1, got {cfg.parallel.fsdp_group_size}")
    if cfg.optim.name == "auto":
        cfg.optim.name = "adamw_fp8" if cfg.parallel.fp8 == "coat" else "adamw"
    check_fp8(cfg)


def check_fp8(cfg: JobConfig) -> None:
    """The combinations COAT mode (parallel.fp8=coat) does not support, named by their key."""
    if cfg.optim.name == "adamw_fp8" and cfg.parallel.tp > 1:
        raise ConfigError(f"parallel.tp={cfg.parallel.tp}: adamw_fp8's row groups follow FSDP2's dim-0 shards; "
                          "tensor-parallel column shards are not supported")
    if cfg.parallel.fp8 != "coat":
        if cfg.parallel.fp8_all_gather:
            raise ConfigError(f"parallel.fp8_all_gather=true needs parallel.fp8=coat (got {cfg.parallel.fp8!r}): "
                              "only COAT's FP8 linears read FP8-gathered weights")
        return
    if cfg.parallel.engine != "fsdp2":
        raise ConfigError(f"parallel.engine={cfg.parallel.engine}: parallel.fp8=coat is implemented for fsdp2")
    if cfg.parallel.tp > 1:
        raise ConfigError(f"parallel.tp={cfg.parallel.tp}: parallel.fp8=coat's FP8 linears take plain tensors, "
                          "not tensor-parallel DTensors")
    if cfg.parallel.compile:
        raise ConfigError("parallel.compile=true: parallel.fp8=coat runs eager (its FP8 blocks pass the producer "
                          "amax as a tensor attribute, which torch.compile does not trace)")
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"parallel.fp8=coat: FP8 GEMMs need compute capability 8.9 or newer, this GPU has "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")


# ---------------------------------------------------------------------------------------------------
# Derived layout: mesh and batch arithmetic
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    world_size: int
    dp_replicate: int
    dp_shard: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    tp: int = 1  # tensor-parallel size: world_size = dp_replicate x dp_shard x tp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


def derive_layout(cfg: JobConfig, world_size: int) -> Layout:
    """Mesh and gradient accumulation from the config and the world size; explains impossibilities."""
    p, t = cfg.parallel, cfg.trainer
    if p.tp < 1:
        raise ConfigError(f"parallel.tp: must be >= 1, got {p.tp}")
    if world_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide the world size {world_size} "
                          f"(nodes x procs_per_node)")
    if p.tp > 1 and p.fp8 != "none":
        raise ConfigError(f"parallel.fp8={p.fp8} with parallel.tp={p.tp}: the FP8 linears replace nn.Linear, "
                          f"not megatron-core's parallel linears; use one of the two")
    if p.tp > 1 and p.engine != "fsdp2":
        raise ConfigError(f"parallel.tp={p.tp} needs parallel.engine=fsdp2, got {p.engine}")
    dp = world_size // p.tp
    if p.dp_replicate < 1:
        raise ConfigError(f"parallel.dp_replicate: must be >= 1, got {p.dp_replicate}")
    if dp % p.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate={p.dp_replicate} does not divide the data-parallel size {dp} "
            f"(world size {world_size} / parallel.tp {p.tp})"
        )
    shard = p.dp_shard if p.dp_shard != -1 else dp // p.dp_replicate
    if shard < 1 or p.dp_replicate * shard * p.tp != world_size:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) x parallel.dp_shard ({shard}) x parallel.tp ({p.tp}) = "
            f"{p.dp_replicate * shard * p.tp} processes, but the job has {world_size} "
            f"(nodes x procs_per_node); the mesh must cover every process exactly once"
        )
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}; "
            f"choose a global batch that is a multiple of {per_step}"
        )
    return Layout(world_size, p.dp_replicate, shard, t.micro_batch_size, t.global_batch_size // per_step,
                  t.global_batch_size, p.tp)


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
