"""Checkpoints that survive faults: atomic writes, the previous one kept, ``weights_only`` loads.

A checkpoint is a dict of tensors and plain types, so ``torch.load(weights_only=True)`` reads
it. :func:`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, keeps the
file it replaces as ``<name>.prev.pt`` and moves the new one into place with ``os.replace``:
a crash at any point leaves a complete checkpoint at ``path``, and a checkpoint damaged later
(a full disk, a copy cut short) still has an intact predecessor. :func:`load_checkpoint`
turns a damaged file into a :class:`CheckpointError` that names it and the previous one.

RNG streams: :func:`rng_state` / :func:`set_rng_state` capture torch (CPU and CUDA), numpy's
global generator and python ``random`` as tensors and plain types.

**Expert-parallel checkpoints** (``train.expert_parallel = P > 1``, :mod:`spiking_moe.parallel`):
no process holds the whole model, so a checkpoint is a set of files in one folder::

    checkpoint.pt                          the index: step, epoch, scheduler, every rank's RNG,
                                           configs, metrics and "expert_parallel":
                                           {"size": P, "world_size": world, "shards": [names]}
    checkpoint.expert<i>of<P>.step<s>.pt   shard i (written by the process holding experts
                                           block i, replica 0): its model state_dict (dense
                                           parameters and its experts, under their global
                                           names), its optimizer state, the parameter names in
                                           optimizer order and which experts it holds

The shards of step ``s`` are written first (each atomically, under names no earlier step
used), then the index, also atomically (:func:`save_expert_parallel_checkpoint`, which every
process calls): the index is the commit, and a crash at any point leaves the previous index
pointing at intact shards of its own step. A resume reads each process's part back with
:func:`model_and_optimizer_state`, which refuses a checkpoint of another layout and says how
to resume or gather it. Shards that neither the
index nor ``checkpoint.prev.pt`` names are deleted after each commit
(:func:`remove_stale_expert_shards`). :func:`load_expert_shard` reads one shard of an index
and checks it belongs there; :func:`gather_expert_checkpoint` merges the shards into the
single-process layout (weights, and the optimizer state in the whole model's parameter order),
which every single-process tool reads.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..parallel import ExpertParallel, ExpertShard
from .distributed import all_or_none, current_dist

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "CheckpointLayoutError",
    "check_single_process",
    "expert_shard_name",
    "gather_expert_checkpoint",
    "load_checkpoint",
    "load_expert_shard",
    "model_and_optimizer_state",
    "previous_checkpoint",
    "remove_stale_expert_shards",
    "resume_source",
    "rng_state",
    "save_checkpoint",
    "save_expert_parallel_checkpoint",
    "seed_everything",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

#: File name of a run's checkpoint in its output folder (written by the Trainer; an expert-parallel
#: run's index); the one it replaces is kept as ``checkpoint.prev.pt``.
CHECKPOINT_NAME = "checkpoint.pt"

#: The ``"format"`` entry of the Trainer's checkpoints (and of their expert shards).
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: truncated, corrupt, or not a checkpoint.

    Attributes:
        path: the damaged file.
        previous: an intact earlier checkpoint to resume from instead, or None.
    """

    def __init__(self, message: str, path: Path, previous: Path | None = None):
        super().__init__(message)
        self.path = path
        self.previous = previous


class CheckpointLayoutError(CheckpointError):
    """An intact checkpoint written for another process layout: a different expert-parallel
    size or world size, or an expert-parallel checkpoint (or one of its shards) where a
    single-process one is needed. The message names both layouts and what to do."""

    def __init__(self, message: str, path: Path):
        super().__init__(message, path, None)


def previous_checkpoint(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint that ``path`` replaced
    (``checkpoint.pt`` -> ``checkpoint.prev.pt``).

    Args:
        path: a checkpoint file (it need not exist).

    Returns:
        ``<stem>.prev<suffix>`` in the same folder (whether or not it exists).

    Example:
        >>> previous_checkpoint("runs/x/checkpoint.pt").name
        'checkpoint.prev.pt'
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically; the file it replaces becomes :func:`previous_checkpoint`.

    A failure at any point (including a kill between writing and replacing) leaves the file
    previously at ``path`` untouched.

    Args:
        state: the checkpoint: tensors and plain types only (what :func:`load_checkpoint`'s
            ``weights_only`` load accepts), saved as a ``dict``.
        path: the file to write; its folder is created.

    Returns:
        ``path``, as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resume_source(
    resume: bool, resume_from: str | Path | None, checkpoint_path: Path | None
) -> Path | None:
    """The checkpoint a run continues from (``resume_from``, or with ``resume`` the run's own
    ``checkpoint_path`` when it exists), or None for a fresh start."""
    if resume_from is not None:
        path = Path(resume_from)
        if not path.is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint at {path}")
        return path
    if not resume:
        return None
    if checkpoint_path is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint lives)")
    if checkpoint_path.is_file():
        return checkpoint_path
    logger.warning("resume: no checkpoint at %s; starting from step 0", checkpoint_path)
    return None


def _keep_previous(path: Path) -> None:
    """Make ``path``'s current content the previous checkpoint, with ``path`` in place
    throughout: a hard link (or copy) under a temporary name, then an atomic rename."""
    previous = previous_checkpoint(path)
    staged = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        try:
            os.link(path, staged)
        except OSError:  # a file system without hard links
            shutil.copy2(path, staged)
        os.replace(staged, previous)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


# What torch.load raises on a truncated or corrupt file, or one that is not a checkpoint.
_DAMAGED = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU.

    Args:
        path: the checkpoint file (of :func:`save_checkpoint`, or any ``torch.save`` of a
            dict of tensors and plain types).

    Returns:
        The checkpoint dict, its tensors on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is damaged or not a checkpoint; the message names it and,
            when :func:`previous_checkpoint` is intact, that file and its step.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return _read(path)
    except _DAMAGED as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = (
            f"checkpoint {path} is damaged or not a checkpoint ({type(error).__name__}: {reason})"
        )
        previous = previous_checkpoint(path)
        usable = None
        if previous != path and previous.is_file():
            try:
                step = _read(previous).get("step")
            except _DAMAGED:
                message += f"; the previous checkpoint {previous} is damaged too"
            else:
                usable = previous
                message += (
                    f"; the previous checkpoint {previous} (step {step}) is intact: resume from "
                    f"it with --resume-from {previous} (Trainer(resume_from=...))"
                )
        raise CheckpointError(message, path, usable) from None


# --------------------------------------------------------------------------- expert parallelism

#: How to turn an expert-parallel checkpoint into one a single process reads.
_GATHER = "spiking-moe-gather --checkpoint {path} --out <folder>"


def expert_shard_name(index: str | Path, shard: int, size: int, step: int) -> str:
    """File name of shard ``shard`` of ``size`` at ``step``, beside the index ``index``
    (``checkpoint.pt`` -> ``checkpoint.expert0of2.step00000120.pt``).

    Example:
        >>> expert_shard_name("runs/x/checkpoint.pt", 1, 4, 120)
        'checkpoint.expert1of4.step00000120.pt'
    """
    index = Path(index)
    return f"{index.stem}.expert{shard}of{size}.step{step:08d}{index.suffix}"


def check_single_process(state: Mapping[str, Any], path: str | Path) -> None:
    """Check that ``state`` holds a whole model: not an expert-parallel index or one of its
    shards, which a single-process tool cannot read.

    Args:
        state: a checkpoint read from ``path`` (:func:`load_checkpoint`).
        path: where it was read from, named in the error (and, for a shard, the folder of its
            index).

    Raises:
        CheckpointLayoutError: ``state`` is an expert-parallel index or shard; the message
            says how to gather it (:func:`gather_expert_checkpoint`) or resume it.
    """
    path = Path(path)
    layout = state.get("expert_parallel")
    if layout is not None:
        raise CheckpointLayoutError(
            f"{path} is an expert-parallel checkpoint (train.expert_parallel = {layout['size']} "
            f"over {layout['world_size']} processes): its experts are split over "
            f"{len(layout['shards'])} shard files and no file holds the whole model. Gather it "
            f"into a single-process checkpoint first: {_GATHER.format(path=path)} (or resume "
            f"it under torchrun with {layout['world_size']} processes and "
            f"--set train.expert_parallel={layout['size']})",
            path,
        )
    shard = state.get("expert_shard")
    if shard is not None:
        index = path.parent / CHECKPOINT_NAME
        raise CheckpointLayoutError(
            f"{path} is shard {shard['index']} of {shard['size']} of an expert-parallel "
            f"checkpoint, not a whole model; read its index, or gather the shards into a "
            f"single-process checkpoint: {_GATHER.format(path=index)}",
            path,
        )


def _previous_hint(index_path: Path) -> tuple[str, Path | None]:
    """A sentence naming the previous checkpoint when it and its shards are on disk."""
    previous = previous_checkpoint(index_path)
    if not previous.is_file():
        return "", None
    try:
        state = _read(previous)
    except _DAMAGED:
        return f"; the previous checkpoint {previous} is damaged too", None
    shards = state.get("expert_parallel", {}).get("shards", [])
    missing = [name for name in shards if not (index_path.parent / name).is_file()]
    if missing:
        return f"; the previous checkpoint {previous} lacks its shards {missing} too", None
    return (
        f"; the previous checkpoint {previous} (step {state.get('step')}) and its shards are "
        f"on disk: resume from it with --resume-from {previous} (Trainer(resume_from=...))",
        previous,
    )


def load_expert_shard(
    index: Mapping[str, Any], index_path: str | Path, shard: int
) -> dict[str, Any]:
    """Shard ``shard`` of the expert-parallel checkpoint whose index ``index`` was read from
    ``index_path`` (the shard files lie beside it).

    Raises:
        CheckpointError: the shard is missing or damaged, or holds another step or shard
            than the index names (the message names the previous checkpoint when it is
            usable).
    """
    index_path = Path(index_path)
    layout = index["expert_parallel"]
    size, step = int(layout["size"]), int(index["step"])
    if not 0 <= shard < size:
        raise ValueError(f"shard must lie in [0, {size}), got {shard}")
    path = index_path.parent / layout["shards"][shard]
    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as error:
        hint, previous = _previous_hint(index_path)
        raise CheckpointError(
            f"checkpoint {index_path} (step {step}) needs its expert shard {path}: {error}{hint}",
            path,
            previous,
        ) from None
    meta = state.get("expert_shard") or {}
    expected = {"index": shard, "size": size, "world_size": int(layout["world_size"])}
    found = {key: meta.get(key) for key in expected}
    if state.get("step") != step or found != expected:
        hint, previous = _previous_hint(index_path)
        raise CheckpointError(
            f"{path} does not belong to checkpoint {index_path}: it holds step "
            f"{state.get('step')} and shard {found}, the index names step {step} and shard "
            f"{expected}{hint}",
            path,
            previous,
        )
    return state


def remove_stale_expert_shards(index_path: str | Path) -> list[Path]:
    """Delete the shard files beside ``index_path`` that neither it nor its previous
    checkpoint names (shards of older steps, or of a step whose index was never written).
    Returns them. Deletes nothing when the index cannot be read."""
    index_path = Path(index_path)
    keep: set[str] = set()
    for i, path in enumerate((index_path, previous_checkpoint(index_path))):
        try:
            state = _read(path)
        except (FileNotFoundError, *_DAMAGED):
            if i == 0:
                return []
            continue
        keep.update(state.get("expert_parallel", {}).get("shards", []))
    removed = []
    for path in sorted(
        index_path.parent.glob(f"{index_path.stem}.expert*of*.step*{index_path.suffix}")
    ):
        if path.name not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_expert_parallel_checkpoint(
    state: dict[str, Any], path: Path, model: nn.Module, ep: ExpertParallel
) -> None:
    """Write an expert-parallel checkpoint: this process's shard, then the index at ``path``.

    Collective: every process of the job calls it with its own ``state`` (the Trainer's
    ``state_dict()``: ``"model"`` and ``"optimizer"`` are this process's and go into its
    shard; the rest is the index). The first replica of each expert block writes its shard,
    then rank 0 writes the index that commits them and deletes stale shards; every process
    learns of a failure on any of them, and the last committed checkpoint stays as it was.
    """
    step = state["step"]
    names = [expert_shard_name(path, i, ep.size, step) for i in range(ep.size)]
    shard = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "expert_shard": {"index": ep.rank, "size": ep.size, "world_size": ep.world_size},
        "model": state.pop("model"),
        "optimizer": state.pop("optimizer"),
        "parameter_names": [name for name, _ in model.named_parameters()],
        "experts": _expert_layout(model),
    }
    writes_shard = ep.replica_rank == 0
    unchanged = "; the last committed checkpoint is unchanged"
    all_or_none(
        lambda: save_checkpoint(shard, path.parent / names[ep.rank]) if writes_shard else None,
        f"writing the expert shards of step {step}",
        unchanged,
    )
    state["expert_parallel"] = {"size": ep.size, "world_size": ep.world_size, "shards": names}

    def commit() -> None:
        if current_dist().is_main:
            save_checkpoint(state, path)
            removed = remove_stale_expert_shards(path)
            logger.info(
                "step %d: checkpoint written to %s (index of %d expert shards; %d stale "
                "shard files removed)",
                step,
                path,
                ep.size,
                len(removed),
            )

    all_or_none(commit, f"writing the index {path} of step {step}", unchanged)


def model_and_optimizer_state(
    state: Mapping[str, Any],
    source: Path,
    model: nn.Module,
    ep: ExpertParallel | None,
    world_size: int,
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """This process's model and optimizer state from a checkpoint of this job's layout.

    Collective under expert parallelism (every process reads its shard, and all stop with the
    same error if any cannot).

    Args:
        state: the checkpoint read from ``source`` (an index under expert parallelism).
        model: this process's model (its experts sharded by ``ep``), for its parameter names.
        ep: this job's expert-parallel layout, or None.
        world_size: processes in this job (named in the errors).

    Raises:
        CheckpointLayoutError: the checkpoint was written for another layout (or is a shard);
            the message says how to resume it or gather it.
        CheckpointError: its parameters are not this model's, or a shard is unreadable.
    """
    layout = state.get("expert_parallel")
    if "expert_shard" in state:
        raise CheckpointLayoutError(
            f"{source} is one shard of an expert-parallel checkpoint; resume from its index "
            f"({source.parent / CHECKPOINT_NAME})",
            source,
        )
    if layout is None and ep is not None:
        raise CheckpointLayoutError(
            f"{source} was written with train.expert_parallel = 1 (every expert in every "
            f"process) but this run has train.expert_parallel = {ep.size} over "
            f"{ep.world_size} processes: resume it with expert_parallel = 1",
            source,
        )
    if layout is not None and ep is None:
        raise CheckpointLayoutError(
            f"{source} is an expert-parallel checkpoint written with "
            f"train.expert_parallel = {layout['size']} over {layout['world_size']} "
            f"processes, but this run has expert_parallel = 1 over {world_size}: "
            f"resume it under torchrun --nproc_per_node={layout['world_size']} with "
            f"--set train.expert_parallel={layout['size']}, or, for one process, gather it "
            f"first: {_GATHER.format(path=source)}",
            source,
        )
    if layout is not None and (layout["size"], layout["world_size"]) != (ep.size, ep.world_size):
        raise CheckpointLayoutError(
            f"{source} was written with train.expert_parallel = {layout['size']} over "
            f"{layout['world_size']} processes, but this run has expert_parallel = "
            f"{ep.size} over {ep.world_size}: resume it with the same layout, or gather it "
            f"into a single-process checkpoint ({_GATHER.format(path=source)})",
            source,
        )
    names = [name for name, _ in model.named_parameters()]
    if layout is None:
        saved = state.get("parameter_names")  # written by the gather; checked when present
        if saved is not None and list(saved) != names:
            raise CheckpointError(
                f"{source}: its optimizer state is for parameters {_differences(saved, names)}"
                " in another order or set than this model's",
                source,
            )
        return state["model"], state["optimizer"]
    shard: dict[str, Any] = {}

    def read() -> None:
        shard.update(load_expert_shard(state, source, ep.rank))
        if list(shard["parameter_names"]) != names:
            raise CheckpointError(
                f"{source}: shard {ep.rank} holds parameters "
                f"{_differences(shard['parameter_names'], names)} other than this model's",
                source,
            )

    # Every rank learns if any shard is unreadable, and all stop with the same error.
    try:
        all_or_none(read, f"reading the expert shards of {source}")
    except RuntimeError as error:
        raise CheckpointError(str(error), source) from None
    return shard["model"], shard["optimizer"]


def _expert_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path of a layer's experts: {"ids": held expert ids, "num_experts": E}}``."""
    return {
        prefix: {"ids": list(module.global_ids), "num_experts": module.num_experts}
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertShard)
    }


def _differences(saved: Sequence[str], names: Sequence[str]) -> str:
    """A short account of how two parameter name lists differ."""
    saved_set, names_set = set(saved), set(names)
    missing = [n for n in names if n not in saved_set]
    extra = [n for n in saved if n not in names_set]
    if not missing and not extra:
        return "(the same names in another order)"
    return f"(missing here: {missing[:5]}, not in this model: {extra[:5]})"


def _layer_of(name: str, experts: Mapping[str, Sequence[int]]) -> str | None:
    """The MoE layer (its experts' module path) whose local expert ``name`` belongs to."""
    for prefix, ids in experts.items():
        head = f"{prefix}."
        if name.startswith(head):
            expert = name[len(head) :].split(".", 1)[0]
            if expert.isdigit() and int(expert) in ids:
                return prefix
    return None


def _splice(lists: Sequence[Sequence[str]], experts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The whole model's names, in its order, from each shard's names in its order.

    A shard's module tree is the whole model's with each layer's experts container holding
    only that shard's experts, at the same position; so the whole order is shard 0's with each
    layer's expert block replaced by the blocks of shards 0, 1, ... (experts ascending).
    """
    whole: list[str] = []
    spliced = set()
    for name in lists[0]:
        layer = _layer_of(name, experts[0])
        if layer is None:
            whole.append(name)
        elif layer not in spliced:
            spliced.add(layer)
            for names, held in zip(lists, experts, strict=True):
                whole += [n for n in names if _layer_of(n, held) == layer]
    return whole


def _gather_optimizer(
    shards: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path
) -> dict[str, Any]:
    """The optimizer state of the whole model (parameter order ``names``): dense parameters'
    from shard 0 (every shard holds the same), each expert's from its shard."""
    position = {name: i for i, name in enumerate(names)}
    state: dict[int, Any] = {}
    for s, shard in enumerate(shards):
        optimizer, local = shard["optimizer"], shard["parameter_names"]
        groups = optimizer["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(local):
            raise CheckpointError(
                f"{path}: shard {s}'s optimizer has {len(groups)} parameter groups over "
                f"{sum(len(g['params']) for g in groups)} parameters for {len(local)} named "
                "parameters; the gather maps one group over all parameters (the Trainer's)",
                path,
            )
        for i, name in zip(groups[0]["params"], local, strict=True):
            if s and _layer_of(name, shard["experts"]) is None:
                continue
            if i in optimizer["state"]:
                state[position[name]] = optimizer["state"][i]
    group = {**shards[0]["optimizer"]["param_groups"][0], "params": list(range(len(names)))}
    if "param_names" in group:
        group["param_names"] = list(names)
    return {"state": state, "param_groups": [group]}


def gather_expert_checkpoint(index_path: str | Path) -> dict[str, Any]:
    """The single-process checkpoint of an expert-parallel one: every tool that reads a
    checkpoint (evaluation, energy reports, export, single-process resume) reads it.

    The model state is the union of the shards (dense entries from shard 0, after checking
    every shard holds the same); the optimizer state is remapped to the whole model's
    parameter order (``"parameter_names"``), so a single process can resume; the train config
    (also inside ``extra["experiment"]``) gets ``expert_parallel = 1``; the RNG streams are
    rank 0's. ``"gathered_from"`` records the source. Resuming it in one process continues
    from the same weights, optimizer and schedule, but its batches are one process's
    (``train.batch_size`` is per process), so it is not the expert-parallel run's continuation.

    Args:
        index_path: the index file of an expert-parallel checkpoint (``checkpoint.pt``); its
            shard files lie beside it.

    Returns:
        The single-process checkpoint dict, for :func:`save_checkpoint` (nothing is written
        here): the index's entries with ``"model"``, ``"optimizer"``,
        ``"parameter_names"``, ``"rng"`` (rank 0's streams only), ``"train_config"``,
        ``"extra"`` and ``"gathered_from"`` (the source index's path, expert-parallel size
        and world size) replaced or added, and no ``"expert_parallel"`` entry.

    Raises:
        FileNotFoundError: no checkpoint at ``index_path``.
        CheckpointLayoutError: it is not an expert-parallel index.
        CheckpointError: a shard is missing, damaged or from another checkpoint, or the
            shards disagree on the dense parameters or do not cover every expert.
    """
    index_path = Path(index_path)
    index = load_checkpoint(index_path)
    layout = index.get("expert_parallel")
    if layout is None:
        if "expert_shard" in index:
            check_single_process(index, index_path)
        raise CheckpointLayoutError(
            f"{index_path} is not an expert-parallel checkpoint (no 'expert_parallel' entry): "
            "it already holds the whole model, nothing to gather",
            index_path,
        )
    shards = [load_expert_shard(index, index_path, i) for i in range(int(layout["size"]))]
    held = [shard["experts"] for shard in shards]
    for prefix, info in held[0].items():
        ids = sorted(e for experts in held for e in experts[prefix]["ids"])
        if ids != list(range(int(info["num_experts"]))):
            raise CheckpointError(
                f"{index_path}: the shards hold experts {ids} of layer {prefix!r}, which has "
                f"{info['num_experts']}",
                index_path,
            )
    layers = [{prefix: info["ids"] for prefix, info in h.items()} for h in held]
    models = [shard["model"] for shard in shards]
    for s in range(1, len(shards)):
        for key, value in models[0].items():
            if _layer_of(key, layers[0]) is not None:
                continue
            other = models[s].get(key)
            if other is None or not torch.equal(other, value):
                raise CheckpointError(
                    f"{index_path}: shards 0 and {s} disagree on the dense entry {key!r}; "
                    "they are not one checkpoint",
                    index_path,
                )
    keys = _splice([list(m) for m in models], layers)
    owner = {}
    for s, (model, layer) in enumerate(zip(models, layers, strict=True)):
        for key in model:
            if s == 0 or _layer_of(key, layer) is not None:
                owner.setdefault(key, s)
    model_state = {key: models[owner[key]][key] for key in keys}
    names = _splice([shard["parameter_names"] for shard in shards], layers)
    shard_views = [{**shard, "experts": layer} for shard, layer in zip(shards, layers, strict=True)]
    optimizer = _gather_optimizer(shard_views, names, index_path)
    extra = dict(index.get("extra", {}))
    experiment = extra.get("experiment")
    if isinstance(experiment, Mapping) and isinstance(experiment.get("train"), Mapping):
        extra["experiment"] = {
            **experiment,
            "train": {**experiment["train"], "expert_parallel": 1},
        }
    gathered = {key: value for key, value in index.items() if key != "expert_parallel"}
    gathered.update(
        model=model_state,
        optimizer=optimizer,
        parameter_names=names,
        rng=list(index["rng"][:1]),
        train_config={**index.get("train_config", {}), "expert_parallel": 1},
        extra=extra,
        gathered_from={
            "checkpoint": str(index_path),
            "expert_parallel": int(layout["size"]),
            "world_size": int(layout["world_size"]),
        },
    )
    return gathered


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: the seed of every stream (numpy gets ``seed mod 2**32``, the range it accepts).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, as tensors and plain types (``weights_only``-safe).

    Returns:
        ``{"torch": ..., "cuda": ..., "numpy": ..., "python": ...}``: torch's CPU generator
        state (a ``uint8`` tensor); the state of every CUDA device's generator (a list, empty
        without CUDA); numpy's global MT19937 state (a dict of ``"keys"``, an ``int64``
        tensor, and ``"pos"``, ``"has_gauss"``, ``"cached_gaussian"``); python ``random``'s
        state as ``[version, list of ints, gauss_next]``. :func:`set_rng_state` restores it.
    """
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [version, list(mt), gauss_next],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured.

    Args:
        state: a dict of :func:`rng_state`, e.g. read back from a checkpoint. Its CUDA states
            are restored only when it has some and CUDA is available here.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
