"""Reference SANA ReLU linear attention (``sana_blocks.py::LiteLA.attn_matmul``; sana.md §3).

Implements the padded-ones trick exactly as upstream: V gets a row of ones, one product [V;1]·φ(K)ᵀ gives
the d×d state plus Σ_j φ(k_j), the product with φ(Q) gives numerator and normaliser, and the division is
done in fp32 (``fp32_attention``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qk_rms_norm_across_heads(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over all H*D channels of each token for t of shape (B, H, N, D); weight (H*D,)."""
    b, h, n, d = t.shape
    if weight.shape != (h * d,):
        raise ValueError(f"qk_norm weight has shape {tuple(weight.shape)}, expected (H*D,) = ({h * d},)")
    tf = t.float().transpose(1, 2).reshape(b, n, h * d)
    tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return tf.reshape(b, n, h, d).transpose(1, 2)


def relu_linear_attention_ref(
    q, k, v, eps=1e-8, *, qk_norm_weight_q=None, qk_norm_weight_k=None, qk_norm_eps=1e-5
) -> torch.Tensor:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, H, N, D) shape; got {q.shape}, {k.shape}, {v.shape}")
    dtype = q.dtype
    if qk_norm_weight_q is not None:
        q = qk_rms_norm_across_heads(q, qk_norm_weight_q, qk_norm_eps)
    if qk_norm_weight_k is not None:
        k = qk_rms_norm_across_heads(k, qk_norm_weight_k, qk_norm_eps)
    q = F.relu(q.float())  # (B, H, N, D)
    k = F.relu(k.float())
    v = F.pad(v.float(), (0, 1), value=1.0)  # (B, H, N, D+1): the padded ones
    vk = torch.matmul(v.transpose(-1, -2), k)  # (B, H, D+1, D)
    out = torch.matmul(q, vk.transpose(-1, -2))  # (B, H, N, D+1)
    out = out[..., :-1] / (out[..., -1:] + eps)
    return out.to(dtype)
