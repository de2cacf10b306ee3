"""Weighted blending of several sources: realized mix within 2% of the weights over 10k samples, and
per-source counts in the metrics."""
from __future__ import annotations

import pytest
import webdataset as wds

from scaleforge.platform.data import build_loader, decode_tokens

from loader_helpers import ctx, data_cfg


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """Three sources of one-file samples (cheap to read: the test reads 10k samples)."""
    out = tmp_path_factory.mktemp("blend")
    patterns = []
    for s, n_shards in enumerate((4, 3, 2)):
        for k in range(n_shards):
            with wds.TarWriter(str(out / f"s{s}-{k}.tar")) as w:
                for i in range(25):
                    w.write({"__key__": f"{k:03d}{i:05d}", "cls": i})
        patterns.append(str(out / f"s{s}-{{0..{n_shards - 1}}}.tar"))
    return patterns


def test_realized_mix_matches_weights_over_10k_samples(tiny_sources):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    cfg = data_cfg(*[(name, p, w) for (name, w), p in zip(weights.items(), tiny_sources)], num_workers=0,
                   shuffle_buffer=1)
    loader = build_loader(cfg, ctx(mbs=200), lambda raw: {"cls": int(raw["cls"])})
    counts = dict.fromkeys(weights, 0)
    for _ in range(50):  # 10k samples
        for key in next(loader)["__key__"]:
            counts[key.split("/", 1)[0]] += 1
    metrics = loader.metrics()
    loader.close()
    assert sum(counts.values()) == 10_000
    for name, w in weights.items():
        assert abs(counts[name] / 10_000 - w) < 0.02, (name, counts)
        assert metrics[f"data/{name}/samples"] == counts[name]
        assert metrics.get(f"data/{name}/bad", 0) == 0


def test_metrics_sum_over_workers(token_shards, token_shards_b):
    cfg = data_cfg(("a", token_shards, 0.5), ("b", token_shards_b, 0.5), num_workers=2)
    loader = build_loader(cfg, ctx(mbs=5), decode_tokens)
    for _ in range(40):
        next(loader)
    m = loader.metrics()
    loader.close()
    # 200 consumed samples; the counters are those of the consumed batches exactly
    assert m["data/a/samples"] + m["data/b/samples"] == 200
