"""Distributed training under torchrun: process-group set-up, tear-down and metric reduction.

torchrun (or `python -m torch.distributed.run`) starts one process per rank and sets RANK, WORLD_SIZE
and LOCAL_RANK. Without them this is a world of one and nothing is initialised. NCCL on CUDA, gloo on
the CPU. Rank 0 alone writes files; every rank reduces its metrics so they describe the whole world.
What rank 0 alone does before the ranks meet again (claiming and writing the run folder) goes through
`on_main`, so when rank 0 stops there the other ranks stop too instead of waiting for it in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as tdist

from train.config import ConfigError

T = TypeVar("T")


class MainRankFailed(Exception):
    """Rank 0 stopped at a step all ranks wait for; its own error line says why."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0  # index of this rank's GPU on its machine
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; asking for cuda without one is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device available")
    return torch.device(name)


def init(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (if any); on CUDA also pick
    this rank's GPU. Returns this process's place in the world."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
        tdist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        tdist.init_process_group("gloo")
    return world


def default_workers() -> int:
    """Loader workers per rank when none are asked for: the machine's cores shared among the ranks
    on it (torchrun's LOCAL_WORLD_SIZE), less one per rank for the process that trains."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, (os.cpu_count() or 1) // ranks_here - 1)


def launched_as_main() -> bool:
    """True in rank 0 of a torchrun launch, and in a process not started by torchrun."""
    return os.environ.get("RANK", "0") == "0"


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def sum_all(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `values` over all ranks (itself in a world of one). One collective call,
    so pack every metric of an interval into one tensor."""
    if tdist.is_initialized():
        values = values.clone()
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def on_main(world: World, device: torch.device, action: Callable[[], T]) -> T | None:
    """`action()` on rank 0 alone (None on the other ranks), then every rank learns whether it raised
    (one collective on `device`): rank 0 raises its own error, the others MainRankFailed."""
    error, result = None, None
    if world.is_main:
        try:
            result = action()
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
    if world.distributed:
        failed = sum_all(torch.tensor([float(error is not None)], device=device)).item()
        if failed and not world.is_main:
            raise MainRankFailed(f"rank {world.rank}: stopped because rank 0 did (its error says why)")
    if error is not None:
        raise error
    return result
