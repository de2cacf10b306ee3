"""Activation-memory measurement for the dry-run estimate: the bytes autograd saves for backward,
counted with saved-tensor hooks on a small probe forward on CPU (no GPU, no process group)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn`` (a forward returning a loss).
    Parameters (and views of them, e.g. a transposed weight) are not activations and are not counted."""
    seen: dict[int, int] = {}
    param_storages = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in param_storages:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
