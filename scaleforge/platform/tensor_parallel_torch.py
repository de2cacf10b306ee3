"""Megatron-core's tensor- and sequence-parallel layers, rebuilt on torch.distributed alone, for the devices
megatron-core does not run on (it needs CUDA): CPU workers with gloo, so tests and CI run ``parallel.tp > 1``
end to end. The same math as megatron's mappings and layers (``megatron.core.tensor_parallel``), with the
interface ``tensor_parallel.py`` gives its megatron layers: one output tensor, ``[batch, sequence, hidden]``
activations, the plain modules' parameter names (``weight``, ``bias``) holding this rank's slice.

- ``split_sequence`` / ``gather_sequence``: this rank's 1/T of the tokens (backward: all-gather of the
  gradient) / all tokens (backward: reduce-scatter, which also sums the partial input gradients of the
  column-parallel linears that read the gathered input);
- ``ColumnParallelLinear``: out_features / T rows; its input is already gathered, so it is a plain linear;
- ``RowParallelLinear``: in_features / T columns; its partial outputs are reduce-scattered over the
  sequence (summed over tp, each rank keeping its tokens), then the bias is added;
- ``VocabParallelEmbedding``: the rank's vocabulary rows; ids outside them give zeros, then an
  all-reduce (backward: identity) gives every rank the full embeddings;
- ``vocab_parallel_cross_entropy``: per-token cross-entropy from logits split over the vocabulary (max,
  target logit and sum of exponentials all-reduced; backward: softmax minus one-hot on the rank's slice).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)
    return out.movedim(0, dim)


def _local_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _local_chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def split_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return _Split.apply(x, group, dim)


def gather_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return _Gather.apply(x, group, dim)


class ColumnParallelLinear(nn.Linear):
    """``out_features / T`` output features (its input is gathered over the sequence by the seam)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group):
        super().__init__(in_features, out_features // dist.get_world_size(group), bias=bias)
        self.group = group


class RowParallelLinear(nn.Module):
    """``in_features / T`` input features; partial outputs reduce-scattered over the sequence (dimension
    ``seq_dim``), then the bias (held whole by every rank) added."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, seq_dim: int):
        super().__init__()
        self.group, self.seq_dim = group, seq_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features // dist.get_world_size(group)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if dist.get_world_size(self.group) > 1:
            y = _ReduceScatter.apply(y, self.group, self.seq_dim)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, group):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.per_rank = group, num_embeddings // size
        self.start = rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return _AllReduce.apply(out, self.group) if dist.get_world_size(self.group) > 1 else out


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        per_rank = logits.shape[-1]
        start = dist.get_rank(group) * per_rank
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + per_rank)
        local = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - predicted

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """Per-token cross-entropy ``[...]`` of ``logits [..., V/T]`` (this rank's vocabulary slice) against
    ``target [...]`` (global vocabulary ids); the same values on every tp rank."""
    return _VocabParallelCrossEntropy.apply(logits, target, group)
