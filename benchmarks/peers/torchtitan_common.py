"""What the torchtitan runners share, free of torchtitan so each runner keeps only its version's wiring: random-token
data (the GPU machines have no internet, and the number of tokens, not their text, sets a step's cost) and the
result line compare.py reads."""
from __future__ import annotations

import json
import os
import statistics

import torch

from flops import flops_per_token, mfu
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


def print_result(stack: str, model: torch.nn.Module, dims: dict, micro_batch: int, step_times: list[float],
                 warmup: int, peak_bytes: float) -> None:
    """The ``RESULT {json}`` line (rank 0) of a torchtitan run: tokens/s/GPU from the median step after
    ``warmup``, MFU by the one FLOPs formula over the parameters outside the token embedding. ``dims``: n_layers,
    n_heads, dim, seq."""
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    fpt = flops_per_token(n_matmul, dims["n_layers"], dims["n_heads"], dims["dim"] // dims["n_heads"], dims["seq"])
    tps = micro_batch * dims["seq"] / statistics.median(step_times[warmup:])
    res = {"stack": stack, "steps_timed": len(step_times), "params_matmul": n_matmul, "flops_per_token": fpt,
           "tokens_per_s_per_gpu": tps, "mfu": mfu(tps, fpt), "peak_mem_gib": peak_bytes / 2**30}
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(res), flush=True)
