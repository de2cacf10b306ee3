"""FP8 all-gather of COAT's FP8-linear weights under FSDP2 (``parallel.fp8_all_gather``; torchao's float8
all-gather, built on FSDP2's all-gather extension hooks).

Each rank quantizes its fp32 shard of an FP8 linear's weight, cast to the compute dtype, to per-tensor E4M3
codes with the scale of the whole weight (max|w| all-reduced over the shard group), and FSDP gathers the
codes: 1 byte per parameter on the wire instead of 2. On arrival the codes are dequantized into the
unsharded compute-dtype weight that :class:`scaleforge.fp8.FP8Linear` reads, and that linear quantizes it
again with the same per-tensor rule. Requantizing a dequantized per-tensor E4M3 tensor gives back its codes
and its scale (the dequantized values sit within a bf16 rounding of the codes, far inside E4M3's half-step),
so the GEMMs see exactly the operands they would without this option: training is unchanged, only the
all-gather shrinks.

Each gather all-reduces its weight's max|w| first (4 bytes, MAX over the shard group), as torchao does without
its precomputed scales: a scale kept from an earlier pass could be stale, and deciding per rank whether to
refresh it could leave one rank in a collective the others skip.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from scaleforge.kernels import dequantize_fp8, quantize_fp8

aten = torch.ops.aten
E4M3 = torch.float8_e4m3fn

#: ops whose output stays a wrapped weight: what FSDP2 does to a parameter while sharding it, materializing
#: it (``to_empty``) and padding it; everything else (optimizer math, EMA clones, checkpoint copies) gets
#: plain tensors
_PRESERVED = {
    aten.empty_like.default, aten.new_zeros.default, aten.new_empty.default, aten.slice.Tensor,
    aten.narrow.default, aten.view.default, aten.as_strided.default, aten.split.Tensor, aten.detach.default,
    aten.alias.default,
}


class FP8AllGatherWeight(torch.Tensor):
    """A weight shard (plain tensor ``data``) whose FSDP2 all-gather sends per-tensor E4M3 codes."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            layout=data.layout, device=data.device, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor):
        self._data = data

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol):
        # saved (torch.save, DCP's checkpoint files) as the plain shard: checkpoints load without this class
        # and with or without parallel.fp8_all_gather
        return self._data.__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"FP8AllGatherWeight({self._data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = func(*tree_map_only(cls, _plain, args), **tree_map_only(cls, _plain, kwargs or {}))
        if func._schema.is_mutable and args and isinstance(args[0], cls):
            return args[0]  # in-place on the shard (optimizer step, checkpoint load): the wrapper itself
        if func not in _PRESERVED:
            return out
        return tree_map_only(torch.Tensor, cls, out)

    def local_amax(self) -> torch.Tensor:
        """max|w| of this shard, fp32 (0 for an empty shard); the caller rounds it to the compute dtype."""
        if self._data.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=self._data.device)
        return self._data.detach().abs().amax().float()

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.dtype
        amax = self.local_amax()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        # The amax of the compute-dtype weight: casting rounds monotonically, so it is the cast of max|w|
        amax = amax.to(dtype).float()
        codes, scale = quantize_fp8(self._data.detach().to(dtype), "tensor", dtype=E4M3, amax=amax)
        rows = -(-outer_size[0] // mesh.size())  # FSDP2's padded shard: ceil(rows / shards)
        if codes.shape[0] < rows:
            codes = torch.cat([codes, codes.new_zeros(rows - codes.shape[0], *codes.shape[1:])])
        return (codes.view(torch.uint8),), (scale, dtype)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (codes,) = all_gather_outputs
        scale, dtype = metadata
        weight = dequantize_fp8(codes.view(E4M3), scale, "tensor", out_dtype=dtype)
        codes.untyped_storage().resize_(0)  # the codes are spent: FSDP allocates them again for the next gather
        if out is not None:  # FSDP's unsharded parameter, storage allocated again: refill it as FSDP's copy-out
            # does, without a version bump (autograd may hold the parameter from a forward of this step)
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(weight[:out.shape[0]])
            return None
        return weight, (weight,)


def _plain(t: FP8AllGatherWeight) -> torch.Tensor:
    return t._data


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under a wrapped shard (for kernels that take raw storage); other tensors as they are."""
    return t._data if isinstance(t, FP8AllGatherWeight) else t


def wrap_fp8_linear_weights(model: nn.Module) -> int:
    """Wrap the weight of every :class:`scaleforge.fp8.FP8Linear` (after :func:`scaleforge.fp8.convert_to_coat`,
    before ``fully_shard``) so FSDP2 gathers it in FP8; returns how many were wrapped."""
    from scaleforge.fp8 import FP8Linear

    count = 0
    for mod in model.modules():
        if isinstance(mod, FP8Linear) and not isinstance(mod.weight.data, FP8AllGatherWeight):
            mod.weight = nn.Parameter(FP8AllGatherWeight(mod.weight.data), requires_grad=mod.weight.requires_grad)
            count += 1
    return count
