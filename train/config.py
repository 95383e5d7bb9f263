"""The one configuration object of `alextrain`: every training option, its type, default and help.

The defaults are the paper's recipe (SGD, batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 divided
by 10 when validation top-1 error stops improving, at most 3 times, 90 epochs). The command line is
generated from these fields (`train/cli.py`), and the resolved object is saved as `config.json` in the
run folder and inside every checkpoint, so a run can always be read back and resumed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from prep.contract import IMAGE_SIZE
from train.device_decode import DECODES, GPU_DECODERS
from train.model import ARCHS, WARMUP_STEPS, min_input_size

SCHEDULES = ("plateau", "step", "cosine")
LR_SCALINGS = ("none", "linear")
DEVICES = ("auto", "cpu", "cuda")
PAPER_BATCH = 128  # the batch size the base learning rate belongs to (linear scaling rule)
FLOAT32_MAX = torch.finfo(torch.float32).max  # the weights' type: SGD cannot scale a gradient by a larger lr or weight decay
SEEDS = range(2**64)  # torch.manual_seed's non-negative range


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Batch sizes are per rank; the global batch is
    batch_size x world size."""

    shards: str | None = _opt(None, "shard folder written by `alexprep build-shards`, or a URL prefix: http(s)://..., or pipe:COMMAND (runs a shell: trusted input only)")
    arch: str = _opt("alexnet", "model: the paper's AlexNet, torchvision's variant, or the paper's with BatchNorm", choices=ARCHS)
    epochs: int = _opt(90, "number of epochs")
    batch_size: int = _opt(128, "images per step on each rank")
    lr: float = _opt(0.01, "base learning rate, for a global batch of 128")
    lr_scaling: str = _opt("none", "'linear': multiply lr by global batch / 128 (the linear scaling rule)", choices=LR_SCALINGS)
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "L2 weight decay on every weight and bias, as in the paper")
    schedule: str = _opt("plateau", "lr schedule: divide by 10 when validation top-1 stops improving (at most 3 times), every --step-epochs, or cosine to 0", choices=SCHEDULES)
    patience: int = _opt(5, "plateau schedule: evaluations (one every --eval-every epochs) without a better validation top-1 before dividing lr by 10")
    step_epochs: int = _opt(30, "step schedule: divide lr by 10 every this many epochs")
    warmup_epochs: float | None = _opt(None, "linear warm-up from 0 to lr over this many epochs (any schedule)  "
                                             f"[default: the first {WARMUP_STEPS['alexnet']} steps for --arch alexnet, none for the others; docs/recipe.md]")
    workers: int | None = _opt(None, "loader worker processes per rank that read and decode shards (0 = in the main process)  "
                                     "[default: this machine's cores shared among its ranks, less one each for training]")
    device: str = _opt("auto", "'auto' = cuda if available, else cpu", choices=DEVICES)
    out: str = _opt("runs/train", "run folder for config.json, metrics.jsonl, last.pt, best.pt; one alextrain at a time writes it")
    seed: int = _opt(0, "seed for the initial weights, shard order, shuffle buffer, augmentation and dropout (0..2**64-1)")
    compile: bool = _opt(False, "torch.compile the model")
    resume: str | None = _opt(None, "continue a run in its own folder: a run folder (its last.pt), or a checkpoint file in it; --out may "
                                    "only name that folder (to branch a run, copy its folder and resume the copy)")
    crop_size: int = _opt(224, f"side of the random training crop and of the evaluation crops, in pixels (at most {IMAGE_SIZE}, and "
                               "at least the smallest input --arch's layers take)")
    lighting_std: float = _opt(0.1, "standard deviation of the PCA lighting coefficients (0 = off)")
    shuffle_buffer: int = _opt(1000, "samples in each worker's shuffle buffer (raw JPEG bytes, about 25 KB each)")
    decode: str = _opt("cpu", "where JPEGs are decoded: in the CPU workers, batched on the GPU (torchvision.io.decode_jpeg), or both: "
                              "the GPU takes the batches the workers start while training waits for data", choices=DECODES)
    gpu_decoder: str = _opt("torchvision", "what decodes on the GPU with --decode gpu or both: torchvision's nvJPEG, or nvImageCodec "
                                           "(optional extra [nvimgcodec]; uses the GPU's hardware JPEG decoders where it has them)",
                            choices=GPU_DECODERS)
    log_every: int = _opt(50, "steps between train_step records in metrics.jsonl")
    save_every: int = _opt(1000, "steps between mid-epoch saves of last.pt (0 = only at the end of each epoch)")
    steps_per_epoch: int | None = _opt(None, "steps per epoch (default: training samples // global batch, from _info.json)")
    eval_every: int = _opt(1, "epochs between evaluations on the validation split (the last epoch is always evaluated)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("float") and value is not None and not math.isfinite(value):  # nan passes every < check
                raise ConfigError(f"{f.name} must be a finite number, not {value}")
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        positive = ("epochs", "batch_size", "log_every", "eval_every", "patience", "step_epochs", "shuffle_buffer")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("workers", "save_every", "warmup_epochs", "lighting_std", "weight_decay", "momentum"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, not {self.lr}")
        for name in ("lr", "weight_decay"):
            if getattr(self, name) > FLOAT32_MAX:
                raise ConfigError(f"{name} must be at most {FLOAT32_MAX:.4g} (the largest float32, the weights' type), not {getattr(self, name):g}")
        if self.seed not in SEEDS:
            raise ConfigError(f"seed must be in 0..2**64-1 (torch's seed range), not {self.seed}")
        if not self.out:
            raise ConfigError("out must name a run folder, not an empty string")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be at least 1, not {self.steps_per_epoch}")
        if not 0 < self.crop_size <= IMAGE_SIZE:
            raise ConfigError(f"crop_size must be in 1..{IMAGE_SIZE}, not {self.crop_size}")
        smallest = min_input_size(self.arch)
        if self.crop_size < smallest:
            raise ConfigError(f"crop_size must be at least {smallest} for --arch {self.arch} (a kernel of its layers is larger "
                              f"than a smaller input), not {self.crop_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of to_dict; unknown keys are an error (a config from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
