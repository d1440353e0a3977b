"""Processes and devices: joining a ``torchrun`` job, choosing the device, laying a model out
over the processes (expert parallelism, DDP), reducing across ranks.

Every helper here is the identity in a single process, so the trainer and its callbacks call
them unconditionally. Collective helpers must be called by every rank.

Statistics travel as NamedTuples of tensors (a field per quantity, never a position in a
packed tensor): :func:`add_fields` sums two field by field, :func:`reduce_fields` sums one
over ranks in a single all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..parallel import (
    ExpertParallel,
    expert_parameter_names,
    init_expert_parallel,
    is_expert_parallel,
    shard_experts,
)

__all__ = [
    "DeviceError",
    "DistInfo",
    "add_fields",
    "all_gather_objects",
    "all_or_none",
    "all_reduce_sum",
    "check_equal_lengths",
    "check_loader_sharding",
    "current_dist",
    "init_distributed",
    "lay_out_model",
    "reduce_fields",
    "resolve_device",
]

Stats = TypeVar("Stats", bound=tuple)


class DeviceError(ConfigError, RuntimeError):
    """The device asked for is not usable here (a RuntimeError as before, and a
    :class:`~spiking_moe.config.ConfigError`: the user's setting is what is wrong)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) job.

    The defaults describe a single process; :attr:`is_main` tells rank 0 from the others.

    Attributes:
        rank: this process's index in the job, ``0 .. world_size - 1``.
        world_size: processes in the job.
        local_rank: this process's index on its machine (``LOCAL_RANK``): the CUDA device
            it uses.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a setting such as ``train.device`` names, for the process ``local_rank``.

    Args:
        device: "auto" (``cuda:<local_rank>`` when CUDA is available, else CPU), "cuda"
            (``cuda:<local_rank>``), or any ``torch.device`` string, used as it is ("cpu",
            "cuda:1", ...).
        local_rank: this process's index on its machine: its CUDA device when ``device``
            names none.

    Returns:
        The ``torch.device``.

    Raises:
        DeviceError: CUDA is asked for and not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...).

    Uses nccl when this process trains on CUDA (and makes ``cuda:<LOCAL_RANK>`` its current
    device), gloo otherwise. Idempotent: a process that has joined a group joins nothing more.

    Args:
        device: the training device setting (``train.device``, as for
            :func:`resolve_device`); it picks the backend when a group is joined here.

    Returns:
        This process's :class:`DistInfo`: the single-process one when ``WORLD_SIZE`` is unset
        or 1 and no group was joined.
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


def current_dist() -> DistInfo:
    """This process's place in the job it has joined; single-process when it joined none.
    Unlike :func:`init_distributed`, joins nothing."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lay_out_model(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    *,
    expert_parallel: int = 1,
    find_unused_parameters: bool = False,
) -> tuple[ExpertParallel | None, nn.parallel.DistributedDataParallel | None]:
    """Lay ``model`` (on ``device``) out over this job's processes: its experts split over
    groups of ``expert_parallel`` processes (in place, :func:`~spiking_moe.parallel.shard_experts`),
    then, in a multi-process job, wrapped in DDP, which ignores the split experts.

    Returns:
        ``(expert-parallel layout or None, DDP wrapper or None)``.

    Raises:
        ConfigError: ``expert_parallel`` does not fit the job (a model already sharded, a
            single process, a world size it does not divide).
        ValueError: a layer whose experts it does not divide.
    """
    if is_expert_parallel(model):
        # DDP would average experts that differ between processes.
        raise ConfigError(
            "the model is already expert-parallel (its experts were sharded): give the "
            "Trainer the whole model and set train.expert_parallel instead"
        )
    ep = None
    if expert_parallel > 1:
        world = info.world_size
        if world == 1:
            raise ConfigError(
                f"train.expert_parallel = {expert_parallel} needs a multi-process job of a "
                f"multiple of {expert_parallel} processes, but this is a single process: "
                f"launch with torchrun --nproc_per_node={expert_parallel}"
            )
        if world % expert_parallel:
            raise ConfigError(
                f"train.expert_parallel = {expert_parallel} does not divide the world size "
                f"{world}: the processes must form whole groups of {expert_parallel}"
            )
        ep = init_expert_parallel(expert_parallel)
        shard_experts(model, ep)  # ValueError naming a layer whose experts it does not divide
    if info.world_size == 1:
        return ep, None
    if ep is not None:  # DDP must see only the parameters that every process holds
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parameter_names(model, buffers=True)
        )
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
    return ep, ddp


def check_loader_sharding(loader: Any, name: str, info: DistInfo) -> None:
    """Raise ConfigError if ``loader`` says it is sharded for another number of processes."""
    world = getattr(loader, "world_size", None)
    if world is not None and info.world_size > 1 and world != info.world_size:
        raise ConfigError(
            f"{name} is sharded for world_size={world} but the job has "
            f"{info.world_size} processes; build it with rank and world_size"
        )


def check_equal_lengths(batches: int) -> None:
    """Every rank's training loader must yield ``batches`` batches (collective): under expert
    parallelism every rank takes as many steps, since each forward exchanges tokens."""
    lengths = all_gather_objects(batches)
    if len(set(lengths)) > 1:
        raise ConfigError(
            f"train_loader yields {lengths} batches per epoch on ranks 0..{len(lengths) - 1}; "
            "under expert parallelism every rank must take the same number of steps "
            "(shard it with pad=True, as BatchLoader(shuffle=True) does)"
        )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks (a new tensor; the input itself in a single process).

    Args:
        tensor: the same shape on every rank.
        device: where the reduction runs (gloo needs CPU tensors, nccl CUDA ones);
            default: the tensor's own device.

    Returns:
        The sum over ranks, a new tensor on ``device`` (collective: every rank calls it); in
        a single process ``tensor`` itself, where it is (``device`` is not used).
    """
    if _world_size() == 1:
        return tensor
    reduced = tensor.to(device or tensor.device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (collective: every rank calls it).

    Args:
        obj: any picklable object (this rank's contribution).

    Returns:
        ``world_size`` objects, rank ``r``'s at index ``r``: ``[obj]`` in a single process.
    """
    if _world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_or_none(action: Callable[[], Any], what: str, consequence: str = "") -> None:
    """Run ``action`` here, then raise on every rank if it failed on any (collective: a rank
    left waiting in a later collective would hang the job).

    Raises:
        Exception: the error of ``action``, on the ranks where it failed.
        RuntimeError: naming those ranks (``"<what> failed on rank(s) [...]<consequence>"``),
            on the others.
    """
    error: BaseException | None = None
    try:
        action()
    except Exception as exc:  # reported to the other ranks, then re-raised
        error = exc
    failed = [
        (rank, message)
        for rank, message in enumerate(all_gather_objects(None if error is None else repr(error)))
        if message is not None
    ]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {failed}{consequence}")


def add_fields(a: Stats, b: Stats) -> Stats:
    """Two NamedTuples of tensors summed field by field."""
    return type(a)(*(x + y for x, y in zip(a, b, strict=True)))


def reduce_fields(
    stats: Stats,
    reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
    device: torch.device | None = None,
) -> Stats:
    """A NamedTuple of tensors summed over ranks in one all-reduce, as plain numbers.

    Args:
        stats: the same fields and shapes on every rank.
        reduce: the sum over ranks (e.g. a :class:`~spiking_moe.training.CallbackContext`'s
            ``all_reduce_sum``).
        device: where the fields go first (gloo needs CPU tensors, nccl CUDA ones).

    Returns:
        ``stats``'s type with each 0-d field a float and each other field a list of floats.
    """
    flat = torch.cat([torch.as_tensor(field, device=device).reshape(-1) for field in stats])
    values = reduce(flat).tolist()
    fields, start = [], 0
    for field in stats:
        size = field.numel()
        fields.append(values[start] if field.dim() == 0 else values[start : start + size])
        start += size
    return type(stats)(*fields)
