"""The small interface through which a recipe (LM, NVILA, PS3, SANA) plugs into the runtime.

The train loop knows nothing about a recipe beyond this class. A recipe:
- declares the typed dataclass of its ``model`` config section (``config_class``);
- builds its model as plain single-device PyTorch, on whatever device it is given (the runtime passes
  ``torch.device("meta")`` and materializes the sharded parameters afterwards, then calls
  ``init_weights``);
- builds its data as a stateful iterator of micro-batches (``scaleforge.platform.data.StatefulIterator``);
- computes the loss of one micro-batch (``forward_loss``);
- says how to parallelize (``parallel_plan``: the FSDP units, frozen modules, parameter groups);
- gives FLOPs per sample for MFU and exports checkpoints to serving formats.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn


@dataclass
class ParamGroupRule:
    """Parameters whose fully-qualified name starts with one of ``prefixes`` (or matches ``predicate``)
    get ``lr_mult`` times the base LR and, when ``weight_decay`` is not None, that decay."""

    name: str
    prefixes: tuple[str, ...] = ()
    predicate: Callable[[str, nn.Parameter], bool] | None = None
    lr_mult: float = 1.0
    weight_decay: float | None = None

    def matches(self, fqn: str, param: nn.Parameter) -> bool:
        if self.predicate is not None and self.predicate(fqn, param):
            return True
        return any(fqn == p or fqn.startswith(p + ".") for p in self.prefixes)


@dataclass
class ParallelPlan:
    """How the runtime should wrap a recipe's model.

    ``fsdp_units``: modules that each become one FSDP2 unit (a ``fully_shard`` call), in the order
    they run; the root module is always wrapped last. Activation checkpointing and per-block
    ``torch.compile`` are applied to ``checkpoint_units`` (defaults to ``fsdp_units``).
    ``frozen``: module-name prefixes whose parameters are frozen (``requires_grad=False``; never put in
    the optimizer, never decayed). Frozen units are sharded like any other to stay cheap in memory.
    ``param_groups``: first matching rule wins; unmatched parameters use the base LR and the default
    weight-decay rule (no decay on biases, norms and 1-D parameters).
    ``eval_modules``: frozen modules to keep in ``eval()`` mode (e.g. a frozen ViT's dropout).
    ``fp8_keep``: module-name prefixes whose ``nn.Linear`` layers stay in high precision under
    ``parallel.fp8=coat`` (output heads, embedders, adaLN modulation; linears whose dims are not multiples of
    16 stay anyway).
    """

    fsdp_units: list[nn.Module] = field(default_factory=list)
    checkpoint_units: list[nn.Module] | None = None
    frozen: tuple[str, ...] = ()
    param_groups: list[ParamGroupRule] = field(default_factory=list)
    eval_modules: tuple[str, ...] = ()
    fp8_keep: tuple[str, ...] = ()


@dataclass
class TensorParallelPlan:
    """Which modules of a recipe's plain model become megatron-core tensor-parallel layers
    (``parallel.tp > 1``; see ``scaleforge/platform/tensor_parallel.py``). Names are module paths, with
    ``*`` matching one path component (``layers.*.attention.wq``).

    ``column``: ``nn.Linear`` modules split along their output features (q/k/v, MLP gate/up);
    ``row``: split along their input features (attention output, MLP down), outputs reduce-scattered
    over the sequence. ``vocab_embedding`` / ``vocab_output``: the token embedding and the output
    projection, split along the vocabulary (the logits stay vocabulary-parallel: the recipe's loss uses
    ``vocab_parallel_summed_cross_entropy``). ``sequence_entry``: the module whose input (the
    embeddings, full sequence) is split along the sequence; from there to the modules in
    ``sequence_gather`` (attention, MLP, output projection: their input is all-gathered) activations
    and norms hold 1/tp of the tokens. ``head_attrs``: per module pattern, integer attributes the
    forward reads as local counts (query / key-value heads), divided by tp."""

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    vocab_embedding: str | None = None
    vocab_output: str | None = None
    sequence_entry: str | None = None
    sequence_gather: tuple[str, ...] = ()
    head_attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: modules inside the sequence-parallel region: their parameters that are not split (norm weights)
    #: see only the rank's tokens, so their gradients are summed over the tp group (parameters upstream
    #: of the region, e.g. a vision tower, get the full gradient on every tp rank and are left alone)
    sequence_modules: tuple[str, ...] = ()
    sequence_length: int | None = None  # tokens per row, split over the tp ranks (must divide)


@dataclass
class LossOutput:
    """Result of one micro-batch.

    ``loss`` is the SUM of per-element losses over the micro-batch (e.g. summed token cross-entropy);
    ``num_items`` is how many elements it summed (tokens with labels, samples, ...). The trainer
    all-reduces ``num_items`` over data-parallel ranks and accumulation steps and divides, so the loss
    is normalized by the global count (NVILA's token-count normalization) and gradient accumulation is
    exact. ``metrics`` holds extra scalars to log (already reduced per micro-batch; summed over the
    step's micro-batches and averaged over ranks). ``num_tokens`` feeds tokens/s when it applies.
    """

    loss: torch.Tensor
    num_items: torch.Tensor | int
    num_tokens: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class DataContext:
    """What a recipe needs to know to build its per-rank data iterator."""

    dp_rank: int
    dp_world_size: int
    micro_batch_size: int
    seed: int
    device: torch.device


class Recipe(ABC):
    """Base class of every recipe. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    #: the dataclass of the ``model`` config section (it must have a ``recipe: str`` field)
    config_class: ClassVar[type]

    def __init__(self, model_cfg: Any, job_cfg: Any):
        self.cfg = model_cfg
        self.job_cfg = job_cfg

    # -- model -----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, device: torch.device) -> nn.Module:
        """Build the model. With ``device=meta`` no memory is allocated."""

    @abstractmethod
    def init_weights(self, model: nn.Module) -> None:
        """(Re)initialize all parameters and buffers in place after ``to_empty``. Must work on
        DTensor-sharded parameters (use ``nn.init`` functions, which DTensor supports) and be
        deterministic given the torch RNG state (the runtime seeds it identically on every rank)."""

    def pretrained_source(self) -> str | None:
        """Where released weights come from (default ``model.init_from``); when not None the engine
        calls ``load_pretrained(model, source)`` after initialization. Recipes with several sources
        (e.g. one per component) return a description of them."""
        return getattr(self.cfg, "init_from", None)

    def load_pretrained(self, model: nn.Module, path: str) -> None:
        """``model.init_from=PATH``: load released weights (HF / diffusers layout) into the
        (possibly sharded) model. Default: unsupported."""
        raise NotImplementedError(f"recipe {self.name!r} cannot initialize from {path!r}")

    def parallel_plan(self, model: nn.Module) -> ParallelPlan:
        return ParallelPlan()

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan | None:
        """The megatron-core tensor-parallel layout of the model (``parallel.tp > 1``); None: the
        recipe does not support tensor parallelism."""
        return None

    # -- data and loss -----------------------------------------------------------------------------
    @abstractmethod
    def build_data(self, ctx: DataContext) -> "StatefulIterator":
        """The per-rank stream of micro-batches (dicts of tensors)."""

    @abstractmethod
    def forward_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        """Forward one micro-batch and return the summed loss (see ``LossOutput``)."""

    # -- accounting ----------------------------------------------------------------------------------
    def flops_per_sample(self, batch: Mapping[str, Any] | None = None) -> float | None:
        """Training FLOPs (forward + backward) of one sample, for MFU; None when unknown.
        Written-down formula in the recipe's docstring."""
        return None

    #: the ``parallel.fp8`` modes whose activations :meth:`activation_bytes` models (its ``fp8`` argument)
    activation_fp8_modes: tuple[str, ...] = ()

    def activation_bytes(self, micro_batch_size: int, activation_checkpointing: bool,
                         compiled: bool = False, fp8: str = "none", tp: int = 1) -> int | None:
        """Peak activation memory of one micro-batch on one device (for the dry-run memory estimate);
        None when the recipe has no model of it. ``compiled``: ``parallel.compile`` is on, so the
        compiled units save what AOTAutograd's partitioner keeps, usually less than eager autograd.
        ``fp8``: one of :attr:`activation_fp8_modes` (the plan passes no other), e.g. ``"coat"``'s
        FP8-saved activations. ``tp``: ``parallel.tp``, passed only when > 1 (to recipes with a
        tensor-parallel plan): what one tp rank keeps (sequence parallelism splits the tensor-parallel
        part's activations over the tp ranks; modules outside it keep theirs whole)."""
        return None

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Extra lines for the dry-run plan (parameters per component, tokens per sample...)."""
        return {}

    # -- export --------------------------------------------------------------------------------------
    def export_formats(self) -> tuple[str, ...]:
        return ()

    def export(self, state_dict: Mapping[str, torch.Tensor], out_dir: str, fmt: str) -> None:
        """Write a full (unsharded, CPU) model state dict to ``out_dir`` in the serving format."""
        raise NotImplementedError(f"recipe {self.name!r} has no export format {fmt!r}")


from scaleforge.platform.data.base import StatefulIterator  # noqa: E402  (type used above)

__all__ = [
    "DataContext", "LossOutput", "ParallelPlan", "ParamGroupRule", "Recipe", "StatefulIterator",
    "TensorParallelPlan",
]
