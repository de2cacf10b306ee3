"""Launch configuration of the fused norm kernels: the launch shape (``NormConfig``), the measured defaults
per row width and case, the shared-memory fit of the pipelined row loop, and the cached launch plans (grid,
scalar arguments, compile-time flags). Measurements behind the defaults: docs/benchmarks.md."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from scaleforge.kernels._triton_utils import cdiv, next_pow2, num_sms


class NormConfig(NamedTuple):
    """Launch shape. Programs hold [block_r, C] tiles and walk a contiguous run of rows inside one modulation
    group (modulation, weight and bias rows are loaded once per program): about progs_per_sm * #SMs
    programs, or one tile per program with progs_per_sm=0 (forward only). ``split`` (forward only) holds a
    row as two power-of-two column pieces, BLOCK_A = the largest power of two <= C plus BLOCK_B = the next
    power of two >= the rest (C=2240: 2048 + 256, 2.8% of lanes masked instead of 45% with one 4096 block),
    for block_r == 1 only (row statistics are then scalars, free of register layout); the backward always
    uses one next_power_of_2(C) block (split measured 1.5-2x slower there).
    ``evict_first`` streams the read-once tensors (x, residual, dy, h) past L2.
    To keep more than one row tile's loads in flight per program: ``stages`` > 0 hands the row loop to
    Triton's software pipeliner (tl.range num_stages: the loads of later tiles go through shared memory
    as async copies); ``prefetch`` (backward only) issues the loads of the next tile (dy, h, dh, x,
    mean/rstd) before computing the current one (register double buffer)."""

    block_r: int
    num_warps: int
    split: bool = False
    progs_per_sm: int = 4
    evict_first: bool = False
    prefetch: bool = False
    stages: int = 0


def _blocks(c: int, split: bool) -> tuple[int, int]:
    if not split or c & (c - 1) == 0:
        return next_pow2(c), 0
    a = next_pow2(c) // 2
    return a, next_pow2(c - a)

# Defaults per case and C class: (largest C of the class, case) -> (forward, backward), the best checked
# configs of benchmarks/kernels/tune_norms.py on an H200 (CUDA-graph timings at 8x4096x1152, 16x4096x2240
# and 4x8192x4096 bf16; the measurements behind each entry: docs/benchmarks.md, "Norm launch defaults").
# Most use the pipelined row loop (stages, last field): with one row tile in flight per program the
# backward's loads were exposed behind its two cross-warp reductions.
_DEFAULTS: dict[tuple[int, str], tuple[NormConfig, NormConfig]] = {
    (1536, "layer"): (NormConfig(1, 1, True, 16, False), NormConfig(1, 2, False, 4, False, False, 4)),
    (1536, "res"): (NormConfig(2, 4, False, 16, False, False, 3), NormConfig(1, 4, False, 4, False, False, 4)),
    (1536, "rms"): (NormConfig(1, 1, True, 16, False, False, 2), NormConfig(1, 4, False, 4, False, False, 3)),
    (3072, "layer"): (NormConfig(1, 2, True, 16, False, False, 3), NormConfig(1, 4, False, 4, False, False, 4)),
    (3072, "res"): (NormConfig(1, 2, True, 16, False, False, 3), NormConfig(1, 8, False, 4, False, False, 4)),
    (3072, "rms"): (NormConfig(1, 2, True, 16, False, False, 4), NormConfig(1, 8, False, 4, False, False, 3)),
    (4096, "layer"): (NormConfig(1, 4, False, 16, False, False, 4), NormConfig(1, 4, False, 2, False, False, 3)),
    (4096, "res"): (NormConfig(2, 8, False, 0, False), NormConfig(1, 8, False, 2, False, False, 3)),
    (4096, "rms"): (NormConfig(2, 8, False, 0, False), NormConfig(4, 16, False, 1, False, False, 2)),
}


@functools.lru_cache(maxsize=None)
def _smem_budget(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def _fit_stages(cfg: NormConfig, tile_elems: int, streamed: list, device: torch.device) -> NormConfig:
    """cfg with no more pipeline stages than shared memory holds. The pipeliner keeps stages - 1 copies of
    every tile the row loop loads (sm_90: 4 rows x 4096 x four bf16 tensors at stages 3 asked for 262,464
    bytes of the 232,448), so the tuned bf16 defaults can overflow with fp32 inputs, per-token modulation
    or a GPU with less shared memory; those get fewer stages (none below 2). 16 KiB stay for the
    reductions' scratch."""
    if cfg.stages < 2 or device.type != "cuda":
        return cfg
    per_stage = tile_elems * sum(t.itemsize for t in streamed if t is not None) + 8 * cfg.block_r
    fit = 1 + (_smem_budget(device.index if device.index is not None else torch.cuda.current_device())
               - 16 * 1024) // per_stage
    stages = min(cfg.stages, fit)
    return cfg._replace(stages=stages if stages >= 2 else 0)


def _case(is_rms: bool, residual: bool) -> str:
    return "res" if residual else ("rms" if is_rms else "layer")


def _default_config(c: int, backward: bool, case: str = "layer") -> NormConfig:
    for (c_max, name), cfgs in _DEFAULTS.items():
        if c <= c_max and name == case:
            return cfgs[backward]
    # beyond the measured classes: one row of ~16 elements per thread (up to 16 warps)
    return NormConfig(1, min(16, max(4, next_pow2(c) // 512)), False, 0 if not backward else 4)


def _segments(m: int, cfg: NormConfig, device, grouped: list[int], backward: bool) -> tuple[int, int, int, int]:
    """(p0, nseg, chunk, s): rows form nseg segments of p0 rows inside which every per-sample modulation is
    constant; each segment is cut into s chunks of chunk rows (whole row tiles), one program per chunk."""
    if len(set(grouped)) > 1:
        raise ValueError(f"modulation tensors with different per-sample groupings {grouped} are not supported")
    p0 = grouped[0] if grouped else m
    nseg = m // p0
    if cfg.progs_per_sm == 0:
        if backward:
            raise ValueError("the backward needs progs_per_sm > 0 (it reduces per-program partials)")
        s = cdiv(p0, cfg.block_r)
    else:
        s = max(1, min(cdiv(p0, cfg.block_r), cdiv(cfg.progs_per_sm * num_sms(device), nseg)))
    chunk = cdiv(cdiv(p0, s), cfg.block_r) * cfg.block_r
    return p0, nseg, chunk, cdiv(p0, chunk)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _mode(p: int, present: bool) -> int:
    return 0 if not present else (1 if p == 1 else 2)


def _grouped(m: int, *mods: tuple[int, bool]) -> list[int]:
    return [p for p, on in mods if on and 1 < p < m]

# The launch plans (grid, scalar arguments, compile-time flags) depend only on shapes, dtypes, the
# modulation layout, the device and the config, so they are cached: the eager path runs per call only
# the allocations and the launch (computed per call they were ~40 us of host time, mostly triton.cdiv).
@functools.lru_cache(maxsize=1024)
def _fwd_plan(m, c, cfg: NormConfig, is_rms, has_res, p_gate, p_shift, p_scale, dtypes, device):
    """dtypes: x, residual, gate, weight, bias, shift, scale (None where absent)."""
    x_dt, r_dt, g_dt, w_dt, b_dt, sh_dt, sc_dt = dtypes
    grouped = _grouped(m, (p_gate, g_dt is not None), (p_shift, sh_dt is not None), (p_scale, sc_dt is not None))
    p0, nseg, chunk, s = _segments(m, cfg, device, grouped, backward=False)
    if cfg.split and cfg.block_r > 1:
        raise ValueError("split needs block_r == 1: the two column pieces of a multi-row tile have different "
                         "register layouts, and the compiler converts a whole piece through shared memory")
    block_a, block_b = _blocks(c, cfg.split)
    per_token = [dt for dt, p in ((g_dt, p_gate), (sh_dt, p_shift), (sc_dt, p_scale)) if dt is not None and p == 1]
    cfg = _fit_stages(cfg, cfg.block_r * (block_a + block_b), [x_dt, r_dt, *per_token], device)
    meta = dict(
        C=c, P0=p0, CHUNK=chunk, P_G=max(p_gate, 1), P_SH=max(p_shift, 1), P_SC=max(p_scale, 1),
        HAS_RES=has_res, G_MODE=_mode(p_gate, g_dt is not None), HAS_W=w_dt is not None,
        HAS_B=b_dt is not None, SH_MODE=_mode(p_shift, sh_dt is not None),
        SC_MODE=_mode(p_scale, sc_dt is not None), IS_RMS=is_rms, EVICT_FIRST=cfg.evict_first,
        BLOCK_R=cfg.block_r, BLOCK_A=block_a, BLOCK_B=block_b, FULL_A=block_a <= c, STAGES=cfg.stages,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return (s, nseg), meta


def _dtype(t: torch.Tensor | None):
    return None if t is None else t.dtype


@functools.lru_cache(maxsize=1024)
def _bwd_plan(m, c, cfg: NormConfig, is_rms, has_res, has_dho, p_gate, p_shift, p_scale, dtypes, device):
    """dtypes: dy, dh_out, h_in, x, gate, weight, bias, scale (None where absent; has_shift via p_shift)."""
    dy_dt, dho_dt, h_dt, x_dt, g_dt, w_dt, b_dt, sc_dt = dtypes
    if cfg.split:
        raise ValueError("the backward has no split column layout")
    has_shift = p_shift > 0
    grouped = _grouped(m, (p_gate, g_dt is not None), (p_shift, has_shift), (p_scale, sc_dt is not None))
    p0, nseg, chunk, s = _segments(m, cfg, device, grouped, backward=True)
    g_mode, sh_mode, sc_mode = _mode(p_gate, g_dt is not None), _mode(p_shift, has_shift), _mode(p_scale, sc_dt is not None)
    block = next_pow2(c)
    per_token = [dt for dt, mode in ((g_dt, g_mode), (sc_dt, sc_mode)) if dt is not None and mode == 1]
    cfg = _fit_stages(cfg, cfg.block_r * block, [dy_dt, dho_dt, h_dt, x_dt if g_dt is not None else None, *per_token],
                      device)  # fmt: skip
    meta = dict(
        C=c, P0=p0, CHUNK=chunk, S=s, P_G=max(p_gate, 1), P_SC=max(p_scale, 1),
        HAS_DHO=has_dho, HAS_RES=has_res, G_MODE=g_mode, HAS_W=w_dt is not None,
        HAS_B=b_dt is not None, SH_MODE=sh_mode, SC_MODE=sc_mode, IS_RMS=is_rms, EVICT_FIRST=cfg.evict_first,
        BLOCK_R=cfg.block_r, BLOCK=block, FULL=block == c, PREFETCH=cfg.prefetch, STAGES=cfg.stages,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return (s, nseg), meta

