"""The one-pass value counter of :mod:`energy.counting` (``value_counts.cpp``), built on first use.

JIT-compiled with :func:`torch.utils.cpp_extension.load_inline` (about 20-40 s once, then cached
in the torch extensions directory, ``TORCH_EXTENSIONS_DIR``, under a name that hashes the source,
the flags and the torch and Python versions, so an edited source never loads a stale build).
Without a compiler, or with ``SPIKING_MOE_NO_CPP=1`` (the package's switch for all its C++
code), the counter is the PyTorch expression, which gives the same counts in four passes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("value_counts.cpp")
_CFLAGS = ["-O3", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _load():
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    if os.environ.get("SPIKING_MOE_NO_CPP", "") not in ("", "0"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        text = _SOURCE.read_text()
        build_inputs = " ".join([text, *_CFLAGS, torch.__version__, sys.version]).encode()
        name = "energy_value_counts_" + hashlib.sha256(build_inputs).hexdigest()[:16]
        logger.info("building energy's value counter (once, ~30 s)")
        return load_inline(
            name=name,
            cpp_sources=[text],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler must leave the PyTorch counter working
        logger.warning(
            "could not build energy's C++ value counter (%s: %s); counting uses PyTorch "
            "(same counts, slower)",
            type(error).__name__,
            str(error).strip().splitlines()[-1] if str(error).strip() else "",
        )
        return None


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def value_counts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nnz(x), #(x == 1))`` as 0-dim int64 tensors on ``x``'s device, without a host sync.

    NaN counts as nonzero and not as one (``x.bool()`` and ``x == 1``). Any dtype.
    """
    if x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and x.numel():
        module = _load()
        if module is not None:
            counts = module.value_counts(x.contiguous())
            return counts[0], counts[1]
    # x.bool() is x != 0 (NaN included), and much faster than count_nonzero on floats.
    return torch.count_nonzero(x.bool()), torch.count_nonzero(x == 1)
