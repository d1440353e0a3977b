"""Kernel providers for :class:`~spiking_moe.functional.kernels.FusedLIF` without Triton.

``CPP``: the C++ kernel in ``lif_cpu.cpp``, JIT-compiled with
:func:`torch.utils.cpp_extension.load` on first use (about 30-60 s once, then cached in the
torch extensions directory, ``TORCH_EXTENSIONS_DIR``). If the build fails (no compiler, no
ninja) a warning is logged once and :data:`TORCH` is used instead. Set
``SPIKING_MOE_NO_CPP=1`` to skip the build altogether.

``TORCH``: the same recurrence as vectorised PyTorch ops: Python loops over T, but no
per-step autograd graph. Works on every device and dtype.

Both satisfy :class:`~.protocol.LIFKernel`, which gives the signatures and shapes. The C++
source holds no surrogate ids of its own: they are passed to the compiler as ``-D`` flags
generated from :data:`~.protocol.SURROGATE_IDS` (:func:`surrogate_defines`), and the flags are
part of the build folder's hash.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..surrogate import Surrogate
from .jit import build_extension, cpu_unavailable_reason, stable_source
from .protocol import SURROGATE_IDS

__all__ = [
    "CPP",
    "TORCH",
    "cpp_available",
    "empty_cache",
    "load_cpp_extension",
    "surrogate_defines",
    "surrogate_macro",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("lif_cpu.cpp")
_PREFIX = "spiking_moe_lif_cpu"
# -ffp-contract=off keeps h = beta * v + x rounded exactly like PyTorch (no FMA), so spikes
# equal the reference loop bit for bit; the kernel is memory-bound, so FMA would buy nothing.
_OPT_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
# "module": the loaded extension, or None after a failure or when disabled; "reason": why not.
_state: dict[str, object] = {}


def surrogate_macro(name: str) -> str:
    """The C preprocessor macro that carries surrogate ``name``'s id into ``lif_cpu.cpp``."""
    return f"SPIKING_MOE_SURROGATE_{name.upper()}"


def surrogate_defines() -> list[str]:
    """One ``-D<macro>=<id>`` compiler flag per entry of :data:`~.protocol.SURROGATE_IDS`."""
    return [f"-D{surrogate_macro(name)}={sid}" for name, sid in SURROGATE_IDS.items()]


def _cflags() -> list[str]:
    return [*_OPT_CFLAGS, *surrogate_defines()]


def load_cpp_extension():
    """Build (first call) and return the C++ extension, or None if it cannot be built."""
    with _lock:
        if "module" not in _state:
            module, reason = build_extension(
                "fused LIF", _SOURCE, _PREFIX, _cflags(), "the slower PyTorch provider"
            )
            if module is not None:
                _check_surrogate_ids(module)
            _state["module"], _state["reason"] = module, reason
        return _state["module"]


def _check_surrogate_ids(module) -> None:
    # The enum is built from the -D flags, so this only fails if someone edits lif_cpu.cpp to
    # bypass them; that would silently compute the wrong surrogate, so it must not fall back.
    compiled = dict(module.surrogate_ids())
    if compiled != dict(SURROGATE_IDS):
        raise RuntimeError(
            f"the fused LIF C++ kernel was built with surrogate ids {compiled}, but "
            f"SURROGATE_IDS is {dict(SURROGATE_IDS)}; lif_cpu.cpp must take its ids from the "
            "SPIKING_MOE_SURROGATE_* macros"
        )


def _stable_source() -> tuple[str, Path]:
    """The extension's name and source copy (:func:`.jit.stable_source`; the surrogate ids
    are in the flags, so a renumbered table builds anew)."""
    return stable_source(_SOURCE, _PREFIX, _cflags())


def empty_cache() -> int:
    """Free the C++ kernel's cached output buffers (it keeps up to 1 GiB of freed outputs for
    reuse, so that every step does not pay the OS for zeroing fresh pages). Returns bytes freed."""
    module = _state.get("module")
    return int(module.empty_cache()) if module is not None else 0


def cpp_available() -> bool:
    """Whether the C++ kernel is (or can be) built here."""
    return load_cpp_extension() is not None


class _CppProvider:
    """The C++ kernel: CPU, float32/float64, once it is built."""

    name = "cpp"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return cpu_unavailable_reason(x, load_cpp_extension, _state)

    def supports(self, x: torch.Tensor) -> bool:
        return self.unavailable_reason(x) is None

    def forward(
        self,
        x_TN: torch.Tensor,
        v0_N: torch.Tensor | None,
        beta_N: torch.Tensor,
        theta_N: torch.Tensor,
        zero_reset: bool,
        return_membrane: bool,
        keep_h: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        module = load_cpp_extension()
        return tuple(
            module.lif_forward(x_TN, beta_N, theta_N, v0_N, zero_reset, return_membrane, keep_h)
        )

    def backward(
        self,
        gs_TN: torch.Tensor,
        gmem_TN: torch.Tensor | None,
        gv_N: torch.Tensor | None,
        h_TN: torch.Tensor,
        beta_N: torch.Tensor,
        theta_N: torch.Tensor,
        v0_N: torch.Tensor | None,
        surrogate: Surrogate,
        zero_reset: bool,
        detach_reset: bool,
        param_grads: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        module = load_cpp_extension()
        out = module.lif_backward(
            gs_TN,
            gmem_TN,
            gv_N,
            h_TN,
            beta_N,
            theta_N,
            v0_N,
            SURROGATE_IDS[surrogate.name],
            float(surrogate.alpha),
            zero_reset,
            detach_reset,
            param_grads,
        )
        return (out[0], out[1], *(out[2:] if param_grads else (None, None)))


def _reset(h, s, theta, zero_reset: bool):
    return h * (1.0 - s) if zero_reset else h - theta * s


class _TorchProvider:
    """Vectorised PyTorch ops: any device and dtype, so it is always available."""

    name = "torch"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return None

    def supports(self, x: torch.Tensor) -> bool:
        return self.unavailable_reason(x) is None

    def forward(
        self,
        x_TN: torch.Tensor,
        v0_N: torch.Tensor | None,
        beta_N: torch.Tensor,
        theta_N: torch.Tensor,
        zero_reset: bool,
        return_membrane: bool,
        keep_h: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        h_TN = torch.empty_like(x_TN)
        spikes_TN = torch.empty_like(x_TN)
        membrane_TN = torch.empty_like(x_TN) if return_membrane else None
        v = torch.zeros_like(x_TN[0]) if v0_N is None else v0_N
        for t in range(x_TN.shape[0]):
            # Same operation order as the reference loop: spikes must match it exactly.
            h = torch.add(beta_N * v, x_TN[t], out=h_TN[t])
            spikes_TN[t] = (h - theta_N) > 0
            v = _reset(h, spikes_TN[t], theta_N, zero_reset)
            if return_membrane:
                membrane_TN[t] = v
        out = (spikes_TN, h_TN, v)
        return out + ((membrane_TN,) if return_membrane else ())

    def backward(
        self,
        gs_TN: torch.Tensor,
        gmem_TN: torch.Tensor | None,
        gv_N: torch.Tensor | None,
        h_TN: torch.Tensor,
        beta_N: torch.Tensor,
        theta_N: torch.Tensor,
        v0_N: torch.Tensor | None,
        surrogate: Surrogate,
        zero_reset: bool,
        detach_reset: bool,
        param_grads: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        keep = 0.0 if detach_reset else 1.0
        gx_TN = torch.empty_like(h_TN)
        a = torch.zeros_like(h_TN[0]) if gv_N is None else gv_N
        gbeta = torch.zeros_like(a) if param_grads else None
        gtheta = torch.zeros_like(a) if param_grads else None
        for t in range(h_TN.shape[0] - 1, -1, -1):
            h = h_TN[t]
            d = h - theta_N
            s = (d > 0).to(h.dtype)
            g = surrogate.derivative(d)
            if gmem_TN is not None:
                a = a + gmem_TN[t]
            gs = gs_TN[t]
            if zero_reset:
                dv_dh = (1.0 - s) - keep * h * g
            else:
                dv_dh = 1.0 - keep * theta_N * g
            gh = torch.add(gs * g, a * dv_dh, out=gx_TN[t])
            if param_grads:
                if t > 0:
                    hp = h_TN[t - 1]
                    v_prev = _reset(hp, ((hp - theta_N) > 0).to(h.dtype), theta_N, zero_reset)
                else:
                    v_prev = torch.zeros_like(h) if v0_N is None else v0_N
                gbeta += gh * v_prev
                gtheta += a * (1.0 - s) - gh
            a = gh * beta_N
        return gx_TN, a, gbeta, gtheta


CPP = _CppProvider()
TORCH = _TorchProvider()
