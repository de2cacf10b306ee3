"""Activation-memory measurement for the dry-run estimate: the bytes autograd saves for backward,
counted with saved-tensor hooks on a small probe forward on CPU (no GPU, no process group)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    # DTensor shards (FSDP2's sharded parameters) have no storage of their own here
    return {t.untyped_storage().data_ptr() for t in tensors if not hasattr(t, "device_mesh")}


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] | torch.nn.Module = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn`` (a forward returning a loss).
    Parameters (and views of them, e.g. a transposed weight) are not activations and are not counted.
    ``params`` may be the model itself: its parameters are then read when each tensor is saved, which
    catches the unsharded parameters FSDP2 swaps in for the forward."""
    seen: dict[int, int] = {}
    live = params if isinstance(params, torch.nn.Module) else None
    param_storages = set() if live is not None else _storage_ptrs(params)

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and (live is None or ptr not in _storage_ptrs(live.parameters())):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
