"""Launch configuration of the FP8 quantizer and state-codec kernels: the config format (``_cfg``), the fixed
table measured on an H200 (``_LAUNCH``; measurements in docs/benchmarks.md), and the launcher."""

from __future__ import annotations

import torch

from scaleforge.kernels._triton_utils import cdiv, num_sms
from scaleforge.kernels.reference.fp8 import fp8_max


def _cfg(
    block, warps, waves=0, prefetch=False, evict_first=False, *, group_per_thread=False, satfinite=False,
    reverse=False,
):  # fmt: skip
    """One launch config. BLOCK: elements per tile (whole groups for the group kernels); WAVES: programs
    per SM of a persistent grid that loops over the tiles (0: one program per tile); PREFETCH: a
    persistent program loads its next tile before it converts and stores the current one (two tiles
    in flight per thread); EVICT_FIRST: loads marked evict_first in L2 (data read once). The keyword
    options are compile-time variants of the quantizers (group: GROUP_PER_THREAD, SATFINITE, see
    _QUANT_GROUP_OPTS; per tensor: SATFINITE, REVERSE, see _QUANT_TENSOR_OPTS), in the dict only when
    set, so the other kernels take the same configs."""
    cfg = dict(BLOCK=block, num_warps=warps, WAVES=waves, PREFETCH=prefetch, EVICT_FIRST=evict_first)
    opts = dict(GROUP_PER_THREAD=group_per_thread, SATFINITE=satfinite, REVERSE=reverse)
    return cfg | {k: True for k, v in opts.items() if v}

# Fixed launch configs, the fastest of the H200 sweep `benchmarks/kernels/tune_fp8.py` at 8192² bf16 (the
# measured times and how each entry was chosen: docs/benchmarks.md, "FP8 launch table"). Fixed rather than
# autotuned: the spread between the top configs is a few %, and an autotuner would re-benchmark every new
# shape inside training. The sweep prints the entries to paste here when a variant beats these.
_LAUNCH = {
    "amax": _cfg(8192, 8, 4, True),  # persistent and prefetching; no evict_first: the quantize pass re-reads x
    # a given scale keeps the clamp (the interpreter's FP8 conversion does not saturate, so CPU tests could
    # not check SATFINITE's codes here; on the GPU the two are within noise)
    "quant_tensor": _cfg(16384, 8),
    # the dynamic scale's quantize pass, after "amax" on the same x: REVERSE starts where the amax pass ended
    "quant_tensor_dynamic": _cfg(4096, 8, satfinite=True, reverse=True),
    "dequant_tensor": dict(BLOCK=4096, num_warps=8),
    # group quantizers: SATFINITE drops the clamp (the group's own amax bounds |x / s|)
    "quant_group/128": _cfg(4096, 4, satfinite=True),
    "quant_group/16": _cfg(4096, 8, satfinite=True),
    "dequant_group/128": dict(BLOCK=4096, num_warps=8),
    "dequant_group/16": dict(BLOCK=8192, num_warps=4),
    # the state codec is partly compute bound (see state_kernels.py): small tiles, more resident programs
    "state_quant": dict(BLOCK=2048, num_warps=4),
    "state_dequant": dict(BLOCK=2048, num_warps=4),
}
# torch divides by a Python scalar as a multiplication by its fp32 reciprocal on CUDA, exactly on CPU
_INV_QMAX = {dt: float(torch.tensor(1.0) / fp8_max(dt)) for dt in (torch.float8_e4m3fn, torch.float8_e5m2)}


def _config(kernel: str, group_size: int | None = None) -> dict:
    """The table's entry; a group size without one takes the 128 entry."""
    if group_size is None:
        return _LAUNCH[kernel]
    return _LAUNCH.get(f"{kernel}/{group_size}", _LAUNCH[f"{kernel}/128"])


def _launch(kernel, cfg, tiles, device, *args, **constexprs):
    """Launch kernel with cfg over `tiles` tiles of cfg's BLOCK: one program per tile, or for the
    tile-loop kernels a persistent grid of WAVES programs per SM."""
    cfg = dict(cfg)
    waves, warps = cfg.pop("WAVES", 0), cfg.pop("num_warps")
    grid = min(tiles, waves * num_sms(device)) if waves else tiles
    torch.library.wrap_triton(kernel)[(grid,)](*args, **constexprs, **cfg, num_warps=warps)


def _group_tiles(groups, gs, block):
    return cdiv(groups, max(block // gs, 1))


_QUANT_TENSOR_OPTS = dict(SATFINITE=False, REVERSE=False)


_QUANT_GROUP_OPTS = dict(GROUP_PER_THREAD=False, SATFINITE=False)

