"""Build a C++ kernel of this package on first use, once per source, flags, torch and Python.

Both C++ kernels (the fused LIF, :mod:`.cpu_fused`; the event-driven product,
:mod:`.event_cpu`) are JIT-compiled with :func:`torch.utils.cpp_extension.load` and cached in
the torch extensions directory (``TORCH_EXTENSIONS_DIR``). A failed build (no compiler, no
ninja) logs one warning and leaves the caller's PyTorch path in charge; ``SPIKING_MOE_NO_CPP=1``
skips the builds altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "CPU_DTYPES",
    "build_extension",
    "cpu_unavailable_reason",
    "extensions_root",
    "stable_source",
]

#: What the C++ kernels compute in.
CPU_DTYPES = (torch.float32, torch.float64)

logger = logging.getLogger(__name__)


def extensions_root() -> Path:
    """The folder C++ extensions are built in: ``TORCH_EXTENSIONS_DIR``, else torch's default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    return Path(root)


def stable_source(source: Path, prefix: str, cflags: Sequence[str]) -> tuple[str, Path]:
    """The extension's name and a copy of ``source`` in its own build folder.

    Named by a hash of the source, the flags, torch and Python versions, and compiled from a
    copy at a fixed path, so every checkout or install of the same source shares one build
    (torch rebuilds whenever the source path in its build file changes) and an edited source
    or flag never loads a stale build.
    """
    text = source.read_bytes()
    # The binary depends on torch's ABI and Python's too, not only on the source.
    build_inputs = " ".join([*cflags, torch.__version__, sys.version]).encode()
    digest = hashlib.sha256(text + build_inputs).hexdigest()[:16]
    folder = extensions_root() / f"{prefix}_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / source.name
    if not copy.exists() or copy.read_bytes() != text:
        partial = copy.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(text)
        os.replace(partial, copy)  # atomic: concurrent first builds see a whole file
    return folder.name, copy


def build_extension(
    what: str, source: Path, prefix: str, cflags: Sequence[str], fallback: str
) -> tuple[object | None, str | None]:
    """``(module, None)``, or ``(None, reason)`` when disabled or the build failed.

    Args:
        what: the kernel, for the log lines ("fused LIF").
        source, prefix, cflags: as :func:`stable_source`.
        fallback: what runs instead, for the warning ("the PyTorch fallback").
    """
    if os.environ.get("SPIKING_MOE_NO_CPP", "") not in ("", "0"):
        logger.debug("SPIKING_MOE_NO_CPP is set: no %s C++ kernel, %s", what, fallback)
        return None, "disabled by SPIKING_MOE_NO_CPP"
    try:
        from torch.utils.cpp_extension import load

        name, copy = stable_source(source, prefix, cflags)
        logger.info("loading the %s C++ kernel (the first build takes ~30-60 s)", what)
        module = load(
            name=name,
            sources=[str(copy)],
            build_directory=str(copy.parent),
            extra_cflags=list(cflags),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # any build failure must leave a working fallback
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        logger.warning(
            "could not build the %s C++ kernel (%s: %s); using %s. Install a C++ compiler and "
            "ninja to enable it.",
            what,
            type(error).__name__,
            last_line,
            fallback,
        )
        return None, f"the build failed ({type(error).__name__}: {last_line})"
    return module, None


def cpu_unavailable_reason(x: torch.Tensor, load, state: dict) -> str | None:
    """Why a C++ kernel cannot run on ``x`` (None if it can); ``load`` builds it on first use
    and ``state["reason"]`` says why a build is missing."""
    if x.device.type != "cpu":
        return f"needs a CPU tensor, got one on {x.device}"
    if x.dtype not in CPU_DTYPES:
        return f"dtype {x.dtype} not supported (float32, float64)"
    if load() is None:  # checked last: the first call builds the kernel
        return f"the C++ kernel is unavailable: {state.get('reason') or 'not built'}"
    return None
