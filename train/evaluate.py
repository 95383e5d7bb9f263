"""Top-1 / top-5 error on the validation split: center crop, or the paper's ten crops with the softmax
averaged over the views. Every validation sample counts exactly once, whatever the world size."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prep.contract import ContractError
from train import dist
from train.augment import StatsTensors, eval_views
from train.checkpoint import CheckpointError
from train.loader import DeviceLoader, check_host_memory
from train.metrics import topk_correct
from train.pretrained import ModelRef
from train.stream import ShardStream, SplitShards, open_shards

CENTER_VIEW = 4  # eval_views(mode="ten") order: 4 corners, center, then their mirror images


def autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 (no autocast) on the CPU, where results must be exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: SplitShards,
    stats: StatsTensors,
    device: torch.device,
    *,
    scaling: str,
    batch_size: int = 128,
    crop_size: int = 224,
    mode: str = "center",
    workers: int = 4,
    decode: str = "cpu",
    gpu_decoder: str = "torchvision",
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """{"top1_err", "top5_err", "loss", "samples", "views"} over the whole split. Each rank reads its
    part (pass the model without its DDP wrapper: ranks see different numbers of batches); the counts
    are summed over ranks. `loss` is the mean negative log of the averaged softmax at the label.
    mode="ten" also gives "center_top1_err" and "center_top5_err" from the center view alone, so one
    pass yields both of the paper's test protocols."""
    was_training = model.training
    model.eval()
    stream = ShardStream(split, batch_size, train=False, rank=rank, world_size=world_size)
    sums = EvalSums.zeros(device)
    for images, labels in DeviceLoader(stream, device, workers=workers, decode=decode, gpu_decoder=gpu_decoder):
        x = eval_views(images, stats, crop_size, mode, scaling=scaling)  # (V, B, 3, S, S)
        v, b = x.shape[:2]
        x = x.flatten(0, 1)  # (V * B, 3, S, S)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(x)  # (V * B, C)
        view_probs = F.softmax(logits.float().view(v, b, -1), dim=-1)  # (V, B, C)
        probs = view_probs.mean(dim=0)  # (B, C)
        center = view_probs[CENTER_VIEW if v > 1 else 0]  # (B, C)
        sums.add(probs, center, labels)
    model.train(was_training)
    n = sums.total()  # the one sync with the device
    result = {"top1_err": 1 - n.top1 / n.samples, "top5_err": 1 - n.top5 / n.samples, "loss": n.nll / n.samples,
              "samples": int(n.samples), "views": 1}
    if mode == "ten":
        result.update(views=10, center_top1_err=1 - n.center_top1 / n.samples, center_top5_err=1 - n.center_top5 / n.samples)
    return result


@dataclass
class EvalSums:
    """Running sums of an evaluation on this rank, float64 0-d tensors on the device (no sync per batch)."""

    nll: torch.Tensor  # -log of the view-averaged softmax at the label, summed over samples
    top1: torch.Tensor  # samples whose label is the best of the averaged softmax
    top5: torch.Tensor
    center_top1: torch.Tensor  # the same for the center view alone
    center_top5: torch.Tensor
    samples: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "EvalSums":
        return cls(*torch.zeros(len(dataclasses.fields(cls)), dtype=torch.float64, device=device))

    def add(self, probs: torch.Tensor, center: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: (B, C) averaged and center-view probabilities, (B,) labels."""
        self.nll += -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum().double()
        top1, top5 = topk_correct(probs, labels)
        center_top1, center_top5 = topk_correct(center, labels)
        self.top1 += top1
        self.top5 += top5
        self.center_top1 += center_top1
        self.center_top5 += center_top5
        self.samples += len(labels)

    def total(self) -> "EvalTotals":
        """The sums over all ranks, as plain numbers (one collective call)."""
        packed = torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])
        return EvalTotals(*dist.sum_all(packed).tolist())


@dataclass
class EvalTotals:
    nll: float
    top1: float
    top5: float
    center_top1: float
    center_top5: float
    samples: float


def evaluate_checkpoint(
    path: str | ModelRef, shards: str | None = None, *, mode: str = "center", batch_size: int = 128, workers: int | None = None, device: str = "auto"
) -> dict:
    """Evaluate a checkpoint (or an exported model: a ModelRef) on a shard folder's validation split
    (by default the folder it was trained on); works under torchrun too. Returns evaluate()'s numbers
    plus what was evaluated."""
    ref = path if isinstance(path, ModelRef) else ModelRef(checkpoint=path)
    workers = dist.default_workers() if workers is None else workers
    check_host_memory(batch_size, workers)  # before anything is read: the loader's slots would fail with ENOMEM
    dev = dist.resolve_device(device)
    world = dist.init(dev.type)
    try:
        if dev.type == "cuda":
            dev = torch.device("cuda", world.local_rank)
        trained = ref.load(dev, for_eval=True, shards=shards)
        location = trained.shards
        if location is None:
            raise CheckpointError(f"{ref}: it does not say which shard folder it was trained on; give --shards")
        model = trained.model
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        folder = open_shards(location, splits=("validation",))
        if [c.wnid for c in folder.classes] != [c["wnid"] for c in trained.classes]:
            raise ContractError(f"{location}: its classes differ from the {len(trained.classes)} the model was trained on")
        result = evaluate(model, folder.split("validation"), trained.stats, dev, scaling=trained.scaling, batch_size=batch_size, crop_size=trained.crop_size,
                          mode=mode, workers=workers, rank=world.rank, world_size=world.world_size)
    finally:
        dist.teardown()
    return {**trained.origin, "shards": location, "mode": mode, "epoch": trained.epoch, **result}
