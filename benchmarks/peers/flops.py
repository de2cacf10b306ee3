"""The one FLOPs-per-token formula every throughput figure in benchmarks/ uses (torchtitan's convention):

    flops_per_token = 6 * N + 12 * L * H * d_head * S

N: the parameters that take part in matrix multiplies, i.e. every parameter except the token (and
learned position) embeddings, the output projection included; L layers, H query heads of d_head, S
tokens per sequence. The attention term is not halved for causality. This is the formula of the llm
recipe (``LLMRecipe.flops_per_sample`` / S), so ours and every peer are measured on one scale.
"""
from __future__ import annotations

#: H100 / H200 SXM dense BF16 tensor-core peak (TFLOP/s), the MFU denominator unless a measured ceiling is given.
PEAK_BF16_TFLOPS = 989.0


def flops_per_token(matmul_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * matmul_params + 12.0 * n_layers * n_heads * head_dim * seq_len


def mfu(tokens_per_s_per_gpu: float, flops_per_tok: float, peak_tflops: float = PEAK_BF16_TFLOPS) -> float:
    return tokens_per_s_per_gpu * flops_per_tok / (peak_tflops * 1e12)
