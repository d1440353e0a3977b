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
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["CPU_DTYPES", "CppExtension", "extensions_root", "stable_source"]

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


class CppExtension:
    """One C++ kernel of this package: built on first use, once per process, then kept.

    Args:
        what: the kernel, for the log lines ("fused LIF").
        source, prefix, cflags: as :func:`stable_source`.
        fallback: what runs instead when the build fails, for the warning ("the dense product").
        check: called with the freshly loaded module; raises if it is unusable (a failed build
            falls back quietly, a check that fails does not).

    Attributes:
        outcome: ``(module, None)`` after a successful load, ``(None, reason)`` after a failed
            or disabled one, None before the first :meth:`load`.
    """

    def __init__(
        self,
        what: str,
        source: Path,
        prefix: str,
        cflags: Sequence[str],
        fallback: str,
        check: Callable[[object], None] | None = None,
    ):
        self.what, self.source, self.prefix = what, source, prefix
        self.cflags, self.fallback, self.check = list(cflags), fallback, check
        self.outcome: tuple[object | None, str | None] | None = None
        self._lock = threading.Lock()

    def load(self):
        """Build (first call) and return the extension module, or None if it cannot be built."""
        with self._lock:
            if self.outcome is None:
                module, reason = self._build()
                if module is not None and self.check is not None:
                    self.check(module)
                self.outcome = (module, reason)
            return self.outcome[0]

    @property
    def loaded(self):
        """The module if it is loaded already, else None (never builds)."""
        return None if self.outcome is None else self.outcome[0]

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        """Why the kernel cannot run on ``x`` (None if it can); builds it on first use."""
        if x.device.type != "cpu":
            return f"needs a CPU tensor, got one on {x.device}"
        if x.dtype not in CPU_DTYPES:
            return f"dtype {x.dtype} not supported (float32, float64)"
        if self.load() is None:  # checked last: the first call builds the kernel
            return f"the C++ kernel is unavailable: {self.outcome[1]}"
        return None

    def _build(self) -> tuple[object | None, str | None]:
        if os.environ.get("SPIKING_MOE_NO_CPP", "") not in ("", "0"):
            logger.debug(
                "SPIKING_MOE_NO_CPP is set: no %s C++ kernel, %s", self.what, self.fallback
            )
            return None, "disabled by SPIKING_MOE_NO_CPP"
        try:
            from torch.utils.cpp_extension import load

            name, copy = stable_source(self.source, self.prefix, self.cflags)
            logger.info("loading the %s C++ kernel (the first build takes ~30-60 s)", self.what)
            module = load(
                name=name,
                sources=[str(copy)],
                build_directory=str(copy.parent),
                extra_cflags=self.cflags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # any build failure must leave a working fallback
            last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            logger.warning(
                "could not build the %s C++ kernel (%s: %s); using %s. Install a C++ compiler "
                "and ninja to enable it.",
                self.what,
                type(error).__name__,
                last_line,
                self.fallback,
            )
            return None, f"the build failed ({type(error).__name__}: {last_line})"
        return module, None
