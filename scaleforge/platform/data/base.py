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

    def metrics(self) -> dict[str, float]:
        """Counters to log (per-source sample counts, bad samples...). Cumulative values."""
        return {}

    def close(self) -> None:
        """Stop worker processes."""
