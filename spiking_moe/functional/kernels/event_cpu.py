"""The C++ kernel of :func:`~spiking_moe.functional.event.event_linear` (``event_cpu.cpp``).

Built and loaded like the fused LIF kernel (:mod:`.cpu_fused`): JIT-compiled with
:func:`torch.utils.cpp_extension.load` on first use (about 30-60 s once, then cached in the
torch extensions directory, ``TORCH_EXTENSIONS_DIR``, in a folder named by a hash of the source,
the flags and the torch and Python versions). If the build fails (no compiler, no ninja) a
warning is logged once and ``event_linear`` falls back to the dense product. Set
``SPIKING_MOE_NO_CPP=1`` to skip the build altogether.

The extension is compiled without ``-march`` (the cache folder may be shared between machines);
its accumulation loop is compiled for generic x86-64 (SSE2), AVX2 and AVX-512 and picked at run
time (:func:`available_isas`). All of them sum in the same order, so they agree bit for bit.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from .jit import build_extension, cpu_unavailable_reason

__all__ = ["CPP", "available_isas", "cpp_available", "load_cpp_extension"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("event_cpu.cpp")
_PREFIX = "spiking_moe_event_cpu"
# -ffp-contract=off: x * w + acc stays a rounded multiply then add in every instruction set,
# so the generic, AVX2 and AVX-512 loops (and the PyTorch reference) agree exactly.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
# "module": the loaded extension, or None after a failure or when disabled; "reason": why not.
_state: dict[str, object] = {}


def load_cpp_extension():
    """Build (first call) and return the C++ extension, or None if it cannot be built."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["reason"] = build_extension(
                "event-driven linear", _SOURCE, _PREFIX, _CFLAGS, "the dense product"
            )
        return _state["module"]


def cpp_available() -> bool:
    """Whether the C++ kernel is (or can be) built here."""
    return load_cpp_extension() is not None


def available_isas() -> list[str]:
    """Instruction sets of the accumulation loop this CPU runs (best last); [] without the build."""
    module = load_cpp_extension()
    return list(module.available_isas()) if module is not None else []


class _CppProvider:
    """The C++ kernel: CPU, float32/float64, once it is built."""

    name = "cpp"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return cpu_unavailable_reason(x, load_cpp_extension, _state)

    def forward(
        self,
        x_RI: torch.Tensor,
        weight_t_IO: torch.Tensor,
        bias_O: torch.Tensor | None,
        max_density: float = 1.0,
        isa: str = "auto",
    ) -> torch.Tensor | None:
        """``x_RI @ weight_t_IO + bias_O``, or None (nothing computed) if more than
        ``max_density`` of ``x_RI`` is nonzero. All arguments contiguous, one dtype, on the CPU."""
        module = load_cpp_extension()
        return module.event_linear_forward(x_RI, weight_t_IO, bias_O, float(max_density), isa)


CPP = _CppProvider()
