"""Shard lists and shard reading on top of webdataset's tar iterators.

A shard is read as a stream of raw samples (dicts of bytes keyed by extension, as webdataset groups
them) numbered by their ordinal in the tar (``__index__``). That ordinal is what the loader's
resumable state refers to, so reading must be deterministic: a truncated or otherwise unreadable tar
ends the shard at the last complete sample (and is reported), it never raises into the worker loop.
"""
from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from braceexpand import braceexpand
from webdataset import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger("scaleforge.data")


class DataError(RuntimeError):
    """A data problem that stops training (missing shards, no usable samples, bad-data budget)."""


def expand_patterns(patterns: str | list[str] | tuple[str, ...], where: str = "shards") -> list[str]:
    """Brace-expand one pattern or a list of patterns (local paths or webdataset URLs such as
    ``pipe:cmd``) into the ordered list of shard URLs."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise DataError(f"{where}: empty shard pattern {pattern!r}")
        expanded = list(braceexpand(pattern))
        if not expanded:
            raise DataError(f"{where}: pattern {pattern!r} expands to no shard")
        urls.extend(expanded)
    if not urls:
        raise DataError(f"{where}: no shard pattern given")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_shards_exist(urls: list[str], where: str) -> None:
    missing = [u for u in urls if (is_local(u) or u.startswith("file://")) and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{where}: {len(missing)} of {len(urls)} shards not found: "
                        f"{', '.join(missing[:3])}{more}")


@dataclass
class ShardReadResult:
    """Filled while a shard is read: whether it ended early and why."""

    truncated: bool = False
    error: str = ""


def iter_shard(url: str, result: ShardReadResult | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, raw_sample)`` for every complete sample of one shard, in tar order.

    A read error (truncated tar, broken pipe, duplicate member) ends the stream; the reason goes into
    ``result``. The last, possibly partial sample before the error is dropped.
    """
    result = result if result is not None else ShardReadResult()
    stream = None
    try:
        stream = gopen(local_path(url), "rb")

        def files() -> Iterator[dict[str, Any]]:
            for f in tar_file_iterator(stream):
                f["__url__"] = url
                yield f

        for index, sample in enumerate(group_by_keys(files())):
            yield index, sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # truncated / corrupt tar
        result.truncated = True
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # noqa: BLE001  (a pipe's exit status: the shard ended badly)
                result.truncated = True
                result.error = result.error or f"{type(e).__name__}: {e}"


def fetch_samples(url: str, indices: set[int]) -> dict[int, dict[str, Any]]:
    """Re-read the samples with the given ordinals from one shard (used to rebuild shuffle buffers
    and batcher contents on resume)."""
    wanted = set(indices)
    found: dict[int, dict[str, Any]] = {}
    if not wanted:
        return found
    last = max(wanted)
    for index, sample in iter_shard(url):
        if index in wanted:
            found[index] = sample
        if index >= last:
            break
    return found
