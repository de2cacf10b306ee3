"""``scaleforge data ...`` subcommands. The ``scaleforge`` command adds them with
``add_data_subcommands(subparsers)``; ``main(argv)`` runs them standalone (tests, ``python -m``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from scaleforge.platform.data.shards import DataError


def _guarded(handler):
    """Data problems (missing files, bad JSONL lines...) print one clear line and exit 2, whoever calls."""

    def run_handler(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run_handler.__name__ = handler.__name__
    return run_handler


def _synth(args: argparse.Namespace) -> int:
    from scaleforge.platform.data.tools import synth

    shards = synth(args.kind, args.out, args.n, per_shard=args.per_shard, seed=args.seed, size=args.size,
                   seq_len=args.seq_len, vocab=args.vocab, frames=args.frames, random_aspect=args.random_aspect)
    print(f"wrote {args.n} {args.kind} samples in {len(shards)} shard(s) to {args.out}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from scaleforge.platform.data.tools import pack

    shards = pack(args.images, args.captions, args.out, shard_size_mb=args.shard_size_mb,
                  max_per_shard=args.max_per_shard)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from scaleforge.platform.data.tools import inspect

    rep = inspect(args.shards)
    if args.json:
        print(json.dumps(rep, default=dict, indent=1))
        return 0
    print(f"{'shard':<48} {'samples':>8} {'MB':>9} {'bad':>5}  fields")
    for s in rep["shards"]:
        fields = ", ".join(f"{k}:{v}" for k, v in sorted(s["fields"].items()))
        print(f"{s['url'][-48:]:<48} {s['samples']:>8} {s['bytes'] / 1e6:>9.2f} {len(s['bad']):>5}  {fields}")
        if s["truncated"]:
            print(f"  truncated: {s['truncated']}")
        for b in s["bad"][:5]:
            print(f"  bad sample {b['key']} (#{b['index']}): {b['error']}")
    print(f"total: {len(rep['shards'])} shards, {rep['samples']} samples, {rep['bytes'] / 1e6:.2f} MB, "
          f"{rep['bad']} bad samples, {rep['truncated']} truncated shards")
    return 1 if rep["bad"] or rep["truncated"] else 0


def add_data_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from scaleforge.platform.data.tools import KINDS

    data = subparsers.add_parser("data", help="write, pack and inspect webdataset shards")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("synth", help="small synthetic dataset for demos and tests")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="output directory (shard-000000.tar, ...)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--per-shard", type=int, default=100, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--random-aspect", action="store_true", help="h/w log-uniform in [0.4, 2.5], area ~ size^2")
    p.add_argument("--seq-len", type=int, default=129, help="tokens: sequence length")
    p.add_argument("--vocab", type=int, default=256, help="tokens: vocabulary size")
    p.add_argument("--frames", type=int, default=8, help="video-text: frames per sample")
    p.set_defaults(func=_guarded(_synth))
    p = sub.add_parser("pack", help="shards from a folder of images and a JSONL of captions/conversations")
    p.add_argument("--images", required=True)
    p.add_argument("--captions", required=True, help="JSONL: {image, caption | conversations, ...}")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size-mb", type=float, default=256.0)
    p.add_argument("--max-per-shard", type=int, default=10000)
    p.set_defaults(func=_guarded(_pack))
    p = sub.add_parser("inspect", help="counts, fields, sizes and bad samples of shards")
    p.add_argument("shards", nargs="+", help="paths or brace patterns")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(_inspect))
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaleforge")
    add_data_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
