"""The per-reader sample stream with an explicit, resumable state.

A *reader* is one (rank, worker) slot; there are ``world_size * max(1, num_workers)`` of them. Each
reader runs one ``ReaderPipeline``: for every source a ``SourceStream`` (shards of the current phase ->
samples -> seeded shuffle buffer), a seeded weighted choice between sources, ``sample_fn`` (decode and
transform, bad samples skipped and counted) and a ``Batcher``.

Sample order (exact mode), a pure function of (seed, epoch, shard list, world size, workers):
  epoch e of source s: shards permuted by ``rng(seed, s, e)``; rank r takes ``perm[r::W]``, its worker w
  takes ``[w::K]`` of that; the reader reads its shards in that order through a shuffle buffer of
  ``shuffle_buffer`` samples seeded by ``rng(seed, s, e, r, W, w, K)``; the buffer is drained at the end
  of the epoch, then epoch e+1 starts. Readers do not wait for each other: a reader with less data
  simply reaches the next epoch sooner; within every epoch each sample is read exactly once over all
  readers.
Resampled mode: the "epoch" e of a reader is ``ceil(n_shards / readers)`` shards drawn with
  replacement by ``rng(seed, s, e, r, W, w, K)``; infinite, no exactly-once guarantee.

State: for every source the phase (epoch, or a transition list after a world-size change), the shard
cursor (``pos``: which shard of the phase, ``scan``: next sample ordinal in it), the shuffle buffer as
sample references ``(epoch, shard_id, index)`` in buffer order and the buffer RNG state; the blend RNG
state; the batcher's held samples as references. On restore the referenced samples are read again
from their shards (``fetch_samples``), so the state stays small while being exact.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from scaleforge.platform.data.batching import Batcher
from scaleforge.platform.data.decode import BAD_SAMPLE_ERRORS
from scaleforge.platform.data.shards import DataError, ShardReadResult, fetch_samples, iter_shard

log = logging.getLogger("scaleforge.data")

ONLY_EXTRAS = 1 << 62  # a unit's ``start`` when only its explicit extra indices remain
TAG_SHUFFLE, TAG_BUFFER, TAG_RESAMPLE, TAG_BLEND, TAG_TRANSITION = 0x5F1, 0xB0F, 0x5E5, 0xB1E, 0x7A5
MIN_SAMPLES_FOR_BUDGET = 100
# a unit of work: (epoch, shard_id, start, extras) = read samples with index >= start or index in extras
Unit = tuple[int, int, int, tuple[int, ...]]
Ref = tuple[int, int, int]  # (epoch, shard_id, index) inside one source


def rng_for(*ints: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(i) for i in ints])))


def sample_seed(seed: int, source: int, epoch: int, shard: int, index: int) -> int:
    h = hashlib.blake2b(f"{seed}/{source}/{epoch}/{shard}/{index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass(frozen=True)
class Slot:
    rank: int
    world_size: int
    worker: int
    num_workers: int  # >= 1 (0 DataLoader workers = one in-process reader)

    @property
    def readers(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class SourceSpec:
    index: int
    name: str
    urls: tuple[str, ...]
    weight: float


@dataclass
class PipelineSpec:
    """Everything a reader needs (picklable: it travels to the DataLoader workers)."""

    sources: list[SourceSpec]
    seed: int
    mode: str  # exact | resampled
    shuffle_buffer: int
    max_bad_fraction: float
    sample_fn: Callable[[dict[str, Any]], dict[str, Any]]
    batcher: Batcher  # template; each reader deep-copies it
    fingerprint: list[Any] = field(default_factory=list)


def epoch_units(spec: PipelineSpec, source: SourceSpec, epoch: int, slot: Slot) -> list[Unit]:
    n = len(source.urls)
    if spec.mode == "exact":
        perm = rng_for(spec.seed, source.index, epoch, TAG_SHUFFLE).permutation(n)
        mine = perm[slot.rank::slot.world_size][slot.worker::slot.num_workers]
    else:
        rng = rng_for(spec.seed, source.index, epoch, slot.rank, slot.world_size, slot.worker,
                      slot.num_workers, TAG_RESAMPLE)
        mine = rng.integers(n, size=max(1, math.ceil(n / slot.readers)))
    return [(epoch, int(s), 0, ()) for s in mine]


def initial_source_state() -> dict[str, Any]:
    return {"phase": {"kind": "epoch", "epoch": 0}, "pos": 0, "scan": 0, "buffer": [], "rng": None,
            "read": 0, "empty": 0}


def phase_next_epoch(phase: dict[str, Any]) -> int:
    return phase["epoch"] + 1 if phase["kind"] == "epoch" else phase["next_epoch"]


class SourceStream:
    """Raw samples of one source for one reader, through the seeded shuffle buffer."""

    def __init__(self, spec: PipelineSpec, source: SourceSpec, slot: Slot, state: dict[str, Any] | None,
                 counters: dict[str, int]):
        self.spec, self.source, self.slot = spec, source, slot
        self.counters = counters
        st = copy.deepcopy(state) if state is not None else initial_source_state()
        self.phase: dict[str, Any] = st["phase"]
        self.pos: int = st["pos"]
        self.scan: int = st["scan"]
        self.read: int = st["read"]
        self.empty: int = st["empty"]
        self._units = self._phase_units()
        self._rng = self._phase_rng()
        if st["rng"] is not None:
            self._rng.bit_generator.state = st["rng"]
        self.buffer_refs: list[Ref] = [tuple(r) for r in st["buffer"]]
        self.buffer: list[dict[str, Any]] = []  # filled by the pipeline on restore (fetch)
        self._it = None
        self._result: ShardReadResult | None = None
        self._reported: set[str] = set()

    # -- phase -------------------------------------------------------------------------------------
    def _phase_units(self) -> list[Unit]:
        if self.phase["kind"] == "epoch":
            return epoch_units(self.spec, self.source, self.phase["epoch"], self.slot)
        return [(int(u[0]), int(u[1]), int(u[2]), tuple(u[3])) for u in self.phase["units"]]

    def _phase_rng(self) -> np.random.Generator:
        s = self.slot
        if self.phase["kind"] == "epoch":
            return rng_for(self.spec.seed, self.source.index, self.phase["epoch"], s.rank, s.world_size,
                           s.worker, s.num_workers, TAG_BUFFER)
        return rng_for(self.spec.seed, self.source.index, TAG_TRANSITION, self.phase["next_epoch"],
                       self.phase["generation"], s.rank, s.world_size, s.worker, s.num_workers)

    def _next_phase(self) -> None:
        if self.phase["kind"] == "epoch":
            self.empty = self.empty + 1 if self.read == 0 else 0
            if self.empty >= 2:
                raise DataError(
                    f"source {self.source.name!r}: reader rank {self.slot.rank} worker {self.slot.worker} "
                    f"read no sample in two epochs in a row (shards unreadable or empty?)")
        self.phase = {"kind": "epoch", "epoch": phase_next_epoch(self.phase)}
        self.pos, self.scan, self.read = 0, 0, 0
        self._units = self._phase_units()
        self._rng = self._phase_rng()

    @property
    def epoch(self) -> int:
        return self.phase["epoch"] if self.phase["kind"] == "epoch" else self.phase["next_epoch"] - 1

    # -- reading -----------------------------------------------------------------------------------
    def annotate(self, raw: dict[str, Any], epoch: int, shard: int, index: int) -> dict[str, Any]:
        raw["__index__"] = index
        raw["__source__"] = self.source.name
        raw["__epoch__"] = epoch
        raw["__seed__"] = sample_seed(self.spec.seed, self.source.index, epoch, shard, index)
        raw["__ref__"] = (self.source.index, epoch, shard, index)
        return raw

    def _close_shard(self, url: str) -> None:
        if self._it is not None:
            self._it.close()
        if self._result is not None and self._result.truncated:
            name = self.source.name
            self.counters[f"{name}/truncated_shards"] = self.counters.get(f"{name}/truncated_shards", 0) + 1
        if self._result is not None and self._result.truncated and url not in self._reported:
            self._reported.add(url)  # counted every time, logged once
            log.warning("data: source %r shard %s ends early after sample %d (%s); rest of shard skipped",
                        self.source.name, url, self.scan - 1, self._result.error)
        self._it, self._result = None, None

    def _read(self) -> dict[str, Any] | None:
        while self.pos < len(self._units):
            epoch, shard, start, extras = self._units[self.pos]
            url = self.source.urls[shard]
            last_extra = max(extras) if extras else -1
            if self._it is None:
                self._result = ShardReadResult()
                self._it = iter_shard(url, self._result)
            for index, raw in self._it:
                if index < self.scan:
                    continue
                self.scan = index + 1
                if index >= start or index in extras:
                    self.read += 1
                    return self.annotate(raw, epoch, shard, index)
                if start == ONLY_EXTRAS and index >= last_extra:
                    break
            self._close_shard(url)
            self.pos, self.scan = self.pos + 1, 0
        return None

    def next_raw(self) -> dict[str, Any]:
        size = max(1, self.spec.shuffle_buffer)
        while True:
            raw = self._read()
            if raw is not None:
                self.buffer.append(raw)
                if len(self.buffer) < size:
                    continue
                return self._pop()
            if self.buffer:
                return self._pop()
            self._next_phase()

    def _pop(self) -> dict[str, Any]:
        j = int(self._rng.integers(len(self.buffer))) if len(self.buffer) > 1 else 0
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "pos": self.pos, "scan": self.scan,
                "buffer": [r["__ref__"][1:] for r in self.buffer], "rng": self._rng.bit_generator.state,
                "read": self.read, "empty": self.empty}


class ReaderPipeline:
    """One reader: sources -> blend -> sample_fn -> batcher, with ``state()`` after every batch."""

    def __init__(self, spec: PipelineSpec, slot: Slot, state: dict[str, Any] | None = None):
        self.spec, self.slot = spec, slot
        state = state or {}
        self.counters: dict[str, int] = dict(state.get("counters", {}))
        self.generation: int = state.get("generation", 0)
        src_states = state.get("sources") or [None] * len(spec.sources)
        self.streams = [SourceStream(spec, s, slot, st, self.counters) for s, st in zip(spec.sources, src_states)]
        self.batcher: Batcher = copy.deepcopy(spec.batcher)
        self.batcher.counters.update(state.get("batcher_counters", {}))
        weights = np.array([s.weight for s in spec.sources], dtype=np.float64)
        self._cum = np.cumsum(weights / weights.sum())
        self._blend = rng_for(spec.seed, TAG_BLEND, slot.rank, slot.world_size, slot.worker, slot.num_workers,
                              self.generation)
        if state.get("blend_rng") is not None:
            self._blend.bit_generator.state = state["blend_rng"]
        self._budget_seen = 0
        self._budget_bad = 0
        self._logged: set[tuple[str, str]] = set()
        self._restore([tuple(r) for r in state.get("pending", [])])

    # -- restore -----------------------------------------------------------------------------------
    def _restore(self, pending: list[tuple[int, int, int, int]]) -> None:
        wanted: dict[tuple[int, int], set[int]] = {}
        for stream in self.streams:
            for e, sh, i in stream.buffer_refs:
                wanted.setdefault((stream.source.index, sh), set()).add(i)
        for s, e, sh, i in pending:
            wanted.setdefault((s, sh), set()).add(i)
        fetched: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
        for (s, sh), idx in sorted(wanted.items()):
            url = self.spec.sources[s].urls[sh]
            fetched[(s, sh)] = fetch_samples(url, idx)
            missing = sorted(idx - fetched[(s, sh)].keys())
            if missing:
                raise DataError(f"cannot resume: samples {missing[:5]} of shard {url} (source "
                                f"{self.spec.sources[s].name!r}) are gone; the shards changed since the checkpoint")

        def raw_for(s: int, e: int, sh: int, i: int) -> dict[str, Any]:
            return self.streams[s].annotate(dict(fetched[(s, sh)][i]), e, sh, i)

        for stream in self.streams:
            stream.buffer = [raw_for(stream.source.index, e, sh, i) for e, sh, i in stream.buffer_refs]
        for ref in pending:
            raw = raw_for(*ref)
            try:
                sample = self._finish(self.spec.sample_fn(raw), raw)
            except BAD_SAMPLE_ERRORS as e:
                raise DataError(f"cannot resume: held sample {raw['__key__']!r} of {raw['__url__']} no longer "
                                f"decodes ({e}); sample_fn must be deterministic") from None
            if self.batcher.add(sample) is not None:
                raise DataError("cannot resume: re-adding the batcher's held samples emitted a batch; the batcher "
                                "must depend only on the arrival order of samples")

    # -- iteration ---------------------------------------------------------------------------------
    def _finish(self, sample: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(sample, dict):
            raise TypeError(f"sample_fn must return a dict, got {type(sample).__name__}")
        sample = dict(sample)
        sample["__ref__"] = raw["__ref__"]
        sample["__key__"] = f"{raw['__source__']}/{os.path.basename(raw['__url__'])}/{raw['__key__']}"
        return sample

    def _choose(self) -> int:
        if len(self.streams) == 1:
            return 0
        return min(int(np.searchsorted(self._cum, self._blend.random(), side="right")), len(self.streams) - 1)

    def _bad(self, name: str, raw: dict[str, Any], err: BaseException) -> None:
        self.counters[f"{name}/bad"] = self.counters.get(f"{name}/bad", 0) + 1
        self._budget_bad += 1
        where = (raw.get("__url__", "?"), raw.get("__key__", "?"))
        if where not in self._logged:
            self._logged.add(where)
            log.warning("data: bad sample skipped: source %r shard %s key %r: %s: %s", name, where[0], where[1],
                        type(err).__name__, err)
        self._check_budget(name, where, err)

    def _check_budget(self, name: str, where: tuple[str, str], err: BaseException) -> None:
        seen = self._budget_seen + self._budget_bad
        if seen >= MIN_SAMPLES_FOR_BUDGET and self._budget_bad > self.spec.max_bad_fraction * seen:
            raise DataError(
                f"too many bad samples: {self._budget_bad} of {seen} read by rank {self.slot.rank} worker "
                f"{self.slot.worker} exceed data.max_bad_fraction={self.spec.max_bad_fraction}; last one: "
                f"source {name!r} shard {where[0]} key {where[1]!r}: {type(err).__name__}: {err}")

    def next_batch(self) -> dict[str, Any]:
        while True:
            s = self._choose()
            name = self.spec.sources[s].name
            raw = self.streams[s].next_raw()
            try:
                sample = self._finish(self.spec.sample_fn(raw), raw)
            except BAD_SAMPLE_ERRORS as e:
                self._bad(name, raw, e)
                continue
            self.counters[f"{name}/samples"] = self.counters.get(f"{name}/samples", 0) + 1
            self._budget_seen += 1
            batch = self.batcher.add(sample)
            if batch is not None:
                batch.pop("__ref__", None)
                return batch

    def state(self) -> dict[str, Any]:
        return {
            "sources": [s.state() for s in self.streams],
            "blend_rng": self._blend.bit_generator.state if len(self.streams) > 1 else None,
            "pending": [s["__ref__"] for s in self.batcher.pending()],
            "batcher_counters": dict(self.batcher.counters),
            "counters": dict(self.counters),
            "generation": self.generation,
        }
