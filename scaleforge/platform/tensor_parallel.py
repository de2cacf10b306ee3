"""Megatron-core tensor parallelism, with sequence parallelism, applied from outside a plain model.

``parallel.tp = T > 1`` adds an innermost ``tp`` dimension to the device mesh (the T ranks of one group
are consecutive, so they share a host and its NVLink); FSDP2 shards over the data-parallel dimensions
only. The recipe's ``TensorParallelPlan`` names the modules; this module swaps them, on the meta
device and before FSDP, for megatron-core layers over the mesh's ``tp`` process group (on CUDA; megatron-core
needs it, so CPU workers get the same layers on torch.distributed alone, ``tensor_parallel_torch.py``):

- column-parallel linears (q/k/v, MLP gate/up) hold 1/T of the output features; attention modules
  see 1/T of the heads (``head_attrs`` are divided);
- row-parallel linears (attention output, MLP down) hold 1/T of the input features and
  reduce-scatter their output over the sequence;
- the embedding is megatron's ``VocabParallelEmbedding``; the output projection is column-parallel
  over the vocabulary and the loss is ``vocab_parallel_cross_entropy``, so full logits never exist (called
  with labels, the head computes the summed loss itself, in recomputed chunks);
- sequence parallelism (Korthikanti et al., 2022): from ``sequence_entry`` on, the residual stream,
  norms and (any) dropout hold 1/T of the tokens; the input of each ``sequence_gather`` module is
  all-gathered (its gradient reduce-scattered) once, shared by q, k and v (and gate and up).

Megatron's sequence-parallel collectives work on the first dimension ([s, b, h]); the models keep
[b, s, h], so the seams transpose (free for micro-batch 1). Norm weights (and any other parameter not
split) see only their rank's tokens, so their gradients are summed over the tp group after every
backward (one coalesced all-reduce of the new contribution, exact under gradient accumulation).

Parameters stay plain tensors holding the rank's slice (megatron's layers require that), which FSDP2
shards over the data-parallel mesh. Checkpoints and exports see the global tensors: ``checkpoint_view``
turns each tp-split state entry into a DTensor over the full mesh (the tp dimension ``Shard(d)``, the
data-parallel one FSDP's ``Shard(0)``, strided where both split dimension 0, as FSDP2 itself records
FSDP x TP), so DCP reshards between tp sizes; ``full_state_dict`` gathers the tp slices for export.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from scaleforge.platform.config import ConfigError
from scaleforge.platform.recipe import TensorParallelPlan

_SEQ_DIM = 1  # the models' activations are [batch, sequence, hidden]


def _matching(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    found = [(name, m) for name, m in model.named_modules()
             if name and fnmatch.fnmatchcase(name, pattern) and name.count(".") == pattern.count(".")]
    if not found:
        raise ConfigError(f"parallel.tp: the recipe's tensor-parallel plan names {pattern!r}, which matches "
                          f"no module of the model")
    return found


def check_tensor_parallel(model: nn.Module, plan: TensorParallelPlan | None, tp: int, recipe: str) -> None:
    """Everything that must divide by ``tp`` does, named in a one-line error; run on the meta model by
    the launcher before any worker starts."""
    if tp == 1:
        return
    if plan is None:
        raise ConfigError(f"parallel.tp={tp}: the {recipe} recipe has no tensor-parallel plan (use parallel.tp=1)")

    def need(value: int, what: str) -> None:
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {what} ({value})")

    for pattern, attrs in plan.head_attrs.items():
        name, m = _matching(model, pattern)[0]
        for attr in attrs:
            need(getattr(m, attr), f"{name}.{attr}")
    for pattern in plan.column:
        for name, m in _matching(model, pattern)[:1]:
            need(m.out_features, f"the output features of {name}")
    for pattern in plan.row:
        for name, m in _matching(model, pattern)[:1]:
            need(m.in_features, f"the input features of {name}")
    for name in filter(None, (plan.vocab_embedding, plan.vocab_output)):
        m = _matching(model, name)[0][1]
        need(m.weight.shape[0], f"the vocabulary of {name} (pad model.vocab_size)")
    if plan.sequence_length is not None:
        need(plan.sequence_length, "the tokens per row (model.seq_len), split by sequence parallelism")


def split_parameters(model: nn.Module, plan: TensorParallelPlan) -> set[str]:
    """FQNs of the parameters the plan splits over tp (for the dry-run memory estimate; megatron-core
    is not needed)."""
    names: set[str] = set()
    for pattern in plan.column + tuple(filter(None, (plan.vocab_embedding, plan.vocab_output))):
        for name, m in _matching(model, pattern):
            names.update(n for n, _ in m.named_parameters(prefix=name))
    for pattern in plan.row:
        for name, m in _matching(model, pattern):
            names.add(f"{name}.weight")
    return names


def backend_for(device: torch.device) -> str:
    """``megatron`` (megatron-core's layers) on CUDA devices; ``torch`` (``tensor_parallel_torch``: the
    same layers on torch.distributed alone) elsewhere, since megatron-core needs CUDA."""
    return "megatron" if device.type == "cuda" else "torch"


# ---------------------------------------------------------------------------------------------------
# Sequence-parallel seams ([b, s, h] in the models, megatron's collectives split dimension 0)
# ---------------------------------------------------------------------------------------------------
def split_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's 1/T of the tokens (backward: all-gather of the gradient)."""
    if not x.is_cuda:
        from scaleforge.platform.tensor_parallel_torch import split_sequence as split

        return split(x, group, _SEQ_DIM)
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(x.transpose(0, _SEQ_DIM), group=group).transpose(0, _SEQ_DIM)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All tokens from the tp ranks' slices (backward: reduce-scatter of the gradient, which also sums
    the partial input gradients of the column-parallel linears that read it)."""
    if not x.is_cuda:
        from scaleforge.platform.tensor_parallel_torch import gather_sequence as gather

        return gather(x, group, _SEQ_DIM)
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    y = gather_from_sequence_parallel_region(x.transpose(0, _SEQ_DIM).contiguous(), True, group=group)
    return y.transpose(0, _SEQ_DIM)


def _replace_first_arg(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, kwargs):
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    return hook


# ---------------------------------------------------------------------------------------------------
# Megatron layers with the plain modules' interface (one output tensor, [b, s, h] activations)
# ---------------------------------------------------------------------------------------------------
class _PlainStateDict:
    """The state dict of the plain module (``weight``, ``bias``): megatron's linears add an empty
    ``_extra_state`` entry (Transformer Engine compatibility) that HF export, DCP checkpoints and
    ``load_state_dict`` between plain and tensor-parallel models would otherwise carry."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hooks(self) -> None:
        self._load_state_dict_pre_hooks.clear()


class _VocabParallelHead:
    """The output projection split over the vocabulary. ``forward(h)``: this rank's slice of the logits.
    ``forward(h, labels=..., chunk_size=...)``: the summed cross-entropy (fp32) of the tokens whose label
    (aligned with ``h``; -100: none) is set, ``chunk_size`` tokens at a time with each chunk's logits
    recomputed in backward (``chunk_size <= 0``: all at once), the same value on every tp rank."""

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 0) -> torch.Tensor:
        if labels is None:
            return self.logits(h)
        from torch.utils.checkpoint import checkpoint

        h, labels = h.reshape(1, -1, h.shape[-1]), labels.reshape(1, -1)
        n = h.shape[1]
        if chunk_size <= 0 or chunk_size >= n:
            return self._summed_loss(h, labels)
        total = h.new_zeros((), dtype=torch.float32)
        for hs, ls in zip(h.split(chunk_size, dim=1), labels.split(chunk_size, dim=1)):
            total = total + checkpoint(self._summed_loss, hs, ls, use_reentrant=False)
        return total

    def _summed_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_aligned_cross_entropy(self.logits(h), labels, self.vocab_group)


def _torch_layer_factories(group) -> tuple[Callable, Callable, Callable, Callable]:
    from scaleforge.platform import tensor_parallel_torch as T

    class Head(_VocabParallelHead, T.ColumnParallelLinear):
        def logits(self, h):
            return T.ColumnParallelLinear.forward(self, h)

    def head(lin):
        m = Head(lin.in_features, lin.out_features, lin.bias is not None, group)
        m.vocab_group = group
        return m

    return (lambda lin: T.ColumnParallelLinear(lin.in_features, lin.out_features, lin.bias is not None, group),
            lambda lin: T.RowParallelLinear(lin.in_features, lin.out_features, lin.bias is not None, group, _SEQ_DIM),
            lambda emb: T.VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, group),
            head)


def _megatron_layer_factories(group) -> tuple[Callable, Callable, Callable, Callable]:
    from megatron.core import ModelParallelConfig

    size = group.size()
    common = dict(tensor_model_parallel_size=size, params_dtype=torch.float32, use_cpu_initialization=True,
                  perform_initialization=False, gradient_accumulation_fusion=False)
    column_cfg = ModelParallelConfig(sequence_parallel=False, **common)  # seams gather their input
    row_cfg = ModelParallelConfig(sequence_parallel=size > 1, **common)  # reduce-scatter over the sequence
    Column, Row, Embedding = _layer_classes()

    class Head(_VocabParallelHead, Column):
        def logits(self, h):
            return Column.forward(self, h)

    def column(lin, cls=Column):
        m = cls(lin.in_features, lin.out_features, config=column_cfg, init_method=_no_init,
                bias=lin.bias is not None, gather_output=False, disable_grad_reduce=True, tp_group=group)
        m.vocab_group = group
        return m

    return (column,
            lambda lin: Row(lin.in_features, lin.out_features, config=row_cfg, init_method=_no_init,
                            bias=lin.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=group),
            lambda emb: Embedding(emb.num_embeddings, emb.embedding_dim, init_method=_no_init, config=column_cfg,
                                  tp_group=group),
            lambda lin: column(lin, Head))


def _layer_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class ColumnParallel(_PlainStateDict, ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._drop_extra_state_hooks()

        def forward(self, x):  # input already gathered over the sequence (``sequence_gather``)
            return super().forward(x)[0]

    class RowParallel(_PlainStateDict, RowParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._drop_extra_state_hooks()

        def forward(self, x):
            if not self.sequence_parallel:  # tp = 1
                return super().forward(x)[0]
            return super().forward(x.transpose(0, _SEQ_DIM))[0].transpose(0, _SEQ_DIM)

    class VocabEmbedding(_PlainStateDict, VocabParallelEmbedding):
        """Full-sequence output (all-reduced over tp); ``sequence_entry`` splits it after the model
        has read the sequence length for positions and masks."""

    return ColumnParallel, RowParallel, VocabEmbedding


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's init hook, unused: the engine initializes the full model and copies slices."""


@dataclass
class TensorParallel:
    """The applied tensor parallelism of one model: which parameters are split (and along which
    dimension), the tp group, and the conversions between rank slices and global tensors."""

    group: Any
    size: int
    rank: int
    split_dims: dict[str, int] = field(default_factory=dict)  # parameter FQN -> dimension split over tp
    partial_grads: set[str] = field(default_factory=set)  # FQNs whose gradients cover the rank's tokens only
    dp_placements: tuple = ()  # FSDP's placements on the data-parallel mesh (set after fully_shard)
    mesh: Any = None  # the full (data-parallel x tp) mesh, for global views

    # -- slices ---------------------------------------------------------------------------------------
    def local_slice(self, fqn: str, full: torch.Tensor) -> torch.Tensor:
        d = self.split_dims.get(fqn)
        return full if d is None else full.chunk(self.size, dim=d)[self.rank]

    def is_split(self, fqn: str) -> bool:
        return fqn in self.split_dims

    # -- gradients of parameters every tp rank holds (norm weights) ------------------------------------
    def replicated_grads(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """(parameter, a copy of its current local gradient) for every trainable parameter of the
        sequence-parallel region that is not split over tp; ``sum_replicated_grads`` adds the other
        ranks' new contributions after backward."""
        out = []
        for name, p in model.named_parameters():
            if p.requires_grad and name in self.partial_grads:
                g = p.grad
                out.append((p, None if g is None else getattr(g, "_local_tensor", g).clone()))
        return out

    def sum_replicated_grads(self, before: list[tuple[nn.Parameter, torch.Tensor | None]]) -> None:
        import torch.distributed as dist

        if self.size == 1:
            return
        locs, deltas = [], []
        for p, old in before:
            if p.grad is None:
                continue
            g = getattr(p.grad, "_local_tensor", p.grad)
            locs.append((g, old))
            deltas.append((g if old is None else g - old).reshape(-1).float())
        if not deltas:
            return
        flat = torch.cat(deltas)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g, old in locs:
            n = g.numel()
            new = flat[offset:offset + n].view_as(g).to(g.dtype)
            g.copy_(new if old is None else old + new)
            offset += n

    # -- checkpoints: global views for DCP (reshardable between tp sizes) ------------------------------
    def _global_placements(self, d: int) -> tuple:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        dp = []
        for pl in self.dp_placements:
            if isinstance(pl, Shard) and pl.dim == d:
                # FSDP split this rank's tp slice: the tp split is the outer one, as FSDP2 records FSDP x TP
                dp.append(_StridedShard(d, split_factor=self.size))
            else:
                dp.append(pl)
        return tuple(dp) + (Shard(d),)

    def to_global(self, fqn: str, t: Any) -> Any:
        from torch.distributed.tensor import DTensor

        d = self.split_dims.get(fqn)
        if d is None or not isinstance(t, DTensor) or t.ndim == 0:
            return t
        shape = list(t.shape)
        shape[d] *= self.size
        return DTensor.from_local(t.to_local(), self.mesh, self._global_placements(d), run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())

    def to_local(self, fqn: str, t: Any, dp_mesh) -> Any:
        from torch.distributed.tensor import DTensor

        d = self.split_dims.get(fqn)
        if d is None or not isinstance(t, DTensor) or t.device_mesh is not self.mesh:
            return t
        shape = list(t.shape)
        shape[d] //= self.size
        return DTensor.from_local(t.to_local(), dp_mesh, self.dp_placements, run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())

    def checkpoint_view(self, state: dict[str, Any], convert) -> dict[str, Any]:
        """``{"model": {fqn: t}, "optim": {"state": {fqn: {k: t}}, ...}}`` with ``convert(fqn, t)``
        applied to every tensor entry (``to_global`` for saving, ``to_local`` after loading)."""
        model = {k: convert(k, v) for k, v in state["model"].items()}
        optim = dict(state["optim"])
        optim["state"] = {fqn: {k: convert(fqn, v) for k, v in s.items()}
                          for fqn, s in state["optim"].get("state", {}).items()}
        return {**state, "model": model, "optim": optim}

    # -- export ----------------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
        """The unsharded model on rank 0's CPU: data-parallel shards gathered by DTensor, tp slices by
        an all-gather over the tp group, one tensor at a time (every rank takes part)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        out = {}
        for name, t in model.state_dict().items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            d = self.split_dims.get(name)
            if d is not None and self.size > 1:
                parts = [torch.empty_like(full) for _ in range(self.size)]
                dist.all_gather(parts, full.contiguous(), group=self.group)
                full = torch.cat(parts, dim=d)
            if is_main:
                out[name] = full.cpu()
        return out


def apply_tensor_parallel(model: nn.Module, plan: TensorParallelPlan, group, device: torch.device,
                          backend: str = "megatron") -> TensorParallel:
    """Swap the plan's modules for tensor-parallel layers over ``group`` (on ``device``, usually meta):
    megatron-core's (``backend="megatron"``, CUDA) or their torch.distributed equivalents
    (``backend="torch"``, any device; ``backend_for``), and install the sequence-parallel seams; returns
    what the engine needs to shard, initialize, checkpoint and export the model."""
    size, rank = group.size(), group.rank()
    check_tensor_parallel(model, plan, size, "this")
    sp = size > 1
    column, row, embedding, head = (_megatron_layer_factories if backend == "megatron" else _torch_layer_factories)(group)
    tp = TensorParallel(group, size, rank)

    def swap(name: str, new: nn.Module, dim: int) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        for pname, _ in new.named_parameters(prefix=name):
            tp.split_dims[pname] = 0 if pname.endswith(".bias") else dim

    with torch.device(device):
        for pattern in plan.column:
            for name, lin in _matching(model, pattern):
                swap(name, column(lin), 0)
        for pattern in plan.row:
            for name, lin in _matching(model, pattern):
                swap(name, row(lin), 1)
                if lin.bias is not None:  # added after the reduction: held whole by every rank
                    tp.split_dims.pop(f"{name}.bias")
        if plan.vocab_embedding:
            swap(plan.vocab_embedding, embedding(model.get_submodule(plan.vocab_embedding)), 0)
        if plan.vocab_output:
            swap(plan.vocab_output, head(model.get_submodule(plan.vocab_output)), 0)
    _retie(model)
    for pattern in plan.sequence_modules:
        for name, m in _matching(model, pattern):
            tp.partial_grads.update(n for n, _ in m.named_parameters(prefix=name) if n not in tp.split_dims)
    for pattern, attrs in plan.head_attrs.items():
        for _, m in _matching(model, pattern):
            for attr in attrs:
                setattr(m, attr, getattr(m, attr) // size)
    if sp:
        for _, m in _matching(model, plan.sequence_entry):
            m.register_forward_pre_hook(_replace_first_arg(lambda x: split_sequence(x, group)), with_kwargs=True)
        for pattern in plan.sequence_gather:
            for _, m in _matching(model, pattern):
                m.register_forward_pre_hook(_replace_first_arg(lambda x: gather_sequence(x, group)),
                                            with_kwargs=True)
    model._tensor_parallel_group = group  # read by vocab_parallel_group (the recipe's loss)
    return tp


def _retie(model: nn.Module) -> None:
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def vocab_parallel_group(model: nn.Module):
    """The tp group when ``model``'s logits are split over the vocabulary, else None."""
    return getattr(model, "_tensor_parallel_group", None)


def vocab_parallel_summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                        ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy (fp32) summed over tokens whose label is not ``ignore_index``, from
    logits split over the vocabulary and labels aligned with the inputs (HF convention, shifted here)."""
    return vocab_parallel_aligned_cross_entropy(logits[:, :-1], labels[:, 1:], group, ignore_index)


def vocab_parallel_aligned_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group,
                                         ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy (fp32) of ``logits [b, s, V/T]`` (this rank's vocabulary slice) against ``targets [b, s]``
    (already shifted), summed over targets that are not ``ignore_index``: megatron-core's
    ``vocab_parallel_cross_entropy`` on CUDA, ``tensor_parallel_torch``'s elsewhere (max, sum of
    exponentials and target logit all-reduced over the tp group; the same value on every tp rank)."""
    valid = targets != ignore_index
    # megatron views the logits as 2-D: the slice must be made contiguous (``.float()`` copies bf16 logits
    # but returns fp32 ones as the strided slice itself)
    logits = logits.float().contiguous()
    target = torch.where(valid, targets, 0)
    if logits.is_cuda:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        per_token = vocab_parallel_cross_entropy(logits, target, tp_group=group)
    else:
        from scaleforge.platform.tensor_parallel_torch import vocab_parallel_cross_entropy

        per_token = vocab_parallel_cross_entropy(logits, target, group)
    return (per_token * valid).sum()
