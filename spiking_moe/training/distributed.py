"""Processes and devices: joining a ``torchrun`` job, choosing the device, reducing across ranks.

Every helper here is the identity in a single process, so the trainer and its callbacks call
them unconditionally. Collective helpers must be called by every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "init_distributed",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": ``cuda:<local_rank>`` when CUDA is available, else CPU; "cuda" -> ``cuda:<local_rank>``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...).

    Uses nccl when this process trains on CUDA, gloo otherwise. Returns the single-process
    :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1. Idempotent.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_cuda = resolve_device(device, local_rank).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks (a new tensor; the input itself in a single process).

    Args:
        tensor: the same shape on every rank.
        device: where the reduction runs (gloo needs CPU tensors, nccl CUDA ones);
            default: the tensor's own device.
    """
    if _world_size() == 1:
        return tensor
    reduced = tensor.to(device or tensor.device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` in a single process."""
    if _world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
