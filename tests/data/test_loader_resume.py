"""Determinism and exact resume of the webdataset loader (same layout, other layouts, resampled)."""
from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch

from scaleforge.platform.data import DataError, PackingBatcher, build_loader

from loader_helpers import ctx, data_cfg, key_and_epoch


def take(loader, n):
    return [next(loader) for _ in range(n)]


def ids(batches):
    return [b["id"] for b in batches]


def same_batches(a, b):
    assert ids(a) == ids(b)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.parametrize("workers,cut", [(0, 1), (0, 13), (2, 3), (2, 18)])
def test_exact_resume_matches_uninterrupted(token_shards, token_shards_b, workers, cut):
    """Stop after ``cut`` micro-batches (mid-shard; cut=18 is past the first epoch boundary of the
    small source), restore into a fresh loader, and get exactly the batches an uninterrupted run gets."""
    cfg = data_cfg(("a", token_shards, 0.6), ("b", token_shards_b, 0.4), num_workers=workers)
    total = cut + 12
    ref_loader = build_loader(cfg, ctx(), key_and_epoch)
    ref = take(ref_loader, total)
    ref_loader.close()

    first = build_loader(cfg, ctx(), key_and_epoch)
    head = take(first, cut)
    state = pickle.loads(pickle.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    resumed = build_loader(cfg, ctx(), key_and_epoch)
    resumed.load_state_dict(state)
    tail = take(resumed, total - cut)
    resumed.close()
    same_batches(head + tail, ref)
    assert len(pickle.dumps(state)) < 100_000


def test_resume_twice_and_order_is_a_function_of_seed(token_shards):
    cfg = data_cfg(("a", token_shards), num_workers=2)
    run1 = build_loader(cfg, ctx(), key_and_epoch)
    ref = ids(take(run1, 20))
    run1.close()
    got = []
    state = None
    for chunk in (4, 7, 9):  # two restarts
        loader = build_loader(cfg, ctx(), key_and_epoch)
        if state is not None:
            loader.load_state_dict(state)
        got += ids(take(loader, chunk))
        state = loader.state_dict()
        loader.close()
    assert got == ref
    other = build_loader(data_cfg(("a", token_shards), num_workers=2, seed=99), ctx(), key_and_epoch)
    assert ids(take(other, 20)) != ref
    other.close()


def epoch_ids(batches, epoch):
    return [i for b in batches for i, e in zip(b["id"], b["epoch"].tolist()) if e == epoch]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (4, 1)])
def test_every_sample_exactly_once_per_epoch(token_shards, world, workers):
    """Over all ranks and workers, epochs 0 and 1 each contain every one of the 96 samples once."""
    cfg = data_cfg(("a", token_shards), num_workers=workers)
    batches = []
    for rank in range(world):
        loader = build_loader(cfg, ctx(rank, world), key_and_epoch)
        # 2 epochs of this rank need at most 2 * 96 samples (8 shards x 12 = 96 in all)
        batches += take(loader, 2 * 96 // 3 + 2)
        loader.close()
    all_ids = {f"a/shard-{i // 12:06d}.tar/{i:08d}" for i in range(96)}
    for epoch in (0, 1):
        seen = Counter(epoch_ids(batches, epoch))
        assert set(seen) == all_ids and max(seen.values()) == 1, epoch
    # epochs are reshuffled: the shard order of epoch 0 and epoch 1 differ on some reader
    assert epoch_ids(batches, 0) != epoch_ids(batches, 1)


@pytest.mark.parametrize("old,new", [((2, 2), (3, 1)), ((2, 2), (1, 2)), ((1, 2), (2, 0))])
def test_resume_at_other_world_size_resplits_rest_of_epoch(token_shards, old, new):
    """Documented rule: the unconsumed rest of every epoch in flight is re-split over the new readers;
    then epochs continue with the new layout. So epochs 0 and 1 still contain every sample once."""
    (ow, ok), (nw, nk) = old, new
    cfg_old = data_cfg(("a", token_shards), num_workers=ok)
    consumed, states = [], []
    for rank in range(ow):
        loader = build_loader(cfg_old, ctx(rank, ow), key_and_epoch)
        consumed += take(loader, 11 + 3 * rank)  # ranks stop at different points, mid-shard
        states.append(pickle.loads(pickle.dumps(loader.state_dict())))
        loader.close()
    cfg_new = data_cfg(("a", token_shards), num_workers=nk)
    after = []
    for rank in range(nw):
        loader = build_loader(cfg_new, ctx(rank, nw), key_and_epoch)
        loader.load_state_dict({"ranks": states})
        after += take(loader, 2 * 96 // (3 * nw) + 4)
        loader.close()
    all_ids = {f"a/shard-{i // 12:06d}.tar/{i:08d}" for i in range(96)}
    for epoch in (0, 1):
        seen = Counter(epoch_ids(consumed + after, epoch))
        assert set(seen) == all_ids and max(seen.values()) == 1, epoch


def test_single_rank_state_at_other_world_size_is_refused(token_shards):
    cfg = data_cfg(("a", token_shards), num_workers=0)
    loader = build_loader(cfg, ctx(0, 2), key_and_epoch)
    next(loader)
    state = loader.state_dict()
    other = build_loader(cfg, ctx(0, 4), key_and_epoch)
    with pytest.raises(DataError, match="pass the states of all old ranks"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="every old rank"):
        other.load_state_dict({"ranks": [state]})


def test_state_from_other_shards_is_refused(token_shards, token_shards_b):
    loader = build_loader(data_cfg(("a", token_shards)), ctx(), key_and_epoch)
    next(loader)
    other = build_loader(data_cfg(("a", token_shards_b)), ctx(), key_and_epoch)
    with pytest.raises(DataError, match="other sources/shards"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_mode_is_infinite_deterministic_and_resumable(token_shards, workers):
    cfg = data_cfg(("a", token_shards), mode="resampled", num_workers=workers)
    ref_loader = build_loader(cfg, ctx(), key_and_epoch)
    ref = ids(take(ref_loader, 80))  # 240 samples: more than two passes over the 96
    ref_loader.close()
    flat = Counter(i for b in ref for i in b)
    assert max(flat.values()) >= 2  # with replacement
    first = build_loader(cfg, ctx(), key_and_epoch)
    head = ids(take(first, 37))
    resumed = build_loader(cfg, ctx(), key_and_epoch)
    resumed.load_state_dict(first.state_dict())
    first.close()
    assert head + ids(take(resumed, 43)) == ref
    resumed.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_with_packing_batcher_holding_samples(token_shards, workers):
    """A batcher that holds samples back (packing) resumes exactly: held samples are re-read."""
    cfg = data_cfg(("a", token_shards), num_workers=workers)

    def make():
        return build_loader(cfg, ctx(), key_and_epoch, batcher=PackingBatcher(max_len=20))  # 2 samples of 9

    ref_loader = make()
    ref = take(ref_loader, 25)
    ref_loader.close()
    first = make()
    head = take(first, 9)
    state = first.state_dict()
    first.close()
    assert any(r["pending"] for r in state["readers"] if r)  # something was held back
    resumed = make()
    resumed.load_state_dict(state)
    tail = take(resumed, 16)
    resumed.close()
    for a, b in zip(head + tail, ref):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_trainer_reshard_entry_point(token_shards):
    """``load_resharded_state_dict`` (what the trainer calls after a world-size change) re-splits."""
    cfg = data_cfg(("a", token_shards), num_workers=2)
    states, consumed = [], []
    for rank in range(2):
        loader = build_loader(cfg, ctx(rank, 2), key_and_epoch)
        consumed += epoch_ids(take(loader, 9), 0)
        states.append(loader.state_dict())
        loader.close()
    single = build_loader(cfg, ctx(0, 1), key_and_epoch)
    note = single.load_resharded_state_dict(states)
    assert "from 2x2 to 1x2 readers" in note
    rest = epoch_ids(take(single, 40), 0)
    single.close()
    seen = Counter(consumed + rest)
    assert len(seen) == 96 and max(seen.values()) == 1


def test_two_layout_changes_in_a_row(token_shards):
    """2x2 -> 3x1 (stopped while still in the re-split work list) -> 1x2: still exactly once per epoch."""
    def run(layout, states, n):
        world, workers = layout
        cfg = data_cfg(("a", token_shards), num_workers=workers)
        out, new_states = [], []
        for rank in range(world):
            loader = build_loader(cfg, ctx(rank, world), key_and_epoch)
            if states:
                loader.load_state_dict({"ranks": states})
            out += take(loader, n)
            new_states.append(pickle.loads(pickle.dumps(loader.state_dict())))
            loader.close()
        return out, new_states

    a, s1 = run((2, 2), None, 7)
    b, s2 = run((3, 1), s1, 3)
    assert any(src["phase"]["kind"] == "transition" for st in s2 for r in st["readers"] for src in r["sources"])
    c, _ = run((1, 2), s2, 70)
    for epoch in (0, 1):
        seen = Counter(epoch_ids(a + b + c, epoch))
        assert len(seen) == 96 and max(seen.values()) == 1, epoch


def test_exact_resume_at_every_step(token_shards, token_shards_b):
    """In-process reader, two blended sources, a packing batcher: resume after each of the first 24
    micro-batches and compare the next 4 with the uninterrupted run."""
    cfg = data_cfg(("a", token_shards, 0.5), ("b", token_shards_b, 0.5), num_workers=0, shuffle_buffer=7)

    def make():
        return build_loader(cfg, ctx(), key_and_epoch, batcher=PackingBatcher(max_len=30, rows=2), probe=False)

    ref_loader = make()
    ref = [b["__key__"] for b in take(ref_loader, 28)]
    ref_loader.close()
    run = make()
    for cut in range(1, 25):
        next(run)
        resumed = make()
        resumed.load_state_dict(run.state_dict())
        assert [b["__key__"] for b in take(resumed, 4)] == ref[cut:cut + 4], cut
        resumed.close()
    run.close()
