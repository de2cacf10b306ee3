"""Small real webdataset shards for the loader tests (written once per session with our synth tool)."""
from __future__ import annotations

import pytest

from scaleforge.platform.data.tools import synth


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory):
    """8 shards x 12 token samples (96 samples, keys 00000000..00000095)."""
    out = tmp_path_factory.mktemp("tokens")
    synth("tokens", str(out), 96, per_shard=12, seq_len=9, vocab=64)
    return str(out / "shard-{000000..000007}.tar")


@pytest.fixture(scope="session")
def token_shards_b(tmp_path_factory):
    """A second token source: 6 shards x 10 samples."""
    out = tmp_path_factory.mktemp("tokens_b")
    synth("tokens", str(out), 60, per_shard=10, seq_len=9, vocab=64, seed=1)
    return str(out / "shard-{000000..000005}.tar")
