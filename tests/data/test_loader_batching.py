"""Batching for the recipes: aspect-ratio buckets (SANA), sequence packing (NVILA), PS3 collate; and
the decoders of every kind ``scaleforge data synth`` writes, read through the loader."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scaleforge.platform.data import (
    AspectRatioBucketBatcher, FixedBatcher, PackingBatcher, aspect_ratio_buckets, build_loader, collate_samples,
    decode_conversation, decode_image_boxes, decode_image_text, decode_tokens, decode_video_text,
    packed_attention_mask,
)
from scaleforge.platform.data.tools import synth

from loader_helpers import ctx, data_cfg


@pytest.mark.parametrize("base", [512, 1024])
def test_bucket_tables(base):
    table = aspect_ratio_buckets(base)
    assert 20 <= len(table) <= 60
    assert table[1.0] == (base, base)
    for ratio, (h, w) in table.items():
        assert h % (base // 16) == 0 and w % (base // 16) == 0
        assert abs(h * w / base ** 2 - 1) < 0.15  # about the base area
        assert abs(h / w - ratio) < 0.01 and 0.25 <= ratio <= 4.0


@pytest.fixture(scope="module")
def aspect_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("aspect")
    synth("image-text", str(out), 48, per_shard=8, size=32, random_aspect=True, seed=5)
    return str(out / "shard-{000000..000005}.tar")


def test_every_bucket_batch_comes_from_one_bucket(aspect_shards):
    table = {0.5: (16, 32), 1.0: (24, 24), 2.0: (32, 16)}
    batcher = AspectRatioBucketBatcher(3, table)
    seen_ratios = {}

    def fn(raw):
        s = decode_image_text(raw)
        seen_ratios[raw["__key__"]] = s["image"].height / s["image"].width
        return s

    loader = build_loader(data_cfg(("img", aspect_shards), num_workers=0), ctx(), fn, batcher=batcher)
    buckets_used = set()
    for _ in range(12):
        b = next(loader)
        h, w = b["bucket_hw"]
        assert b["image"].shape == (3, 3, h, w) and b["image"].dtype == torch.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        for key in b["__key__"]:
            r = seen_ratios[key.rsplit("/", 1)[-1]]
            nearest = min(table, key=lambda q: abs(math.log(q) - math.log(r)))
            assert table[nearest] == (h, w)
        buckets_used.add((h, w))
    loader.close()
    assert len(buckets_used) >= 2


def test_bucket_batcher_resumes_exactly_with_workers(aspect_shards):
    cfg = data_cfg(("img", aspect_shards), num_workers=2)

    def make():
        return build_loader(cfg, ctx(), decode_image_text, batcher=AspectRatioBucketBatcher(2, 64))

    ref_l = make()
    ref = [next(ref_l) for _ in range(16)]
    ref_l.close()
    a = make()
    head = [next(a) for _ in range(7)]
    state = a.state_dict()
    a.close()
    b = make()
    b.load_state_dict(state)
    tail = [next(b) for _ in range(9)]
    b.close()
    for x, y in zip(head + tail, ref):
        assert x["__key__"] == y["__key__"] and torch.equal(x["image"], y["image"])


def _tok_sample(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (n,), generator=g), "id": seed}


def test_packing_layout():
    batcher = PackingBatcher(max_len=10, rows=2)
    lengths = [4, 5, 3, 6, 2, 7]
    out = None
    for i, n in enumerate(lengths):
        r = batcher.add(_tok_sample(n, i))
        if r is not None:
            assert out is None
            out = r
    # rows: [4, 5] (3 does not fit), [3, 6]; 2 does not fit into row 2 -> batch; 2 and 7 are held
    assert out is not None and [s["id"] for s in batcher.pending()] == [4, 5]
    assert out["num_samples"].tolist() == [2, 2]
    assert out["id"] == [0, 1, 2, 3]
    assert out["cu_seqlens"].tolist() == [0, 4, 9, 10, 13, 19, 20]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    assert out["seq_ids"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, -1]
    assert out["labels"][0, 0] == -100 and out["labels"][0, 4] == -100 and out["labels"][0, 9] == -100
    assert torch.equal(out["labels"][0, 1:4], out["input_ids"][0, 1:4])
    assert out["max_seqlen"] == 6
    assert batcher.counters["truncated"] == 0
    batcher.add(_tok_sample(15, 9))
    assert batcher.counters["truncated"] == 1


def test_packed_attention_never_crosses_samples():
    """Attention over a packed row with ``packed_attention_mask`` equals attention of each sample on its
    own (so nothing leaks across samples), and the mask is block-diagonal causal."""
    torch.manual_seed(0)
    batcher = PackingBatcher(max_len=16, rows=1)
    samples = [_tok_sample(n, i) for i, n in enumerate([5, 7, 3, 9])]
    out = None
    for s in samples:
        out = batcher.add(s) or out
    assert out is not None and out["num_samples"].tolist() == [3]  # 5 + 7 + 3 = 15 <= 16
    mask = packed_attention_mask(out["seq_ids"])
    seq = out["seq_ids"][0]
    for i in range(16):
        for j in range(16):
            same = seq[i] == seq[j] and seq[i] >= 0
            assert mask[0, 0, i, j] == ((same and j <= i) or (seq[i] < 0 and i == j))
    d = 8
    emb = torch.nn.Embedding(100, d)
    q, k, v = (emb(out["input_ids"]) @ torch.randn(d, d) for _ in range(3))
    packed = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)[:, 0]
    start = 0
    for s in samples[:3]:
        n = s["input_ids"].shape[0]
        alone = F.scaled_dot_product_attention(q[:, None, start:start + n], k[:, None, start:start + n],
                                               v[:, None, start:start + n], is_causal=True)[:, 0]
        torch.testing.assert_close(packed[:, start:start + n], alone)
        assert torch.equal(out["position_ids"][0, start:start + n], torch.arange(n))
        start += n


def test_ps3_collate_keeps_boxes_and_local_captions(tmp_path):
    synth("image-boxes", str(tmp_path), 8, per_shard=4, size=32)
    loader = build_loader(data_cfg(("ps3", str(tmp_path / "shard-{000000..000001}.tar")), num_workers=0),
                          ctx(mbs=4), decode_image_boxes)
    b = next(loader)
    loader.close()
    assert len(b["boxes"]) == 4 and len(b["box_captions"]) == 4 and len(b["image"]) == 4
    for boxes, caps, img, cap in zip(b["boxes"], b["box_captions"], b["image"], b["caption"]):
        assert boxes.shape == (len(caps), 4) and boxes.dtype == torch.float32
        assert isinstance(img, Image.Image)
        for (x0, y0, x1, y1), c in zip(boxes.tolist(), caps):
            assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
            assert c in cap  # the global caption names every local one
            # the box really holds a shape of that colour: its centre pixel is not background
            assert img.getpixel((int((x0 + x1) / 2), int(y1 - 2))) != (255, 255, 255)


def test_collate_stacks_what_stacks():
    out = collate_samples([{"a": torch.ones(2), "b": 1, "c": "x", "d": torch.ones(1)},
                           {"a": torch.zeros(2), "b": 2, "c": "y", "d": torch.ones(3)}])
    assert out["a"].shape == (2, 2) and out["b"].tolist() == [1, 2]
    assert out["c"] == ["x", "y"] and isinstance(out["d"], list)


@pytest.mark.parametrize("kind,decoder", [
    ("tokens", decode_tokens), ("image-text", decode_image_text), ("conversations", decode_conversation),
    ("video-text", decode_video_text), ("image-boxes", decode_image_boxes)])
def test_synth_kinds_decode_through_the_loader(tmp_path, kind, decoder):
    synth(kind, str(tmp_path), 6, per_shard=3, size=24, frames=4, seq_len=17)
    loader = build_loader(data_cfg((kind, str(tmp_path / "shard-{000000..000001}.tar")), num_workers=0),
                          ctx(mbs=2), decoder, batcher=FixedBatcher(2, lambda s: {"s": s}))
    samples = next(loader)["s"]
    loader.close()
    for s in samples:
        if kind == "tokens":
            ids = s["input_ids"]
            assert ids.shape == (17,) and ids.dtype == torch.int64
            assert len({int(x) for x in (ids[1:] - ids[:-1]) % 256}) == 1  # arithmetic progression
        elif kind == "conversations":
            assert len(s["images"]) == 1 and s["conversations"][0]["value"].startswith("<image>\n")
            assert [t["from"] for t in s["conversations"]][:2] == ["human", "gpt"]
        elif kind == "video-text":
            assert len(s["frames"]) == 4 and "moving" in s["caption"]
            assert s["frames"][0].tobytes() != s["frames"][-1].tobytes()  # the shape moved
        else:
            assert isinstance(s["image"], Image.Image) and s["caption"].startswith("a ")


def test_mp4_video_decodes_through_pyav(tmp_path):
    av = pytest.importorskip("av")  # optional extra: pip install .[video]
    import io

    import numpy as np
    import webdataset as wds

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for f in range(6):
            arr = np.full((32, 64, 3), 255, np.uint8)
            arr[8:24, 8 * f:8 * f + 16] = (200, 20, 20)  # a red square moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with wds.TarWriter(str(tmp_path / "v.tar")) as w:
        w.write({"__key__": "clip", "mp4": buf.getvalue(), "txt": "a red square moving left to right"})
    loader = build_loader(data_cfg(("v", str(tmp_path / "v.tar")), num_workers=0), ctx(mbs=1), decode_video_text)
    s = next(loader)
    loader.close()
    frames = s["frames"][0]
    assert len(frames) == 6 and frames[0].size == (64, 32)
    xs = [int(np.argmax(np.asarray(fr)[16, :, 1] < 128)) for fr in frames]  # left edge of the square
    assert xs == sorted(xs) and xs[-1] - xs[0] >= 30
