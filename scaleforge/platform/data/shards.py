"""Shard lists and shard reading on top of webdataset's tar iterators.

A shard is read as a stream of raw samples (dicts of bytes keyed by extension, as webdataset groups
them) numbered by their ordinal in the tar (``__index__``). That ordinal is what the loader's
resumable state refers to, so reading must be deterministic: a truncated or otherwise unreadable tar
ends the shard at the last complete sample (and is reported), it never raises into the worker loop.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from braceexpand import braceexpand
from webdataset import gopen
from webdataset.tariterators import group_by_keys

log = logging.getLogger("scaleforge.data")


class DataError(RuntimeError):
    """A data problem that stops training (missing shards, no usable samples, bad-data budget)."""


def expand_patterns(patterns: str | list[str] | tuple[str, ...], where: str = "shards") -> list[str]:
    """Brace-expand one pattern or a list of patterns (local paths or webdataset URLs such as
    ``pipe:cmd``) into the ordered list of shard URLs. A local path with a glob (``data/*.tar``) stands
    for the files it matches and a local directory for its ``*.tar`` files, both in sorted order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise DataError(f"{where}: empty shard pattern {pattern!r}")
        expanded = list(braceexpand(pattern))
        if not expanded:
            raise DataError(f"{where}: pattern {pattern!r} expands to no shard")
        for url in expanded:
            urls.extend(_local_files(url, where))
    if not urls:
        raise DataError(f"{where}: no shard pattern given")
    return urls


def _local_files(url: str, where: str) -> list[str]:
    if not is_local(url):
        return [url]
    if os.path.isdir(url):
        found = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
        if not found:
            raise DataError(f"{where}: {url} is a directory holding no .tar shard")
        return found
    if glob.has_magic(url):
        found = sorted(p for p in glob.glob(url) if os.path.isfile(p))
        if not found:
            raise DataError(f"{where}: {url!r} matches no file (brace patterns name shards that may not "
                            f"exist yet: shard-{{000000..000009}}.tar)")
        return found
    return [url]


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


class _RecordingTarInfo(tarfile.TarInfo):
    """Remembers the last header block tarfile read. tarfile's streaming mode treats a missing,
    short or garbled header after the first member as a normal end of archive; only a full block of
    zeros is a real end marker, so this is how a truncated shard is told from a complete one."""

    last: list[bytes]

    @classmethod
    def frombuf(cls, buf, encoding, errors):  # noqa: D102  (stdlib hook)
        cls.last[0] = bytes(buf)
        return super().frombuf(buf, encoding, errors)


def _tar_members(fileobj: Any, url: str, result: ShardReadResult) -> Iterator[dict[str, Any]]:
    info_cls = type("_ShardTarInfo", (_RecordingTarInfo,), {"last": [None]})
    tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=info_cls)
    for member in tf:
        if not member.isreg() or _META.match(member.name):
            continue
        data = tf.extractfile(member).read()
        tf.members = []  # streaming: do not keep every TarInfo
        yield {"fname": member.name, "data": data, "__url__": url}
    last = info_cls.last[0]
    if last is None or len(last) != tarfile.BLOCKSIZE or last.count(0) != tarfile.BLOCKSIZE:
        result.truncated = True
        result.error = ("no end-of-archive marker (file cut short)" if not last or len(last) < tarfile.BLOCKSIZE
                        else "garbled tar header")


_META = re.compile(r"__[^/]*__($|/)")


def iter_shard(url: str, result: ShardReadResult | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, raw_sample)`` for every complete sample of one shard, in tar order.

    A read error or a missing end-of-archive marker (truncated tar, broken pipe, garbled header) ends
    the stream, and the sample being read when it happened is dropped as incomplete; the reason goes
    into ``result``.
    """
    result = result if result is not None else ShardReadResult()
    stream = None
    index, held = 0, None
    try:
        stream = gopen(local_path(url), "rb")
        for sample in group_by_keys(_tar_members(stream, url, result)):
            if held is not None:  # one sample of lag: the last one is only complete if the tar is
                yield index, held
                index += 1
            held = sample
        if held is not None and not result.truncated:
            yield index, held
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # corrupt / unreadable tar
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
