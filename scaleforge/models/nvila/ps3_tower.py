"""PS3 as NVILA's vision tower (VILA-HD, ``model.vision_tower: ps3``), bottom-up selection.

Per image: PS3 encodes the low-res grid (27 x 27) and ``ps3_num_look_close`` rounds of selected
high-res patches (``last_hidden_state``, no final norm). The projector's k x k STC turns the low-res
grid into ceil(27/2)^2 = 196 tokens, and the high-res tokens of all rounds (grid order) into groups of
k^2 consecutive tokens -> ``budget // k^2`` LLM tokens per round (640 for 2560 patches). Token count
per image: 196 + 640 k (reference ps3.md §4). Upstream keeps a high-res 2 x 2 block only when all four
of its patches were selected, which makes the count vary per image; grouping consecutive selected
patches keeps it fixed, so the text placeholders are known in the loader (a round budget not divisible
by k^2, e.g. PS3-4K's 2559, drops the remainder patches).

The selection modules, the final norm and the MAP head get no gradient here; the recipe freezes those
modules (``prior_prompt``, a bare parameter, is not a module: it stays out of the update as it never
has a gradient).
"""
from __future__ import annotations

import torch

from scaleforge.models.nvila import dynamic_s2 as ds2

UNUSED_PS3_PREFIXES = ("trunk.norm", "trunk.attn_pool", "selection_feature_proj",
                       "highres_selection_feature_module", "prompt_proj_for_highres")


def round_llm_tokens(cfg, k: int) -> int:
    return sum(cfg.ps3.budget_per_scale()) // (k * k)


def ps3_visual_tokens(cfg, k: int) -> int:
    """LLM tokens of one image: low-res STC grid + per-round groups."""
    return ds2.tokens_per_tile(cfg.ps3.grid, k) + cfg.ps3_num_look_close * round_llm_tokens(cfg, k)


def encode_ps3(tower, projector, pixel_values: torch.Tensor, cfg) -> torch.Tensor:
    """[N, 3, S, S] images at the largest PS3 scale -> [N, tokens, d] LLM-width visual tokens (one
    tower call; one projector call for the low-res grid and one for the rounds when there are any,
    a config constant, so every rank and micro-batch makes the same calls)."""
    k = projector.k
    n = pixel_values.shape[0]
    g = cfg.ps3.grid
    rounds = cfg.ps3_num_look_close
    h = tower(pixel_values, num_look_close=rounds).last_hidden_state
    low = projector(h[:, : g * g].reshape(n, g, g, -1))
    low = low.reshape(n, -1, low.shape[-1])
    groups = rounds * round_llm_tokens(cfg, k)
    if groups == 0:
        return low
    hi = h[:, g * g: g * g + groups * k * k]
    # k*k consecutive tokens -> one k x k block of a [k, groups*k] grid
    hi = hi.reshape(n, groups, k, k, -1).permute(0, 2, 1, 3, 4).reshape(n, k, groups * k, -1)
    return torch.cat([low, projector(hi).reshape(n, groups, -1)], 1)
