"""NVILA micro-batches: conversations with images / video frames -> packed token rows + media tiles.

A sample is ``{"images": [PIL or [3,H,W] tensor, ...], "frames": [...] (optional video),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}`` (the format of
``scaleforge.platform.data.decode_conversation``, see docs/data.md). ``process_sample`` turns it into
token ids / labels (``tokens.py``) and normalized 448 tiles; ``collate_packed`` packs the samples of
a micro-batch into one row (in-micro-batch packing with ``cu_seqlens``, reference nvila.md §6).

``data.kind: synthetic`` uses ``SyntheticConversations``: each sample is a pure function of
(seed, sample index) - an image of random size and aspect with one coloured shape (or a short clip of
a moving shape) and a conversation about it whose answers depend on the pixels.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Sequence

import torch

from scaleforge.models.nvila import dynamic_s2 as ds2
from scaleforge.models.nvila.config import NVILAConfig
from scaleforge.models.nvila.model import KIND_IMAGE, KIND_VIDEO, media_token_count
from scaleforge.models.nvila.tokens import (IGNORE_INDEX, ChatTokenizer, ensure_placeholders, pack,
                                            truncate)
from scaleforge.platform.data.base import StatefulIterator


# ---------------------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------------------
def preprocess_image(cfg: NVILAConfig, image) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """-> media items [(tiles [n, 3, S, S] normalized, grid)], one per block of the placeholder."""
    tile = cfg.vision.image_size
    norm = functools.partial(ds2.normalize, mean=cfg.vision.image_mean, std=cfg.vision.image_std)
    if cfg.image_mode == "dynamic_s2":
        s2 = ds2.S2Settings(tuple(cfg.s2_scales), tile, cfg.max_tiles)
        tiles, grids = ds2.dynamic_s2_preprocess(image, s2)
        return [(norm(tiles), grids[-1])]
    if cfg.image_mode == "dynamic":  # NVILA-Lite: every tile (and the thumbnail) is its own block
        tiles, _ = ds2.dynamic_preprocess(image, tile, cfg.max_tiles)
        return [(norm(t.unsqueeze(0)), (1, 1)) for t in tiles]
    return [(norm(ds2.single_tile(image, tile)), (1, 1))]


def process_sample(sample: dict[str, Any], cfg: NVILAConfig, tok: ChatTokenizer, where: str = "sample") -> dict:
    images = list(sample.get("images") or ([sample["image"]] if sample.get("image") is not None else []))
    frames = sample.get("frames")
    videos = [frames] if frames else []
    convs = sample.get("conversations")
    if convs is None and "caption" in sample:  # image/video-caption samples become one-turn conversations
        convs = [{"from": "human", "value": "Describe this."}, {"from": "gpt", "value": sample["caption"]}]
    if not convs:
        raise ValueError(f"{where}: no 'conversations' (or 'caption')")
    convs = ensure_placeholders(list(convs), len(images), len(videos))
    # media in placeholder order: the conversation text decides the order of images vs video
    order = []
    text = "".join(t.get("value", "") for t in convs)
    i_img = i_vid = 0
    pos = 0
    while True:
        a, b = text.find("<image>", pos), text.find("<vila/video>", pos)
        if a < 0 and b < 0:
            break
        if b < 0 or (0 <= a < b):
            if i_img >= len(images):
                raise ValueError(f"{where}: more <image> placeholders than images ({len(images)})")
            order.append(("image", images[i_img]))
            i_img += 1
            pos = a + 1
        else:
            if i_vid >= len(videos):
                raise ValueError(f"{where}: <vila/video> placeholder but no video frames")
            order.append(("video", videos[i_vid]))
            i_vid += 1
            pos = b + 1
    if i_img != len(images) or i_vid != len(videos):
        raise ValueError(f"{where}: {len(images)} images / {len(videos)} videos but {i_img} / {i_vid} placeholders")

    tiles, kinds, ntiles, grids, blocks = [], [], [], [], []
    tile = cfg.vision.image_size
    for kind, m in order:
        if kind == "image":
            items = preprocess_image(cfg, m)
            blocks.append([media_token_count(cfg, KIND_IMAGE, t.shape[0], g) for t, g in items])
            for t, g in items:
                tiles.append(t)
                kinds.append(KIND_IMAGE)
                ntiles.append(t.shape[0])
                grids.append(g)
        else:
            idx = _uniform_frame_indices(len(m), cfg.video_frames)
            fr = torch.cat([ds2.single_tile(m[i], tile) for i in idx])
            fr = ds2.normalize(fr, cfg.vision.image_mean, cfg.vision.image_std)
            blocks.append([media_token_count(cfg, KIND_VIDEO, fr.shape[0], (1, 1))])
            tiles.append(fr)
            kinds.append(KIND_VIDEO)
            ntiles.append(fr.shape[0])
            grids.append((1, 1))
    ids, labels = tok.encode_conversation(convs, blocks, where=where)
    ids, labels = truncate(ids, labels, cfg.max_length, tok.image_id, where)
    s = cfg.vision.image_size
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.cat(tiles) if tiles else torch.zeros(0, 3, s, s),
        "media_kind": kinds,
        "media_tiles": ntiles,
        "media_grid": grids,
    }


def _uniform_frame_indices(n: int, k: int) -> list[int]:
    """k frames spread uniformly over n (np.linspace-style, as upstream); repeats frames if n < k."""
    if n <= 0:
        raise ValueError("video without frames")
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def collate_packed(samples: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple: int = 1) -> dict[str, Any]:
    row = pack([(s["input_ids"], s["labels"]) for s in samples], pad_id, pad_to_multiple)
    kinds = [k for s in samples for k in s["media_kind"]]
    tiles = [n for s in samples for n in s["media_tiles"]]
    grids = [g for s in samples for g in s["media_grid"]]
    pix = [s["pixel_values"] for s in samples if s["pixel_values"].shape[0]]
    s0 = samples[0]["pixel_values"]
    return {
        "input_ids": row.input_ids,
        "labels": row.labels,
        "position_ids": row.position_ids,
        "cu_seqlens": row.cu_seqlens,
        "pixel_values": torch.cat(pix) if pix else s0.new_zeros(0, *s0.shape[1:]),
        "media_kind": torch.tensor(kinds, dtype=torch.long),
        "media_tiles": torch.tensor(tiles, dtype=torch.long),
        "media_grid": torch.tensor(grids, dtype=torch.long).view(-1, 2),
        "num_samples": torch.tensor(len(samples)),
        "num_text_tokens": torch.tensor(sum(len(s["input_ids"]) for s in samples)),
    }


# ---------------------------------------------------------------------------------------------------
# Synthetic conversations
# ---------------------------------------------------------------------------------------------------
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "circle")
POSITIONS = ("left", "right")


def _draw(h: int, w: int, shape: str, color: tuple, cx: float, cy: float, r: float) -> torch.Tensor:
    yy = torch.arange(h, dtype=torch.float32).view(-1, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, -1)
    if shape == "square":
        inside = ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)
    else:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = torch.ones(3, h, w)
    for c in range(3):
        img[c][inside] = color[c]
    return img


def synthetic_sample(cfg: NVILAConfig, seed: int, index: int) -> dict[str, Any]:
    """A pure function of (seed, index)."""
    sc = cfg.synthetic
    rng = random.Random(seed * 1_000_003 + index)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    turns = []
    if rng.random() < sc.video_prob:
        w = h = rng.randint(sc.image_min_side, sc.image_max_side)
        n = max(cfg.video_frames, 2)
        direction = rng.choice(("left to right", "right to left"))
        frames = []
        for f in range(n):
            t = f / (n - 1)
            cx = (0.2 + 0.6 * t if direction == "left to right" else 0.8 - 0.6 * t) * w
            frames.append(_draw(h, w, shape, COLORS[color], cx, h / 2, w / 8))
        turns = [{"from": "human", "value": "<vila/video>\nWhat happens in the video?"},
                 {"from": "gpt", "value": f"A {color} {shape} moves {direction}."}]
        return {"frames": frames, "conversations": turns[: 2 * sc.turns]}
    n_images = rng.randint(1, max(sc.max_images, 1)) if rng.random() < sc.image_prob and sc.max_images else 0
    images, facts = [], []
    for _ in range(n_images):
        w, h = rng.randint(sc.image_min_side, sc.image_max_side), rng.randint(sc.image_min_side, sc.image_max_side)
        side = rng.choice(POSITIONS)
        cx = w * (0.25 if side == "left" else 0.75)
        r = min(w, h) / 6
        images.append(_draw(h, w, shape, COLORS[color], cx, h / 2, r))
        facts.append(side)
    if images:
        qa = [("What shape is in the image?", f"A {color} {shape}."),
              ("Which side is it on?", f"It is on the {facts[0]} side."),
              ("What color is it?", f"It is {color}.")]
        first = "<image>" * n_images + "\n"
    else:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
              (f"Name a {color} thing.", f"A {color} {shape}."),
              ("Thanks!", "You are welcome.")]
        first = ""
    for t in range(sc.turns):
        q, a = qa[t % len(qa)]
        turns += [{"from": "human", "value": (first if t == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"images": images, "conversations": turns}


class SyntheticConversations(StatefulIterator):
    """Micro-batches of packed synthetic conversations; rank r of W reads samples
    ``(step * W + r) * mbs + j`` of an epoch of ``num_samples`` (the order is fixed, so resuming only
    needs the micro-batch counter)."""

    def __init__(self, cfg: NVILAConfig, tok: ChatTokenizer, seed: int, dp_rank: int, dp_world: int,
                 micro_batch_size: int, num_samples: int, pad_to_multiple: int = 1):
        self.cfg, self.tok, self.seed, self.pad_to_multiple = cfg, tok, seed, pad_to_multiple
        self.rank, self.world, self.mbs, self.num_samples = dp_rank, dp_world, micro_batch_size, num_samples
        self.step = 0
        self._counts = {"samples": 0, "images": 0, "videos": 0, "visual_tokens": 0}

    def __next__(self) -> dict[str, Any]:
        samples = []
        for j in range(self.mbs):
            idx = ((self.step * self.world + self.rank) * self.mbs + j) % self.num_samples
            raw = synthetic_sample(self.cfg, self.seed, idx)
            samples.append(process_sample(raw, self.cfg, self.tok, where=f"synthetic sample {idx}"))
        self.step += 1
        batch = collate_packed(samples, self.tok.pad_id, self.pad_to_multiple)
        self._counts["samples"] += len(samples)
        self._counts["images"] += int((batch["media_kind"] == 0).sum())
        self._counts["videos"] += int((batch["media_kind"] == 1).sum())
        self._counts["visual_tokens"] += int((batch["input_ids"] == self.tok.image_id).sum())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._counts.update(state.get("counts", {}))

    def load_resharded_state_dict(self, states: list[dict[str, Any]]) -> str:
        # every rank advanced the same number of micro-batches; keep the counter (order changes)
        self.step = int(states[0]["step"])
        return f"synthetic stream continues at micro-batch {self.step} (sample order differs after resharding)"

    def metrics(self) -> dict[str, float]:
        return dict(self._counts)


# ---------------------------------------------------------------------------------------------------
# Webdataset
# ---------------------------------------------------------------------------------------------------
def webdataset_sample_fn(raw: dict[str, Any], cfg: NVILAConfig, tok: ChatTokenizer) -> dict[str, Any]:
    """Loader-worker transform: a raw webdataset sample (conversation with images, or video frames
    with a caption / conversations json) -> a processed sample."""
    import json

    from scaleforge.platform.data import decode_conversation, decode_video_text

    where = f"{raw.get('__url__', '?')}/{raw.get('__key__', '?')}"
    if any(k.startswith("frame_") or k == "mp4" for k in raw):
        sample = decode_video_text(raw)
        meta = json.loads(raw["json"]) if "json" in raw else None
        if isinstance(meta, dict) and "conversations" in meta:
            sample["conversations"] = meta["conversations"]
    else:
        sample = decode_conversation(raw)
    return process_sample(sample, cfg, tok, where=where)
