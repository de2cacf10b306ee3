"""CAME (Confidence-guided Adaptive Memory Efficient optimisation, Luo et al. 2023) with an optional 8-bit
block-wise quantised first moment, as SANA trains with it (sana.md §7, §11), working on FSDP2 shards.

The update is the published one (same as the ``came-pytorch`` package, which the tests compare against):
factored second moment (row / column EMAs of g^2 + eps1, beta2), update clipped to RMS <= clip_threshold,
first moment m (beta1), factored "instability" EMAs of (u - m)^2 + eps2 (beta3), step = lr * m * S, decoupled
weight decay p -= lr * wd * p. Defaults: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16).

8-bit first moment (``quantize_first_moment``): for 2-D parameters with more than ``min_8bit_size`` (16,384)
elements, m is stored as uint8 with min-max affine quantisation, one (scale, min) fp32 pair per block of up
to ``block_size`` (2048) consecutive elements *within one row*; it is dequantised, updated and requantised
every step. Row-aligned blocks keep quantisation independent of how rows are sharded. (Upstream SANA's
``CAME8BitWrapper`` uses 2048 *rows* x all columns per block, sana.md §11; ours is finer.) Everything else
(factored statistics, 1-D parameters, depthwise convs) stays fp32, as upstream.

Sharding (FSDP2): parameters may be DTensors sharded on dim 0 (``Shard(0)``, possibly with replicated mesh
dims for HSDP). The statistics are then made exact for the *full* matrix:
- 2-D (n, m), rows sharded: row statistics are local; column statistics are summed over the rows of every
  shard (all-reduce); the mean of the row statistic used for normalisation is global (same all-reduce);
- >= 3-D (e.g. a depthwise conv (C, 1, 3, 3)): factorisation is over the last two dims, dim 0 is a batch
  dim, so everything is local;
- the RMS used for update clipping is global (all-reduce of the sum of squares).
Any other placement (sharding on another dim, tensor parallelism) raises an error naming the parameter.
Optimizer state tensors are DTensors with matching placements, so DCP checkpoints save and reshard them.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist

from scaleforge.platform.fp8_all_gather import plain_tensor
from scaleforge.platform.optim import register_optimizer

DEFAULT_BETAS = (0.9, 0.999, 0.9999)
DEFAULT_EPS = (1e-30, 1e-16)
BLOCK_SIZE = 2048
MIN_8BIT_SIZE = 16384


# ---------------------------------------------------------------------------------------------------
# Block-wise 8-bit codec (row-aligned blocks)
# ---------------------------------------------------------------------------------------------------
def _pad_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    m = x.shape[1]
    nb = max(1, math.ceil(m / block))
    pad = nb * block - m
    if pad:
        # repeat the last column: padding then never changes a block's min or max
        x = torch.cat([x, x[:, -1:].expand(x.shape[0], pad)], dim=1)
    return x.view(x.shape[0], nb, block), nb


def quantize_rows(x: torch.Tensor, block: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (R, m) fp32 -> (q uint8 (R, m), scale (R, nb), minimum (R, nb))."""
    r, m = x.shape
    if r == 0:
        nb = max(1, math.ceil(m / block))
        return (torch.empty(0, m, dtype=torch.uint8, device=x.device), x.new_empty(0, nb), x.new_empty(0, nb))
    xb, nb = _pad_rows(x.float(), block)
    lo, hi = xb.amin(-1), xb.amax(-1)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xb - lo[..., None]) / scale[..., None]).round_().clamp_(0, 255).to(torch.uint8)
    return q.view(r, nb * block)[:, :m].contiguous(), scale, lo


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, block: int = BLOCK_SIZE) -> torch.Tensor:
    r, m = q.shape
    nb = scale.shape[1]
    pad = nb * block - m
    qf = q.float()
    if pad:
        qf = torch.cat([qf, qf.new_zeros(r, pad)], dim=1)
    x = qf.view(r, nb, block) * scale[..., None] + lo[..., None]
    return x.view(r, nb * block)[:, :m]


# ---------------------------------------------------------------------------------------------------
# Sharding helpers
# ---------------------------------------------------------------------------------------------------
def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    return plain_tensor(t.to_local()) if _is_dtensor(t) else t


class _Layout:
    """How a parameter is split: the process group over which dim 0 is sharded (None: all local)."""

    def __init__(self, p: torch.Tensor, name: str):
        self.pg = None
        self.mesh = None
        self.placements = None
        self.shape = tuple(p.shape)  # global shape
        if not _is_dtensor(p):
            return
        from torch.distributed.tensor import Replicate

        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(self.placements) if pl.is_shard()]
        for i in shard_dims:
            if self.placements[i].dim != 0:
                raise ValueError(f"CAME: parameter {name} is sharded on dim {self.placements[i].dim}; only dim-0 "
                                 "sharding (FSDP2 Shard(0)) keeps the factored statistics exact")
        if any(not (pl.is_shard() or isinstance(pl, Replicate)) for pl in self.placements):
            raise ValueError(f"CAME: parameter {name} has unsupported placements {self.placements}")
        if len(shard_dims) > 1:
            raise ValueError(f"CAME: parameter {name} is sharded on dim 0 over several mesh dims {self.placements}")
        if shard_dims and self.mesh.size(shard_dims[0]) > 1:
            self.pg = self.mesh.get_group(shard_dims[0])

    def wrap(self, local: torch.Tensor, global_shape: tuple[int, ...], sharded: bool) -> torch.Tensor:
        """A state tensor: a DTensor like the parameter (dim 0 sharded) or replicated, for DCP."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Replicate

        placements = self.placements if sharded else tuple(Replicate() for _ in self.placements)
        stride = torch.empty(global_shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=torch.Size(global_shape),
                                  stride=stride)


# ---------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------
class CAME(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float, float] = DEFAULT_BETAS,
                 eps: tuple[float, float] = DEFAULT_EPS, weight_decay: float = 0.0, clip_threshold: float = 1.0,
                 quantize_first_moment: bool = False, block_size: int = BLOCK_SIZE,
                 min_8bit_size: int = MIN_8BIT_SIZE, fused: bool = False):
        if lr < 0:
            raise ValueError(f"CAME: lr must be >= 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"CAME: betas must be three values in [0, 1), got {tuple(betas)}")
        if len(eps) != 2:
            raise ValueError(f"CAME: eps must be a pair (eps1, eps2), got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=tuple(eps), weight_decay=weight_decay,
                        clip_threshold=clip_threshold, quantize_first_moment=quantize_first_moment,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self._layouts: dict[int, _Layout] = {}
        # CUDA parameters: each parameter's update through torch.compile (a few fused kernels instead of ~40
        # element-wise passes over the parameter, most of the step's memory traffic); CPU always runs eager
        self.fused = fused

    @property
    def supports_device_step(self) -> bool:
        """Whether the step reads ``grad_scale`` / ``found_inf`` (the engine's device-side step): with ``fused``,
        where the skip costs nothing extra inside the compiled update."""
        return self.fused

    def _layout(self, p: torch.Tensor) -> _Layout:
        key = id(p)
        if key not in self._layouts:
            self._layouts[key] = _Layout(p, name=f"#{len(self._layouts)} shape {tuple(p.shape)}")
        return self._layouts[key]

    def _init_state(self, p: torch.Tensor, group: dict, lay: _Layout) -> dict:
        shape = lay.shape
        g = _local(p)
        dev = g.device
        f32 = dict(dtype=torch.float32, device=dev)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        factored = len(shape) >= 2
        quant = group["quantize_first_moment"] and len(shape) == 2 and math.prod(shape) > group["min_8bit_size"]
        if quant:
            nb = max(1, math.ceil(shape[1] / group["block_size"]))
            rows = g.shape[0]
            state["exp_avg_q"] = lay.wrap(torch.zeros(g.shape, dtype=torch.uint8, device=dev), shape, True)
            state["exp_avg_scale"] = lay.wrap(torch.ones(rows, nb, **f32), (shape[0], nb), True)
            state["exp_avg_min"] = lay.wrap(torch.zeros(rows, nb, **f32), (shape[0], nb), True)
        else:
            state["exp_avg"] = lay.wrap(torch.zeros(g.shape, **f32), shape, True)
        if factored:
            row_local, row_global = g.shape[:-1], shape[:-1]
            col_local = g.shape[:-2] + g.shape[-1:]
            col_global = shape[:-2] + shape[-1:]
            col_sharded = len(shape) >= 3  # for 2-D the column statistic is over all rows: replicated
            for name in ("exp_avg_sq", "exp_avg_res"):
                state[f"{name}_row"] = lay.wrap(torch.zeros(row_local, **f32), row_global, True)
                state[f"{name}_col"] = lay.wrap(torch.zeros(col_local, **f32), col_global, col_sharded)
        else:
            state["exp_avg_sq"] = lay.wrap(torch.zeros(g.shape, **f32), shape, True)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = dict(betas=tuple(group["betas"]), eps=tuple(group["eps"]), wd=group["weight_decay"],
                         clip=group["clip_threshold"], block=group["block_size"])
            # a 0-d CPU tensor: the compiled update takes a new learning rate without recompiling
            lr = torch.tensor(group["lr"], dtype=torch.float32)
            # set by the engine's device-side step (torch's GradScaler protocol, as its fused Adam reads them)
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            for p in group["params"]:
                if p.grad is None:
                    continue
                lay = self._layout(p)
                grad = _local(p.grad).float()
                if grad.is_sparse:
                    raise RuntimeError("CAME does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group, lay))
                state["step"] += 1
                local = {k: _local(v) for k, v in state.items() if k != "step"}
                update = _compiled_param_update() if self.fused and grad.is_cuda else param_update
                update(grad, _local(p), local, lay.shape, lay.pg, lr, grad_scale, found_inf, **hyper)
        return loss


def _all_reduce_(t: torch.Tensor, pg) -> torch.Tensor:
    if pg is not None:
        dist.all_reduce(t, group=pg)
    return t


def _assign(t: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """t <- new, or t kept where ``skip`` (a 0-d bool on the device: the step's gradients were not finite);
    returns the value the rest of the update goes on with."""
    t.copy_(new if skip is None else torch.where(skip, t, new))
    return new


def _factored(row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, beta: float, shape: tuple[int, ...],
              pg, skip: torch.Tensor | None) -> torch.Tensor:
    """EMA of row/column means of ``val`` (local shard), then the rank-1 rsqrt approximation."""
    n_rows_global = shape[-2]
    m = val.shape[-1]
    row_new = _assign(row, row * beta + val.sum(dim=-1) * ((1 - beta) / m), skip)
    col_sum = val.sum(dim=-2)
    if len(shape) == 2 and pg is not None:
        # one all-reduce for the column sums and the sum of the row statistic (for its global mean)
        buf = _all_reduce_(torch.cat([col_sum, row_new.sum().view(1)]), pg)
        col_sum, row_mean = buf[:-1], (buf[-1] / n_rows_global).view(1)
    else:
        row_mean = row_new.mean(dim=-1, keepdim=True)
    col_new = _assign(col, col * beta + col_sum * ((1 - beta) / n_rows_global), skip)
    return (row_new / row_mean).rsqrt().unsqueeze(-1) * col_new.unsqueeze(-2).rsqrt()


def param_update(grad: torch.Tensor, pl: torch.Tensor, st: dict[str, torch.Tensor], shape: tuple[int, ...], pg,
                 lr: torch.Tensor, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                 *, betas, eps, wd: float, clip: float, block: int) -> None:
    """One parameter's CAME step on local tensors (``st``: its state but the step count; ``shape``: the global
    shape; ``pg``: the group dim 0 is sharded over, or None), in place. A function of tensors and constants only,
    so that ``torch.compile`` can fuse its dozens of element-wise passes (``CAME(fused=True)``). ``grad_scale`` /
    ``found_inf`` (0-d device tensors, the GradScaler protocol the trainer's device-side step uses): the gradient is
    divided by grad_scale, and where found_inf is nonzero nothing changes, without the host reading either."""
    beta1, beta2, beta3 = betas
    eps1, eps2 = eps
    skip = None if found_inf is None else found_inf != 0
    if grad_scale is not None:
        grad = grad / grad_scale
    factored = len(shape) >= 2
    if factored:
        update = _factored(st["exp_avg_sq_row"], st["exp_avg_sq_col"], grad * grad + eps1, beta2, shape, pg, skip)
        update = update * grad
    else:
        v = _assign(st["exp_avg_sq"], st["exp_avg_sq"] * beta2 + (grad * grad + eps1) * (1 - beta2), skip)
        update = v.rsqrt() * grad
    sq = _all_reduce_(update.pow(2).sum().view(1), pg)
    rms = (sq / max(1, math.prod(shape))).sqrt()
    update = update / (rms / clip).clamp(min=1.0)
    quantized = "exp_avg_q" in st
    # the state starts as q = 0, scale = 1, min = 0: the first step dequantizes to zeros
    exp_avg = dequantize_rows(st["exp_avg_q"], st["exp_avg_scale"], st["exp_avg_min"], block) if quantized \
        else st["exp_avg"]
    exp_avg = exp_avg * beta1 + update * (1 - beta1)
    if quantized:
        for name, new in zip(("exp_avg_q", "exp_avg_scale", "exp_avg_min"), quantize_rows(exp_avg, block)):
            _assign(st[name], new, skip)
    else:
        _assign(st["exp_avg"], exp_avg, skip)
    if factored:
        res = (update - exp_avg).pow(2) + eps2
        update = _factored(st["exp_avg_res_row"], st["exp_avg_res_col"], res, beta3, shape, pg, skip) * exp_avg
    else:
        update = exp_avg
    # lr multiplies device tensors directly (a CPU scalar operand inside the kernel: no CPU code of its own)
    new_p = pl - pl * lr * wd - update * lr if wd != 0 else pl - update * lr
    _assign(pl, new_p, skip)


@functools.lru_cache(maxsize=1)
def _compiled_param_update():
    # dynamic shapes from the start: one graph per kind of parameter (factored or not, 8-bit or not), not per shape
    return torch.compile(param_update, dynamic=True)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this process (local shards)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                t = _local(v)
                total += t.numel() * t.element_size()
    return total


def _came_args(cfg: Any) -> dict[str, Any]:
    betas = tuple(getattr(cfg, "betas", ()) or ())
    eps = getattr(cfg, "came_eps", None) or getattr(cfg, "eps2", None)
    return dict(
        lr=cfg.lr,
        # OptimConfig.betas has two entries for AdamW; CAME needs three: use them only when three are given
        betas=betas if len(betas) == 3 else DEFAULT_BETAS,
        # OptimConfig.eps is AdamW's scalar; CAME's pair defaults to (1e-30, 1e-16) (sana.md §7)
        eps=tuple(eps) if eps else DEFAULT_EPS,
        weight_decay=cfg.weight_decay,
        fused=bool(getattr(cfg, "fused", False)),
    )


@register_optimizer("came8bit", state_bytes=lambda shape: 2 * math.prod(shape))
def _came8bit(groups, cfg):
    return CAME(groups, quantize_first_moment=True, **_came_args(cfg))


@register_optimizer("came", state_bytes=lambda shape: 4 * math.prod(shape))
def _came(groups, cfg):
    return CAME(groups, quantize_first_moment=False, **_came_args(cfg))
