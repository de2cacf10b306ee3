"""Plain-PyTorch references for every kernel family (fp32 math, the semantics the kernels must match)."""

from scaleforge.kernels.reference.fp8 import (
    FP8State,
    dequantize_fp8_ref,
    dequantize_fp8_state_ref,
    fp8_max,
    quantize_fp8_ref,
    quantize_fp8_state_ref,
)
from scaleforge.kernels.reference.fp8_linear import fp8_linear_ref
from scaleforge.kernels.reference.linear_attention import relu_linear_attention_ref
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

__all__ = [
    "FP8State",
    "dequantize_fp8_ref",
    "dequantize_fp8_state_ref",
    "fp8_linear_ref",
    "fp8_max",
    "layer_norm_ref",
    "quantize_fp8_ref",
    "quantize_fp8_state_ref",
    "relu_linear_attention_ref",
    "rms_norm_ref",
]
