"""The default recipe gets off the ground: the paper's AlexNet with its default optimiser settings,
warm-up and input scaling learns a small set at full 224 x 224 crops (docs/recipe.md)."""

import json

import pytest

from train import checkpoint
from train.config import TrainConfig
from train.evaluate import evaluate_checkpoint
from train.loop import train
from train.run_folder import METRICS

# 90 steps of 32 demo images (300 train, 10 classes; the stream cycles through them): about a minute
# and a half on two idle cores. Chance is a loss of ln 10 = 2.30 and a top-1 error of 0.9. Measured
# (2026-12-02): validation top-1 error 0.50 with this recipe, 0.90 with the standardised inputs every
# model had before; the training loss stays noisy on 10 classes (docs/recipe.md), so the checks are
# the validation error and the best of the last five 10-step intervals.
STEPS = 90


@pytest.mark.slow
def test_the_paper_model_learns_with_the_default_recipe(demo_shards, tmp_path):
    config = TrainConfig(shards=str(demo_shards), out=str(tmp_path), batch_size=32, epochs=1, steps_per_epoch=STEPS,
                         log_every=10, workers=1, device="cpu")
    default = TrainConfig(shards=config.shards)
    assert (config.arch, config.lr, config.momentum, config.weight_decay, config.crop_size, config.warmup_epochs) == \
        ("alexnet", 0.01, 0.9, 5e-4, 224, None) == (default.arch, default.lr, default.momentum, default.weight_decay, default.crop_size, default.warmup_epochs)
    record = train(config)
    steps = [r for r in map(json.loads, (tmp_path / METRICS).read_text().splitlines()) if r["kind"] == "train_step"]
    losses = [r["loss"] for r in steps]
    assert len(losses) == STEPS // 10
    assert min(losses[-5:]) < 1.8, losses
    assert record["val_top1_err"] <= 0.7, record
    assert checkpoint.load(tmp_path)["inputs"] == "subtract-mean"
    # eval feeds the checkpoint's model as it was trained: the run's own numbers again
    again = evaluate_checkpoint(str(tmp_path), mode="center", batch_size=32, workers=1, device="cpu")
    assert (again["top1_err"], again["top5_err"]) == (record["val_top1_err"], record["val_top5_err"])
