"""Triton kernel library shared by training and inference. Imports neither ``platform`` nor ``models``.

Every public function takes ``backend="triton" | "torch"`` (None: the global switch, see
:func:`set_backend` / :func:`use_backend`); ``"torch"`` runs the plain-PyTorch reference in
``scaleforge.kernels.reference``. ``import scaleforge.kernels`` works without triton and without a GPU.
Usage and semantics: docs/kernels.md.
"""

from scaleforge.kernels._backend import get_backend, set_backend, use_backend
from scaleforge.kernels.fp8 import (
    adamw_fp8_step,
    FP8State,
    dequantize_fp8,
    dequantize_fp8_state,
    quantize_fp8,
    quantize_fp8_state,
)
from scaleforge.kernels.fp8_linear import fp8_linear
from scaleforge.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from scaleforge.kernels.linear_attention import relu_linear_attention
from scaleforge.kernels.norms import layer_norm, rms_norm
from scaleforge.kernels.swiglu import swiglu

__all__ = [
    "adamw_fp8_step",
    "FP8State",
    "dequantize_fp8",
    "dequantize_fp8_state",
    "fp8_linear",
    "fused_linear_cross_entropy",
    "get_backend",
    "layer_norm",
    "quantize_fp8",
    "quantize_fp8_state",
    "relu_linear_attention",
    "rms_norm",
    "set_backend",
    "swiglu",
    "use_backend",
]
