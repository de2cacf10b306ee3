"""Turning decoded samples into micro-batches, inside the loader's workers.

A ``Batcher`` receives samples one at a time and returns a finished micro-batch (or ``None``). The
samples it holds back (``pending()``) are part of the loader's resumable state: on resume the loader
decodes them again and re-adds them in arrival order, which must rebuild the batcher exactly (true
for every batcher here because their decisions depend only on the arrival sequence).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image


# ---------------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------------
def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack what stacks, keep the rest as lists.

    Per key: tensors / numpy arrays of one shape are stacked; Python numbers become a tensor; anything
    else (strings, PIL images, variable-length tensors such as PS3's per-image boxes, lists of box
    captions) stays a list in batch order.
    """
    if not samples:
        raise ValueError("collate_samples: empty list of samples")
    out: dict[str, Any] = {}
    keys = list(samples[0].keys())
    for s in samples[1:]:
        keys += [k for k in s if k not in keys]
    for key in keys:
        values = [s.get(key) for s in samples]
        if key.startswith("__"):
            out[key] = values
        elif all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.from_numpy(np.stack(values))
        elif all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


# ---------------------------------------------------------------------------------------------------
# Batchers
# ---------------------------------------------------------------------------------------------------
class Batcher:
    """Base class. ``add`` returns a finished batch or None; ``pending`` lists held samples in arrival
    order. ``counters`` are cumulative integers reported in the loader's metrics and saved with its
    state."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def add(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def pending(self) -> list[dict[str, Any]]:
        raise NotImplementedError


class FixedBatcher(Batcher):
    """``batch_size`` consecutive samples through ``collate``."""

    def __init__(self, batch_size: int, collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_samples):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.collate = collate
        self._held: list[dict[str, Any]] = []

    def add(self, sample):
        self._held.append(sample)
        if len(self._held) < self.batch_size:
            return None
        batch, self._held = self._held, []
        return self.collate(batch)

    def pending(self):
        return list(self._held)


def aspect_ratio_buckets(base_size: int) -> dict[float, tuple[int, int]]:
    """A SANA-style multi-aspect table around ``base_size`` (512 or 1024): heights from base/2 to
    2*base in steps of base/16, each width the multiple of base/16 closest to base**2/height, so
    h*w ~ base**2 and h/w spans 0.25..4. Keys are h/w rounded to 2 decimals.

    This is our rule, in the spirit of SANA's ``ASPECT_RATIO_512`` / ``ASPECT_RATIO_1024`` tables
    (see docs/data.md); it is not a copy of those tables.
    """
    if base_size % 16:
        raise ValueError(f"base_size must be a multiple of 16, got {base_size}")
    step = base_size // 16
    table: dict[float, tuple[int, int]] = {}
    for h in range(base_size // 2, 2 * base_size + 1, step):
        w = max(step, round(base_size * base_size / h / step) * step)
        for hh, ww in ((h, w), (w, h)):
            r = round(hh / ww, 2)
            if 0.25 <= r <= 4.0:
                table.setdefault(r, (hh, ww))
    return dict(sorted(table.items()))


def image_aspect(sample: dict[str, Any]) -> float:
    if "image" in sample and isinstance(sample["image"], Image.Image):
        w, h = sample["image"].size
        return h / w
    if "latent" in sample:
        _, h, w = sample["latent"].shape
        return h / w
    raise KeyError("AspectRatioBucketBatcher: sample has neither a PIL 'image' nor a 'latent'; "
                   "pass aspect_fn")


def resize_center_crop(img: Image.Image, hw: tuple[int, int]) -> Image.Image:
    h, w = hw
    scale = max(h / img.height, w / img.width)
    nh, nw = max(h, math.ceil(img.height * scale)), max(w, math.ceil(img.width * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - h) // 2, (nw - w) // 2
    return img.crop((left, top, left + w, top + h))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def finalize_images(samples: list[dict[str, Any]], hw: tuple[int, int]) -> dict[str, Any]:
    images = torch.stack([image_to_tensor(resize_center_crop(s["image"], hw)) for s in samples])
    rest = collate_samples([{k: v for k, v in s.items() if k != "image"} for s in samples])
    rest["image"] = images
    return rest


class AspectRatioBucketBatcher(Batcher):
    """Every batch holds ``batch_size`` samples of one aspect-ratio bucket.

    A sample goes to the bucket whose ratio is closest in log space to its own h/w; when that bucket
    has ``batch_size`` samples they are finalized to the bucket's (h, w) (default: resize and center
    crop the PIL ``image`` to (h, w), float [-1, 1]) and emitted with ``bucket_hw``.
    """

    def __init__(self, batch_size: int, buckets: dict[float, tuple[int, int]] | int = 1024,
                 aspect_fn: Callable[[dict[str, Any]], float] | None = None,
                 finalize: Callable[[list[dict[str, Any]], tuple[int, int]], dict[str, Any]] | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.buckets = aspect_ratio_buckets(buckets) if isinstance(buckets, int) else dict(buckets)
        if not self.buckets:
            raise ValueError("AspectRatioBucketBatcher: empty bucket table")
        self._ratios = np.log(np.array(list(self.buckets.keys()), dtype=np.float64))
        self._hw = list(self.buckets.values())
        self.aspect_fn = aspect_fn or image_aspect
        self.finalize = finalize or finalize_images
        self._held: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        self._arrivals = 0

    def bucket_of(self, sample: dict[str, Any]) -> int:
        return int(np.argmin(np.abs(self._ratios - math.log(self.aspect_fn(sample)))))

    def add(self, sample):
        b = self.bucket_of(sample)
        held = self._held.setdefault(b, [])
        held.append((self._arrivals, sample))
        self._arrivals += 1
        if len(held) < self.batch_size:
            return None
        del self._held[b]
        batch = self.finalize([s for _, s in held], self._hw[b])
        batch["bucket_hw"] = self._hw[b]
        return batch

    def pending(self):
        return [s for _, s in sorted((item for held in self._held.values() for item in held),
                                     key=lambda t: t[0])]


class PackingBatcher(Batcher):
    """Sequence packing for the VLM: consecutive samples share a row of ``max_len`` tokens.

    Greedy in arrival order (no reordering, so the result depends only on the sample sequence): a row
    takes samples until the next one does not fit, and ``rows`` rows make a micro-batch. Position ids
    restart at 0 for every sample and ``cu_seqlens`` / ``seq_ids`` mark the sample boundaries, so
    varlen attention (or ``packed_attention_mask``) never crosses samples. The first label of every
    sample is ignored so that the shift-by-one LM loss never predicts across a boundary (NVILA's
    ``repack_multimodal_data`` rule, reference/nvila.md section 6).
    """

    def __init__(self, max_len: int, rows: int = 1, pad_id: int = 0, ignore_index: int = -100):
        super().__init__()
        if max_len < 2 or rows < 1:
            raise ValueError(f"PackingBatcher: need max_len >= 2 and rows >= 1, got {max_len}, {rows}")
        self.max_len, self.rows, self.pad_id, self.ignore_index = max_len, rows, pad_id, ignore_index
        self._closed: list[list[dict[str, Any]]] = []
        self._open: list[dict[str, Any]] = []
        self._open_len = 0
        self.counters = {"truncated": 0}

    def _length(self, sample: dict[str, Any]) -> int:
        return min(int(sample["input_ids"].shape[0]), self.max_len)

    def add(self, sample):
        if "input_ids" not in sample:
            raise KeyError("PackingBatcher: sample has no 'input_ids'")
        n = self._length(sample)
        if n < int(sample["input_ids"].shape[0]):
            self.counters["truncated"] += 1
        out = None
        if self._open and self._open_len + n > self.max_len:
            self._closed.append(self._open)
            self._open, self._open_len = [], 0
            if len(self._closed) == self.rows:
                out = self._build(self._closed)
                self._closed = []
        self._open.append(sample)
        self._open_len += n
        return out

    def pending(self):
        return [s for row in self._closed for s in row] + list(self._open)

    def _build(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        L = self.max_len
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), self.ignore_index, dtype=torch.long)
        position_ids = torch.zeros((len(rows), L), dtype=torch.long)
        seq_ids = torch.full((len(rows), L), -1, dtype=torch.long)
        seg_lens: list[int] = []
        extra: dict[str, list[Any]] = {}
        for r, row in enumerate(rows):
            at = 0
            for i, s in enumerate(row):
                n = self._length(s)
                ids = s["input_ids"][:n].long()
                lab = s.get("labels", s["input_ids"])[:n].long().clone()
                lab[0] = self.ignore_index
                input_ids[r, at:at + n] = ids
                labels[r, at:at + n] = lab
                position_ids[r, at:at + n] = torch.arange(n)
                seq_ids[r, at:at + n] = i
                seg_lens.append(n)
                at += n
                for k, v in s.items():
                    if k not in ("input_ids", "labels"):
                        extra.setdefault(k, []).append(v)
            if at < L:
                position_ids[r, at:] = torch.arange(L - at)
                seg_lens.append(L - at)
        cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int32), 0)
        batch: dict[str, Any] = {
            "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids,
            "cu_seqlens": cu, "max_seqlen": max(seg_lens),
            "num_samples": torch.tensor([len(row) for row in rows], dtype=torch.long),
        }
        batch.update(extra)
        return batch


def packed_attention_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Causal block-diagonal mask [rows, 1, L, L] (True = may attend) from ``seq_ids`` [rows, L]:
    a token attends to earlier tokens of its own sample only; padding attends to itself only."""
    L = seq_ids.shape[-1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    pad = (seq_ids < 0)
    eye = torch.eye(L, dtype=torch.bool)
    mask = same & causal & ~pad[:, :, None] | (pad[:, :, None] & eye)
    return mask[:, None]
