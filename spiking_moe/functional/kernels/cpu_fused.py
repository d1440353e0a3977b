"""Kernel providers for :class:`~spiking_moe.functional.kernels.FusedLIF` without Triton.

``CPP``: the C++ kernel in ``lif_cpu.cpp``, JIT-compiled with
:func:`torch.utils.cpp_extension.load` on first use (about 30-60 s once, then cached in the
torch extensions directory, ``TORCH_EXTENSIONS_DIR``). If the build fails (no compiler, no
ninja) a warning is logged once and :data:`TORCH` is used instead. Set
``SPIKING_MOE_NO_CPP=1`` to skip the build altogether.

``TORCH``: the same recurrence as vectorised PyTorch ops: Python loops over T, but no
per-step autograd graph. Works on every device.

Both operate on time-major ``[T, N]`` contiguous tensors, ``N`` = neurons of one step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from ..surrogate import Surrogate

__all__ = ["CPP", "TORCH", "cpp_available", "empty_cache", "load_cpp_extension"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("lif_cpu.cpp")
# -ffp-contract=off keeps h = beta * v + x rounded exactly like PyTorch (no FMA), so spikes
# equal the reference loop bit for bit; the kernel is memory-bound, so FMA would buy nothing.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_SURROGATE_IDS = {"fast_sigmoid": 0, "atan": 1, "sigmoid": 2, "triangle": 3, "boxcar": 4}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the loaded extension or None after a failure


def load_cpp_extension():
    """Build (first call) and return the C++ extension, or None if it cannot be built."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("SPIKING_MOE_NO_CPP", "") not in ("", "0"):
            logger.debug("SPIKING_MOE_NO_CPP is set: fused LIF uses the PyTorch provider")
        else:
            try:
                from torch.utils.cpp_extension import load

                name, source = _stable_source()
                logger.info("loading the fused LIF C++ kernel (the first build takes ~30 s)")
                module = load(
                    name=name,
                    sources=[str(source)],
                    build_directory=str(source.parent),
                    extra_cflags=_CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as error:  # any build failure must leave a working fallback
                logger.warning(
                    "could not build the fused LIF C++ kernel (%s: %s); using the slower "
                    "PyTorch fallback. Install a C++ compiler and ninja to enable it.",
                    type(error).__name__,
                    str(error).strip().splitlines()[-1] if str(error).strip() else "",
                )
        _state["module"] = module
        return module


def _stable_source() -> tuple[str, Path]:
    """The extension's name and a copy of its source in its own build folder.

    Named by a hash of the source, flags, torch and Python versions, and compiled from a copy at a fixed path, so every
    checkout or install of the same source shares one build (torch rebuilds whenever the
    source path in its build file changes) and an edited source never loads a stale build.
    """
    text = _SOURCE.read_bytes()
    # The binary depends on torch's ABI and Python's too, not only on the source.
    build_inputs = " ".join([*_CFLAGS, torch.__version__, sys.version]).encode()
    digest = hashlib.sha256(text + build_inputs).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    folder = Path(root) / f"spiking_moe_lif_cpu_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / _SOURCE.name
    if not source.exists() or source.read_bytes() != text:
        partial = source.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(text)
        os.replace(partial, source)  # atomic: concurrent first builds see a whole file
    return folder.name, source


def empty_cache() -> int:
    """Free the C++ kernel's cached output buffers (it keeps up to 1 GiB of freed outputs for
    reuse, so that every step does not pay the OS for zeroing fresh pages). Returns bytes freed."""
    module = _state.get("module")
    return int(module.empty_cache()) if module is not None else 0


def cpp_available() -> bool:
    """Whether the C++ kernel is (or can be) built here."""
    return load_cpp_extension() is not None


class _CppProvider:
    name = "cpp"

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)

    @staticmethod
    def forward(x_TN, v0_N, beta_N, theta_N, zero_reset: bool, return_membrane: bool):
        module = load_cpp_extension()
        return module.lif_forward(x_TN, beta_N, theta_N, v0_N, zero_reset, return_membrane)

    @staticmethod
    def backward(
        gs_TN,
        gmem_TN,
        gv_N,
        h_TN,
        beta_N,
        theta_N,
        v0_N,
        surrogate: Surrogate,
        zero_reset: bool,
        detach_reset: bool,
        param_grads: bool,
    ):
        module = load_cpp_extension()
        out = module.lif_backward(
            gs_TN,
            gmem_TN,
            gv_N,
            h_TN,
            beta_N,
            theta_N,
            v0_N,
            _SURROGATE_IDS[surrogate.name],
            float(surrogate.alpha),
            zero_reset,
            detach_reset,
            param_grads,
        )
        return (out[0], out[1], *(out[2:] if param_grads else (None, None)))


def _reset(h, s, theta, zero_reset: bool):
    return h * (1.0 - s) if zero_reset else h - theta * s


class _TorchProvider:
    name = "torch"

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        return True

    @staticmethod
    def forward(x_TN, v0_N, beta_N, theta_N, zero_reset: bool, return_membrane: bool):
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

    @staticmethod
    def backward(
        gs_TN,
        gmem_TN,
        gv_N,
        h_TN,
        beta_N,
        theta_N,
        v0_N,
        surrogate: Surrogate,
        zero_reset: bool,
        detach_reset: bool,
        param_grads: bool,
    ):
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
