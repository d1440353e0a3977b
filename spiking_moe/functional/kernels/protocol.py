"""What every kernel provider agrees on: one call signature per kernel and one surrogate-id table.

A fused LIF provider (:data:`~.cpu_fused.CPP`, :data:`~.cpu_fused.TORCH`,
:data:`~.triton_lif.TRITON`) satisfies :class:`LIFKernel`; its arguments travel in one
:class:`LIFForwardArgs` or :class:`LIFBackwardArgs`, so the argument list is written once, here.
:class:`~spiking_moe.functional.kernels.FusedLIF` flattens the caller's tensors, calls
``forward``/``backward``, and reduces the results back to the caller's shapes; the maths of both
passes is in :mod:`spiking_moe.functional.kernels`. An event-driven product
(:data:`~.event_cpu.CPP`, :data:`~.triton_event.TRITON`, and the PyTorch reference in
:mod:`spiking_moe.functional.event`) satisfies :class:`EventKernel` with
:class:`EventLinearArgs`.

Shapes of the LIF kernels, for every provider and every call: ``T`` time steps, ``U`` all neuron dimensions of one
step folded together. ``*_TU`` tensors are ``[T, U]`` and ``*_U`` tensors ``[U]``; all are
contiguous, on one device, in one dtype (the input's), and ``beta_U``/``theta_U`` arrive
expanded to one value per neuron.

:data:`SURROGATE_IDS` is the only place a surrogate's kernel id is written. The C++ kernel is
compiled with one ``-DSPIKING_MOE_SURROGATE_<NAME>=<id>`` flag per entry (see
:func:`~.cpu_fused.surrogate_defines`) and its enum takes its values from those macros; the
Triton kernel branches on module constants built from this table.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from ..surrogate import Surrogate

__all__ = [
    "SURROGATE_IDS",
    "EventKernel",
    "EventLinearArgs",
    "KernelProvider",
    "LIFBackwardArgs",
    "LIFForwardArgs",
    "LIFKernel",
]

#: Surrogate name -> integer id inside the compiled kernels. Read-only: the C++ kernel bakes the
#: ids in at build time, so a table changed at run time would silently desynchronise it.
SURROGATE_IDS = MappingProxyType(
    {"fast_sigmoid": 0, "atan": 1, "sigmoid": 2, "triangle": 3, "boxcar": 4}
)


class LIFForwardArgs(NamedTuple):
    """The arguments of :meth:`LIFKernel.forward`.

    Attributes:
        x_TU: input current.
        v0_U: initial membrane; zeros when None.
        beta_U, theta_U: decay and threshold per neuron.
        zero_reset: hard reset (``v = h (1 - s)``) instead of subtraction.
        return_membrane: also return the post-reset membrane of every step.
        keep_h: False when no backward will run (no input needs a gradient): a provider may
            then skip writing ``h_TU`` (one of the three ``[T, U]`` streams of an inference
            forward) and return an empty tensor in its place.
    """

    x_TU: torch.Tensor
    v0_U: torch.Tensor | None
    beta_U: torch.Tensor
    theta_U: torch.Tensor
    zero_reset: bool
    return_membrane: bool
    keep_h: bool = True


class LIFBackwardArgs(NamedTuple):
    """The arguments of :meth:`LIFKernel.backward`.

    Attributes:
        gs_TU: gradient of the spikes.
        gmem_TU: gradient of the membrane trace, or None if it was not returned or unused.
        gv_U: gradient of the final membrane, or None.
        h_TU: pre-reset membrane saved by forward.
        beta_U, theta_U, v0_U: as in :class:`LIFForwardArgs`.
        surrogate: the surrogate whose derivative replaces ``dH/dx``; kernels look its id up
            in :data:`SURROGATE_IDS`.
        zero_reset: as in forward.
        detach_reset: no gradient through the reset term.
        param_grads: also compute the beta and threshold gradients.
    """

    gs_TU: torch.Tensor
    gmem_TU: torch.Tensor | None
    gv_U: torch.Tensor | None
    h_TU: torch.Tensor
    beta_U: torch.Tensor
    theta_U: torch.Tensor
    v0_U: torch.Tensor | None
    surrogate: Surrogate
    zero_reset: bool
    detach_reset: bool
    param_grads: bool


@runtime_checkable
class KernelProvider(Protocol):
    """What every provider has, whatever it computes.

    Attributes:
        name: short name used in logs and error messages ("cpp", "torch", "triton").
    """

    name: str

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        """Why this provider cannot run on tensors like ``x`` (device, dtype, a missing build or
        package), or None if it can. Checks only what the provider itself needs; whether the
        arguments suit its path at all is decided by the caller."""
        ...


@runtime_checkable
class LIFKernel(KernelProvider, Protocol):
    """A fused multi-step LIF kernel: forward and adjoint over all ``T`` steps in one call."""

    def forward(self, args: LIFForwardArgs) -> tuple[torch.Tensor, ...]:
        """Run the recurrence over all steps.

        Returns:
            ``(spikes_TU, h_TU, v_U)``, plus ``membrane_TU`` when ``args.return_membrane``;
            ``h_TU`` (pre-reset membrane) is all that backward needs.
        """
        ...

    def backward(
        self, args: LIFBackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The BPTT adjoint of :meth:`forward`.

        Returns:
            ``(grad_x_TU, grad_v0_U, grad_beta_U, grad_theta_U)``; the last two, summed over
            ``T`` only, are None unless ``args.param_grads``.
        """
        ...


class EventLinearArgs(NamedTuple):
    """The arguments of :meth:`EventKernel.forward` (``R`` rows, ``I`` inputs, ``O`` outputs).

    Attributes:
        x_RI: the input, usually spikes; contiguous.
        weight_t_IO: the transposed weight, contiguous, ``x_RI``'s dtype and device.
        bias_O: the bias, or None.
        max_density: the kernel computes nothing (returns None) when more than this fraction
            of ``x_RI`` is nonzero.
    """

    x_RI: torch.Tensor
    weight_t_IO: torch.Tensor
    bias_O: torch.Tensor | None
    max_density: float = 1.0


@runtime_checkable
class EventKernel(KernelProvider, Protocol):
    """An event-driven product for :func:`~spiking_moe.functional.event.event_linear`."""

    def forward(self, args: EventLinearArgs) -> torch.Tensor | None:
        """``x_RI @ weight_t_IO + bias_O`` as ``[R, O]``, or None (nothing computed) above
        ``max_density``."""
        ...
