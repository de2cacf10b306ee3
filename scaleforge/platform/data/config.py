"""The ``data`` config section (generic; recipe-specific shaping lives in the recipe's model section)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataSourceConfig:
    name: str = "default"
    shards: list[str] = field(default_factory=list)  # paths, brace patterns, pipe: URLs
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | webdataset
    sources: list[DataSourceConfig] = field(default_factory=list)
    mode: str = "exact"  # exact | resampled
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True  # only used on GPU
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    synthetic_samples: int = 4096  # size of one epoch of the synthetic source
    seed: Optional[int] = None  # None: run.seed
