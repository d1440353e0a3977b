r"""Leaky integrate-and-fire dynamics as pure functions.

Discrete time, one step per index ``t`` (charge, fire, reset):

.. math::

    h_t = \beta\, v_{t-1} + x_t, \qquad
    s_t = H(h_t - \theta), \qquad
    v_t = \begin{cases} h_t - \theta\, s_t & \text{reset="subtract" (soft)} \\
                        h_t\,(1 - s_t)      & \text{reset="zero" (hard)} \end{cases}

with :math:`v_{-1} = v_0` (zeros by default) and :math:`H(0) = 0`. Backward replaces
:math:`dH/dx` by a surrogate (:mod:`spiking_moe.functional.surrogate`). With
``detach_reset=True`` the reset term uses :math:`\mathrm{sg}(s_t)`, so no gradient flows
through the reset (Zenke & Vogels 2021).

``beta`` and ``threshold`` are Python floats or tensors that broadcast against one time step
``x[t]`` (a scalar, or one value per neuron over the trailing feature dimensions).

Shapes: ``T`` time steps, ``B`` batch, ``...`` any neuron dimensions. Time-major: ``[T, B, ...]``.

:func:`lif_multistep` is the single entry point for a sequence. ``implementation="reference"``
is the plain Python loop below, kept obviously correct: every accelerated path is tested
against it. ``"fused"`` runs all ``T`` steps as one autograd node (a C++ kernel on CPU,
vectorised PyTorch elsewhere), ``"triton"`` a Triton kernel on CUDA; ``"auto"`` (default) takes
Triton on CUDA when importable, else the fused path. The fused paths and their backward maths
live in :mod:`spiking_moe.functional.kernels`.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import torch

from .surrogate import Surrogate, resolve_surrogate

__all__ = [
    "IMPLEMENTATIONS",
    "RESETS",
    "LIFOutput",
    "check_lif_input",
    "check_lif_parameters",
    "lif_multistep",
    "lif_step",
]

logger = logging.getLogger(__name__)

Reset = Literal["subtract", "zero"]
RESETS = ("subtract", "zero")
IMPLEMENTATIONS = ("auto", "reference", "fused", "triton")


class LIFOutput(NamedTuple):
    """Result of :func:`lif_multistep`.

    Attributes:
        spikes: ``[T, B, ...]`` in {0, 1}, the input's dtype.
        v: ``[B, ...]`` membrane after the last step's reset (the state to carry on with).
        membrane: ``[T, B, ...]`` membrane after each step's reset, or None unless requested.
    """

    spikes: torch.Tensor
    v: torch.Tensor
    membrane: torch.Tensor | None = None


def check_lif_parameters(beta, threshold, reset: str) -> None:
    """Raise ValueError for a reset name or a constant beta/threshold out of range."""
    if reset not in RESETS:
        raise ValueError(f"unknown reset {reset!r}; valid: {list(RESETS)}")
    for name, value in (("beta", beta), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(beta, (int, float)) and not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if isinstance(threshold, (int, float)) and not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold}")


def check_lif_input(x: torch.Tensor, min_dim: int, what: str = "x", *, nan: bool = True) -> None:
    """Raise for a non-tensor, too few dims, a non-float dtype or (if ``nan``) NaN in ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        layout = "[T, B, ...]" if min_dim == 2 else "[B, ...]"
        raise ValueError(
            f"{what} must have at least {min_dim} dims {layout}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if nan:
        _check_nan(x, what)


def _check_nan(x: torch.Tensor, what: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{what} contains NaN (shape {tuple(x.shape)})")


def _check_broadcast(name: str, value, step_shape: torch.Size) -> None:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        try:
            shape = torch.broadcast_shapes(value.shape, step_shape)
        except RuntimeError:
            shape = None
        if shape != step_shape:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to one time step "
                f"of shape {tuple(step_shape)}; use a scalar or one value per neuron"
            )


def lif_step(
    x: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    beta: float | torch.Tensor = 0.9,
    threshold: float | torch.Tensor = 1.0,
    reset: Reset = "subtract",
    surrogate: str | Surrogate = "fast_sigmoid",
    alpha: float | None = None,
    detach_reset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF step.

    Args:
        x: input current ``[B, ...]``.
        v: membrane after the previous step ``[B, ...]``; zeros when None.
        beta: membrane decay in [0, 1].
        threshold: firing threshold > 0.
        reset: "subtract" (soft) or "zero" (hard).
        surrogate: surrogate name or :class:`Surrogate`; ``alpha`` overrides its default.
        detach_reset: stop gradients through the reset term.

    Returns:
        ``(spikes, v_next)``, both ``[B, ...]``.

    Example:
        >>> s, v = lif_step(torch.tensor([0.5, 1.5]), beta=0.5)
        >>> s, v
        (tensor([0., 1.]), tensor([0.5000, 0.5000]))
    """
    check_lif_parameters(beta, threshold, reset)
    check_lif_input(x, 1)
    _check_broadcast("beta", beta, x.shape)
    _check_broadcast("threshold", threshold, x.shape)
    spike_fn = resolve_surrogate(surrogate, alpha)
    if v is None:
        v = torch.zeros_like(x)
    elif v.shape != x.shape:
        raise ValueError(f"state v has shape {tuple(v.shape)}, expected {tuple(x.shape)} like x")
    return _step(x, v, beta, threshold, reset, spike_fn, detach_reset)


def _step(x, v, beta, threshold, reset, spike_fn, detach_reset):
    h = beta * v + x
    s = spike_fn(h - threshold)
    s_reset = s.detach() if detach_reset else s
    if reset == "subtract":
        v_next = h - threshold * s_reset
    else:
        v_next = h * (1.0 - s_reset)
    return s, v_next


def lif_multistep(
    x: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    beta: float | torch.Tensor = 0.9,
    threshold: float | torch.Tensor = 1.0,
    reset: Reset = "subtract",
    surrogate: str | Surrogate = "fast_sigmoid",
    alpha: float | None = None,
    detach_reset: bool = False,
    return_membrane: bool = False,
    implementation: str = "auto",
) -> LIFOutput:
    """Run LIF over a time-major sequence.

    Args:
        x: input current ``[T, B, ...]``, floating point.
        v0: initial membrane ``[B, ...]``; zeros when None.
        beta, threshold, reset, surrogate, alpha, detach_reset: as in :func:`lif_step`.
        return_membrane: also return the post-reset membrane trace ``[T, B, ...]``.
        implementation: "auto" picks the fastest available path for the device (Triton on
            CUDA, else "fused"); "reference" forces the plain loop, "fused" the one-node path,
            "triton" the Triton kernel. A path that cannot run these arguments (e.g. mixed
            dtypes, Triton without CUDA) falls back to the reference loop, logged at debug level.

    Returns:
        :class:`LIFOutput` ``(spikes [T, B, ...], v [B, ...], membrane [T, B, ...] | None)``.

    Example:
        >>> out = lif_multistep(torch.full((4, 1), 0.6), beta=0.5)
        >>> out.spikes.flatten()
        tensor([0., 0., 1., 0.])
    """
    check_lif_parameters(beta, threshold, reset)
    check_lif_input(x, 2, nan=False)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid: {list(IMPLEMENTATIONS)}"
        )
    step_shape = x.shape[1:]
    _check_broadcast("beta", beta, step_shape)
    _check_broadcast("threshold", threshold, step_shape)
    if v0 is not None and v0.shape != step_shape:
        raise ValueError(
            f"v0 has shape {tuple(v0.shape)}, expected one time step {tuple(step_shape)}"
        )
    spike_fn = resolve_surrogate(surrogate, alpha)
    provider = _choose_provider(x, v0, beta, threshold, implementation)
    if provider is None:
        _check_nan(x, "x")
        return _reference_multistep(
            x, v0, beta, threshold, reset, spike_fn, detach_reset, return_membrane
        )
    from .kernels import FusedConfig, FusedLIF

    config = FusedConfig(provider, reset == "zero", spike_fn, detach_reset, return_membrane)
    outputs = FusedLIF.apply(x, v0, beta, threshold, config)
    # NaN anywhere in a neuron's input propagates to its final membrane (0 * NaN and
    # NaN - theta * 0 stay NaN), so checking v costs one step instead of a pass over x.
    if torch.isnan(outputs[1]).any():
        _check_nan(x, "x")
    return LIFOutput(*outputs) if return_membrane else LIFOutput(outputs[0], outputs[1], None)


def _choose_provider(x, v0, beta, threshold, implementation: str):
    """The kernel provider for these arguments, or None for the reference loop."""
    if implementation == "reference":
        return None
    tensors = [t for t in (v0, beta, threshold) if isinstance(t, torch.Tensor)]
    if any(t.device != x.device for t in tensors):
        logger.debug("LIF arguments on different devices: using the reference loop")
        return None
    dtype = torch.result_type(x, beta) if isinstance(beta, torch.Tensor) else x.dtype
    if isinstance(threshold, torch.Tensor):
        dtype = torch.promote_types(dtype, torch.result_type(x, threshold))
    if x.dtype not in (torch.float32, torch.float64):
        # Half precision: the loop rounds a Python-float beta differently from a tensor one
        # (PyTorch computes scalar ops in float32); only the loop reproduces that exactly.
        logger.debug("LIF in %s: using the reference loop", x.dtype)
        return None
    if dtype != x.dtype or (v0 is not None and v0.dtype != x.dtype):
        logger.debug("LIF arguments promote beyond x.dtype %s: using the reference loop", x.dtype)
        return None
    if implementation == "triton" or (implementation == "auto" and x.is_cuda):
        from .kernels import triton_lif

        if triton_lif.supports(x):
            return triton_lif.TRITON
        if implementation == "triton":
            logger.debug(
                "Triton LIF unavailable for %s (%s): using the reference loop",
                x.device,
                triton_lif.unavailable_reason(x),
            )
            return None
    from .kernels import cpu_fused

    if cpu_fused.CPP.supports(x) and cpu_fused.cpp_available():
        return cpu_fused.CPP
    return cpu_fused.TORCH


def _reference_multistep(x, v0, beta, threshold, reset, spike_fn, detach_reset, return_membrane):
    v = torch.zeros_like(x[0]) if v0 is None else v0
    spikes, membrane = [], []
    for x_t in x.unbind(0):
        s, v = _step(x_t, v, beta, threshold, reset, spike_fn, detach_reset)
        spikes.append(s)
        if return_membrane:
            membrane.append(v)
    return LIFOutput(torch.stack(spikes), v, torch.stack(membrane) if return_membrane else None)
