"""SANA ReLU linear attention (sana.md §3, kernels.md §2.1): Triton forward/backward, autograd wiring and
the public ``relu_linear_attention``. Reference: ``reference/linear_attention.py``.

Forward (per batch·head, φ = ReLU):  KV = Σ_j φ(k_j)ᵀ v_j (D×D) and z = Σ_j φ(k_j) (D), both fp32; then
o_i = φ(q_i)·KV / (φ(q_i)·z + eps) with the division in fp32. The state pass is split over N across
programs (partial states summed afterwards, deterministic) so B·H programs do not starve the GPU.

Backward with den_i = φ(q_i)·z + eps, o_i recomputed in fp32 from the saved state:
  dnum_i = do_i / den_i,  dden_i = -dnum_i·o_i
  dφq_i = KV·dnum_i + z·dden_i,           dKV = Σ_i φ(q_i)ᵀ dnum_i,  dz = Σ_i φ(q_i) dden_i
  dφk_j = dKV·v_j + dz,  dv_j = φ(k_j)ᵀ dKV;   dq, dk = dφ · [x > 0]
Kernel A computes dq and the partial (dKV, dz) in one pass over (q, do); kernel B computes dk, dv.
Memory traffic (bf16): forward reads q, k, v and writes o (8·N·D bytes per head), backward reads q, do, k,
v and writes dq, dk, dv (14·N·D bytes per head); the state is D² fp32 per head.
"""

from __future__ import annotations

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.linear_attention import relu_linear_attention_ref

__all__ = ["relu_linear_attention", "relu_linear_attention_ref"]


def _token_major_empty(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empty (B, H, N, D) tensor; laid out as (B, N, H, D) when t is (so a (B, N, H*D) view is free)."""
    b, h, n, d = t.shape
    dtype = t.dtype if dtype is None else dtype
    if t.stride(2) > t.stride(1):  # token stride larger than head stride: token-major producer
        return _backend.new_output((b, h, n, d), dtype, t.device, (n * h * d, d, h * d, 1))
    return _backend.new_output((b, h, n, d), dtype, t.device)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import autotune_configs, cdiv, dot_f32acc, dot_precision, kernel_op, next_pow2, num_sms

    _STATE_CHUNK = 256  # tokens per state program (multiple of every BLOCK_N below)

    @triton.autotune(
        configs=autotune_configs(
            [
                triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_N": 64}, num_warps=2, num_stages=4),
                triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
            ]
        ),
        key=["D", "CHUNK"],
    )
    @triton.jit
    def _rla_state_kernel(
        K, V, KV, Z, N, H, CHUNK, S,
        skb, skh, skn, skd, svb, svh, svn, svd,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        zacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = pid_s * CHUNK
        end = tl.minimum(start + CHUNK, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < end)[:, None] & dmask[None, :]
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=m, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=m, other=0.0)
            k = tl.where(k > 0, k, 0.0).to(v.dtype)  # keep bf16/fp16 operands for the tensor-core dot
            acc += dot_f32acc(tl.trans(k), v, PREC)
            zacc += tl.sum(k.to(tl.float32), axis=0)
        out = (pid_bh * S + pid_s) * BLOCK_D
        tl.store(KV + (out + offs_d[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(Z + out + offs_d, zacc)

    @triton.autotune(
        configs=autotune_configs(
            [
                triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=2),
                triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
            ]
        ),
        key=["D"],
    )
    @triton.jit
    def _rla_out_kernel(
        Q, KV, Z, O, N, H, eps,
        sqb, sqh, sqn, sqd, sob, soh, son, sod,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (offs_n < N)[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=m, other=0.0)
        q = tl.maximum(q.to(tl.float32), 0.0)
        kv = tl.load(KV + (pid_bh * BLOCK_D + offs_d[:, None]) * BLOCK_D + offs_d[None, :])
        z = tl.load(Z + pid_bh * BLOCK_D + offs_d)
        num = dot_f32acc(q, kv, PREC)
        den = tl.sum(q * z[None, :], axis=1) + eps
        o = num / den[:, None]
        tl.store(O + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=m)

    @triton.autotune(
        configs=autotune_configs(
            [
                triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=3),
                triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
            ]
        ),
        key=["D", "CHUNK"],
        reset_to_zero=[],
    )
    @triton.jit
    def _rla_bwd_q_kernel(
        Q, DO, KV, Z, DQ, DKV, DZ, N, H, CHUNK, S, eps,
        sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        kv = tl.load(KV + (pid_bh * BLOCK_D + offs_d[:, None]) * BLOCK_D + offs_d[None, :])
        z = tl.load(Z + pid_bh * BLOCK_D + offs_d)
        dkv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = pid_s * CHUNK
        end = tl.minimum(start + CHUNK, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < end)[:, None] & dmask[None, :]
            q_raw = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=m, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd, mask=m, other=0.0)
            q = tl.maximum(q_raw.to(tl.float32), 0.0)
            do = do.to(tl.float32)
            num = dot_f32acc(q, kv, PREC)
            den = tl.sum(q * z[None, :], axis=1) + eps
            dnum = do / den[:, None]
            dden = -tl.sum(dnum * (num / den[:, None]), axis=1)
            dphiq = dot_f32acc(dnum, tl.trans(kv), PREC) + dden[:, None] * z[None, :]
            dq = tl.where(q_raw > 0, dphiq, 0.0)
            tl.store(DQ + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd, dq.to(DQ.dtype.element_ty), mask=m)
            dkv += dot_f32acc(tl.trans(q), dnum, PREC)
            dz += tl.sum(q * dden[:, None], axis=0)
        out = (pid_bh * S + pid_s) * BLOCK_D
        tl.store(DKV + (out + offs_d[:, None]) * BLOCK_D + offs_d[None, :], dkv)
        tl.store(DZ + out + offs_d, dz)

    @triton.autotune(
        configs=autotune_configs(
            [
                triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=2),
                triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
            ]
        ),
        key=["D"],
    )
    @triton.jit
    def _rla_bwd_kv_kernel(
        K, V, DKV, DZ, DK, DV, N, H,
        skb, skh, skn, skd, svb, svh, svn, svd, sab, sah, san, sad, scb, sch, scn, scd,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (offs_n < N)[:, None] & dmask[None, :]
        k_raw = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=m, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=m, other=0.0)
        dkv = tl.load(DKV + (pid_bh * BLOCK_D + offs_d[:, None]) * BLOCK_D + offs_d[None, :])
        dz = tl.load(DZ + pid_bh * BLOCK_D + offs_d)
        k = tl.maximum(k_raw.to(tl.float32), 0.0)
        dphik = dot_f32acc(v.to(tl.float32), tl.trans(dkv), PREC) + dz[None, :]
        dk = tl.where(k_raw > 0, dphik, 0.0)
        dv = dot_f32acc(k, dkv, PREC)
        tl.store(DK + b * sab + h * sah + offs_n[:, None] * san + offs_d[None, :] * sad, dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + b * scb + h * sch + offs_n[:, None] * scn + offs_d[None, :] * scd, dv.to(DV.dtype.element_ty), mask=m)

    def _split(bh: int, n: int, device: torch.device) -> tuple[int, int]:
        """Number of N-chunks per (batch, head) for the reduction passes and the chunk length."""
        chunks = cdiv(n, _STATE_CHUNK)
        want = max(1, cdiv(4 * num_sms(device), bh))
        s = min(chunks, want)
        chunk = cdiv(cdiv(n, s), _STATE_CHUNK) * _STATE_CHUNK
        return cdiv(n, chunk), chunk

    @kernel_op("scaleforge::relu_linear_attention_fwd")
    def _rla_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, h, n, d = q.shape
        bd = max(16, next_pow2(d))
        s, chunk = _split(b * h, n, q.device)
        kv_part = _backend.new_output((b * h, s, bd, bd), torch.float32, q.device)
        z_part = _backend.new_output((b * h, s, bd), torch.float32, q.device)
        prec = dot_precision()
        torch.library.wrap_triton(_rla_state_kernel)[(b * h, s)](
            k, v, kv_part, z_part, n, h, chunk, s, *k.stride(), *v.stride(), D=d, BLOCK_D=bd, PREC=prec
        )
        kv = kv_part.sum(1)
        z = z_part.sum(1)
        o = _token_major_empty(q)

        def grid(meta):
            return (b * h, cdiv(n, meta["BLOCK_N"]))

        torch.library.wrap_triton(_rla_out_kernel)[grid](
            q, kv, z, o, n, h, eps, *q.stride(), *o.stride(), D=d, BLOCK_D=bd, PREC=prec
        )
        return o, kv, z

    @kernel_op("scaleforge::relu_linear_attention_bwd")
    def _rla_bwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, z: torch.Tensor,
        do: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        b, h, n, d = q.shape
        bd = kv.shape[-1]
        s, chunk = _split(b * h, n, q.device)
        dkv_part = _backend.new_output((b * h, s, bd, bd), torch.float32, q.device)
        dz_part = _backend.new_output((b * h, s, bd), torch.float32, q.device)
        dq = _token_major_empty(q)
        dk = _token_major_empty(k)
        dv = _token_major_empty(v)
        prec = dot_precision()
        torch.library.wrap_triton(_rla_bwd_q_kernel)[(b * h, s)](
            q, do, kv, z, dq, dkv_part, dz_part, n, h, chunk, s, eps,
            *q.stride(), *do.stride(), *dq.stride(), D=d, BLOCK_D=bd, PREC=prec,
        )  # fmt: skip
        dkv = dkv_part.sum(1)
        dz = dz_part.sum(1)

        def grid(meta):
            return (b * h, cdiv(n, meta["BLOCK_N"]))

        torch.library.wrap_triton(_rla_bwd_kv_kernel)[grid](
            k, v, dkv, dz, dk, dv, n, h, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
            D=d, BLOCK_D=bd, PREC=prec,
        )  # fmt: skip
        return dq, dk, dv

    def _rla_setup_context(ctx, inputs, output):
        q, k, v, eps = inputs
        _, kv, z = output
        ctx.save_for_backward(q, k, v, kv, z)
        ctx.eps = eps

    def _rla_backward(ctx, do, _dkv, _dz):
        if do is None:  # the eager path passes None for unused outputs
            return None, None, None, None
        q, k, v, kv, z = ctx.saved_tensors
        dq, dk, dv = _rla_bwd(q, k, v, kv, z, do, ctx.eps)
        return dq, dk, dv, None

    # kv and z (the state sums) are saved for backward, not differentiable outputs
    _rla_fwd.register_autograd(_rla_backward, setup_context=_rla_setup_context, non_differentiable=(1, 2))


def _check_inputs(q, k, v, wq, wk):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"relu_linear_attention: q, k, v must share a (B, H, N, D) shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"relu_linear_attention: q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    hd = q.shape[1] * q.shape[3]
    for name, w in (("qk_norm_weight_q", wq), ("qk_norm_weight_k", wk)):
        if w is not None and w.shape != (hd,):
            raise ValueError(f"relu_linear_attention: {name} has shape {tuple(w.shape)}, expected (H*D,) = ({hd},)")


def _norm_across_heads(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from scaleforge.kernels.norms import rms_norm

    b, h, n, d = t.shape
    flat = t.transpose(1, 2).reshape(b, n, h * d)  # free for a token-major producer
    return rms_norm(flat, weight, eps, backend="triton").view(b, n, h, d).transpose(1, 2)


def relu_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-8,
    *,
    qk_norm_weight_q: torch.Tensor | None = None,
    qk_norm_weight_k: torch.Tensor | None = None,
    qk_norm_eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """SANA ReLU linear attention on (B, H, N, D) inputs; see docs/kernels.md.

    ``o_i = Σ_j relu(q_i)·relu(k_j) v_j / (relu(q_i)·Σ_j relu(k_j) + eps)`` with fp32 accumulation and
    division, output in the input dtype. ``qk_norm_weight_q/k`` (shape (H*D,)) apply SANA-1.5's RMSNorm
    across all heads before the ReLU.
    """
    _check_inputs(q, k, v, qk_norm_weight_q, qk_norm_weight_k)
    if resolve(backend) == "torch":
        return relu_linear_attention_ref(
            q, k, v, eps, qk_norm_weight_q=qk_norm_weight_q, qk_norm_weight_k=qk_norm_weight_k, qk_norm_eps=qk_norm_eps
        )
    check_triton_device(q, k, v)
    if qk_norm_weight_q is not None:
        q = _norm_across_heads(q, qk_norm_weight_q, qk_norm_eps)
    if qk_norm_weight_k is not None:
        k = _norm_across_heads(k, qk_norm_weight_k, qk_norm_eps)
    return _rla_fwd(q, k, v, float(eps))[0]
