"""Loader throughput: ours (exact-resume bookkeeping on) against a plain webdataset pipeline.

Both read the same synthetic image-text shards (JPEG, written by ``scaleforge data synth``), decode
with PIL, convert to a float tensor and batch; both shuffle with a buffer of the same size and use
``torch.utils.data.DataLoader`` with the same number of workers. Prints a markdown table of samples/s
(best of ``--repeats`` interleaved timed passes of ``--batches`` batches, after one warm-up batch;
best-of because other processes on a shared machine only ever slow a pass down).

    python benchmarks/data_loader.py                       # 256 and 1024 px, 0/1/2 workers
    python benchmarks/data_loader.py --sizes 256 --workers 0 2 --batches 20
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from scaleforge.platform.data import build_loader, collate_samples, decode_image_text, image_to_tensor
from scaleforge.platform.data.config import DataConfig, DataSourceConfig
from scaleforge.platform.data.tools import synth
from scaleforge.platform.recipe import DataContext


def sample_fn(raw):
    s = decode_image_text(raw)
    return {"image": image_to_tensor(s["image"]), "caption": s["caption"]}


def plain_collate(samples):
    return collate_samples(samples)


def plain_loader(urls, batch, workers, buffer, seed):
    """A plain webdataset pipeline: shard shuffle, split by worker, sample shuffle, decode, batch."""
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .repeat()
          .shuffle(buffer, initial=buffer)
          .map(sample_fn)
          .batched(batch, collation_fn=plain_collate, partial=False))
    kw = {"prefetch_factor": 2} if workers else {}
    return iter(DataLoader(ds, batch_size=None, num_workers=workers, **kw))


def ours_loader(urls, batch, workers, buffer, seed):
    cfg = DataConfig(kind="webdataset", sources=[DataSourceConfig("bench", list(urls))], num_workers=workers,
                     shuffle_buffer=buffer, seed=seed, prefetch_factor=2)
    ctx = DataContext(dp_rank=0, dp_world_size=1, micro_batch_size=batch, seed=seed, device=torch.device("cpu"))
    return build_loader(cfg, ctx, sample_fn)


def timed(make, batches, batch):
    it = make()
    next(it)  # warm-up: worker start, first shards
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        assert b["image"].shape[0] == batch
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    elif hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    return batches * batch / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=15, help="timed batches per pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--buffer", type=int, default=100)
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = args.dir or tempfile.mkdtemp(prefix="sf_bench_")
    print(f"# data loader benchmark: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"webdataset {getattr(wds, '__version__', '?')}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"# batch {args.batch}, {args.batches} timed batches, best of {args.repeats}, shuffle buffer {args.buffer}")
    print()
    print("| image px | workers | plain webdataset (samples/s) | scaleforge exact (samples/s) | ours / plain |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        n = max(64, (args.batches + 2) * args.batch * 2)
        out = os.path.join(root, f"img{size}")
        if not os.path.isdir(out):
            synth("image-text", out, n, per_shard=max(8, n // 8), size=size, seed=size)
        urls = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar"))
        for workers in args.workers:
            plain, ours = 0.0, 0.0
            for _ in range(args.repeats):  # interleaved so that load changes hit both
                plain = max(plain, timed(lambda: plain_loader(urls, args.batch, workers, args.buffer, 0),
                                         args.batches, args.batch))
                ours = max(ours, timed(lambda: ours_loader(urls, args.batch, workers, args.buffer, 0),
                                       args.batches, args.batch))
            print(f"| {size} | {workers} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
