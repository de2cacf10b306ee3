"""Fused RMSNorm / LayerNorm with adaLN modulation and a gated residual add, forward and backward.

One read of each row computes (all math fp32, I/O in the input dtype)::

    h = residual + gate * x          (only with residual; h is also returned: the new residual stream)
    y = norm(h) * weight + bias      (norm over the last dim C; RMS or mean/variance)
    y = y * (1 + scale) + shift      (adaLN modulation, sana.md §2)

``shift``/``scale``/``gate`` are per channel, per sample (B, 1, C) or per token. The backward pass
recomputes x̂ from the saved (mean, rstd) and reduces the parameter/modulation gradients with per-program
fp32 partials (summed afterwards, deterministic). Reference: ``reference/norms.py``.
"""

from __future__ import annotations

import math

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._backend import HAS_TRITON, check_triton_device, resolve
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

__all__ = ["layer_norm", "rms_norm"]


def _mod_2d(t: torch.Tensor | None, x: torch.Tensor, name: str) -> tuple[torch.Tensor | None, int]:
    """Modulation tensor -> ((G, C) contiguous, rows per G) for x viewed as (M, C)."""
    if t is None:
        return None, 0
    c = x.shape[-1]
    m = x.numel() // c
    if t.shape[-1] != c:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; its last dim must be C = {c}")
    if t.numel() == c:
        return t.reshape(1, c).contiguous(), m
    shape = tuple(t.shape)
    if t.ndim == 2 and x.ndim == 3:
        if shape[0] != x.shape[0]:
            raise ValueError(f"2-D {name} {shape} for x {tuple(x.shape)} must be (B, C) per sample")
        shape = (shape[0], 1, c)  # (B, C) modulation for (B, N, C) tokens
    shape = (1,) * (x.ndim - len(shape)) + shape
    for j in range(x.ndim - 1, -1, -1):
        if shape[:j] == tuple(x.shape[:j]) and all(s == 1 for s in shape[j:-1]):
            g = math.prod(x.shape[:j])
            return t.reshape(g, c).contiguous(), m // g
    raise ValueError(
        f"{name} of shape {tuple(t.shape)} does not broadcast against x {tuple(x.shape)} as a per-channel "
        "(C,), per-sample (B, 1, C) / (B, C) or per-token tensor"
    )


if HAS_TRITON:
    import triton
    import triton.language as tl

    from scaleforge.kernels._triton_utils import num_sms

    def _warps(block_c: int) -> int:
        return 4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)

    @triton.jit
    def _norm_fwd_kernel(
        X, R, G, W, B, SH, SC, Y, H, MEAN, RSTD,
        C, P_G, P_SH, P_SC, eps,
        HAS_RES: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_SH: tl.constexpr, HAS_SC: tl.constexpr, IS_RMS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        cm = cols < C
        h = tl.load(X + row * C + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_RES:
            if HAS_G:
                h = h * tl.load(G + (row // P_G) * C + cols, mask=cm, other=0.0).to(tl.float32)
            h = h + tl.load(R + row * C + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(H + row * C + cols, h.to(H.dtype.element_ty), mask=cm)
        if IS_RMS:
            mean = 0.0
            hc = h
        else:
            mean = tl.sum(h, axis=0) / C
            hc = tl.where(cm, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / C + eps)
        y = hc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_SC:
            y = y * (1.0 + tl.load(SC + (row // P_SC) * C + cols, mask=cm, other=0.0).to(tl.float32))
        if HAS_SH:
            y = y + tl.load(SH + (row // P_SH) * C + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=cm)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _norm_bwd_kernel(
        DY, DHO, HIN, X, G, W, B, SC, MEAN, RSTD,
        DX, DR, DG, DW, DB, DSH, DSC,
        C, P0, CHUNK, S, P_G, P_SC,
        HAS_DHO: tl.constexpr, HAS_RES: tl.constexpr, G_MODE: tl.constexpr, HAS_W: tl.constexpr,
        HAS_B: tl.constexpr, SH_MODE: tl.constexpr, SC_MODE: tl.constexpr, IS_RMS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # modes: 0 absent, 1 per-row gradient stored directly, 2 reduced into per-program partials
        seg = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        part = (seg * S + sp) * C
        cols = tl.arange(0, BLOCK_C)
        cm = cols < C
        if HAS_W:
            w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_B:
            bias = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
        acc_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_sh = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_sc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, P0)
        for i in range(start, end):
            row = seg * P0 + i
            h = tl.load(HIN + row * C + cols, mask=cm, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(cm, (h - mean) * rstd, 0.0)
            dy = tl.load(DY + row * C + cols, mask=cm, other=0.0).to(tl.float32)
            if SH_MODE == 1:
                tl.store(DSH + row * C + cols, dy, mask=cm)
            if SH_MODE == 2:
                acc_sh += dy
            if SC_MODE != 0:
                y0 = xhat
                if HAS_W:
                    y0 = y0 * w
                if HAS_B:
                    y0 = y0 + bias
                if SC_MODE == 1:
                    tl.store(DSC + row * C + cols, dy * y0, mask=cm)
                else:
                    acc_sc += dy * y0
                dy = dy * (1.0 + tl.load(SC + (row // P_SC) * C + cols, mask=cm, other=0.0).to(tl.float32))
            if HAS_B:
                acc_b += dy
            if HAS_W:
                acc_w += dy * xhat
                dy = dy * w
            c1 = tl.sum(xhat * dy, axis=0) / C
            if IS_RMS:
                dh = (dy - xhat * c1) * rstd
            else:
                c2 = tl.sum(dy, axis=0) / C
                dh = (dy - xhat * c1 - c2) * rstd
            if HAS_DHO:
                dh += tl.load(DHO + row * C + cols, mask=cm, other=0.0).to(tl.float32)
            if HAS_RES:
                tl.store(DR + row * C + cols, dh.to(DR.dtype.element_ty), mask=cm)
            if G_MODE != 0:
                x = tl.load(X + row * C + cols, mask=cm, other=0.0).to(tl.float32)
                if G_MODE == 1:
                    tl.store(DG + row * C + cols, dh * x, mask=cm)
                else:
                    acc_g += dh * x
                dh = dh * tl.load(G + (row // P_G) * C + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(DX + row * C + cols, dh.to(DX.dtype.element_ty), mask=cm)
        if HAS_W:
            tl.store(DW + part + cols, acc_w, mask=cm)
        if HAS_B:
            tl.store(DB + part + cols, acc_b, mask=cm)
        if SH_MODE == 2:
            tl.store(DSH + part + cols, acc_sh, mask=cm)
        if SC_MODE == 2:
            tl.store(DSC + part + cols, acc_sc, mask=cm)
        if G_MODE == 2:
            tl.store(DG + part + cols, acc_g, mask=cm)

    def _empty(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)

    @torch.library.triton_op("scaleforge::norm_fwd", mutates_args=())
    def _norm_fwd(
        x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
        bias: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None,
        p_gate: int, p_shift: int, p_scale: int, eps: float, is_rms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        c = x.shape[-1]
        m = x.numel() // c
        y = _backend.new_output(x.shape, x.dtype, x.device)
        h = _backend.new_output(x.shape, x.dtype, x.device) if residual is not None else _empty(x)
        mean = _backend.new_output((m,), torch.float32, x.device)
        rstd = _backend.new_output((m,), torch.float32, x.device)
        block_c = triton.next_power_of_2(c)
        dummy = x
        torch.library.wrap_triton(_norm_fwd_kernel)[(m,)](
            x, dummy if residual is None else residual, dummy if gate is None else gate,
            dummy if weight is None else weight, dummy if bias is None else bias,
            dummy if shift is None else shift, dummy if scale is None else scale,
            y, dummy if residual is None else h, mean, rstd,
            c, max(p_gate, 1), max(p_shift, 1), max(p_scale, 1), eps,
            HAS_RES=residual is not None, HAS_G=gate is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_SH=shift is not None, HAS_SC=scale is not None, IS_RMS=is_rms,
            BLOCK_C=block_c, num_warps=_warps(block_c),
        )  # fmt: skip
        return y, h, mean, rstd

    def _mode(p: int, present: bool) -> int:
        return 0 if not present else (1 if p == 1 else 2)

    @torch.library.triton_op("scaleforge::norm_bwd", mutates_args=())
    def _norm_bwd(
        dy: torch.Tensor, dh_out: torch.Tensor | None, h_in: torch.Tensor, x: torch.Tensor | None,
        gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
        scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
        has_res: bool, has_shift: bool, p_gate: int, p_shift: int, p_scale: int, is_rms: bool,
    ) -> list[torch.Tensor]:  # fmt: skip
        c = h_in.shape[-1]
        m = h_in.numel() // c
        # rows are processed in segments of p0 rows inside which every per-sample modulation is constant
        grouped = [p for p, on in ((p_gate, gate is not None), (p_shift, has_shift), (p_scale, scale is not None))
                   if on and 1 < p < m]  # fmt: skip
        if len(set(grouped)) > 1:
            raise ValueError(f"modulation tensors with different per-sample groupings {grouped} are not supported")
        p0 = grouped[0] if grouped else m
        nseg = m // p0
        s = max(1, min(p0, triton.cdiv(4 * num_sms(h_in.device), nseg)))
        chunk = triton.cdiv(p0, s)
        s = triton.cdiv(p0, chunk)
        def f32_out(shape):
            return _backend.new_output(shape, torch.float32, h_in.device)

        g_mode, sh_mode, sc_mode = _mode(p_gate, gate is not None), _mode(p_shift, has_shift), _mode(p_scale, scale is not None)

        def out_for(mode):
            return f32_out((m, c)) if mode == 1 else f32_out((nseg * s, c))

        dx = _backend.new_output((m, c), dy.dtype, dy.device)
        dr = _backend.new_output((m, c), dy.dtype, dy.device) if has_res else dx
        dw = f32_out((nseg * s, c)) if weight is not None else dx
        db = f32_out((nseg * s, c)) if bias is not None else dx
        dsh = out_for(sh_mode) if sh_mode else dx
        dsc = out_for(sc_mode) if sc_mode else dx
        dg = out_for(g_mode) if g_mode else dx
        block_c = triton.next_power_of_2(c)
        torch.library.wrap_triton(_norm_bwd_kernel)[(nseg, s)](
            dy, dy if dh_out is None else dh_out, h_in, h_in if x is None else x, h_in if gate is None else gate,
            h_in if weight is None else weight, h_in if bias is None else bias, h_in if scale is None else scale,
            mean, rstd, dx, dr, dg, dw, db, dsh, dsc,
            c, p0, chunk, s, max(p_gate, 1), max(p_scale, 1),
            HAS_DHO=dh_out is not None, HAS_RES=has_res, G_MODE=g_mode, HAS_W=weight is not None,
            HAS_B=bias is not None, SH_MODE=sh_mode, SC_MODE=sc_mode, IS_RMS=is_rms,
            BLOCK_C=block_c, num_warps=_warps(block_c),
        )  # fmt: skip

        def reduce(t, mode, p):
            if mode == 0:
                return _empty(dy)
            if mode == 1:
                return t
            if p >= m:  # per channel: sum over everything
                return t.sum(0, keepdim=True)
            return t.view(nseg, s, c).sum(1)

        return [
            dx,
            dr if has_res else _empty(dy),
            reduce(dg, g_mode, p_gate),
            dw.sum(0) if weight is not None else _empty(dy),
            db.sum(0) if bias is not None else _empty(dy),
            reduce(dsh, sh_mode, p_shift),
            reduce(dsc, sc_mode, p_scale),
        ]

    def _norm_setup_context(ctx, inputs, output):
        x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms = inputs
        _, h, mean, rstd = output
        has_res = residual is not None
        ctx.save_for_backward(h if has_res else x, x if gate is not None else None, gate, weight, bias, scale, mean, rstd)
        ctx.meta = (has_res, shift is not None, p_gate, p_shift, p_scale, is_rms)
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in (residual, gate, weight, bias, shift, scale)]

    def _norm_backward(ctx, dy, dh, _dmean, _drstd):
        h_in, x, gate, weight, bias, scale, mean, rstd = ctx.saved_tensors
        has_res, has_shift, p_gate, p_shift, p_scale, is_rms = ctx.meta
        c = h_in.shape[-1]
        dh2 = dh.reshape(-1, c) if (has_res and dh is not None) else None
        grads = _norm_bwd(
            dy.reshape(-1, c), dh2, h_in.reshape(-1, c), None if x is None else x.reshape(-1, c),
            gate, weight, bias, scale, mean, rstd, has_res, has_shift, p_gate, p_shift, p_scale, is_rms,
        )  # fmt: skip
        dx = grads[0].view(h_in.shape)
        rest = []
        for g, shp in zip(grads[1:], ctx.shapes):
            rest.append(None if shp is None else g.reshape(shp[0]).to(shp[1]))
        dres, dgate, dw, db, dshift, dscale = rest
        if dres is not None:
            dres = grads[1].view(h_in.shape)
        return dx, dres, dgate, dw, db, dshift, dscale, None, None, None, None, None

    _norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def _norm(x, weight, bias, eps, shift, scale, residual, gate, is_rms):
    c = x.shape[-1]
    if weight is not None and weight.shape != (c,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({c},)")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({c},)")
    if gate is not None and residual is None:
        raise ValueError("gate is only used with residual (h = residual + gate * x)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_triton_device(x)
    g2, p_gate = _mod_2d(gate, x, "gate")
    sh2, p_shift = _mod_2d(shift, x, "shift")
    sc2, p_scale = _mod_2d(scale, x, "scale")
    x2 = x.reshape(-1, c).contiguous()
    r2 = None if residual is None else residual.reshape(-1, c).contiguous()
    y, h, _, _ = torch.ops.scaleforge.norm_fwd(
        x2, r2, g2, weight, bias, sh2, sc2, p_gate, p_shift, p_scale, float(eps), is_rms
    )
    y = y.view(x.shape)
    if residual is None:
        return y
    # the autograd node hands back grads shaped like the inputs it got; reshape the modulation grads
    return y, h.view(x.shape)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    backend: str | None = None,
):
    """RMSNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given."""
    if resolve(backend) == "torch":
        return rms_norm_ref(x, weight, eps, shift=shift, scale=scale, residual=residual, gate=gate)
    return _norm(x, weight, None, eps, shift, scale, residual, gate, True)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    backend: str | None = None,
):
    """LayerNorm over the last dim with optional adaLN modulation and gated residual add (docs/kernels.md).
    Returns y, or (y, h) when ``residual`` is given."""
    if resolve(backend) == "torch":
        return layer_norm_ref(x, weight, bias, eps, shift=shift, scale=scale, residual=residual, gate=gate)
    return _norm(x, weight, bias, eps, shift, scale, residual, gate, False)
