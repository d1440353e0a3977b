"""Checkpoints that survive faults: atomic writes, the previous one kept, ``weights_only`` loads.

A checkpoint is a dict of tensors and plain types, so ``torch.load(weights_only=True)`` reads
it. :func:`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, keeps the
file it replaces as ``<name>.prev.pt`` and moves the new one into place with ``os.replace``:
a crash at any point leaves a complete checkpoint at ``path``, and a checkpoint damaged later
(a full disk, a copy cut short) still has an intact predecessor. :func:`load_checkpoint`
turns a damaged file into a :class:`CheckpointError` that names it and the previous one.

RNG streams: :func:`rng_state` / :func:`set_rng_state` capture torch (CPU and CUDA), numpy's
global generator and python ``random`` as tensors and plain types.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "load_checkpoint",
    "previous_checkpoint",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


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


def previous_checkpoint(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint that ``path`` replaced
    (``checkpoint.pt`` -> ``checkpoint.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically; the file it replaces becomes :func:`previous_checkpoint`.

    A failure at any point (including a kill between writing and replacing) leaves the file
    previously at ``path`` untouched.
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


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, as tensors and plain types (``weights_only``-safe)."""
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
    """Restore what :func:`rng_state` captured."""
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
