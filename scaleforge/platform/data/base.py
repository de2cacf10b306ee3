"""The data interface of the runtime: a stateful iterator of micro-batches.

The trainer calls ``next()`` once per micro-batch and stores ``state_dict()`` in every checkpoint
(one per data-parallel rank). After ``load_state_dict(sd)`` the iterator must yield exactly the
micro-batches an uninterrupted run would have yielded next. ``state_dict`` must be cheap and picklable
(plain Python types and tensors).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator


class StatefulIterator(ABC):
    @abstractmethod
    def __next__(self) -> dict[str, Any]: ...

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def load_resharded_state_dict(self, states: list[dict[str, Any]]) -> str:
        """Resume from the states of ALL ranks of a run with a different number of data-parallel
        ranks (``states[r]`` is old rank r's ``state_dict()``). Returns one line saying what happens to
        the data order; the trainer prints it. Iterators that cannot do this raise a clear error."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot resume at a different data-parallel size "
            f"(checkpoint has {len(states)} ranks); resume with the same number of processes"
        )

    def metrics(self) -> dict[str, float]:
        """Counters to log (per-source sample counts, bad samples...). Cumulative values."""
        return {}

    def close(self) -> None:
        """Stop worker processes."""
