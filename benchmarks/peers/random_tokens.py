"""Random-token data for the torchtitan runners: the GPU machines have no internet, and the number of tokens, not
their text, sets a step's cost. Free of torchtitan, so each runner keeps only its version's wiring."""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset


class RandomTokens(IterableDataset):
    """Endless ``(inputs, labels)`` samples of ``seq`` random ids, seeded by data-parallel rank; ``positions``
    adds the position ids torchtitan 0.3.0's samples carry."""

    def __init__(self, vocab: int, seq: int, rank: int, positions: bool = False):
        self.vocab, self.seq, self.rank, self.positions = vocab, seq, rank, positions

    def __iter__(self):
        g = torch.Generator().manual_seed(1 + self.rank)
        while True:
            ids = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
            inputs = {"input": ids[:-1]}
            if self.positions:
                inputs["positions"] = torch.arange(self.seq)
            yield inputs, ids[1:]


class TokenIdsOnly:
    """The tokenizer methods of a stand-in whose data are token ids already (mixed into torchtitan's
    ``BaseTokenizer``); ``vocab_size`` is set by the subclass."""

    vocab_size: int

    def encode(self, *args, **kwargs) -> list[int]:
        raise NotImplementedError("random tokens only")

    def decode(self, *args, **kwargs) -> str:
        raise NotImplementedError("random tokens only")

    def get_vocab_size(self) -> int:
        return self.vocab_size
