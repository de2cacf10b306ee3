"""Helpers shared by the loader tests (a uniquely named module: several test folders have a conftest)."""
from __future__ import annotations

import torch

from scaleforge.platform.data import decode_tokens
from scaleforge.platform.data.config import DataConfig, DataSourceConfig
from scaleforge.platform.recipe import DataContext


def data_cfg(*sources, **kw) -> DataConfig:
    """``data_cfg(("a", pattern), ("b", pattern, 0.3), num_workers=2)``"""
    srcs = [DataSourceConfig(name=s[0], shards=[s[1]] if isinstance(s[1], str) else list(s[1]),
                             weight=s[2] if len(s) > 2 else 1.0) for s in sources]
    kw.setdefault("shuffle_buffer", 5)
    kw.setdefault("seed", 1234)
    return DataConfig(kind="webdataset", sources=srcs, **kw)


def ctx(rank: int = 0, world: int = 1, mbs: int = 3) -> DataContext:
    return DataContext(dp_rank=rank, dp_world_size=world, micro_batch_size=mbs, seed=0, device=torch.device("cpu"))


def key_and_epoch(raw):
    """sample_fn for order tests: identifies the sample and the epoch it was read in."""
    out = decode_tokens(raw)
    out["id"] = f"{raw['__source__']}/{raw['__url__'].rsplit('/', 1)[-1]}/{raw['__key__']}"
    out["epoch"] = raw["__epoch__"]
    return out
