"""A short real run on the synthetic demo set learns (loss falls, accuracy far above the 10% chance),
and its checkpoint evaluates and predicts through the command line."""

import json
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from torchcodec.decoders import decode_jpeg

from train import checkpoint
from prep.contract import PixelStats
from train.augment import StatsTensors, eval_views
from train.cli import main
from train.config import TrainConfig
from train.loop import Schedule, train
from train.run_folder import METRICS
from train.predict import load_image, predict_images

# Chosen for a reliable fall on 2 CPU cores in about a minute: BatchNorm (the paper's model needs many
# more steps to leave chance), 64 px crops, 4 epochs of 9 steps.
RECIPE = dict(arch="alexnet-bn", crop_size=64, batch_size=32, lr=0.005, epochs=4, workers=2, device="cpu", log_every=3)


def records(run, kind):
    return [r for r in map(json.loads, (run / METRICS).read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(shards=str(demo_shards), out=str(out), **RECIPE))
    return out


def invoke(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_short_run_learns_the_demo_set(run, demo_shards):
    steps, epochs = records(run, "train_step"), records(run, "epoch")
    assert [r["global_step"] for r in steps] == list(range(3, 37, 3)) and all(r["images"] == 96 for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_loss"] < 0.7 * steps[0]["loss"]
    assert epochs[-1]["val_top1_err"] < 0.5 and epochs[-1]["val_top5_err"] < 0.2  # chance: 0.9 and 0.5
    assert epochs[-1]["best_top1_err"] == min(r["val_top1_err"] for r in epochs)
    assert json.loads((run / "config.json").read_text()) == TrainConfig(shards=str(demo_shards), out=str(run), **RECIPE).to_dict()
    best = checkpoint.load(run / "best.pt")
    assert best["best_top1_err"] == epochs[-1]["best_top1_err"] and best["global_step"] == 9 * best["epoch"]


@pytest.mark.slow
def test_eval_json_matches_the_run_and_ten_crop_counts_every_image(run, demo_shards):
    last_epoch = records(run, "epoch")[-1]
    center = json.loads(invoke("eval", "--checkpoint", str(run), "--center", "--json", "--batch-size", "32", "--workers", "2"))
    assert center["samples"] == 100 and center["views"] == 1 and center["mode"] == "center" and center["epoch"] == 4
    # The same weights, batches and code as the run's own last evaluation: the same numbers.
    assert (center["top1_err"], center["top5_err"]) == (last_epoch["val_top1_err"], last_epoch["val_top5_err"])
    assert center["loss"] == pytest.approx(last_epoch["val_loss"], rel=1e-6)
    ten = json.loads(invoke("eval", "--checkpoint", str(run / "last.pt"), "--shards", str(demo_shards), "--ten-crop", "--json",
                            "--workers", "2"))
    assert ten["samples"] == 100 and ten["views"] == 10 and ten["shards"] == str(demo_shards)
    # (64 px corner crops of these pictures often miss the pattern: no claim that ten crops do better.)
    assert all(round(ten[k] * 100, 6) == round(ten[k] * 100) for k in ("top1_err", "top5_err")) and ten["top5_err"] <= ten["top1_err"]
    # The ten-crop pass also scores its center view alone: the center-crop protocol's numbers.
    assert (ten["center_top1_err"], ten["center_top5_err"]) == (center["top1_err"], center["top5_err"])
    text = invoke("eval", "--checkpoint", str(run), "--batch-size", "32", "--workers", "2")
    assert text == (f"{demo_shards} validation, 100 images, center crop: top-1 error {center['top1_err']:.2%}, top-5 error {center['top5_err']:.2%}\n"
                    f"{demo_shards} validation, 100 images, ten crops: top-1 error {ten['top1_err']:.2%}, top-5 error {ten['top5_err']:.2%}\n")


@pytest.mark.slow
def test_predict_top5_on_jpeg_and_png(run, demo_shards, tmp_path):
    """A validation picture as its JPEG bytes and as a PNG of its decoded pixels: the JPEG's top 5 are
    exactly the model's softmax over the center crop of the picture as alexprep prepares it; the PNG
    (one more JPEG round trip away from the same pixels) agrees."""
    with tarfile.open(demo_shards / "validation-000000.tar") as tar:
        jpg = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    (tmp_path / "picture.jpg").write_bytes(jpg)
    pixels = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode="RGB")  # (3, 256, 256)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "picture.png")

    state = checkpoint.load(run / "best.pt")
    names, scaling = [c["name"] for c in state["classes"]], state["inputs"]
    assert scaling == "standardize"  # alexnet-bn's
    model, _ = checkpoint.load_model(run / "best.pt", torch.device("cpu"))
    stats = StatsTensors.of(PixelStats.from_json(state["stats"], "checkpoint stats"))
    with torch.no_grad():
        probs = torch.softmax(model(eval_views(load_image(tmp_path / "picture.jpg")[None], stats, 64, scaling=scaling)[0]), dim=1)[0]
    top = probs.topk(5)
    expected = [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]
    (png,) = predict_images(model, [tmp_path / "picture.png"], stats, names, torch.device("cpu"), scaling=scaling, crop_size=64)
    (jpeg,) = predict_images(model, [tmp_path / "picture.jpg"], stats, names, torch.device("cpu"), scaling=scaling, crop_size=64)
    assert jpeg == expected and len({n for n, _ in jpeg}) == 5
    assert jpeg[0][0] == png[0][0] and all(abs(p - q) < 0.02 for (_, p), (_, q) in zip(jpeg, png))

    # Both pictures in one call: "path", then five "  12.3%  name" lines each.
    lines = invoke("predict", "--checkpoint", str(run / "best.pt"), str(tmp_path / "picture.jpg"), str(tmp_path / "picture.png")).splitlines()
    assert lines[0] == str(tmp_path / "picture.jpg") and lines[6] == str(tmp_path / "picture.png") and len(lines) == 12
    for block, top in ((lines[1:6], jpeg), (lines[7:12], png)):
        printed = [line.split(None, 1) for line in block]
        assert [name for _, name in printed] == [n for n, _ in top]
        assert all(abs(float(p.rstrip("%")) / 100 - q) < 0.0006 for (p, _), (_, q) in zip(printed, top))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(run), str(not_image)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {not_image}: cannot read image (")


def test_schedules():
    def lrs(schedule, arch="alexnet-bn", **kw):
        s = Schedule(TrainConfig(shards="x", arch=arch, schedule=schedule, epochs=4, **kw), base_lr=0.1, steps_per_epoch=10)
        return s, [round(s.lr(step), 6) for step in (0, 9, 10, 20, 39)]

    assert lrs("step", step_epochs=2)[1] == [0.1, 0.1, 0.1, 0.01, 0.01]
    assert lrs("cosine")[1] == [0.1, round(0.05 * (1 + np.cos(np.pi * 9 / 40)), 6), 0.085355, 0.05, round(0.05 * (1 + np.cos(np.pi * 39 / 40)), 6)]
    assert lrs("step", step_epochs=2, warmup_epochs=1)[1] == [0.01, 0.1, 0.1, 0.01, 0.01]
    # The paper's model warms up over its first 150 steps unless --warmup-epochs says otherwise.
    assert lrs("step", arch="alexnet", step_epochs=100)[1] == [round(0.1 * k / 150, 6) for k in (1, 10, 11, 21, 40)]
    assert lrs("step", arch="alexnet", step_epochs=100, warmup_epochs=0)[1] == [0.1] * 5
    plateau, values = lrs("plateau", patience=2)
    assert values == [0.1] * 5
    for err in (0.5, 0.4, 0.45, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3):
        plateau.evaluated(err)
    # 0.45 and 0.4 do not beat 0.4: first division. After 0.3, eight evaluations without improvement:
    # the second and third divisions after two each, then no fourth; the count goes on.
    assert plateau.state_dict() == {"reductions": 3, "best": 0.3, "bad": 4}
    assert plateau.lr(0) == pytest.approx(1e-4)
