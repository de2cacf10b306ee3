"""Decoders from raw webdataset samples (bytes per extension) to sample dicts, with PIL and numpy.

Each helper raises ``KeyError`` for a missing field and lets PIL / numpy errors (``OSError``,
``ValueError``) through; the loader counts those as bad samples. The formats are documented in
docs/data.md ("Decoders").
"""
from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class BadSample(ValueError):
    """Raised by a ``sample_fn`` to skip a sample (counted and logged by the loader)."""


#: exceptions from ``sample_fn`` that mean "this sample is bad" (anything else is a bug and stops training)
BAD_SAMPLE_ERRORS: tuple[type[BaseException], ...] = (BadSample, KeyError, ValueError, OSError, EOFError,
                                                      Image.DecompressionBombError, SyntaxError)


def _field(raw: dict[str, Any], *names: str) -> tuple[str, Any]:
    for n in names:
        if n in raw:
            return n, raw[n]
    raise KeyError(f"sample {raw.get('__key__')!r} has none of the fields {', '.join(names)} "
                   f"(fields: {', '.join(sorted(k for k in raw if not k.startswith('__')))})")


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now so that a truncated file fails here, inside the bad-sample guard
    return img.convert(mode) if mode and img.mode != mode else img


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def decode_video_mp4(data: bytes, mode: str = "RGB") -> list[Image.Image]:
    """All frames of an mp4 through PyAV (optional dependency: ``pip install .[video]``)."""
    try:
        import av  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("decoding mp4 needs PyAV: pip install 'scaleforge[video]'") from e
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_image().convert(mode) for f in container.decode(video=0)]
    except av.error.FFmpegError as e:  # pragma: no cover
        raise ValueError(f"undecodable mp4: {e}") from None
    if not frames:
        raise ValueError("mp4 without frames")
    return frames


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode every field by its last extension; meta keys (``__key__`` ...) are kept."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("__"):
            out[key] = value
            continue
        ext = key.rsplit(".", 1)[-1]
        if ext in IMAGE_EXTS:
            out[key] = decode_image(value)
        elif ext == "npy":
            out[key] = torch.from_numpy(decode_npy(value))
        elif ext == "json":
            out[key] = decode_json(value)
        elif ext in ("txt", "text", "caption"):
            out[key] = decode_text(value)
        elif ext in ("cls", "cls2", "index"):
            out[key] = int(decode_text(value))
        else:
            out[key] = value
    return out


def decode_tokens(raw: dict[str, Any]) -> dict[str, Any]:
    _, data = _field(raw, "tokens.npy")
    arr = decode_npy(data)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens.npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return {"input_ids": torch.from_numpy(arr.astype(np.int64))}


def decode_image_text(raw: dict[str, Any], mode: str = "RGB") -> dict[str, Any]:
    _, img = _field(raw, *IMAGE_EXTS)
    _, txt = _field(raw, "txt", "caption")
    return {"image": decode_image(img, mode), "caption": decode_text(txt)}


def _numbered_images(raw: dict[str, Any], prefix: str) -> list[Image.Image]:
    pat = re.compile(rf"^{prefix}_?(\d+)\.({'|'.join(IMAGE_EXTS)})$")
    found = sorted((int(m.group(1)), k) for k in raw if (m := pat.match(k)))
    return [decode_image(raw[k]) for _, k in found]


def decode_conversation(raw: dict[str, Any]) -> dict[str, Any]:
    _, meta = _field(raw, "json")
    obj = decode_json(meta)
    if "conversations" not in obj:
        raise KeyError(f"sample {raw.get('__key__')!r}: json has no 'conversations'")
    conv = obj["conversations"]
    if not isinstance(conv, list) or not all(isinstance(t, dict) and "value" in t for t in conv):
        raise ValueError(f"sample {raw.get('__key__')!r}: 'conversations' must be a list of turns "
                         "{'from': ..., 'value': ...}")
    images = _numbered_images(raw, "img")
    if not images:
        for ext in IMAGE_EXTS:
            if ext in raw:
                images = [decode_image(raw[ext])]
                break
    return {"images": images, "conversations": conv}


def decode_video_text(raw: dict[str, Any]) -> dict[str, Any]:
    frames = _numbered_images(raw, "frame")
    if not frames and "mp4" in raw:
        frames = decode_video_mp4(raw["mp4"])
    if not frames:
        raise KeyError(f"sample {raw.get('__key__')!r} has no frame_NNN.jpg files and no mp4")
    _, txt = _field(raw, "txt", "caption")
    return {"frames": frames, "caption": decode_text(txt)}


def decode_image_boxes(raw: dict[str, Any]) -> dict[str, Any]:
    _, img = _field(raw, *IMAGE_EXTS)
    _, meta = _field(raw, "json")
    obj = decode_json(meta)
    boxes = torch.tensor(obj["boxes"], dtype=torch.float32).reshape(-1, 4)
    box_captions = list(obj["box_captions"])
    if len(box_captions) != boxes.shape[0]:
        raise ValueError(f"sample {raw.get('__key__')!r}: {boxes.shape[0]} boxes but "
                         f"{len(box_captions)} box captions")
    caption = decode_text(raw["txt"]) if "txt" in raw else str(obj.get("caption", ""))
    return {"image": decode_image(img), "caption": caption, "boxes": boxes, "box_captions": box_captions}


def decode_latent_text(raw: dict[str, Any]) -> dict[str, Any]:
    _, lat = _field(raw, "latent.npy", "npy")
    arr = decode_npy(lat)
    if arr.ndim != 3:
        raise ValueError(f"latent must be (C, h, w), got shape {arr.shape}")
    _, txt = _field(raw, "txt", "caption")
    return {"latent": torch.from_numpy(arr.astype(np.float32)), "caption": decode_text(txt)}
