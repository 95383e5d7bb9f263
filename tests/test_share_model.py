"""Sharing a trained model: `alextrain export` writes safetensors, config.json and a model card; `alextrain
push` publishes it through the real `huggingface_hub` client (to the stand-in Hub, tests/hubstub.py) in
one commit; `--model` loads it back for `eval` and `predict` with the checkpoint's exact numbers; and
what does not fit (a tampered weights file, a pickle, an unknown arch, no token, no write access, a
network drop) is refused in one line, with nothing half-published."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file

from hubstub import WRITE_TOKEN, WRITE_USER
from train import checkpoint
from train.cli import main
from train.config import TrainConfig
from train.export import EXPORT_FILES, export
from train.loop import train
from train.model import build_model
from train.prediction_sheet import sheet_size
from train.hub import HubError
from train.predict import predict_files
from train.pretrained import ModelError, load_pretrained
from train.run_folder import export_folder

REPO = f"{WRITE_USER}/tiny-alexnet"
# The smallest real run: 2 steps of 8 pictures (64 px crops) on the CPU, one epoch, evaluated.
TINY = dict(arch="alexnet-bn", crop_size=64, batch_size=8, epochs=1, steps_per_epoch=2, workers=0, device="cpu", log_every=1)
EVAL = ["--workers", "0", "--batch-size", "50", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(shards=str(demo_shards), out=str(out), **TINY))
    return out


@pytest.fixture(scope="module")
def exported(run) -> Path:
    done = export(run, workers=0, batch_size=50, device="cpu")
    assert done.folder == run / "model-last" and done.notes == []
    return done.folder


@pytest.fixture(scope="module")
def checkpoint_eval(run) -> dict:
    """`alextrain eval --checkpoint RUN --json`: ten crops (and the centre crop) over the 100 validation pictures."""
    return json.loads(ok("eval", "--checkpoint", str(run), "--json", *EVAL))


@pytest.fixture(scope="module")
def pictures(demo_shards, tmp_path_factory) -> list[str]:
    """Two validation pictures of the demo set as files, one JPEG and one PNG."""
    folder = tmp_path_factory.mktemp("pictures")
    with tarfile.open(demo_shards / "validation-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:2]
    (folder / "a.jpg").write_bytes(jpegs[0])
    with Image.open(folder / "a.jpg") as picture:
        picture.save(folder / "b.png")
    (folder / "c.jpg").write_bytes(jpegs[1])
    return [str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "c.jpg")]


@pytest.fixture
def writer(hub, monkeypatch):
    """The stand-in Hub with HF_TOKEN set to a token that may write to WRITE_USER's repos."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    return hub


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper_shape(folder: Path, key: str, shape: list[int]) -> None:
    """Give tensor `key` of folder/model.safetensors another shape of the same size, in its header alone
    (a valid safetensors file whose tensor no longer fits the model)."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[key]["shape"] = shape
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    data[8:8 + n] = text.ljust(n)  # the format allows trailing spaces in the header
    path.write_bytes(bytes(data))


# --- export -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_writes_weights_config_card_and_pictures(run, exported, demo_shards, checkpoint_eval):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    assert {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()} == {name: 0o644 for name in EXPORT_FILES}
    state = checkpoint.load(run / "last.pt")
    weights = load_file(exported / "model.safetensors")  # safetensors alone reads it
    assert weights.keys() == state["model"].keys() and all(torch.equal(weights[k], state["model"][k]) for k in weights)
    config = json.loads((exported / "config.json").read_text())
    assert (config["arch"], config["num_classes"], config["classes"]) == ("alexnet-bn", 10, state["classes"])
    assert config["num_parameters"] == sum(p.numel() for p in build_model("alexnet-bn", 10).parameters())
    inputs = config["inputs"]
    assert (inputs["scaling"], inputs["crop_size"], inputs["image_size"]) == ("standardize", 64, 256)
    assert {k: inputs[k] for k in state["stats"]} == state["stats"]
    assert config["training"]["epochs_done"] == 1 and config["training"]["global_step"] == 2
    assert config["training"]["config"] == {k: v for k, v in state["config"].items() if k not in ("shards", "out", "resume")}
    assert config["checkpoint"] == {"file": "last.pt", "sha256": sha256(run / "last.pt"), "epoch": 1, "global_step": 2,
                                    "best_top1_err": state["best_top1_err"]}
    dataset = config["dataset"]
    assert dataset["location"] == str(demo_shards) and dataset["info_sha256"] == sha256(demo_shards / "_info.json")
    assert dataset["num_samples"] == {"train": 300, "validation": 100} and dataset["hub_id"] is None
    assert dataset["build_options"] == json.loads((demo_shards / "_info.json").read_text())["options"]
    # The evaluation is `alextrain eval --ten-crop`'s, on every validation picture.
    ten, evaluation = checkpoint_eval, config["evaluation"]
    assert evaluation["images"] == ten["samples"] == 100
    assert evaluation["center_crop"] == {"top1_err": ten["center_top1_err"], "top5_err": ten["center_top5_err"]}
    assert evaluation["ten_crops"] == {"top1_err": ten["top1_err"], "top5_err": ten["top5_err"]}
    assert len(evaluation["examples"]) == 8 and all(len(e["top5"]) == 5 for e in evaluation["examples"])

    card = (exported / "README.md").read_text()
    _, block, text = card.split("---\n", 2)
    meta = yaml.safe_load(block)
    assert (meta["library_name"], meta["pipeline_tag"], meta["metrics"]) == ("pytorch", "image-classification", ["accuracy"])
    assert "alexnet-bn" in meta["tags"] and "license" not in meta and "# license: choose one" in block
    results = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results == {"top-1 accuracy, centre crop": round(1 - ten["center_top1_err"], 6),
                       "top-5 accuracy, centre crop": round(1 - ten["center_top5_err"], 6),
                       "top-1 accuracy, ten crops": round(1 - ten["top1_err"], 6),
                       "top-5 accuracy, ten crops": round(1 - ten["top5_err"], 6)}
    assert f"| this model | ten crops, softmax averaged | 100 | {ten['top1_err']:.2%} | {ten['top5_err']:.2%} |" in text
    assert "| ten crops | 50,000 | 40.70% | 18.20% |" in text and "| centre crop | 50,000 | 43.48% | 20.93% |" in text
    assert 'load_pretrained("USER/NAME")' in text  # the repo is named when pushed
    assert "![training curves" in text and "(training_curves.png)" in text and "(predictions.png)" in text
    with Image.open(exported / "training_curves.png") as curves, Image.open(exported / "predictions.png") as sheet:
        assert curves.size == (1500, 900) and sheet.size == sheet_size(8, 5)


@pytest.mark.slow
def test_export_without_evaluation_takes_the_runs_numbers_and_refuses_foreign_folders(run, tmp_path):
    done = export(run, tmp_path / "plain", evaluate=False)
    config = json.loads((done.folder / "config.json").read_text())
    epoch = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert config["evaluation"]["center_crop"] == {"top1_err": epoch["val_top1_err"], "top5_err": epoch["val_top5_err"]}
    assert config["evaluation"]["ten_crops"] is None and config["evaluation"]["images"] == 100
    assert sorted(p.name for p in done.folder.iterdir()) == sorted(set(EXPORT_FILES) - {"predictions.png"})
    # An earlier export is replaced whole, with the same bytes (so pushing it again commits nothing);
    # any other folder is left alone.
    first = {p.name: sha256(p) for p in done.folder.iterdir()}
    again = export(run, tmp_path / "plain", evaluate=False)
    assert again.folder == done.folder and not list(tmp_path.glob(".tmp-*"))
    assert {p.name: sha256(p) for p in again.folder.iterdir()} == first
    (tmp_path / "mine").mkdir()
    assert done.folder.stat().st_mode & 0o777 == (tmp_path / "mine").stat().st_mode & 0o777  # a plain folder's mode
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = invoke("export", str(run), "--out", str(tmp_path / "mine"), "--no-evaluate")
    assert error_line(result) == f"{tmp_path / 'mine'}: exists and is not an earlier export; give --out a new or empty folder"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_alexnet_tv_weights_load_unchanged_into_torchvision(demo_shards, tmp_path):
    torch.manual_seed(0)
    model = build_model("alexnet-tv", num_classes=10).to(memory_format=torch.channels_last)  # as a CUDA run keeps it
    assert not model.state_dict()["features.0.weight"].is_contiguous()
    folder = demo_shards
    info = json.loads((folder / "_info.json").read_text())
    state = {"format": checkpoint.FORMAT, "model": model.state_dict(), "epoch": 0, "step": 0, "global_step": 0,
             "world_size": 1, "best_top1_err": None, "classes": info["classes"],
             "stats": json.loads((folder / "stats.json").read_text()), "inputs": "standardize",
             "config": TrainConfig(shards=str(folder), arch="alexnet-tv").to_dict()}
    checkpoint.save(state, tmp_path / "last.pt")
    done = export(tmp_path / "last.pt", evaluate=False)
    assert done.folder == export_folder(tmp_path / "last.pt") == tmp_path / "model-last"
    tv = torchvision.models.alexnet(num_classes=10).eval()
    tv.load_state_dict(load_file(done.folder / "model.safetensors"))  # strict: every name and shape as torchvision's
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tv.state_dict().items())
    torch.manual_seed(0)
    reference = build_model("alexnet-tv", num_classes=10).eval()  # the same weights, in the usual memory format
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(tv(x), reference(x))
    text = (done.folder / "README.md").read_text()
    assert "model = torchvision.models.alexnet(num_classes=10).eval()" in text


# --- push and load --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_push_then_eval_and_predict_by_model_give_the_checkpoints_results(run, exported, pictures, checkpoint_eval, writer):
    said = ok("push", str(exported), "--repo", REPO)
    commits = writer.models.commits(REPO)
    assert said == f"pushed {exported} to {writer.url}/{REPO} (main, commit {commits[-1].oid[:12]})\n"
    assert [c.title for c in commits] == ["initial commit", "alextrain push: alexnet-bn after epoch 1 (synthetic)"]
    assert sorted(commits[-1].files) == sorted([".gitattributes", *EXPORT_FILES])
    assert all(writer.models.read(REPO, name) == (exported / name).read_bytes() for name in EXPORT_FILES)
    assert f'load_pretrained("{REPO}")' in (exported / "README.md").read_text()  # the card now names the repo
    uploaded = list(writer.models.uploaded)
    assert sorted(uploaded) == sorted(sha256(exported / n) for n in ("model.safetensors", "training_curves.png", "predictions.png"))

    # The same folder again: nothing changed, nothing sent, no commit.
    assert ok("push", str(exported), "--repo", REPO) == f"{writer.url}/{REPO} (main) already holds {exported}: nothing to commit\n"
    assert writer.models.commits(REPO) == commits and writer.models.uploaded == uploaded

    # Loaded back by --model (from the Hub, and from the folder): the checkpoint's numbers and predictions.
    by_model = json.loads(ok("eval", "--model", REPO, "--json", *EVAL))
    assert by_model.pop("model") == REPO and by_model.pop("revision") is None
    assert by_model == {k: v for k, v in checkpoint_eval.items() if k != "checkpoint"}
    predicted = ok("predict", "--checkpoint", str(run), *pictures, "--device", "cpu")
    assert ok("predict", "--model", REPO, *pictures, "--device", "cpu") == predicted
    assert ok("predict", "--model", str(exported), *pictures, "--device", "cpu") == predicted
    assert ok("predict", "--model", REPO, "--revision", commits[-1].oid, *pictures, "--ten-crop", "--device", "cpu") == \
        ok("predict", "--checkpoint", str(run), *pictures, "--ten-crop", "--device", "cpu")
    # The weights came once into the Hugging Face cache; the second and third loads read it there.
    pretrained = load_pretrained(REPO)  # the Python way
    assert pretrained.predict(pictures) == predict_files(str(run), pictures, device="cpu")
    assert not pretrained.model.training
    assert pretrained.preprocess(torch.zeros(1, 3, 256, 256, dtype=torch.uint8)).shape == (1, 1, 3, 64, 64)
    gets = [r for r in writer.requests if r.method == "GET" and r.file == "model.safetensors"]
    assert len(gets) == 1  # downloaded once into the Hugging Face cache, then read from there


@pytest.mark.slow
def test_push_of_a_checkpoint_exports_it_once(run, exported, writer):
    text = invoke("push", str(run / "best.pt"), "--repo", REPO, "--no-evaluate", "--revision", "v1")
    assert text.exit_code == 0, text.output
    folder = run / "model-best"
    assert text.stderr == f"exported {folder}\n" and json.loads((folder / "config.json").read_text())["evaluation"]["ten_crops"] is None
    assert len(writer.models.commits(REPO, "v1")) == 2 and len(writer.models.commits(REPO, "main")) == 1
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = invoke("push", str(run / "best.pt"), "--repo", REPO, "--revision", "v1")
    assert again.exit_code == 0 and again.stderr == "" and "nothing to commit" in again.stdout
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime and len(writer.models.commits(REPO, "v1")) == 2
    # An export with a prediction sheet, then this one again: the sheet it lacks is deleted in its commit.
    ok("push", str(exported), "--repo", REPO, "--revision", "v1")
    assert "predictions.png" in writer.models.commits(REPO, "v1")[-1].files
    ok("push", str(folder), "--repo", REPO, "--revision", "v1")
    assert sorted(writer.models.commits(REPO, "v1")[-1].files) == sorted({".gitattributes", *EXPORT_FILES} - {"predictions.png"})
    assert len(writer.models.commits(REPO, "v1")) == 4


# --- refusals ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_push_failures_are_one_line_and_publish_nothing(exported, writer, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert error_line(invoke("push", str(exported), "--repo", REPO)) == (
        f"no Hugging Face token to push {REPO} with: run `hf auth login` or set HF_TOKEN to a token with write access "
        "(https://huggingface.co/settings/tokens)")
    monkeypatch.setenv("HF_TOKEN", writer.token)  # a token without write access
    line = error_line(invoke("push", str(exported), "--repo", REPO))
    assert line.startswith(f"{REPO}: this token has no write access there (HTTP 403: You don't have the rights to create a model")
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    assert error_line(invoke("push", str(exported), "--repo", REPO)).startswith(
        f"{REPO}: the Hub did not accept the token (HTTP 401: Invalid credentials in Authorization header)")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert error_line(invoke("push", str(exported), "--repo", "not a repo")).startswith("'not a repo' is not a Hub repo id")
    assert error_line(invoke("push", str(exported), "--repo", "someone/tiny")).startswith(
        "someone/tiny: this token has no write access there (HTTP 403")
    # The connection drops once the commit is sent: one line, and the repo holds what it held.
    writer.models.drop("commit")
    line = error_line(invoke("push", str(exported), "--repo", REPO))
    assert line.startswith(f"{REPO}: the connection to the Hub failed during the push (RemoteProtocolError: ")
    assert line.endswith("the repo holds its previous version or the whole new one: run the same command again")
    assert [c.title for c in writer.models.commits(REPO)] == ["initial commit"]
    assert sorted(writer.models.commits(REPO)[0].files) == [".gitattributes"]
    assert WRITE_TOKEN not in line and writer.token not in line
    ok("push", str(exported), "--repo", REPO)  # run again: published whole
    assert len(writer.models.commits(REPO)) == 2


def test_a_hub_failure_is_told_from_a_bug_by_the_clients_own_types():
    """What the client's HTTP library raises (whatever that library is called: the client's session
    says, as huggingface_hub 1.x moved from httpx to httpx2) is a Hub failure, one line; anything else
    is a bug that keeps its traceback. The error here comes from this module, as the library's errors
    reach us through the client's wrappers and its transport's own modules."""
    import sys

    from huggingface_hub.utils import get_session

    from train.hub import _is_hub_error

    library = sys.modules[type(get_session()).__module__.split(".")[0]]

    class TransportTrouble(library.TransportError):
        pass

    try:
        raise RuntimeError("while pushing") from TransportTrouble("connection reset by peer")
    except RuntimeError as wrapped:
        assert _is_hub_error(wrapped)
    assert _is_hub_error(TimeoutError("timed out"))
    assert not _is_hub_error(KeyError("siblings")) and not _is_hub_error(FileNotFoundError("model.safetensors"))


@pytest.mark.slow
def test_tampered_weights_pickles_and_unknown_archs_are_refused(exported, pictures, writer, tmp_path):
    api = HfApi(token=WRITE_TOKEN)
    # Weights whose fc8 has another shape of the same size: a valid safetensors file that does not fit.
    tampered = shutil.copytree(exported, tmp_path / "tampered")
    tamper_shape(tampered, "classifier.fc8.weight", [20, 2048])
    refusal = ("model.safetensors does not fit alexnet-bn with 10 classes: classifier.fc8.weight has shape [20, 2048], "
               "the model's is [10, 4096]")
    assert error_line(invoke("predict", "--model", str(tampered), pictures[0])) == f"{tampered}: {refusal}"
    assert error_line(invoke("push", str(tampered), "--repo", REPO)) == f"{tampered}: {refusal}"  # never published
    assert writer.models.private(REPO) is None
    api.create_repo(f"{WRITE_USER}/tampered")
    api.upload_folder(repo_id=f"{WRITE_USER}/tampered", folder_path=tampered)
    assert error_line(invoke("eval", "--model", f"{WRITE_USER}/tampered", *EVAL)) == f"{WRITE_USER}/tampered: {refusal}"

    # A repo offering a pickle instead: never downloaded, never unpickled.
    marker = tmp_path / "unpickled"
    (tmp_path / "pickled").mkdir()
    shutil.copy(exported / "config.json", tmp_path / "pickled" / "config.json")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps(_Opens(str(marker))))
    api.create_repo(f"{WRITE_USER}/pickled")
    api.upload_folder(repo_id=f"{WRITE_USER}/pickled", folder_path=tmp_path / "pickled")
    assert error_line(invoke("predict", "--model", f"{WRITE_USER}/pickled", pictures[0])) == (
        f"{WRITE_USER}/pickled: no model.safetensors in this repo (it holds pytorch_model.bin: pickled weights are "
        "never loaded, only model.safetensors)")
    assert not marker.exists() and not [r for r in writer.requests if r.file == "pytorch_model.bin"]

    # An arch this alextrain does not build: refused from config.json, before the weights are downloaded.
    config = json.loads((exported / "config.json").read_text())
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "config.json").write_text(json.dumps({**config, "arch": "resnet50"}))
    shutil.copy(exported / "model.safetensors", tmp_path / "resnet" / "model.safetensors")
    api.create_repo(f"{WRITE_USER}/resnet")
    api.upload_folder(repo_id=f"{WRITE_USER}/resnet", folder_path=tmp_path / "resnet")
    assert error_line(invoke("predict", "--model", f"{WRITE_USER}/resnet", pictures[0])) == (
        f"{WRITE_USER}/resnet: unknown arch 'resnet50' in config.json; this alextrain builds alexnet, alexnet-tv, alexnet-bn")
    assert not [r for r in writer.requests if r.path.startswith(f"/{WRITE_USER}/resnet/") and r.method == "GET"
                and r.file == "model.safetensors"]
    with pytest.raises(HubError, match="no such model repo"):
        load_pretrained(f"{WRITE_USER}/missing")
    with pytest.raises(ModelError, match="no such model folder, and not a Hub repo id"):
        load_pretrained("runs/nothing/here")


def test_eval_and_predict_take_one_model(tmp_path):
    for command in (["eval"], ["predict", __file__]):
        for extra in ([], ["--model", REPO, "--checkpoint", "x"]):
            result = invoke(*command, *extra)
            assert result.exit_code == 2 and "give --checkpoint PATH or --model USER/NAME|DIR (one of the two)" in result.output
        result = invoke(*command, "--checkpoint", "x", "--revision", "main")
        assert result.exit_code == 2 and "--revision goes with --model (a Hub repo)" in result.output


class _Opens:
    """Unpickling this creates a file: what loading a stranger's pickle can do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")
