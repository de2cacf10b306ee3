"""Twilight (kernels.md §2.5) for LLM decoding: per decode step and head, the attention weights estimated
with INT4 keys, the top-p token set of that estimate by binary search, and attention over those tokens."""

from __future__ import annotations

import torch


class TwilightDecode:
    """A decode-attention callable for one generation: ``attn(q, k, v, layer)`` with q (B, Hq, 1, D) and the
    layer's cached k, v (B, Hkv, L, D) -> (B, Hq, 1, D). Keys are INT4-quantized once, when first seen (the
    codes are kept per layer and extended as the cache grows). The first ``skip_layers`` layers run dense
    (Twilight skips the first two).

    ``stats`` records, over all sparse calls: ``min_est_mass`` (the smallest estimated attention mass kept by
    a head, >= top_p by construction), ``min_true_mass`` (the same under the exact attention weights; only
    with ``track_true_mass``, one dense score pass per call) and ``kept`` / ``total`` token counts."""

    def __init__(self, top_p: float = 0.85, skip_layers: int = 2, *, track_true_mass: bool = False,
                 backend: str | None = None):  # fmt: skip
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"twilight top_p must be in (0, 1], got {top_p}")
        if skip_layers < 0:
            raise ValueError(f"twilight skip_layers must be >= 0, got {skip_layers}")
        self.top_p, self.skip_layers, self.track_true_mass, self.backend = top_p, skip_layers, track_true_mass, backend
        self._codes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # running statistics kept as device tensors: reading them per layer would sync the host every call
        self._min_est: torch.Tensor | None = None
        self._min_true: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None
        self._total = 0

    @property
    def stats(self) -> dict:
        """The statistics so far as Python numbers (one host sync, when read)."""
        num = lambda t, empty: empty if t is None else t.item()  # noqa: E731
        return {"min_est_mass": num(self._min_est, float("inf")), "min_true_mass": num(self._min_true, float("inf")),
                "kept": num(self._kept, 0), "total": self._total}

    def _int4(self, layer: int, k: torch.Tensor):
        from scaleforge.kernels.sparse_attention import quantize_int4

        have = self._codes.get(layer)
        n = 0 if have is None else have[0].shape[2]
        if n > k.shape[2]:  # a new generation reusing this object: start over
            have, n = None, 0
        if n < k.shape[2]:
            new = quantize_int4(k[:, :, n:])
            have = new if have is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(have, new))
            self._codes[layer] = have
        return have

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        from scaleforge.kernels.sparse_attention import sparse_decode_attention, twilight_select

        if layer < self.skip_layers:
            gqa = q.shape[1] != k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        q1 = q[:, :, 0]
        packed, scale, lo = self._int4(layer, k)
        mask, w_est = twilight_select(q1, packed, scale, lo, self.top_p, backend=self.backend)
        out = sparse_decode_attention(q1, k, v, mask, backend=self.backend)
        self._record(q1, k, mask, w_est)
        return out[:, :, None]

    @torch.no_grad()
    def _record(self, q1, k, mask, w_est):
        low = lambda run, x: x if run is None else torch.minimum(run, x)  # noqa: E731
        self._min_est = low(self._min_est, (w_est * mask).sum(-1).min())
        kept = mask.sum()
        self._kept = kept if self._kept is None else self._kept + kept
        self._total += mask.numel()
        if self.track_true_mass:
            kf = k.float().repeat_interleave(q1.shape[1] // k.shape[1], dim=1)
            w = torch.softmax(torch.einsum("bhd,bhsd->bhs", q1.float(), kf) * q1.shape[-1] ** -0.5, -1)
            self._min_true = low(self._min_true, (w * mask).sum(-1).min())
