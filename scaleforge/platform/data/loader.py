"""``build_loader``: the per-rank, exactly resumable webdataset loader (``data.kind: webdataset``).

Workers and exactness: every batch a DataLoader worker yields carries that reader's state *after* the
batch. The main process keeps the latest state per worker as batches are CONSUMED (not prefetched)
and which worker comes next (DataLoader takes batches from its workers round-robin, deterministically,
for infinite iterable datasets). On resume the DataLoader is rebuilt with each worker starting from
its recorded state, rotated so that the worker due next yields first.

Different world size or worker count (exact mode): pass the states of ALL old ranks,
``load_state_dict({"ranks": [state_rank0, state_rank1, ...]})``. Every sample of the epochs in flight
that no old rank consumed (unread shard tails, untouched shards, samples sitting in shuffle buffers or
batchers) becomes a "transition" work list, split by rank then by worker over the new readers; after
it, epochs continue with the new layout from the first epoch no old reader had started. So within
every epoch no sample is seen twice and none is lost. In resampled mode the new readers simply start
the next epoch (held samples are dropped; sampling is with replacement anyway).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaleforge.platform.data.base import StatefulIterator
from scaleforge.platform.data.batching import Batcher, FixedBatcher, collate_samples
from scaleforge.platform.data.config import DataConfig
from scaleforge.platform.data.decode import BAD_SAMPLE_ERRORS, decode_sample
from scaleforge.platform.data.shards import (
    DataError,
    ShardReadResult,
    check_shards_exist,
    expand_patterns,
    is_local,
    iter_shard,
)
from scaleforge.platform.data.stream import (
    ONLY_EXTRAS, PipelineSpec, ReaderPipeline, Slot, SourceSpec, epoch_units, initial_source_state,
    phase_next_epoch,
)

log = logging.getLogger("scaleforge.data")
STATE_VERSION = 1
PROBE_SHARDS, PROBE_SAMPLES = 4, 64


def _identity(x: Any) -> Any:
    return x


class _ReaderDataset(IterableDataset):
    """One DataLoader worker = one reader; yields batches with ``__loader_state__`` attached."""

    def __init__(self, spec: PipelineSpec, rank: int, world_size: int, num_workers: int,
                 states: list[dict[str, Any] | None], rotation: int):
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, num_workers
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
            if info.num_workers != self.num_workers:
                raise RuntimeError(f"expected {self.num_workers} workers, DataLoader has {info.num_workers}")
        worker = ((info.id if info is not None else 0) + self.rotation) % self.num_workers
        pipeline = ReaderPipeline(self.spec, Slot(self.rank, self.world_size, worker, self.num_workers),
                                  self.states[worker])
        while True:
            batch = pipeline.next_batch()
            batch["__loader_state__"] = (worker, pipeline.state())
            yield batch


class WebDatasetLoader(StatefulIterator):
    """See the module docstring. Build it with ``build_loader``."""

    def __init__(self, spec: PipelineSpec, rank: int, world_size: int, num_workers: int, prefetch_factor: int,
                 pin_memory: bool):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.num_workers = num_workers
        self.readers_per_rank = max(1, num_workers)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._states: list[dict[str, Any] | None] = [None] * self.readers_per_rank
        self._next_worker = 0
        self._consumed = 0
        self._loader_iter = None

    # -- iteration ---------------------------------------------------------------------------------
    def _start(self) -> None:
        dataset = _ReaderDataset(self.spec, self.rank, self.world_size, self.readers_per_rank, list(self._states),
                                 self._next_worker)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, **kwargs)
        self._loader_iter = iter(loader)

    def __next__(self) -> dict[str, Any]:
        if self._loader_iter is None:
            self._start()
        batch = next(self._loader_iter)
        worker, state = batch.pop("__loader_state__")
        self._states[worker] = state
        self._next_worker = (worker + 1) % self.readers_per_rank
        self._consumed += 1
        return batch

    def close(self) -> None:
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "mode": self.spec.mode, "seed": self.spec.seed,
            "rank": self.rank, "world_size": self.world_size, "readers_per_rank": self.readers_per_rank,
            "fingerprint": self.spec.fingerprint, "next_worker": self._next_worker,
            "consumed": self._consumed, "readers": list(self._states),
        }

    def _check_compatible(self, st: dict[str, Any]) -> None:
        if st.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {st.get('version')!r} is not {STATE_VERSION}")
        if st["fingerprint"] != self.spec.fingerprint:
            raise DataError("data loader state was saved for other sources/shards: saved "
                            f"{st['fingerprint']}, configured {self.spec.fingerprint}")
        if st["seed"] != self.spec.seed or st["mode"] != self.spec.mode:
            raise DataError(f"data loader state was saved with seed={st['seed']} mode={st['mode']}, the job has "
                            f"seed={self.spec.seed} mode={self.spec.mode}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        ranks = state["ranks"] if "ranks" in state else None
        if ranks is None and state.get("world_size") == 1 and (
                state.get("readers_per_rank") != self.readers_per_rank or self.world_size != 1):
            ranks = [state]
        if ranks is None:
            self._check_compatible(state)
            if state["world_size"] != self.world_size or state["readers_per_rank"] != self.readers_per_rank:
                raise DataError(
                    f"data loader state is from world size {state['world_size']} x {state['readers_per_rank']} "
                    f"readers, this job has {self.world_size} x {self.readers_per_rank}; pass the states of all "
                    "old ranks as {'ranks': [...]} to re-split the rest of the epoch")
            if state["rank"] != self.rank:
                raise DataError(f"data loader state of rank {state['rank']} given to rank {self.rank}")
            self._states = list(state["readers"])
            self._next_worker = state["next_worker"]
            self._consumed = state["consumed"]
            return
        for st in ranks:
            self._check_compatible(st)
        if sorted(st["rank"] for st in ranks) != list(range(ranks[0]["world_size"])):
            raise DataError("load_state_dict({'ranks': ...}) needs the state of every old rank exactly once")
        same = ranks[0]["world_size"] == self.world_size and ranks[0]["readers_per_rank"] == self.readers_per_rank
        if same:
            self.load_state_dict(next(st for st in ranks if st["rank"] == self.rank))
            return
        self._states = resplit(self.spec, ranks, self.rank, self.world_size, self.readers_per_rank)
        self._next_worker = 0
        self._consumed = 0

    def load_resharded_state_dict(self, states: Sequence[dict[str, Any]]) -> str:
        """The trainer's entry point after a world-size change: the states of all old ranks."""
        old = states[0]
        self.load_state_dict({"ranks": list(states)})
        if self.spec.mode == "exact":
            return (f"webdataset loader re-split the unconsumed rest of the epochs in flight from "
                    f"{old['world_size']}x{old['readers_per_rank']} to {self.world_size}x{self.readers_per_rank} "
                    "readers (no sample repeated or lost within an epoch), then continues with the new layout")
        return (f"webdataset loader (resampled) restarts its {self.world_size}x{self.readers_per_rank} readers "
                "at the next epoch")

    # -- metrics -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for st in self._states:
            if st is None:
                continue
            for k, v in list(st["counters"].items()) + list(st["batcher_counters"].items()):
                out[f"data/{k}"] = out.get(f"data/{k}", 0.0) + float(v)
        epochs = [phase_next_epoch(s["phase"]) - 1 for st in self._states if st is not None for s in st["sources"]]
        out["data/epoch"] = float(min(epochs)) if epochs else 0.0
        return out


def resplit(spec: PipelineSpec, ranks: Sequence[dict[str, Any]], rank: int, world_size: int,
            readers_per_rank: int) -> list[dict[str, Any]]:
    """New reader states for ``rank`` of the new layout from the states of all old ranks."""
    old_w, old_k = ranks[0]["world_size"], ranks[0]["readers_per_rank"]
    generation = 1 + max((st or {}).get("generation", 0) for r in ranks for st in r["readers"])
    readers = [(Slot(r["rank"], old_w, w, old_k), st) for r in ranks for w, st in enumerate(r["readers"])]
    new_sources = []
    for src in spec.sources:
        src_states = [(slot, (st["sources"][src.index] if st else initial_source_state())) for slot, st in readers]
        next_epoch = max(phase_next_epoch(s["phase"]) for _, s in src_states)
        if spec.mode != "exact":
            new_sources.append([{**initial_source_state(), "phase": {"kind": "epoch", "epoch": next_epoch}}
                                for _ in range(readers_per_rank)])
            continue
        todo: dict[tuple[int, int], list[Any]] = {}  # (epoch, shard) -> [start, extras]

        def add(epoch: int, shard: int, start: int, extras: Sequence[int] = ()) -> None:
            item = todo.setdefault((epoch, shard), [ONLY_EXTRAS, set()])
            item[0] = min(item[0], start)
            item[1].update(extras)

        for slot, s in src_states:
            phase = s["phase"]
            units = (epoch_units(spec, src, phase["epoch"], slot) if phase["kind"] == "epoch"
                     else [tuple(u) for u in phase["units"]])
            for i, (e, sh, start, extras) in enumerate(units[s["pos"]:]):
                lo = s["scan"] if i == 0 else 0
                add(e, sh, max(start, lo) if start != ONLY_EXTRAS else ONLY_EXTRAS, [x for x in extras if x >= lo])
            for e, sh, idx in s["buffer"]:
                add(e, sh, ONLY_EXTRAS, [idx])
            for e in range(phase_next_epoch(phase), next_epoch):
                for (ue, sh, start, extras) in epoch_units(spec, src, e, slot):
                    add(ue, sh, start, extras)
        for slot, st in readers:
            for s_idx, e, sh, idx in (st or {}).get("pending", []):
                if s_idx == src.index:
                    add(e, sh, ONLY_EXTRAS, [idx])
        units = [(e, sh, item[0], tuple(sorted(x for x in item[1] if x < item[0])))
                 for (e, sh), item in sorted(todo.items())]
        units = [u for u in units if u[2] != ONLY_EXTRAS or u[3]]
        mine = units[rank::world_size]
        new_sources.append([
            {**initial_source_state(),
             "phase": {"kind": "transition", "units": mine[w::readers_per_rank], "next_epoch": next_epoch,
                       "generation": generation}}
            for w in range(readers_per_rank)])
    counters: dict[str, int] = {}
    batcher_counters: dict[str, int] = {}
    for _, st in readers:
        for k, v in (st or {}).get("counters", {}).items():
            counters[k] = counters.get(k, 0) + v
        for k, v in (st or {}).get("batcher_counters", {}).items():
            batcher_counters[k] = batcher_counters.get(k, 0) + v
    out = []
    for w in range(readers_per_rank):
        first = rank == 0 and w == 0  # old totals carried once, so sums over ranks stay right
        out.append({"sources": [per_reader[w] for per_reader in new_sources], "blend_rng": None, "pending": [],
                    "batcher_counters": dict(batcher_counters) if first else {},
                    "counters": dict(counters) if first else {}, "generation": generation})
    return out


def _probe_source(source: SourceSpec, sample_fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Fail at start-up (before workers) when a source has no usable sample near its start; the error
    names the source and what each probed shard held."""
    errors: list[str] = []
    shards: list[str] = []  # per probed shard: "url (what was wrong)"
    scanned = 0
    for url in source.urls[:PROBE_SHARDS]:
        res, in_shard = ShardReadResult(), 0
        for index, raw in iter_shard(url, res):
            scanned += 1
            in_shard += 1
            raw.update(__index__=index, __source__=source.name, __epoch__=0, __seed__=0)
            try:
                out = sample_fn(raw)
            except BAD_SAMPLE_ERRORS as e:
                if len(errors) < 3:
                    errors.append(f"{url} key {raw.get('__key__')!r}: {type(e).__name__}: {e}")
            else:
                if not isinstance(out, dict):
                    raise DataError(f"source {source.name!r}: sample_fn returned {type(out).__name__}, not a dict")
                return
            if scanned >= PROBE_SAMPLES:
                break
        what = f"unreadable: {res.error}" if res.truncated and not in_shard else \
            f"{in_shard} undecodable sample(s)" if in_shard else "no sample"
        shards.append(f"{url} ({what})")
        if scanned >= PROBE_SAMPLES:
            break
    detail = "; ".join(errors) if errors else "no complete sample"
    raise DataError(f"source {source.name!r}: no usable sample in the first {scanned} samples of "
                    f"{len(shards)} shard(s): {', '.join(shards)} ({detail})")


def probe_sources(data_cfg: DataConfig, world: int) -> None:
    """``check_sources`` plus, per source, one sample of its first shards that reads and decodes
    (``decode_sample``): the launcher's check, so that a source of empty or garbage shards fails before
    any worker starts (the workers probe again with the recipe's own sample function)."""
    for src in check_sources(data_cfg, world):
        if all(is_local(u) or u.startswith("file://") for u in src.urls[:PROBE_SHARDS]):
            _probe_source(src, decode_sample)


def check_sources(data_cfg: DataConfig, world: int) -> list[SourceSpec]:
    """The configuration checks of ``build_loader`` that need no sample decoding: mode, workers, the
    bad-sample budget, source names and weights, patterns, missing shards, shards per reader. The
    launcher runs them too, so a missing shard fails before any process starts."""
    if data_cfg.kind != "webdataset":
        raise DataError(f"data.kind: build_loader reads webdataset shards, got kind={data_cfg.kind!r}")
    if data_cfg.mode not in ("exact", "resampled"):
        raise DataError(f"data.mode: {data_cfg.mode!r} is not one of exact, resampled")
    if not data_cfg.sources:
        raise DataError("data.sources: no source configured (need [{name, shards, weight}, ...])")
    if data_cfg.num_workers < 0:
        raise DataError(f"data.num_workers: must be >= 0, got {data_cfg.num_workers}")
    if not 0.0 <= data_cfg.max_bad_fraction <= 1.0:
        raise DataError(f"data.max_bad_fraction: must be in [0, 1], got {data_cfg.max_bad_fraction}")
    names = [s.name for s in data_cfg.sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: source names must be unique, got {names}")
    readers = world * max(1, data_cfg.num_workers)
    sources = []
    for i, s in enumerate(data_cfg.sources):
        where = f"data.sources[{i}] ({s.name})"
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise DataError(f"{where}.weight: must be a positive number, got {s.weight}")
        urls = expand_patterns(list(s.shards) if not isinstance(s.shards, str) else s.shards, f"{where}.shards")
        check_shards_exist(urls, f"{where}.shards")
        if data_cfg.mode == "exact" and len(urls) < readers:
            raise DataError(
                f"{where}: {len(urls)} shard(s) for {world} rank(s) x {max(1, data_cfg.num_workers)} worker(s) = "
                f"{readers} readers; exact mode splits by shard and needs at least one shard per reader "
                "(write more, smaller shards, lower data.num_workers, or use data.mode=resampled)")
        sources.append(SourceSpec(i, s.name, tuple(urls), float(s.weight)))
    return sources


def build_loader(
    data_cfg: DataConfig,
    ctx: Any,
    sample_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    batcher: Batcher | Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    probe: bool = True,
) -> WebDatasetLoader:
    """The per-rank loader for ``data.kind: webdataset`` (see docs/data.md).

    ``ctx`` is a ``scaleforge.platform.recipe.DataContext`` (dp_rank, dp_world_size, micro_batch_size,
    seed, device). All checks (patterns, missing shards, shard count, a usable sample per source)
    happen here, before any worker starts.
    """
    sample_fn = sample_fn or decode_sample
    if batcher is None:
        batcher = FixedBatcher(ctx.micro_batch_size, collate_samples)
    elif not isinstance(batcher, Batcher):
        batcher = FixedBatcher(ctx.micro_batch_size, batcher)
    world, rank = int(ctx.dp_world_size), int(ctx.dp_rank)
    sources = check_sources(data_cfg, world)
    if probe:
        for src in sources:
            _probe_source(src, sample_fn)
    seed = int(data_cfg.seed if data_cfg.seed is not None else ctx.seed)
    spec = PipelineSpec(
        sources=sources, seed=seed, mode=data_cfg.mode, shuffle_buffer=int(data_cfg.shuffle_buffer),
        max_bad_fraction=float(data_cfg.max_bad_fraction), sample_fn=sample_fn, batcher=batcher,
        fingerprint=[[s.name, len(s.urls), s.urls[0], s.urls[-1]] for s in sources],
    )
    device = getattr(ctx, "device", None)
    pin = bool(data_cfg.pin_memory) and device is not None and torch.device(device).type == "cuda"
    return WebDatasetLoader(spec, rank, world, data_cfg.num_workers, data_cfg.prefetch_factor, pin)
