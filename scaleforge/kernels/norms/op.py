"""The norms' torch.library ops (``scaleforge::norm_fwd`` / ``scaleforge::norm_bwd``), their launches and
the autograd formula that connects them."""

from __future__ import annotations

import torch

from scaleforge.kernels import _backend
from scaleforge.kernels._triton_utils import cached_call, kernel_op
from scaleforge.kernels.norms.launch import (
    NormConfig,
    _bwd_plan,
    _case,
    _default_config,
    _dtype,
    _empty,
    _fwd_plan,
)
from scaleforge.kernels.norms.triton_kernels import _norm_bwd_kernel, _norm_fwd_kernel


def norm_fwd_impl(x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms,
                  want_amax=False, cfg: NormConfig | None = None):  # fmt: skip
    """The forward launch (also called directly, with explicit configs, by benchmarks/kernels/tune_norms.py)
    -> y, h, mean, rstd, amax (want_amax: max|y| as the int32 bits of an fp32 0-d tensor, else empty)."""
    c = x.shape[-1]
    m = x.numel() // c
    cfg = cfg or _default_config(c, False, _case(is_rms, residual is not None))
    dtypes = tuple(map(_dtype, (x, residual, gate, weight, bias, shift, scale)))
    grid, meta = cached_call(_fwd_plan, m, c, cfg, is_rms, residual is not None, p_gate, p_shift, p_scale, dtypes,
                             x.device)  # fmt: skip
    y = _backend.new_output(x.shape, x.dtype, x.device)
    h = _backend.new_output(x.shape, x.dtype, x.device) if residual is not None else _empty(x)
    mean = _backend.new_output((m,), torch.float32, x.device)
    rstd = _backend.new_output((m,), torch.float32, x.device)
    amax = torch.zeros((), dtype=torch.int32, device=x.device) if want_amax else _empty(mean)
    dummy = x
    torch.library.wrap_triton(_norm_fwd_kernel)[grid](
        x, dummy if residual is None else residual, dummy if gate is None else gate,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if shift is None else shift, dummy if scale is None else scale,
        y, dummy if residual is None else h, mean, rstd, amax if want_amax else mean, eps=eps,
        HAS_AMAX=want_amax, **meta,
    )  # fmt: skip
    return y, h, mean, rstd, amax


@kernel_op("scaleforge::norm_fwd")
def _norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None,
    p_gate: int, p_shift: int, p_scale: int, eps: float, is_rms: bool, want_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return norm_fwd_impl(x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms,
                         want_amax)  # fmt: skip


def _bwd_launch(dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd,
                has_res, has_shift, p_gate, p_shift, p_scale, is_rms, cfg: NormConfig | None = None):  # fmt: skip
    """The backward kernel. Tensors are contiguous, any shape with C = the last dim (the kernel reads rows of
    C). -> dx, dr (dy's dtype), the (per-sample, per-channel) fp32 partial stacks, their names, the per-token
    gradients (each in its tensor's dtype, shift's in dy's), and the segment count and programs per segment.

    The reduced gradients' per-program partials go into one stack per reduction, so each takes one torch
    sum, not one per gradient: per-sample modulation (summed over the programs of each segment) and
    per-channel parameters / modulation (summed over all programs)."""
    c = h_in.shape[-1]
    m = h_in.numel() // c
    cfg = cfg or _default_config(c, True, _case(is_rms, has_res))
    p_shift = p_shift if has_shift else 0
    dtypes = tuple(map(_dtype, (dy, dh_out, h_in, x, gate, weight, bias, scale)))
    grid, meta = cached_call(_bwd_plan, m, c, cfg, is_rms, has_res, dh_out is not None, p_gate, p_shift, p_scale,
                             dtypes, h_in.device)  # fmt: skip
    s, nseg = grid
    modes = {"gate": (meta["G_MODE"], gate), "shift": (meta["SH_MODE"], dy), "scale": (meta["SC_MODE"], scale)}
    present = dict(gate=gate is not None, shift=has_shift, scale=scale is not None, weight=weight is not None,
                   bias=bias is not None)  # fmt: skip
    per_sample, per_channel = _stack_names(m, present, dict(gate=p_gate, shift=p_shift, scale=p_scale))
    parts = [_backend.new_output((len(names), nseg * s, c), torch.float32, dy.device) if names else None
             for names in (per_sample, per_channel)]  # fmt: skip
    dx = _backend.new_output(h_in.shape, dy.dtype, dy.device)
    out = {"dr": _backend.new_output(h_in.shape, dy.dtype, dy.device) if has_res else dx}
    for names, stack in zip((per_sample, per_channel), parts):
        out.update({k: stack[i] for i, k in enumerate(names)})
    # per-token gradients are stored by the kernel in their tensor's dtype (shift: dy's, it is not passed)
    per_token = {k: _backend.new_output(h_in.shape, like.dtype, dy.device) for k, (mode, like) in modes.items()
                 if mode == 1}  # fmt: skip
    out.update(per_token)
    torch.library.wrap_triton(_norm_bwd_kernel)[grid](
        dy, dy if dh_out is None else dh_out, h_in, h_in if x is None else x, h_in if gate is None else gate,
        h_in if weight is None else weight, h_in if bias is None else bias, h_in if scale is None else scale,
        mean, rstd, dx, out["dr"], *(out.get(k, dx) for k in ("gate", "weight", "bias", "shift", "scale")),
        **meta,
    )  # fmt: skip
    return dx, out["dr"] if has_res else None, parts, (per_sample, per_channel), per_token, nseg, s


def _reduce_partials(parts, nseg, s, c):
    """(per-sample stack (k, P, C), per-channel stack (k, P, C)) -> (k, nseg, C) and (k, C) fp32 sums."""
    ps, pc = parts
    return (None if ps is None else ps.view(-1, nseg, s, c).sum(2), None if pc is None else pc.sum(1))


def norm_bwd_impl(dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd,
                  has_res, has_shift, p_gate, p_shift, p_scale, is_rms, cfg: NormConfig | None = None):  # fmt: skip
    """The backward launch plus the sums of the partials: [dx, dr, dg, dw, db, dsh, dsc] (empty where absent;
    dx, dr in dy's dtype, per-token gradients in their tensor's dtype, reduced ones fp32: (nseg, C) per
    sample, (1, C) per channel, weight and bias (C,)); called with explicit configs by
    benchmarks/kernels/tune_norms.py and the tests."""
    c = h_in.shape[-1]
    dx, dr, parts, (ps_names, pc_names), per_token, nseg, s = _bwd_launch(
        dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd, has_res, has_shift, p_gate, p_shift, p_scale,
        is_rms, cfg)  # fmt: skip
    sums = _reduce_partials(parts, nseg, s, c)
    got = dict(per_token)
    for names, total in zip((ps_names, pc_names), sums):
        got.update({k: total[i] for i, k in enumerate(names)})
    got = {k: (v.unsqueeze(0) if v.ndim == 1 and k not in ("weight", "bias") else v) for k, v in got.items()}
    outs = [dx, dr] + [got.get(k) for k in ("gate", "weight", "bias", "shift", "scale")]
    return [_empty(dy) if t is None else t for t in outs]


@kernel_op("scaleforge::norm_bwd")
def _norm_bwd(
    dy: torch.Tensor, dh_out: torch.Tensor | None, h_in: torch.Tensor, x: torch.Tensor | None,
    gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    has_res: bool, has_shift: bool, p_gate: int, p_shift: int, p_scale: int, is_rms: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """-> [dx, dr, per-sample sums (k, nseg, C), per-channel sums (k, C), per-token dgate, dshift, dscale]
    (empty where absent; separate tensors: a custom op's outputs may not alias each other). The order of the
    stacked gradients is _stack_names'."""
    c = h_in.shape[-1]
    dx, dr, parts, _, per_token, nseg, s = _bwd_launch(
        dy, dh_out, h_in, x, gate, weight, bias, scale, mean, rstd, has_res, has_shift, p_gate, p_shift, p_scale,
        is_rms)  # fmt: skip
    ps, pc = _reduce_partials(parts, nseg, s, c)
    outs = [dx, dr, ps, pc] + [per_token.get(k) for k in ("gate", "shift", "scale")]
    return [_empty(dy) if t is None else t for t in outs]  # distinct empties: no aliasing outputs


def _stack_names(m, present, p):
    """Names of the per-sample and the per-channel partial stacks, in stack order (_bwd_launch allocates them,
    _norm_backward unpacks the op's sums). present: dict over gate, shift, scale, weight, bias; p: rows of x
    per modulation row, dict over gate, shift, scale (1: per token, not stacked)."""
    mods = [k for k in ("gate", "shift", "scale") if present[k] and p[k] != 1]
    return ([k for k in mods if p[k] < m],
            [k for k in ("weight", "bias") if present[k]] + [k for k in mods if p[k] >= m])


def _norm_setup_context(ctx, inputs, output):
    x, residual, gate, weight, bias, shift, scale, p_gate, p_shift, p_scale, eps, is_rms, _ = inputs
    _, h, mean, rstd, _ = output
    has_res = residual is not None
    ctx.save_for_backward(h if has_res else x, x if gate is not None else None, gate, weight, bias, scale, mean, rstd)
    ctx.meta = (has_res, shift is not None, p_gate, p_shift, p_scale, is_rms)
    ctx.shapes = {k: None if t is None else (t.shape, t.dtype) for k, t in
                  (("gate", gate), ("weight", weight), ("bias", bias), ("shift", shift), ("scale", scale))}


def _norm_backward(ctx, dy, dh, _dmean, _drstd, _damax):
    h_in, x, gate, weight, bias, scale, mean, rstd = ctx.saved_tensors
    has_res, has_shift, p_gate, p_shift, p_scale, is_rms = ctx.meta
    if dy is None:  # only h was used (the eager path does not materialize unused gradients)
        dy = torch.zeros_like(h_in)
    # gradients may arrive as views with zero strides (the backward of .sum() expands a scalar); the
    # kernel reads rows contiguously
    dh2 = dh.contiguous() if (has_res and dh is not None) else None
    dx, dr, ps, pc, *per_token = _norm_bwd(
        dy.contiguous(), dh2, h_in, x, gate, weight, bias, scale, mean, rstd,
        has_res, has_shift, p_gate, p_shift, p_scale, is_rms,
    )  # fmt: skip
    shapes = ctx.shapes
    grads = dict(zip(("gate", "shift", "scale"), per_token))
    m = h_in.numel() // h_in.shape[-1]
    present = {k: v is not None for k, v in shapes.items()}
    ps_names, pc_names = _stack_names(m, present, dict(gate=p_gate, shift=p_shift, scale=p_scale))
    for names, total in zip((ps_names, pc_names), (ps, pc)):
        if not names:
            continue
        dts = {shapes[k][1] for k in names}
        if len(dts) == 1:  # one cast for the stack
            total = total.to(dts.pop())
        # the gradients of one stack are views of one buffer (the autograd engine keeps them as .grad): no
        # copy per gradient, which is what the stacks save
        grads.update({k: total[i] for i, k in enumerate(names)})
    out = [None if shapes[k] is None else grads[k].reshape(shapes[k][0]).to(shapes[k][1])
           for k in ("gate", "weight", "bias", "shift", "scale")]
    dgate, dw, db, dshift, dscale = out
    return dx, dr if has_res else None, dgate, dw, db, dshift, dscale, None, None, None, None, None, None

# mean and rstd are saved for backward, amax is a statistic: not differentiable outputs
_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context, non_differentiable=(2, 3, 4))

