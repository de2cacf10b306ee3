"""PS3 pre-training samples: image + boxes + box captions + global caption -> model inputs.

Runs in the loader workers (webdataset shards decoded with ``decode_image_boxes``, or the synthetic
coloured-shapes source): the image is resized (squashed, bicubic) to EVERY scale here, so the trainer
process never holds the full-resolution resize work; per sample the global caption is used with
probability ``model.loss.global_caption_prob`` (or when the sample has no box), else one box is drawn
and its caption is the text and its mask (on the largest high-res grid) forces and supervises the
selection. Draws use a generator seeded by (seed, sample key), so a resumed run sees the same choices.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from scaleforge.models.ps3.config import PS3Config
from scaleforge.platform.data.base import StatefulIterator
from scaleforge.platform.data.batching import collate_samples

MEAN = STD = (0.5, 0.5, 0.5)  # SigLIP's normalisation of [0, 1] pixels


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))


def to_tensor(img: Image.Image, side: int) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def box_mask(box, width: int, height: int, grid: int) -> torch.Tensor:
    """[grid, grid] float mask of the patches a pixel box [x1, y1, x2, y2] touches (squashed image)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box {list(box)} is outside the {width}x{height} image or empty")
    m = torch.zeros(grid, grid)
    c0, c1 = int(x1 / width * grid), max(int(np.ceil(x2 / width * grid)), int(x1 / width * grid) + 1)
    r0, r1 = int(y1 / height * grid), max(int(np.ceil(y2 / height * grid)), int(y1 / height * grid) + 1)
    m[r0:r1, c0:c1] = 1.0
    return m


def process_sample(sample: dict[str, Any], cfg: PS3Config, tok, seed: int, key: str) -> dict[str, Any]:
    img: Image.Image = sample["image"]
    rng = _rng(seed, key)
    grid = cfg.vision.scale_grids()[-1]
    boxes = sample["boxes"]
    is_global = boxes.shape[0] == 0 or rng.random() < cfg.loss.global_caption_prob
    if is_global:
        text, mask = sample["caption"], torch.zeros(grid, grid)
    else:
        j = rng.randrange(boxes.shape[0])
        text, mask = sample["box_captions"][j], box_mask(boxes[j].tolist(), img.width, img.height, grid)
    out = {f"pixel_values_{i}": to_tensor(img, s) for i, s in enumerate(cfg.vision.scales)}
    out.update(text=tok([text])[0], box_mask=mask, is_global=torch.tensor(is_global))
    return out


def webdataset_sample_fn(raw: dict[str, Any], cfg: PS3Config, tok, seed: int) -> dict[str, Any]:
    from scaleforge.platform.data import decode_image_boxes

    return process_sample(decode_image_boxes(raw), cfg, tok, seed, f"{raw.get('__url__', '')}/{raw.get('__key__')}")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return collate_samples(samples)


def synthetic_sample(cfg: PS3Config, seed: int, idx: int) -> dict[str, Any]:
    from scaleforge.platform.data.tools import shapes_image

    s = cfg.synthetic_image_size
    img, shapes = shapes_image(random.Random(seed * 1_000_003 + idx), s, s)
    return {"image": img, "caption": " and ".join(f"a {x['color']} {x['shape']}" for x in shapes),
            "boxes": torch.tensor([x["box"] for x in shapes], dtype=torch.float32).reshape(-1, 4),
            "box_captions": [f"a {x['color']} {x['shape']}" for x in shapes]}


class SyntheticBoxes(StatefulIterator):
    """Coloured shapes with boxes; rank r of W reads samples ``(step * W + r) * mbs + j`` (mod the epoch
    size), so resuming needs only the micro-batch counter."""

    def __init__(self, cfg: PS3Config, tok, seed: int, rank: int, world: int, mbs: int, num_samples: int):
        self.cfg, self.tok, self.seed = cfg, tok, seed
        self.rank, self.world, self.mbs, self.num_samples = rank, world, mbs, num_samples
        self.step = 0

    def __next__(self) -> dict[str, Any]:
        out = []
        for j in range(self.mbs):
            idx = ((self.step * self.world + self.rank) * self.mbs + j) % self.num_samples
            out.append(process_sample(synthetic_sample(self.cfg, self.seed, idx), self.cfg, self.tok, self.seed, str(idx)))
        self.step += 1
        return collate(out)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
