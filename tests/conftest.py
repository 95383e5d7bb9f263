"""Shared fixtures: a small synthetic shard folder built once per test session, and a local Hub.

The Hub stand-in (tests/hubstub.py) must be chosen before anything imports `huggingface_hub`, which
reads HF_ENDPOINT and HF_HOME at import: so this module binds the server's socket and sets HF_ENDPOINT
to it, HF_HOME to a temporary folder (no real token, cache or settings are touched), telemetry, update
checks and Xet uploads off, and removes the caller's other HF_* settings (a token among them), before it imports
anything that may import the client. Subprocesses (the `alexprep` CLI) inherit the same environment.
`hub` gives a test the running server, reset.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hubstub import HubStub, RepoSummary, make_imagenet_like_repo

_HUB = HubStub()  # binds a free port now, serves from the `hub_server` fixture on
atexit.register(_HUB.stop)
_HF_HOME = tempfile.mkdtemp(prefix="alexnet-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
for _name in [n for n in os.environ if n.startswith(("HF_", "HUGGING_FACE_"))]:
    del os.environ[_name]
os.environ.update(HF_ENDPOINT=_HUB.url, HF_HOME=_HF_HOME, HF_HUB_DISABLE_TELEMETRY="1",
                  HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                  HF_HUB_DISABLE_XET="1")  # uploads over LFS, which the stand-in speaks (not Xet)

from prep.build import build_shards  # noqa: E402  (after the environment above, see the docstring)

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


@pytest.fixture(scope="session")
def hub_repo(tmp_path_factory) -> tuple[Path, RepoSummary]:
    """(folder, summary) of the default `make_imagenet_like_repo` (36 parquet files). Read-only."""
    root = tmp_path_factory.mktemp("hub_repo")
    return root, make_imagenet_like_repo(root)


@pytest.fixture(scope="session")
def hub_server(hub_repo) -> HubStub:
    """The session's Hub stand-in at HF_ENDPOINT, serving `hub_repo` as ILSVRC/imagenet-1k."""
    _HUB.root = hub_repo[0]
    with _HUB:
        yield _HUB


@pytest.fixture
def hub(hub_server, hub_repo, monkeypatch) -> HubStub:
    """The Hub stand-in over `hub_repo`, reset for this test: no accounting, faults or bandwidth limit,
    an empty Hub cache, HF_TOKEN set to the accepted token. Set `hub.root` to serve another folder."""
    from huggingface_hub import HfFileSystem

    hub_server.reset()
    hub_server.root = hub_repo[0]
    shutil.rmtree(Path(_HF_HOME) / "hub", ignore_errors=True)
    HfFileSystem.clear_instance_cache()  # its listings outlive a test otherwise
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server
