"""``scaleforge data synth | pack | inspect`` handlers, called in-process."""
from __future__ import annotations

import json

from PIL import Image

from scaleforge.platform.data import build_loader, decode_conversation, decode_image_text
from scaleforge.platform.data.cli import main
from scaleforge.platform.data.tools import inspect

from loader_helpers import ctx, data_cfg


def test_synth_writes_shards_of_the_requested_size(tmp_path, capsys):
    assert main(["data", "synth", "--kind", "image-text", "--out", str(tmp_path), "--n", "25",
                 "--per-shard", "10", "--size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]
    rep = inspect([str(tmp_path / "shard-{000000..000002}.tar")])
    assert [s["samples"] for s in rep["shards"]] == [10, 10, 5]
    assert rep["fields"] == {"jpg": 25, "txt": 25, "json": 25} and rep["bad"] == 0
    assert "wrote 25 image-text samples in 3 shard(s)" in capsys.readouterr().out


def test_synth_is_deterministic_and_captions_describe_the_image(tmp_path):
    for d in ("a", "b"):
        main(["data", "synth", "--kind", "image-boxes", "--out", str(tmp_path / d), "--n", "5", "--size", "48"])
    a = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    loader = build_loader(data_cfg(("x", str(tmp_path / "a" / "shard-000000.tar")), shuffle_buffer=1), ctx(mbs=5),
                          lambda raw: {"meta": json.loads(raw["json"]), "caption": raw["txt"].decode()})
    batch = next(loader)
    loader.close()
    for meta, cap in zip(batch["meta"], batch["caption"]):
        for box_cap in meta["box_captions"]:
            assert box_cap in cap
    assert len(a) > 0 and inspect([str(tmp_path / "b" / "shard-000000.tar")])["samples"] == 5


def test_pack_folder_and_jsonl(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    lines = []
    for i in range(7):
        Image.new("RGB", (20 + i, 16), (10 * i, 0, 0)).save(imgs / f"im{i}.jpg")
        rec = {"image": f"im{i}.jpg", "caption": f"picture {i}"} if i % 2 else {
            "image": f"im{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                     {"from": "gpt", "value": f"picture {i}"}]}
        lines.append(json.dumps(rec))
    cap = tmp_path / "caps.jsonl"
    cap.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert main(["data", "pack", "--images", str(imgs), "--captions", str(cap), "--out", str(out),
                 "--max-per-shard", "3"]) == 0
    rep = inspect([str(out / "shard-{000000..000002}.tar")])
    assert [s["samples"] for s in rep["shards"]] == [3, 3, 1] and rep["bad"] == 0
    loader = build_loader(data_cfg(("p", str(out / "shard-{000000..000002}.tar")), shuffle_buffer=1),
                          ctx(mbs=1), lambda raw: {"raw": raw})
    got = {}
    for _ in range(7):
        raw = next(loader)["raw"][0]
        rec = json.loads(raw["json"])
        if "caption" in rec:
            s = decode_image_text(raw)
            assert s["caption"] == rec["caption"]
        else:
            s = decode_conversation(raw)
            s["image"] = s["images"][0]
        got[rec["image"]] = s["image"].size
    loader.close()
    assert got == {f"im{i}.jpg": (20 + i, 16) for i in range(7)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.jpg", "caption": "x"}) + "\n")
    assert main(["data", "pack", "--images", str(imgs), "--captions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: image" in capsys.readouterr().err


def test_inspect_reports_bad_samples_and_truncation(tmp_path, capsys):
    main(["data", "synth", "--kind", "image-text", "--out", str(tmp_path), "--n", "8", "--per-shard", "4",
          "--size", "16"])
    p = tmp_path / "shard-000001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shard-{000000..000001}.tar")]) == 1
    out = capsys.readouterr().out
    assert "truncated:" in out and "1 truncated shards" in out
    assert main(["data", "inspect", str(tmp_path / "nope-{0..1}.tar")]) == 2
    assert "2 of 2 shards not found" in capsys.readouterr().err


def test_wired_into_the_scaleforge_command(tmp_path, capsys):
    from scaleforge.launch.cli import scaleforge_main

    assert scaleforge_main(["data", "synth", "--kind", "tokens", "--out", str(tmp_path), "--n", "3"]) == 0
    assert scaleforge_main(["data", "inspect", str(tmp_path / "shard-000000.tar")]) == 0
    assert "3 samples" in capsys.readouterr().out
    assert scaleforge_main(["data", "inspect", str(tmp_path / "missing.tar")]) == 2
