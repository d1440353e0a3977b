"""Kernel providers for :class:`~spiking_moe.functional.kernels.FusedLIF` without Triton.

``CPP``: the C++ kernel in ``lif_cpu.cpp``, JIT-compiled with
:func:`torch.utils.cpp_extension.load` on first use (about 30-60 s once, then cached in the
torch extensions directory, ``TORCH_EXTENSIONS_DIR``). If the build fails (no compiler, no
ninja) a warning is logged once and :data:`TORCH` is used instead. Set
``SPIKING_MOE_NO_CPP=1`` to skip the build altogether.

``TORCH``: the same recurrence as vectorised PyTorch ops: Python loops over T, but no
per-step autograd graph. Works on every device and dtype.

Both satisfy :class:`~.protocol.LIFKernel`, which gives the arguments and shapes. The C++
source holds no surrogate ids of its own: they are passed to the compiler as ``-D`` flags
generated from :data:`~.protocol.SURROGATE_IDS` (:func:`surrogate_defines`), and the flags are
part of the build folder's hash.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .jit import CppExtension
from .protocol import SURROGATE_IDS, LIFBackwardArgs, LIFForwardArgs

__all__ = ["CPP", "EXTENSION", "TORCH", "empty_cache", "surrogate_defines", "surrogate_macro"]

# -ffp-contract=off keeps h = beta * v + x rounded exactly like PyTorch (no FMA), so spikes
# equal the reference loop bit for bit; the kernel is memory-bound, so FMA would buy nothing.
_OPT_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def surrogate_macro(name: str) -> str:
    """The C preprocessor macro that carries surrogate ``name``'s id into ``lif_cpu.cpp``."""
    return f"SPIKING_MOE_SURROGATE_{name.upper()}"


def surrogate_defines() -> list[str]:
    """One ``-D<macro>=<id>`` compiler flag per entry of :data:`~.protocol.SURROGATE_IDS`."""
    return [f"-D{surrogate_macro(name)}={sid}" for name, sid in SURROGATE_IDS.items()]


def _cflags() -> list[str]:
    """The build's flags; the surrogate ids are among them, so a renumbered table builds anew
    (:func:`.jit.stable_source` hashes the flags into the build folder's name)."""
    return [*_OPT_CFLAGS, *surrogate_defines()]


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


#: The C++ kernel's build (:class:`.jit.CppExtension`): ``EXTENSION.load()`` builds it.
EXTENSION = CppExtension(
    "fused LIF",
    Path(__file__).with_name("lif_cpu.cpp"),
    "spiking_moe_lif_cpu",
    _cflags(),
    "the slower PyTorch provider",
    check=_check_surrogate_ids,
)


def empty_cache() -> int:
    """Free the C++ kernel's cached output buffers (it keeps up to 1 GiB of freed outputs for
    reuse, so that every step does not pay the OS for zeroing fresh pages). Returns bytes freed."""
    module = EXTENSION.loaded
    return int(module.empty_cache()) if module is not None else 0


class _CppProvider:
    """The C++ kernel: CPU, float32/float64, once it is built."""

    name = "cpp"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return EXTENSION.unavailable_reason(x)

    def forward(self, args: LIFForwardArgs) -> tuple[torch.Tensor, ...]:
        return tuple(
            EXTENSION.load().lif_forward(
                args.x_TU,
                args.beta_U,
                args.theta_U,
                args.v0_U,
                args.zero_reset,
                args.return_membrane,
                args.keep_h,
            )
        )

    def backward(
        self, args: LIFBackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        out = EXTENSION.load().lif_backward(
            args.gs_TU,
            args.gmem_TU,
            args.gv_U,
            args.h_TU,
            args.beta_U,
            args.theta_U,
            args.v0_U,
            SURROGATE_IDS[args.surrogate.name],
            float(args.surrogate.alpha),
            args.zero_reset,
            args.detach_reset,
            args.param_grads,
        )
        return (out[0], out[1], *(out[2:] if args.param_grads else (None, None)))


def _reset(h, s, theta, zero_reset: bool):
    return h * (1.0 - s) if zero_reset else h - theta * s


class _TorchProvider:
    """Vectorised PyTorch ops: any device and dtype, so it is always available."""

    name = "torch"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return None

    def forward(self, args: LIFForwardArgs) -> tuple[torch.Tensor, ...]:
        x_TU, beta_U, theta_U = args.x_TU, args.beta_U, args.theta_U
        h_TU = torch.empty_like(x_TU)
        spikes_TU = torch.empty_like(x_TU)
        membrane_TU = torch.empty_like(x_TU) if args.return_membrane else None
        v = torch.zeros_like(x_TU[0]) if args.v0_U is None else args.v0_U
        for t in range(x_TU.shape[0]):
            # Same operation order as the reference loop: spikes must match it exactly.
            h = torch.add(beta_U * v, x_TU[t], out=h_TU[t])
            spikes_TU[t] = (h - theta_U) > 0
            v = _reset(h, spikes_TU[t], theta_U, args.zero_reset)
            if membrane_TU is not None:
                membrane_TU[t] = v
        out = (spikes_TU, h_TU, v)
        return out + ((membrane_TU,) if membrane_TU is not None else ())

    def backward(
        self, args: LIFBackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        h_TU, beta_U, theta_U, zero_reset = args.h_TU, args.beta_U, args.theta_U, args.zero_reset
        keep = 0.0 if args.detach_reset else 1.0
        gx_TU = torch.empty_like(h_TU)
        a = torch.zeros_like(h_TU[0]) if args.gv_U is None else args.gv_U
        gbeta = torch.zeros_like(a) if args.param_grads else None
        gtheta = torch.zeros_like(a) if args.param_grads else None
        for t in range(h_TU.shape[0] - 1, -1, -1):
            h = h_TU[t]
            d = h - theta_U
            s = (d > 0).to(h.dtype)
            g = args.surrogate.derivative(d)
            if args.gmem_TU is not None:
                a = a + args.gmem_TU[t]
            if zero_reset:
                dv_dh = (1.0 - s) - keep * h * g
            else:
                dv_dh = 1.0 - keep * theta_U * g
            gh = torch.add(args.gs_TU[t] * g, a * dv_dh, out=gx_TU[t])
            if args.param_grads:
                if t > 0:
                    hp = h_TU[t - 1]
                    v_prev = _reset(hp, ((hp - theta_U) > 0).to(h.dtype), theta_U, zero_reset)
                else:
                    v_prev = torch.zeros_like(h) if args.v0_U is None else args.v0_U
                gbeta += gh * v_prev
                gtheta += a * (1.0 - s) - gh
            a = gh * beta_U
        return gx_TU, a, gbeta, gtheta


#: The C++ kernel (``lif_cpu.cpp``) as a :class:`~.protocol.LIFKernel`: CPU, float32/float64, once
#: :data:`EXTENSION` builds; what the fused LIF path runs unless Triton is taken or it cannot run.
CPP = _CppProvider()
#: The same recurrence in vectorised PyTorch ops, any device and dtype: the fused LIF path where
#: neither Triton nor :data:`CPP` can run.
TORCH = _TorchProvider()
