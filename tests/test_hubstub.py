"""The Hub stand-in (tests/hubstub.py) against the real `huggingface_hub` client: the dataset repo, model repos
(uploads, commits, downloads), and the dataset repo generator."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import httpx2
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import (CommitOperationAdd, HfApi, HfFileSystem, get_hf_file_metadata, hf_hub_download,
                             hf_hub_url)
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from PIL import Image

from hubstub import (COMMIT, CLASS_NAMES, WRITE_TOKEN, WRITE_USER, HubStub, label_from_pixels,
                     make_imagenet_like_repo)

REPO = "ILSVRC/imagenet-1k"
TRAIN0 = "data/train-00000-of-00024.parquet"


def file_requests(hub: HubStub, method: str = "GET") -> list:
    """The resolve requests of `method` (the client also fetches an agent registry once per process)."""
    return [r for r in hub.requests if r.file is not None and r.method == method]


# --- the repo generator ------------------------------------------------------------------------------------------

def test_repo_is_laid_out_like_imagenet_1k(hub_repo):
    root, summary = hub_repo
    assert [f.path for f in summary.files] == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert [(s, sum(f.split == s for f in summary.files)) for s in ("train", "validation", "test")] == [
        ("train", 24), ("validation", 8), ("test", 4)]
    assert summary.files[0].path == "data/test-00000-of-00004.parquet"
    assert summary.files[-1].path == "data/validation-00007-of-00008.parquet"
    assert [summary.split_rows(s) for s in ("train", "validation", "test")] == [1152, 192, 64]
    assert summary.total_bytes == sum((root / f.path).stat().st_size for f in summary.files)
    for f in summary.files:
        meta = pq.read_metadata(root / f.path)
        assert (meta.num_rows, meta.num_row_groups, f.bytes) == (f.rows, f.row_groups, (root / f.path).stat().st_size)
        assert all(meta.row_group(i).num_rows <= 12 for i in range(meta.num_row_groups))
    schema = pq.read_schema(root / TRAIN0)
    features = datasets.Features.from_arrow_schema(schema)  # from the b"huggingface" metadata
    assert isinstance(features["image"], datasets.Image)
    assert features["label"] == datasets.ClassLabel(names=list(CLASS_NAMES))
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"


def test_repo_rows_sorted_by_class_and_pixels_tell_the_label(hub_repo):
    root, summary = hub_repo
    split_labels = {}
    for f in summary.files:
        table = pq.read_table(root / f.path)
        split_labels.setdefault(f.split, []).extend(table.column("label").to_pylist())
        row = table.slice(f.rows - 1).to_pylist()[0]  # the file's last row
        with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
            assert im.format == "JPEG"
            pixels = np.asarray(im.convert("RGB"))
        if f.split != "test":
            assert label_from_pixels(pixels) == row["label"]
        prefix = {"train": "n9", "validation": "ILSVRC2012_val_", "test": "ILSVRC2012_test_"}[f.split]
        assert row["image"]["path"].startswith(prefix) and row["image"]["path"].endswith(".JPEG")
    train = split_labels["train"]
    assert train == sorted(train) and sorted(set(train)) == list(range(10)) and train.count(0) == 116
    assert sorted(split_labels["validation"]) != split_labels["validation"]
    assert sorted(set(split_labels["validation"])) == list(range(10))
    assert split_labels["test"] == [-1] * 64


def test_repo_generator_parameters(tmp_path):
    summary = make_imagenet_like_repo(tmp_path, files={"train": 2, "validation": 1, "test": 0},
                                      rows_per_file={"train": 5, "validation": 3}, row_group_size=2, num_classes=3)
    assert [(f.path, f.rows, f.row_groups) for f in summary.files] == [
        ("data/train-00000-of-00002.parquet", 5, 3), ("data/train-00001-of-00002.parquet", 5, 3),
        ("data/validation-00000-of-00001.parquet", 3, 2)]
    assert summary.class_names == list(CLASS_NAMES[:3])
    assert pq.read_table(tmp_path / "data/train-00000-of-00002.parquet").column("label").to_pylist() == [0, 0, 0, 0, 1]


# --- the real client against the server ---------------------------------------------------------------------------

def test_listing_info_and_paths_info(hub, hub_repo):
    root, summary = hub_repo
    api = HfApi()
    paths = [f.path for f in summary.files]
    assert api.list_repo_files(REPO, repo_type="dataset") == paths
    info = api.dataset_info(REPO, files_metadata=True)
    assert info.sha == COMMIT and info.gated == "auto"
    assert [(s.rfilename, s.size, s.lfs.sha256) for s in info.siblings] == [
        (f.path, f.bytes, hashlib.sha256((root / f.path).read_bytes()).hexdigest()) for f in summary.files]
    assert api.repo_info(REPO, repo_type="dataset", revision=COMMIT).sha == COMMIT
    top = list(api.list_repo_tree(REPO, repo_type="dataset"))
    assert [(type(e).__name__, e.path) for e in top] == [("RepoFolder", "data")]
    tree = {e.path: e for e in api.list_repo_tree(REPO, repo_type="dataset", recursive=True)}
    assert sorted(tree) == sorted(["data"] + paths)
    assert tree[TRAIN0].size == summary.file(TRAIN0).bytes and tree[TRAIN0].lfs.size == summary.file(TRAIN0).bytes
    got = api.get_paths_info(REPO, ["data", TRAIN0, "data/missing.parquet"], repo_type="dataset")
    assert [(type(e).__name__, e.path) for e in got] == [("RepoFolder", "data"), ("RepoFile", TRAIN0)]
    assert hub.total_sent == 0


def test_the_fixed_commit_is_a_revision(hub, hub_repo, tmp_path):
    data = (hub_repo[0] / TRAIN0).read_bytes()
    path = hf_hub_download(REPO, TRAIN0, repo_type="dataset", revision=COMMIT, cache_dir=tmp_path)
    assert Path(path).read_bytes() == data and COMMIT in path
    with HfFileSystem().open(f"datasets/{REPO}@{COMMIT}/{TRAIN0}", "rb", cache_type="none") as f:
        assert f.read(10) == data[:10]
    assert {r.status for r in hub.requests} <= {200, 206}


def test_tree_pages_are_followed(hub, hub_repo):
    hub.page_size = 5
    assert len(HfApi().list_repo_files(REPO, repo_type="dataset")) == 36
    tree_calls = [r for r in hub.requests if "/tree/" in r.path]
    assert len(tree_calls) == 8  # 37 entries (36 files and data/) in pages of 5


def test_file_metadata_and_download(hub, hub_repo, tmp_path):
    root, summary = hub_repo
    data = (root / TRAIN0).read_bytes()
    meta = get_hf_file_metadata(hf_hub_url(REPO, TRAIN0, repo_type="dataset"))
    assert (meta.commit_hash, meta.etag, meta.size) == (COMMIT, hashlib.sha256(data).hexdigest(), len(data))
    path = hf_hub_download(REPO, TRAIN0, repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    assert hub.sent == {TRAIN0: len(data)} and hub.total_sent == len(data)
    assert [(r.method, r.range, r.status) for r in hub.requests if r.file == TRAIN0] == [
        ("HEAD", None, 200), ("HEAD", None, 200), ("GET", None, 200)]


def test_ranged_reads(hub, hub_repo):
    root, _ = hub_repo
    data = (root / TRAIN0).read_bytes()
    with HfFileSystem().open(f"datasets/{REPO}/{TRAIN0}", "rb", cache_type="none") as f:
        f.seek(100)
        assert f.read(300) == data[100:400]
    assert hub.sent == {TRAIN0: 300}
    assert [(r.range, r.status) for r in file_requests(hub)] == [("bytes=100-399", 206)]
    url = hf_hub_url(REPO, TRAIN0, repo_type="dataset")
    auth = {"Authorization": f"Bearer {hub.token}"}
    with httpx2.Client() as client:
        tail = client.get(url, headers={**auth, "Range": "bytes=-8"})
        assert (tail.status_code, tail.content) == (206, data[-8:])
        assert tail.headers["Content-Range"] == f"bytes {len(data) - 8}-{len(data) - 1}/{len(data)}"
        beyond = client.get(url, headers={**auth, "Range": f"bytes={len(data)}-"})
        assert (beyond.status_code, beyond.headers["Content-Range"]) == (416, f"bytes */{len(data)}")


def test_pyarrow_reads_one_row_group_through_hffilesystem(hub, hub_repo):
    root, summary = hub_repo
    local = pq.ParquetFile(root / TRAIN0)
    with HfFileSystem().open(f"datasets/{REPO}/{TRAIN0}", "rb", block_size=4096) as f:
        remote = pq.ParquetFile(f)
        assert remote.metadata.num_rows == 48 and remote.metadata.num_row_groups == 4
        assert remote.read_row_group(1).equals(local.read_row_group(1))
    row_group = local.metadata.row_group(1)
    group_bytes = sum(row_group.column(i).total_compressed_size for i in range(row_group.num_columns))
    # The footer and the second row group, in 4 KB blocks: not the first row group's images.
    assert group_bytes + local.metadata.serialized_size < hub.total_sent < summary.file(TRAIN0).bytes
    assert all(r.status == 206 for r in file_requests(hub))


def test_no_token_is_the_gated_repo_error_but_listing_is_public(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    assert len(HfApi().list_repo_files(REPO, repo_type="dataset")) == 36  # as on the Hub: metadata is public
    with pytest.raises(GatedRepoError) as raised:
        hf_hub_download(REPO, TRAIN0, repo_type="dataset", cache_dir=tmp_path)
    assert raised.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        HfApi().auth_check(REPO, repo_type="dataset")
    assert hub.total_sent == 0


def test_wrong_token_is_403_gated(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_token")
    with pytest.raises(GatedRepoError) as raised:
        hf_hub_download(REPO, TRAIN0, repo_type="dataset", cache_dir=tmp_path)
    assert raised.value.response.status_code == 403
    HfApi().auth_check(REPO, repo_type="dataset", token=hub.token)
    with pytest.raises(GatedRepoError):
        HfApi().auth_check(REPO, repo_type="dataset")


def test_unknown_repo_revision_and_file_are_404s(hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        HfApi().dataset_info("ILSVRC/imagenet-22k")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("ILSVRC/imagenet-22k", TRAIN0, repo_type="dataset", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO)  # the repo is a dataset
    with pytest.raises(RevisionNotFoundError):
        HfApi().dataset_info(REPO, revision="v2")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "data/train-00099-of-00024.parquet", repo_type="dataset", cache_dir=tmp_path)
    missing = [(r.method, r.status) for r in hub.requests if r.file == "data/train-00099-of-00024.parquet"]
    assert missing == [("HEAD", 404)]


def test_a_drop_mid_file_is_resumed_by_the_client(hub, hub_repo, tmp_path):
    root, _ = hub_repo
    data = (root / TRAIN0).read_bytes()
    hub.drop(TRAIN0, after_bytes=1000)
    path = hf_hub_download(REPO, TRAIN0, repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    # The client keeps no partial chunk from the dropped GET: it fetches the whole file again.
    assert [(r.range, r.status) for r in file_requests(hub)] == [(None, 200), (None, 200)]
    assert hub.sent == {TRAIN0: 1000 + len(data)}


def test_a_dropped_ranged_read_is_retried(hub, hub_repo):
    root, _ = hub_repo
    data = (root / TRAIN0).read_bytes()
    hub.drop(TRAIN0, after_bytes=10)
    with HfFileSystem().open(f"datasets/{REPO}/{TRAIN0}", "rb", cache_type="none") as f:
        assert f.read(100) == data[:100]
    assert [(r.range, r.status) for r in file_requests(hub)] == [("bytes=0-99", 206)] * 2
    assert hub.sent == {TRAIN0: 110}


@pytest.mark.slow
def test_a_file_that_keeps_dropping_is_the_clients_error(hub, tmp_path):
    hub.drop(TRAIN0, after_bytes=0, times=10)
    with pytest.raises(httpx2.RemoteProtocolError, match="peer closed connection without sending complete"):
        hf_hub_download(REPO, TRAIN0, repo_type="dataset", cache_dir=tmp_path)  # 5 retries, 1 s apart
    assert len(file_requests(hub)) == 6 and hub.total_sent == 0


def test_bandwidth_limit_is_shared_by_all_downloads(hub, hub_repo, tmp_path):
    root, summary = hub_repo
    files = [summary.file(TRAIN0), summary.file("data/validation-00000-of-00008.parquet")]
    total = sum(f.bytes for f in files)
    hub.bandwidth = total / 0.5  # both files together take 0.5 s at this rate
    threads = [threading.Thread(target=hf_hub_download, args=(REPO, f.path),
                                kwargs={"repo_type": "dataset", "cache_dir": tmp_path}) for f in files]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert hub.total_sent == total
    assert elapsed >= 0.25  # a generous lower bound only: half the time the limit implies


def test_hub_can_serve_another_folder(hub, tmp_path):
    summary = make_imagenet_like_repo(tmp_path / "small", files={"train": 1, "validation": 1, "test": 0})
    hub.root = tmp_path / "small"
    assert HfApi().list_repo_files(REPO, repo_type="dataset") == [f.path for f in summary.files]


def test_standalone_server(hub_repo):
    root, summary = hub_repo
    proc = subprocess.Popen([sys.executable, "-m", "tests.hubstub", "--root", str(root), "--port", "0",
                             "--token", "hf_standalone", "--bandwidth", "1e9"],
                            cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.rsplit("HF_ENDPOINT=", 1)[1].strip()
        api = HfApi(endpoint=url, token="hf_standalone")
        assert api.list_repo_files(REPO, repo_type="dataset") == [f.path for f in summary.files]
        api.auth_check(REPO, repo_type="dataset")
        info = json.loads(httpx2.get(f"{url}/api/datasets/{REPO}").text)
        assert info["sha"] == COMMIT
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


# --- model repos: what create_repo, create_branch, create_commit and hf_hub_download of a model do ---------------

MODEL = f"{WRITE_USER}/tiny"


def model_folder(folder: Path, weights: bytes = b"\x01\x02" * 50_000) -> Path:
    """A small model folder: two text files (regular git files) and two binary ones (LFS: one by its
    name, one by its content)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"arch": "alexnet"}\n')
    (folder / "README.md").write_text("---\ntags:\n- alexnet\n---\n# tiny\n")
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0" + bytes(range(256)) * 10)
    return folder


def additions(folder: Path) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(p.name, str(p)) for p in sorted(folder.iterdir())]


def test_commit_regular_and_lfs_files_then_download_them(hub, tmp_path):
    api, folder = HfApi(token=WRITE_TOKEN), model_folder(tmp_path / "m")
    url = api.create_repo(MODEL)
    assert url == f"{hub.url}/{MODEL}" and api.create_repo(MODEL, exist_ok=True) == url  # the 409 carries the URL
    commit = api.create_commit(MODEL, additions(folder), commit_message="first")
    assert [(c.oid, c.title) for c in hub.models.commits(MODEL)][1:] == [(commit.oid, "first")]
    lfs = {"model.safetensors", "pic.png"}
    assert sorted(hub.models.uploaded) == sorted(hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in lfs)
    assert api.list_repo_files(MODEL) == [".gitattributes", "README.md", "config.json", "model.safetensors", "pic.png"]
    info = api.model_info(MODEL, files_metadata=True)
    assert info.sha == commit.oid and {s.rfilename for s in info.siblings if s.lfs} == lfs
    for name in sorted(lfs) + ["README.md", "config.json"]:
        assert Path(hf_hub_download(MODEL, name, cache_dir=tmp_path / "cache")).read_bytes() == (folder / name).read_bytes()
        assert Path(hf_hub_download(MODEL, name, revision=commit.oid, cache_dir=tmp_path / "c2")).read_bytes() == (folder / name).read_bytes()
    # The same files again: the client leaves out every file whose oid the preupload answer repeats.
    again = api.create_commit(MODEL, additions(folder), commit_message="second")
    assert again.oid == commit.oid and len(hub.models.commits(MODEL)) == 2 and len(hub.models.uploaded) == 2
    # One file changed: one commit, one upload, the other files as they were.
    (folder / "model.safetensors").write_bytes(b"\x03" * 100_000)
    third = api.create_commit(MODEL, additions(folder), commit_message="third")
    assert [c.oid for c in hub.models.commits(MODEL)][2:] == [third.oid] and len(hub.models.uploaded) == 3
    assert hub.models.read(MODEL, "model.safetensors") == b"\x03" * 100_000
    assert hub.models.read(MODEL, "model.safetensors", commit.oid) == b"\x01\x02" * 50_000
    assert hub.models.read(MODEL, "pic.png") == (folder / "pic.png").read_bytes()


def test_a_commit_is_all_or_nothing(hub, tmp_path):
    api, folder = HfApi(token=WRITE_TOKEN), model_folder(tmp_path / "m")
    api.create_repo(MODEL)
    # A regular file and an LFS file whose content was never uploaded: refused whole.
    ndjson = b"".join(json.dumps(item).encode() + b"\n" for item in [
        {"key": "header", "value": {"summary": "half", "description": ""}},
        {"key": "file", "value": {"path": "config.json", "content": "e30K", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 10}}])
    answer = httpx2.post(f"{hub.url}/api/models/{MODEL}/commit/main", content=ndjson,
                         headers={"Authorization": f"Bearer {WRITE_TOKEN}", "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 400 and "never uploaded" in answer.json()["error"]
    assert len(hub.models.commits(MODEL)) == 1 and api.list_repo_files(MODEL) == [".gitattributes"]
    # The connection drops after the commit request was sent: the client fails, nothing is applied.
    hub.models.drop("commit")
    with pytest.raises(httpx2.TransportError):
        api.create_commit(MODEL, additions(folder), commit_message="dropped")
    assert len(hub.models.commits(MODEL)) == 1 and api.list_repo_files(MODEL) == [".gitattributes"]
    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")] == [400, 0]
    # A drop in the middle of an LFS upload: the client sends it again (after 1 s) and the commit is whole.
    hub.reset()
    api.create_repo(MODEL)
    hub.models.drop("lfs")
    api.create_commit(MODEL, additions(folder), commit_message="after a drop")
    puts = [r.status for r in hub.requests if r.method == "PUT"]
    assert sorted(puts) == [0, 200, 200] and len(hub.models.commits(MODEL)) == 2
    assert hub.models.read(MODEL, "model.safetensors") == (folder / "model.safetensors").read_bytes()


def test_writes_need_a_token_with_write_access(hub, tmp_path):
    folder = model_folder(tmp_path / "m")
    for token, status in ((False, 401), ("hf_not_a_token", 401), (hub.token, 403)):
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(token=token).create_repo(MODEL)
        assert e.value.response.status_code == status
    with pytest.raises(HfHubHTTPError, match='rights to create a model under the namespace "someone"') as e:
        HfApi(token=WRITE_TOKEN).create_repo("someone/tiny")
    assert e.value.response.status_code == 403
    HfApi(token=WRITE_TOKEN).create_repo(MODEL)
    for token, status in ((False, 401), (hub.token, 403)):
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(token=token).create_commit(MODEL, additions(folder), commit_message="no")
        assert e.value.response.status_code == status
    assert len(hub.models.commits(MODEL)) == 1 and hub.models.uploaded == []


def test_private_repos_and_branches(hub, tmp_path):
    api, folder = HfApi(token=WRITE_TOKEN), model_folder(tmp_path / "m")
    api.create_repo(MODEL, private=True)
    api.create_branch(MODEL, branch="dev")
    api.create_branch(MODEL, branch="dev", exist_ok=True)  # 409, accepted
    dev = api.create_commit(MODEL, additions(folder), commit_message="on dev", revision="dev")
    assert len(hub.models.commits(MODEL)) == 1 and len(hub.models.commits(MODEL, "dev")) == 2
    assert api.list_repo_files(MODEL) == [".gitattributes"]
    path = hf_hub_download(MODEL, "config.json", revision="dev", token=WRITE_TOKEN, cache_dir=tmp_path / "cache")
    assert Path(path).parent.name == dev.oid
    for token in (False, hub.token):  # private: not there for anyone else
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info(MODEL)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(MODEL, "config.json", revision="dev", token=token, cache_dir=tmp_path / "other")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(MODEL, revision="nope")
