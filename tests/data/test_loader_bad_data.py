"""Bad data: truncated tars, undecodable images and missing fields are skipped, counted and logged
once; a budget stops training; start-up problems are clear errors before any worker starts."""
from __future__ import annotations

import logging
import tarfile
from collections import Counter

import pytest
import webdataset as wds

from scaleforge.platform.data import BadSample, DataError, build_loader, decode_image_text, decode_tokens
from scaleforge.platform.data.tools import synth_samples

from loader_helpers import ctx, data_cfg


def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@pytest.fixture(scope="module")
def dirty_shards(tmp_path_factory):
    """4 image-text shards x 6 samples; shard 1 is truncated after about half its bytes, shard 2 has an
    undecodable jpg (key 00000013) and a sample without caption (key 00000015)."""
    out = tmp_path_factory.mktemp("dirty")
    samples = list(synth_samples("image-text", 24, seed=3, size=24))
    for i, s in enumerate(samples):
        s["json"] = {"i": i}
    samples[13]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    del samples[15]["txt"]
    for k in range(4):
        _write(out / f"shard-{k:06d}.tar", samples[6 * k:6 * k + 6])
    p = out / "shard-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return str(out / "shard-{000000..000003}.tar"), out


def _ids(raw):
    out = decode_image_text(raw)
    out["id"] = raw["__key__"]
    out["epoch"] = raw["__epoch__"]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_logged_once(dirty_shards, workers, caplog):
    pattern, _ = dirty_shards
    cfg = data_cfg(("img", pattern), num_workers=workers, max_bad_fraction=0.5, shuffle_buffer=3)
    caplog.set_level(logging.WARNING, logger="scaleforge.data")
    loader = build_loader(cfg, ctx(mbs=2), _ids)
    batches = [next(loader) for _ in range(40)]  # 80 samples: more than 3 epochs of the <= 21 good ones
    metrics = loader.metrics()
    loader.close()
    by_epoch = {}
    for b in batches:
        for i, e in zip(b["id"], b["epoch"].tolist()):
            by_epoch.setdefault(e, Counter())[i] += 1
    first_good_of_shard1 = {f"{i:08d}" for i in range(6, 12)}
    for e in (0, 1):
        got = by_epoch[e]
        assert max(got.values()) == 1
        assert "00000013" not in got and "00000015" not in got
        expected = {f"{i:08d}" for i in range(24)} - first_good_of_shard1 - {"00000013", "00000015"}
        assert expected <= set(got)  # every good sample of the intact shards
        assert set(got) - expected <= first_good_of_shard1  # whatever survived the truncation
    epochs_done = min(by_epoch) + 2
    assert metrics["data/img/bad"] >= 2 * epochs_done
    assert metrics["data/img/truncated_shards"] >= epochs_done
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        msgs = [r.getMessage() for r in caplog.records]
        bad_jpg = [m for m in msgs if "00000013" in m]
        assert len(bad_jpg) == 1 and "shard-000002.tar" in bad_jpg[0]
        assert len([m for m in msgs if "00000015" in m]) == 1
        assert len([m for m in msgs if "shard-000001.tar" in m and "ends early" in m]) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_fraction_budget_stops_with_clear_error(token_shards, workers):
    def every_tenth_is_bad(raw):
        if int(raw["__key__"]) % 10 == 0:
            raise BadSample("test: every tenth sample is bad")
        return decode_tokens(raw)

    loader = build_loader(data_cfg(("tok", token_shards), num_workers=workers, max_bad_fraction=0.05),
                          ctx(), every_tenth_is_bad)
    with pytest.raises(DataError, match=r"too many bad samples.*max_bad_fraction=0.05.*shard-0000\d\d.tar key"):
        for _ in range(200):
            next(loader)
    loader.close()
    ok = build_loader(data_cfg(("tok", token_shards), num_workers=workers, max_bad_fraction=0.15),
                      ctx(), every_tenth_is_bad)
    for _ in range(100):
        next(ok)
    ok.close()


def test_other_errors_in_a_worker_are_not_swallowed(token_shards):
    def buggy(raw):
        if raw["__key__"] == "00000030":
            raise RuntimeError("bug in sample_fn")
        return decode_tokens(raw)

    loader = build_loader(data_cfg(("tok", token_shards), num_workers=2), ctx(), buggy, probe=False)
    with pytest.raises(RuntimeError, match="bug in sample_fn"):
        for _ in range(100):
            next(loader)
    loader.close()


def test_startup_errors_name_the_problem(token_shards, dirty_shards, tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[0\] \(tok\).shards: 1 of 9 shards not found: .*shard-000008.tar"):
        build_loader(data_cfg(("tok", token_shards.replace("000007", "000008"))), ctx(), decode_tokens)
    with pytest.raises(DataError, match="empty shard pattern"):
        build_loader(data_cfg(("tok", [""])), ctx(), decode_tokens)
    with pytest.raises(DataError, match="no source configured"):
        build_loader(data_cfg(), ctx(), decode_tokens)
    with pytest.raises(DataError, match="8 shard\\(s\\) for 3 rank\\(s\\) x 3 worker\\(s\\) = 9 readers"):
        build_loader(data_cfg(("tok", token_shards), num_workers=3), ctx(0, 3), decode_tokens)
    # a source whose samples all fail: image decoder on token shards
    with pytest.raises(DataError, match=r"source 'tok': no usable sample .*KeyError"):
        build_loader(data_cfg(("tok", token_shards)), ctx(), decode_image_text)
    empty = tmp_path / "empty.tar"
    _write(empty, [])
    with pytest.raises(DataError, match="no complete sample"):
        build_loader(data_cfg(("e", str(empty))), ctx(), decode_tokens)
    with pytest.raises(DataError, match="data.mode"):
        build_loader(data_cfg(("tok", token_shards), mode="sometimes"), ctx(), decode_tokens)


def test_pipe_urls_and_lists_of_patterns(token_shards):
    base = token_shards.split("shard-")[0]
    shards = [f"pipe:cat {base}shard-00000{{0..3}}.tar", f"{base}shard-00000{{4..7}}.tar"]
    loader = build_loader(data_cfg(("tok", shards), num_workers=2), ctx(mbs=4), decode_tokens)
    keys = [k for _ in range(24) for k in next(loader)["__key__"]]
    loader.close()
    assert len(set(keys)) == 96  # one epoch = 96 distinct samples over pipe and local shards


def test_truncation_anywhere_is_detected_and_never_yields_a_partial_sample(tmp_path):
    from scaleforge.platform.data.shards import ShardReadResult, iter_shard

    src = tmp_path / "full.tar"
    _write(src, synth_samples("image-text", 3, size=16))
    data = src.read_bytes()
    full = list(iter_shard(str(src)))
    assert len(full) == 3
    with tarfile.open(src) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive marker starts
    cuts = sorted(set(range(512, end + 512, 512)) | {700, 1500, 2100, end // 2, end + 100})
    for cut in cuts:
        p = tmp_path / "cut.tar"
        p.write_bytes(data[:cut])
        res = ShardReadResult()
        got = list(iter_shard(str(p), res))
        assert res.truncated, cut
        assert len(got) < 3
        for (i, s), (j, ref) in zip(got, full):
            assert i == j and set(s) == set(ref) and s["jpg"] == ref["jpg"], cut
