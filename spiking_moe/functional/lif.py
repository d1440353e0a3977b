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
vectorised PyTorch elsewhere or when the C++ build is unavailable), ``"triton"`` a Triton
kernel on CUDA. ``"auto"`` (default) takes Triton on CUDA when usable, else the fused path, and
the reference loop for arguments no fused path reproduces exactly (half precision, tensors on
different devices, beta/threshold/v0 that promote beyond ``x``'s dtype); it logs each fallback
at debug level. An explicitly named path that cannot run raises instead. The fused paths and
their backward maths live in :mod:`spiking_moe.functional.kernels`.
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
#: Reset modes of :func:`lif_multistep` and :func:`lif_step` (``NeuronArgs.reset``): ``"subtract"``
#: (soft) and ``"zero"`` (hard).
RESETS = ("subtract", "zero")
#: ``implementation=`` values of :func:`lif_multistep` (``NeuronArgs.implementation``): ``"auto"``,
#: ``"reference"`` (the Python loop), ``"fused"`` (C++ or vectorised PyTorch), ``"triton"``.
IMPLEMENTATIONS = ("auto", "reference", "fused", "triton")
_FUSED_DTYPES = (torch.float32, torch.float64)


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


def _check_step_shapes(step_shape: torch.Size, beta, threshold, state_name: str, state) -> None:
    """Raise ValueError unless beta and threshold broadcast to one time step and the state
    (``v`` or ``v0``, None allowed) has its shape."""
    for name, value in (("beta", beta), ("threshold", threshold)):
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
    if state is not None and state.shape != step_shape:
        raise ValueError(
            f"{state_name} has shape {tuple(state.shape)}, expected one time step "
            f"{tuple(step_shape)}"
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
    _check_step_shapes(x.shape, beta, threshold, "state v", v)
    spike_fn = resolve_surrogate(surrogate, alpha)
    if v is None:
        v = torch.zeros_like(x)
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
        implementation: "auto" picks the fastest path that can run these arguments (Triton
            on CUDA, else "fused", else the reference loop, each fallback logged at debug
            level); "reference" forces the plain loop, "fused" the one-node path (the C++
            kernel on CPU, vectorised PyTorch where that is unavailable), "triton" the Triton
            kernel.

    Returns:
        :class:`LIFOutput` ``(spikes [T, B, ...], v [B, ...], membrane [T, B, ...] | None)``.

    Raises:
        ValueError: ``implementation`` is "fused" or "triton" and the arguments suit no fused
            path: dtype other than float32/float64, tensors on different devices, or
            beta/threshold/v0 that promote beyond ``x``'s dtype.
        RuntimeError: ``implementation="triton"`` and Triton cannot run here (not importable,
            or ``x`` is not on CUDA and ``TRITON_INTERPRET=1`` is not set).

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
    _check_step_shapes(x.shape[1:], beta, threshold, "v0", v0)
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
    """The kernel provider for these arguments, or None for the reference loop.

    Raises for an explicit "fused" or "triton" that cannot run; "auto" falls back instead.
    """
    if implementation == "reference":
        return None
    reason = _fused_unavailable_reason(x, v0, beta, threshold)
    if reason is not None:
        if implementation == "auto":
            logger.debug(
                "fused LIF cannot run these arguments (%s): using the reference loop", reason
            )
            return None
        raise ValueError(_cannot_run(implementation, reason))
    if implementation == "triton" or (implementation == "auto" and x.is_cuda):
        from .kernels import triton_lif

        reason = triton_lif.TRITON.unavailable_reason(x)
        if reason is None:
            return triton_lif.TRITON
        if implementation == "triton":
            raise RuntimeError(_cannot_run(implementation, reason, "here"))
        logger.debug("Triton LIF unavailable (%s): using the fused path", reason)
    from .kernels import cpu_fused

    reason = cpu_fused.CPP.unavailable_reason(x)
    if reason is None:
        return cpu_fused.CPP
    # Still a fused path, so not an error even when "fused" was asked for by name.
    logger.debug("C++ LIF kernel unavailable (%s): using the PyTorch fused provider", reason)
    return cpu_fused.TORCH


def _fused_unavailable_reason(x, v0, beta, threshold) -> str | None:
    """Why no fused path can reproduce the reference loop on these arguments, or None."""
    named = {"v0": v0, "beta": beta, "threshold": threshold}
    tensors = {name: t for name, t in named.items() if isinstance(t, torch.Tensor)}
    elsewhere = [f"{name} on {t.device}" for name, t in tensors.items() if t.device != x.device]
    if elsewhere:
        return f"arguments on different devices (x on {x.device}, {', '.join(elsewhere)})"
    if x.dtype not in _FUSED_DTYPES:
        # PyTorch computes a Python-float beta times a half tensor in float32 but a tensor beta
        # in half; only the loop itself reproduces both roundings exactly.
        return f"dtype {x.dtype} not supported (float32, float64); half precision needs the loop"
    for name in ("beta", "threshold"):
        if name in tensors and (dtype := torch.result_type(x, tensors[name])) != x.dtype:
            # The loop would return the promoted dtype; the fused node computes in x's dtype.
            return f"{name} ({tensors[name].dtype}) promotes beyond x's dtype {x.dtype} to {dtype}"
    if v0 is not None and v0.dtype != x.dtype:
        return f"v0 has dtype {v0.dtype}, not x's dtype {x.dtype}"
    return None


def _cannot_run(implementation: str, reason: str, where: str = "these arguments") -> str:
    return (
        f'implementation="{implementation}" cannot run {where}: {reason}. '
        'Use implementation="auto" to fall back to a path that can.'
    )


def _reference_multistep(x, v0, beta, threshold, reset, spike_fn, detach_reset, return_membrane):
    v = torch.zeros_like(x[0]) if v0 is None else v0
    spikes, membrane = [], []
    for x_t in x.unbind(0):
        s, v = _step(x_t, v, beta, threshold, reset, spike_fn, detach_reset)
        spikes.append(s)
        if return_membrane:
            membrane.append(v)
    return LIFOutput(torch.stack(spikes), v, torch.stack(membrane) if return_membrane else None)
