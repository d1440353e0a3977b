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

from pathlib import Path

import torch

from .jit import CppExtension
from .protocol import EventLinearArgs

__all__ = ["CPP", "EXTENSION", "available_isas"]

# -ffp-contract=off: x * w + acc stays a rounded multiply then add in every instruction set,
# so the generic, AVX2 and AVX-512 loops (and the PyTorch reference) agree exactly.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

#: The C++ kernel's build (:class:`.jit.CppExtension`): ``EXTENSION.load()`` builds it.
EXTENSION = CppExtension(
    "event-driven linear",
    Path(__file__).with_name("event_cpu.cpp"),
    "spiking_moe_event_cpu",
    _CFLAGS,
    "the dense product",
)


def available_isas() -> list[str]:
    """Instruction sets of the accumulation loop this CPU runs (best last); [] without the build."""
    module = EXTENSION.load()
    return list(module.available_isas()) if module is not None else []


class _CppProvider:
    """The C++ kernel: CPU, float32/float64, once it is built."""

    name = "cpp"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return EXTENSION.unavailable_reason(x)

    def forward(self, args: EventLinearArgs, isa: str = "auto") -> torch.Tensor | None:
        """:meth:`~.protocol.EventKernel.forward` with the accumulation loop of ``isa`` ("auto":
        the best of :func:`available_isas`)."""
        return EXTENSION.load().event_linear_forward(
            args.x_RI, args.weight_t_IO, args.bias_O, float(args.max_density), isa
        )


#: The C++ kernel as a :class:`~.protocol.EventKernel` (CPU, float32/float64, once :data:`EXTENSION`
#: builds): ``implementation="cpp"``, and ``"auto"`` on CPU.
CPP = _CppProvider()
