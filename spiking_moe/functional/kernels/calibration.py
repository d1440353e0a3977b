"""Measured break-even densities of the event-driven product, kept per machine across processes.

:func:`~spiking_moe.functional.event.auto_dense_above` times the dense product against the C++
event-driven kernel once per layer shape. A timing depends on how busy the machine was, so a
fresh measurement in every process could send the same layer down the dense path in one run and
the event-driven path (which rounds differently) in the next. The first measurement is therefore
stored here, and every later process on the same machine reads it back instead of timing again.

The store is one small JSON file, ``spiking_moe_event_break_even.json``, in the torch extensions
folder where the C++ kernels are built (``TORCH_EXTENSIONS_DIR``, else torch's default; see
:func:`.jit.extensions_root`)::

    {"break_even": {"<cpu model>|isa=<isa>|torch=<version>|threads=<n>|shape=<in>x<out>": 0.153}}

Each entry is keyed by everything the timing depends on: the CPU model, the instruction set of
the kernel's accumulation loop, the torch version, the thread count and the layer shape. The file
is replaced atomically (a temporary file, then :func:`os.replace`), so a reader sees a whole old
or a whole new file; writers take an advisory lock (``fcntl``, where it exists) around the
read-modify-write, so concurrent processes do not drop each other's entries, and the first
measurement of a key stays (a later writer adopts it). A damaged or unreadable file logs a
warning and is measured anew (and overwritten), never an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import threading
from pathlib import Path

import torch

from .jit import extensions_root

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; os.replace still keeps the file whole
    fcntl = None

__all__ = ["FILE_NAME", "entry_key", "read_break_even", "store_break_even"]

logger = logging.getLogger(__name__)

#: Name of the break-even store, a JSON file in the torch extensions folder
#: (:func:`~spiking_moe.functional.kernels.jit.extensions_root`).
FILE_NAME = "spiking_moe_event_break_even.json"
_ENTRIES = "break_even"
_ABOUT = (
    "spiking_moe event_linear: the measured fraction of nonzero inputs above which the dense "
    "product is faster than the event-driven kernel, per machine, torch version, thread count "
    "and layer shape. Delete this file to measure again."
)
# Threads of one process share the lock file's path but not its descriptor, and flock locks
# are per open file description, so the process-local lock is taken too (cheap, never contended
# across processes).
_thread_lock = threading.Lock()


class _Damaged(Exception):
    """The store exists but cannot be used (unreadable, not JSON, or the wrong layout)."""


def cache_path() -> Path:
    """Where the store lives now (``TORCH_EXTENSIONS_DIR`` is read on every call)."""
    return extensions_root() / FILE_NAME


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def entry_key(isa: str, threads: int, in_features: int, out_features: int) -> str:
    """The store's key for one layer shape timed with ``isa`` on ``threads`` threads here."""
    return (
        f"{_cpu_model()}|isa={isa}|torch={torch.__version__}|threads={threads}"
        f"|shape={in_features}x{out_features}"
    )


def _valid(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _load(path: Path) -> dict[str, float]:
    """The entries in ``path`` ({} if there is no file); raises :class:`_Damaged`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise _Damaged(f"cannot read it ({type(error).__name__}: {error})") from error
    try:
        data = json.loads(text)
    except ValueError as error:
        raise _Damaged(f"not valid JSON ({error})") from error
    entries = data.get(_ENTRIES) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise _Damaged(f'no "{_ENTRIES}" table')
    bad = [key for key, value in entries.items() if not _valid(value)]
    if bad:
        raise _Damaged(f"entries that are not numbers > 0: {bad[:3]}")
    return entries


def read_break_even(key: str) -> float | None:
    """The stored break-even density for ``key``, or None (not measured yet, or a damaged store:
    then a warning says so, and the caller measures and stores anew)."""
    path = cache_path()
    try:
        return _load(path).get(key)
    except _Damaged as damage:
        logger.warning(
            "the event-driven calibration file %s is damaged: %s; measuring again", path, damage
        )
        return None


@contextlib.contextmanager
def _locked(path: Path):
    with _thread_lock, open(path.with_name(path.name + ".lock"), "a") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def store_break_even(key: str, break_even: float) -> float | None:
    """Store ``break_even`` for ``key`` unless the store already has a value for it.

    Returns:
        The value the store now holds for ``key``: ``break_even``, or the value another process
        stored first (use that one, so that every process agrees); None if the store could not
        be written (a warning says why; the caller keeps its own measurement for this process).
    """
    if not _valid(break_even):
        raise ValueError(f"break_even must be a finite number > 0, got {break_even!r}")
    path = cache_path()
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            try:
                entries = _load(path)
            except _Damaged:
                entries = {}  # read_break_even warned; the measurement replaces it
            if key in entries:
                return entries[key]
            entries[key] = break_even
            partial.write_text(
                json.dumps({"about": _ABOUT, _ENTRIES: entries}, indent=1, sort_keys=True),
                encoding="utf-8",
            )
            os.replace(partial, path)
    except OSError as error:
        logger.warning(
            "could not save the event-driven calibration to %s (%s: %s); later processes will "
            "measure again",
            path,
            type(error).__name__,
            error,
        )
        with contextlib.suppress(OSError):
            partial.unlink()
        return None
    return break_even
