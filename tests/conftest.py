"""Shared fixtures: a small synthetic shard folder built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.build import build_shards

# 10 classes x 30 train / 10 validation images; 32 inputs per shard -> 10 train shards (the last of
# 12 samples) and 4 validation shards (the last of 4): several shards per split, ragged ends.
DEMO_PER_CLASS = {"train": 30, "validation": 10}
DEMO_SHARD_SIZE = 32


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A finished synthetic shard folder (300 train, 100 validation samples). Read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("demo_shards")
    build_shards(out, source="synthetic", per_class=DEMO_PER_CLASS, shard_size=DEMO_SHARD_SIZE, workers=2)
    return out
