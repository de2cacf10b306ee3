"""COAT FP8 training (``parallel.fp8=coat``; COAT, ICLR 2025): the FP8-aware building blocks models call and
the pass that switches a model into FP8 mode from outside, in the engine's parallelize step.

Linear layers (:class:`FP8Linear`): per-tensor E4M3 operands, E5M2 gradients, the input saved as FP8
(``kernels.fp8_linear``). Its input scale comes from the producer's max|x| when the producer left one on the
tensor (:func:`norm` does, from the norm kernel's ``return_amax``), so no amax pass runs over x.

Non-linear layers (:func:`norm`, :func:`act`, :func:`glu`): the tensors they would save for backward are
kept as FP8 E4M3 codes with one scale per 1 x 16 group along the channels (COAT's mixed granularity) and
dequantized in backward, which re-runs the layer's forward from them to backpropagate (an elementwise or
row-wise op, cheap next to the GEMMs). One generic mechanism (:class:`_FP8Saved`) for every such layer, not
a hand-fused copy per architecture. The quantizers and the norm run on the kernel library's backend: the
Triton kernels on GPU, the torch reference on CPU.

Models stay plain PyTorch: a module that has an FP8 path derives from :class:`FP8Block` and checks
``self.fp8`` (False unless :func:`convert_to_coat` set it); in BF16 mode the model's own code runs unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.kernels import dequantize_fp8, fp8_linear, layer_norm, quantize_fp8, rms_norm, swiglu
from scaleforge.kernels.fp8_linear import quantize_fp8_input

GROUP = 16  # COAT's 1 x 16 groups for the inputs of non-linear layers
AMAX_ATTR = "coat_amax"  # max|y| left on a tensor by its producer, read by FP8Linear
CODES_ATTR = "coat_fp8_codes"  # (FP8Input, x._version) of a tensor, shared by the FP8Linears that read it
KEPT_ATTR = "coat_kept_for_backward"  # saved by another op anyway: FP8Linear keeps it, not its codes

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class FP8Block(nn.Module):
    """A module with an FP8 path; ``fp8`` is switched on by :func:`convert_to_coat`, never by the model."""

    fp8: bool = False


class FP8Linear(nn.Linear):
    """``nn.Linear`` through ``kernels.fp8_linear`` (same parameters and names; the class is swapped in place).

    x's FP8 codes are left on x (``CODES_ATTR``), so the next FP8Linear of the same x (k and v after q, up after
    gate) reuses them: one quantization and one saved copy per input, not one per linear. An x marked by
    :func:`kept_for_backward` is saved as itself and quantized again in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = getattr(x, AMAX_ATTR, None)
        if getattr(x, KEPT_ATTR, False):
            y = fp8_linear(x, self.weight, self.bias, x_amax=amax, save_x="input")
        else:
            codes, version = getattr(x, CODES_ATTR, (None, None))
            if codes is None or version != x._version:  # an in-place change of x since: quantize again
                codes = quantize_fp8_input(x, x_amax=amax)
                setattr(x, CODES_ATTR, (codes, x._version))  # lives as long as x: freed with x after the forward
            y = fp8_linear(x, self.weight, self.bias, x_fp8=codes)
        # the FP8 GEMM writes bf16; under fp32 compute (parallel.mixed_precision=fp32) the model continues in fp32
        return y if y.dtype == x.dtype else y.to(x.dtype)


def kept_for_backward(x: torch.Tensor) -> torch.Tensor:
    """Mark x as a tensor another op already saves for backward in its own precision (the attention output,
    which SDPA's fused kernels keep), so an FP8Linear reading it saves x itself instead of 1 B/element of codes."""
    setattr(x, KEPT_ATTR, True)
    return x


# ---------------------------------------------------------------------------------------------------
class _FP8Saved(torch.autograd.Function):
    """``fn(*acts, *rest)`` whose ``acts`` are saved as FP8 1 x 16 groups instead of by autograd: forward runs
    ``fn`` without a graph; backward dequantizes ``acts``, re-runs ``fn`` with one and backpropagates.
    ``rest`` (weights, modulation, None) is saved as is. A 0-d fp32 output (an amax) has no gradient."""

    @staticmethod
    def forward(ctx, fn, n_act, *args):
        acts = args[:n_act]
        with torch.no_grad():
            out = fn(*args)
        codes = [t for a in acts for t in quantize_fp8(a.detach(), "group", GROUP)]
        ctx.save_for_backward(*codes, *args[n_act:])
        ctx.fn, ctx.n_act, ctx.dtypes = fn, n_act, [a.dtype for a in acts]
        outs = out if isinstance(out, tuple) else (out,)
        ctx.mark_non_differentiable(*[o for o in outs if o.ndim == 0])
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        n = ctx.n_act
        acts = [dequantize_fp8(saved[2 * i], saved[2 * i + 1], "group", GROUP, out_dtype=ctx.dtypes[i])
                for i in range(n)]
        inputs = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip([*acts, *saved[2 * n:]], ctx.needs_input_grad[2:])]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        outs = out if ctx.tuple_out else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.ndim > 0 and g is not None and o.requires_grad]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if wanted else ())
        return (None, None, *[next(got) if t is not None and t.requires_grad else None for t in inputs])


def _run(fn, acts: tuple, rest: tuple):
    if not torch.is_grad_enabled():
        return fn(*acts, *rest)
    return _FP8Saved.apply(fn, len(acts), *acts, *rest)


def norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         eps: float = 1e-6, *, rms: bool = True, shift: torch.Tensor | None = None,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm / LayerNorm (+ adaLN ``y * (1 + scale) + shift``) of the kernel library with its input saved in
    FP8; y carries the kernel's max|y| for the next FP8 linear (``return_amax``, COAT's group scaling)."""

    def fn(x, weight, bias, shift, scale):
        if rms:
            return rms_norm(x, weight, eps, shift=shift, scale=scale, return_amax=True)
        return layer_norm(x, weight, bias, eps, shift=shift, scale=scale, return_amax=True)

    y, amax = _run(fn, (x,), (weight, bias, shift, scale))
    setattr(y, AMAX_ATTR, amax)
    return y


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """``act(x)`` (silu, gelu, gelu_tanh, relu) with x saved in FP8."""
    return _run(ACTIVATIONS[name], (x,), ())


def act_then(x: torch.Tensor, name: str, fn: Callable[..., torch.Tensor], *rest: torch.Tensor) -> torch.Tensor:
    """``fn(act(x), *rest)`` with only x saved (FP8 1 x 16 groups) and ``rest`` (the consumer's weights) as is:
    for a consumer that would keep act(x) in bf16 for its own backward (SANA's depthwise conv: 2 B per element
    on top of act's 1.25), act(x) and fn are recomputed from x's codes in backward instead."""
    act_fn = ACTIVATIONS[name]
    return _run(lambda x, *r: fn(act_fn(x), *r), (x,), rest)


def glu(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    """``act(a) * b`` (SwiGLU with silu, GeGLU with gelu) with a and b saved in FP8: 2 x 1.25 bytes per element
    where autograd keeps a, act(a) and b in bf16 (6 bytes). SwiGLU is the kernel library's ``swiglu`` (one
    kernel forward and one backward on the GPU, fp32 inside), as the models' fused-kernel path computes it."""
    if name == "silu":
        return _run(swiglu, (a, b), ())
    fn = ACTIVATIONS[name]
    return _run(lambda a, b: fn(a) * b, (a, b), ())


class FP8LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim through :func:`norm` (swapped in place by :func:`convert_to_coat`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x, self.weight, self.bias, self.eps, rms=False)


class FP8GELU(nn.GELU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act(x, "gelu_tanh" if self.approximate == "tanh" else "gelu")


class FP8SiLU(nn.SiLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act(x, "silu")


def _swap(mod: nn.Module) -> bool:
    """Standard torch modules with an FP8 counterpart of the same parameters: swap the class in place."""
    if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
        mod.__class__ = FP8LayerNorm
    elif type(mod) is nn.GELU:
        mod.__class__ = FP8GELU
    elif type(mod) is nn.SiLU:
        mod.__class__ = FP8SiLU
    else:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
def fp8_eligible(linear: nn.Linear) -> bool:
    """FP8 GEMMs (``torch._scaled_mm``) need in and out features divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_to_coat(model: nn.Module, keep_high_precision: tuple[str, ...] = ()) -> dict[str, int]:
    """Switch ``model`` into COAT mode in place: every ``nn.Linear`` outside ``keep_high_precision`` (module-name
    prefixes) whose dims suit the FP8 GEMM becomes an :class:`FP8Linear` (same parameters, so FSDP, checkpoints
    and exports are unaffected), every :class:`FP8Block` takes its FP8 path, and ``nn.LayerNorm``, ``nn.GELU``
    and ``nn.SiLU`` modules become their FP8-saving counterparts. Returns counts for the log."""
    names = dict(model.named_modules())
    for prefix in keep_high_precision:
        if prefix not in names:
            raise ValueError(f"fp8_keep: module {prefix!r} does not exist in the model")
    counts = {"fp8_linears": 0, "high_precision_linears": 0, "fp8_blocks": 0}
    for name, mod in names.items():
        if isinstance(mod, FP8Block):
            mod.fp8 = True
            counts["fp8_blocks"] += 1
        elif _swap(mod):
            counts["fp8_blocks"] += 1
        if not isinstance(mod, nn.Linear):
            continue
        kept = any(name == p or name.startswith(p + ".") for p in keep_high_precision)
        # subclasses (e.g. an LM head that computes its loss itself) have their own forward: left alone
        if kept or type(mod) is not nn.Linear or not fp8_eligible(mod):
            counts["high_precision_linears"] += 1
        else:
            mod.__class__ = FP8Linear
            counts["fp8_linears"] += 1
    return counts
