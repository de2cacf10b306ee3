"""Token data for the ``llm`` recipe.

``SyntheticTokenStream``: a deterministic, learnable token "language" for demos, tests and benchmarks.
Every sequence is a walk on a fixed random Markov chain over the vocabulary: each token has 4 possible
successors, taken with probabilities 0.7 / 0.15 / 0.1 / 0.05 (entropy 0.93 nats/token). A model starts
at ln(vocab) (5.55 for 256) and drops towards 0.93 as it learns the bigram table — visibly within a
few dozen steps of the tiny preset. The chain depends on the seed only; sample ``i`` of epoch ``e`` is a
pure function of ``(seed, e, i)``.

Sharding: the stream is one global sequence of samples ``k = 0, 1, 2, ...`` (epoch ``k // N``, index
``k % N`` for ``N = data.synthetic_samples``); data-parallel rank ``r`` of ``W`` takes ``k ≡ r (mod W)``.
The state is the next ``k`` of this rank, so resuming at a different ``W`` is exact too (the union of
consumed samples is always a prefix ``[0, n*W)``).

Batches use the Hugging Face label convention: ``labels`` are aligned with ``input_ids`` (not shifted);
the loss predicts ``labels[:, t+1]`` from position ``t``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scaleforge.platform.data.base import StatefulIterator

IGNORE_INDEX = -100
SUCCESSOR_PROBS = (0.7, 0.15, 0.1, 0.05)


def markov_table(vocab_size: int, seed: int) -> np.ndarray:
    """(vocab, 4) successor table of the synthetic language."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.integers(0, vocab_size, size=(vocab_size, len(SUCCESSOR_PROBS)), dtype=np.int64)


def markov_entropy() -> float:
    """Per-token entropy (nats) of the synthetic language: the loss floor."""
    p = np.asarray(SUCCESSOR_PROBS)
    return float(-(p * np.log(p)).sum())


class SyntheticTokenStream(StatefulIterator):
    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int, dp_rank: int,
                 dp_world_size: int, samples_per_epoch: int):
        if samples_per_epoch <= 0:
            raise ValueError(f"data.synthetic_samples must be positive, got {samples_per_epoch}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_world_size {dp_world_size}")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank, self.world = seed, dp_rank, dp_world_size
        self.samples_per_epoch = samples_per_epoch
        self.table = markov_table(vocab_size, seed)
        self._table_list = self.table.tolist()
        self.next_k = dp_rank  # next global sample index this rank takes

    def sample(self, k: int) -> np.ndarray:
        epoch, index = divmod(k, self.samples_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        choice = rng.choice(len(SUCCESSOR_PROBS), size=self.seq_len - 1, p=SUCCESSOR_PROBS).tolist()
        tok = int(rng.integers(0, self.vocab_size))
        succ = self._table_list
        out = [tok]
        for c in choice:
            tok = succ[tok][c]
            out.append(tok)
        return np.asarray(out, dtype=np.int64)

    def __next__(self) -> dict[str, Any]:
        rows = []
        for _ in range(self.batch_size):
            rows.append(self.sample(self.next_k))
            self.next_k += self.world
        ids = torch.from_numpy(np.stack(rows))
        return {"input_ids": ids, "labels": ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"next_k": self.next_k, "world": self.world, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world", self.world) != self.world or state.get("rank", self.rank) != self.rank:
            raise ValueError(
                f"synthetic data state is for rank {state.get('rank')} of {state.get('world')}, "
                f"this iterator is rank {self.rank} of {self.world}; use load_resharded_state_dict"
            )
        self.next_k = int(state["next_k"])

    def load_resharded_state_dict(self, states: list[dict[str, Any]]) -> str:
        # Ranks advance in lockstep, so the consumed samples are [0, n*W_old); continue from there.
        consumed = min(int(s["next_k"]) - int(s["rank"]) for s in states)
        self.next_k = consumed + self.rank
        return (f"synthetic stream continues exactly at global sample {consumed} "
                f"(now {self.world} ranks, rank r takes samples k = r mod {self.world})")

    def metrics(self) -> dict[str, float]:
        return {"data/samples": float((self.next_k - self.rank) // self.world)}


class VocabularyError(RuntimeError):
    """A token id outside the model's vocabulary: a data/config mismatch, not a bad sample."""


def decode_token_sample(raw: dict, vocab_size: int) -> dict:
    """webdataset sample with ``tokens.npy`` -> ``{"input_ids"}``; checks ids against the vocabulary
    (raising VocabularyError, which stops training, since every sample would fail the same way)."""
    from scaleforge.platform.data import decode_tokens

    sample = decode_tokens(raw)
    ids = sample["input_ids"]
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise VocabularyError(
            f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r}: token ids in "
            f"[{int(ids.min())}, {int(ids.max())}] but model.vocab_size={vocab_size}"
        )
    return sample
