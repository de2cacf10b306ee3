"""``scaleforge data synth | pack | inspect``: write small synthetic datasets, pack image folders into
shards, and report what shards hold. Formats are in docs/data.md."""
from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from scaleforge.platform.data.decode import BAD_SAMPLE_ERRORS, decode_sample
from scaleforge.platform.data.shards import DataError, ShardReadResult, check_shards_exist, expand_patterns, iter_shard

KINDS = ("tokens", "image-text", "conversations", "video-text", "image-boxes")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20),
          "black": (10, 10, 10), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")


def _draw(draw: ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], box: tuple[int, int, int, int]):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def shapes_image(rng: random.Random, width: int, height: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """A white image with 1-3 non-overlapping-ish colored shapes; returns the shapes with pixel boxes."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    shapes = []
    for _ in range(rng.randint(1, 3)):
        s = max(4, int(min(width, height) * rng.uniform(0.2, 0.4)))
        x0, y0 = rng.randint(0, width - s), rng.randint(0, height - s)
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        box = (x0, y0, x0 + s, y0 + s)
        _draw(draw, shape, COLORS[color], box)
        shapes.append({"shape": shape, "color": color, "box": list(box)})
    return img, shapes


def _image_size(rng: random.Random, size: int, random_aspect: bool) -> tuple[int, int]:
    if not random_aspect:
        return size, size
    ratio = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))  # h / w
    return max(8, round(size / math.sqrt(ratio))), max(8, round(size * math.sqrt(ratio)))


def _describe(shapes: list[dict[str, Any]]) -> str:
    return _join([f"a {s['color']} {s['shape']}" for s in shapes])


def synth_samples(kind: str, n: int, seed: int = 0, size: int = 64, seq_len: int = 129, vocab: int = 256,
                  frames: int = 8, random_aspect: bool = False) -> Iterator[dict[str, Any]]:
    """The samples ``scaleforge data synth`` writes (dicts for webdataset's TarWriter)."""
    if kind not in KINDS:
        raise DataError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    for i in range(n):
        key = f"{i:08d}"
        if kind == "tokens":
            start, step = rng.randrange(vocab), rng.randrange(1, max(2, vocab // 4))
            toks = ((start + step * np.arange(seq_len)) % vocab).astype(np.int32)
            yield {"__key__": key, "tokens.npy": toks, "json": {"start": start, "step": step}}
            continue
        w, h = _image_size(rng, size, random_aspect)
        if kind == "video-text":
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            s = max(4, size // 4)
            direction = rng.choice(["left to right", "right to left", "top to bottom", "bottom to top"])
            sample = {"__key__": key, "txt": f"a {color} {shape} moving {direction}",
                      "json": {"shape": shape, "color": color, "direction": direction, "frames": frames}}
            for f in range(frames):
                t = f / max(1, frames - 1)
                if direction in ("left to right", "right to left"):
                    x = int((t if direction == "left to right" else 1 - t) * (w - s))
                    y = (h - s) // 2
                else:
                    y = int((t if direction == "top to bottom" else 1 - t) * (h - s))
                    x = (w - s) // 2
                img = Image.new("RGB", (w, h), (255, 255, 255))
                _draw(ImageDraw.Draw(img), shape, COLORS[color], (x, y, x + s, y + s))
                sample[f"frame_{f:03d}.jpg"] = _jpeg(img)
            yield sample
            continue
        img, shapes = shapes_image(rng, w, h)
        caption = f"{_describe(shapes)} on a white background"
        if kind == "image-text":
            yield {"__key__": key, "jpg": _jpeg(img), "txt": caption,
                   "json": {"width": w, "height": h, "shapes": shapes}}
        elif kind == "image-boxes":
            yield {"__key__": key, "jpg": _jpeg(img), "txt": caption,
                   "json": {"width": w, "height": h, "boxes": [s["box"] for s in shapes],
                            "box_captions": [f"a {s['color']} {s['shape']}" for s in shapes]}}
        else:  # conversations
            turns = [("<image>\nWhat is in the image?", f"The image shows {_describe(shapes)}."),
                     ("How many shapes are there?", str(len(shapes))),
                     (f"What color is the {shapes[0]['shape']}?", shapes[0]["color"])]
            conv = []
            for q, a in turns[:rng.randint(1, 3)]:
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            yield {"__key__": key, "jpg": _jpeg(img), "json": {"conversations": conv, "width": w, "height": h}}


def write_shards(samples: Iterator[dict[str, Any]], out: str | os.PathLike, per_shard: int = 100,
                 max_bytes: float = 3e9) -> list[str]:
    """Write ``shard-%06d.tar`` files into ``out``: into a temporary folder first, moved into place only once
    every sample is written, so that an error (a bad input line) leaves no partial shards behind. An
    ``out`` that already holds shards is refused, so that old and new shards never mix."""
    out = Path(out)
    old = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if old:
        raise DataError(f"--out {out}: already holds {len(old)} shard(s) ({old[0].name} ...); remove them or "
                        "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=per_shard, maxsize=max_bytes, verbose=0) as sink:
            for s in samples:
                sink.write(s)
        names = sorted(p.name for p in tmp.glob("shard-*.tar"))
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(out / name) for name in names]


def synth(kind: str, out: str, n: int, per_shard: int = 100, seed: int = 0, size: int = 64, seq_len: int = 129,
          vocab: int = 256, frames: int = 8, random_aspect: bool = False) -> list[str]:
    for flag, value, low in (("--n", n, 1), ("--per-shard", per_shard, 1), ("--size", size, 8),
                             ("--seq-len", seq_len, 2), ("--vocab", vocab, 2), ("--frames", frames, 1)):
        if value < low:
            raise DataError(f"{flag}: must be >= {low}, got {value}")
    return write_shards(synth_samples(kind, n, seed, size, seq_len, vocab, frames, random_aspect), out, per_shard)


def pack(images: str, captions: str, out: str, shard_size_mb: float = 256.0, max_per_shard: int = 10000) -> list[str]:
    """Shards from a folder of images and a JSONL whose lines name an image (relative to ``images``)
    and carry a ``caption`` and/or ``conversations``; other fields go into the sample's json."""
    root, cap = Path(images), Path(captions)
    if not root.is_dir():
        raise DataError(f"--images: {root} is not a directory")
    if not cap.is_file():
        raise DataError(f"--captions: {cap} not found")
    if shard_size_mb <= 0 or max_per_shard < 1:
        raise DataError(f"--shard-size-mb and --max-per-shard: must be positive, got {shard_size_mb}, {max_per_shard}")

    def samples() -> Iterator[dict[str, Any]]:
        for lineno, line in enumerate(cap.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{cap}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{cap}:{lineno}: expected a JSON object {{\"image\": ..., \"caption\": ...}}, "
                                f"got {type(rec).__name__}")
            name = rec.get("image")
            if not name:
                raise DataError(f"{cap}:{lineno}: no 'image' field")
            path = root / name
            if not path.is_file():
                raise DataError(f"{cap}:{lineno}: image {path} not found")
            if "caption" not in rec and "conversations" not in rec:
                raise DataError(f"{cap}:{lineno}: needs 'caption' or 'conversations'")
            ext = path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            sample: dict[str, Any] = {"__key__": f"{lineno - 1:08d}", ext: path.read_bytes(), "json": rec}
            if "caption" in rec:
                sample["txt"] = str(rec["caption"])
            yield sample

    return write_shards(samples(), out, per_shard=max_per_shard, max_bytes=shard_size_mb * 1e6)


def inspect(patterns: list[str]) -> dict[str, Any]:
    """Per shard: samples, field counts, bytes, bad samples (undecodable fields) and truncation."""
    urls = expand_patterns(patterns, "shards")
    check_shards_exist(urls, "shards")
    report: dict[str, Any] = {"shards": [], "samples": 0, "bytes": 0, "bad": 0, "truncated": 0, "fields": Counter()}
    for url in urls:
        res = ShardReadResult()
        info: dict[str, Any] = {"url": url, "samples": 0, "bytes": 0, "fields": Counter(), "bad": []}
        for index, raw in iter_shard(url, res):
            info["samples"] += 1
            info["bytes"] += sum(len(v) for k, v in raw.items() if not k.startswith("__") and isinstance(v, bytes))
            info["fields"].update(k for k in raw if not k.startswith("__"))
            try:
                decode_sample(raw)
            except BAD_SAMPLE_ERRORS as e:
                info["bad"].append({"key": raw["__key__"], "index": index, "error": f"{type(e).__name__}: {e}"})
        info["truncated"] = res.error if res.truncated else ""
        report["shards"].append(info)
        report["samples"] += info["samples"]
        report["bytes"] += info["bytes"]
        report["bad"] += len(info["bad"])
        report["truncated"] += bool(res.truncated)
        report["fields"].update(info["fields"])
    return report
