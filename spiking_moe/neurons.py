"""Spiking neuron modules. The dynamics live in :mod:`spiking_moe.functional.lif`.

Mapping onto the peers (tested in ``tests/test_neurons.py`` with the peers as oracles):

snnTorch ``snntorch.Leaky``
    ``Leaky(beta=beta, threshold=threshold, spike_grad=<surrogate>,
    reset_mechanism=reset, reset_delay=False)`` with membrane passed explicitly per step.
    snnTorch's default ``reset_delay=True`` applies the subtractive reset one step late and
    undecayed, which is not this equation. With ``reset_delay=False``, snnTorch still decides
    its spike on ``h_t - theta * H(v_{t-1} - theta)``, which equals ``h_t`` whenever the carried
    membrane is below threshold. That holds at every step as long as ``h_t < 2 * theta``
    (after a spike the soft reset leaves ``h_t - theta < theta``). So: "zero" reset matches
    always; "subtract" matches while ``h_t < 2 * theta``. Gradients match too (snnTorch's reset
    term is not detached) for the same surrogate, e.g. ``fast_sigmoid`` with ``alpha`` =
    snnTorch's ``slope``.

Norse ``norse.torch.LIFBoxCell``
    Norse integrates ``v + dt * tau_mem_inv * (v_leak - v + i)``, so with ``v_leak = 0``:
    ``beta = 1 - dt * tau_mem_inv`` and ``i = x / (1 - beta)`` (the input is scaled up by
    ``1 / (1 - beta)``; ``beta = 1`` has no Norse equivalent). ``v_th = threshold``;
    "zero" is ``reset_method=reset_value`` with ``v_reset = 0``, "subtract" is
    ``reset_subtract``. Spikes and membrane equal ours up to float rounding of the rescaling.
    Norse's surrogate is SuperSpike (``method="super"``), i.e. ``fast_sigmoid``; Norse 1.1's
    SuperSpike backward ignores its ``alpha`` (slope fixed at 1), so gradients equal ours only
    for ``alpha=1``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .functional.lif import (
    IMPLEMENTATIONS,
    RESETS,
    LIFOutput,
    check_lif_input,
    check_lif_parameters,
    lif_multistep,
)
from .functional.surrogate import Surrogate, resolve_surrogate

__all__ = ["BACKENDS", "LIF"]

logger = logging.getLogger(__name__)

BACKENDS = ("native", "snntorch", "norse")


def _as_constant(name: str, value, lower_ok) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        tensor = value.detach().clone()
    else:
        tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if tensor.dim() > 1:
        raise ValueError(
            f"{name} must be a scalar or a 1-D per-neuron tensor, got shape {tuple(tensor.shape)}"
        )
    if torch.isnan(tensor).any() or not lower_ok(tensor):
        raise ValueError(
            f"{name} out of range: got {tensor.tolist()}; "
            + ("beta must lie in [0, 1]" if name == "beta" else "threshold must be > 0")
        )
    return tensor


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire layer, time-major.

    Args:
        beta: membrane decay in [0, 1]; a float or a 1-D tensor (one per neuron of the last dim).
        threshold: firing threshold > 0; a float or a 1-D per-neuron tensor.
        reset: "subtract" (soft) or "zero" (hard).
        surrogate: surrogate gradient name (see :mod:`spiking_moe.functional.surrogate`)
            or a :class:`Surrogate`.
        learn_beta: make beta an ``nn.Parameter`` (else a buffer). Like snnTorch, it is
            clamped to [0, 1] in the forward pass.
        learn_threshold: make threshold an ``nn.Parameter`` (else a buffer).
        backend: "native" (this package), "snntorch" (``snntorch.Leaky``) or "norse"
            (``norse.torch.LIFBoxCell``); the module docstring gives the exact mapping.
        alpha: surrogate sharpness; None takes the surrogate's default (25 for fast_sigmoid).
        detach_reset: stop gradients through the reset term (native backend only).
        implementation: native backend only: "auto" (default: Triton on CUDA, else the fused
            one-node path, else the reference loop for half precision or mixed devices),
            "fused", "triton" or "reference" (the plain loop). A named "fused" or "triton"
            that cannot run the input raises instead of falling back; see
            :func:`~spiking_moe.functional.lif.lif_multistep`.

    Shape:
        ``forward(x)``: ``x`` is ``[T, B, ...]`` current; returns spikes of the same shape and
        dtype, values in {0, 1}. No state survives between calls; use :meth:`run` to pass an
        initial membrane and get the final one back.

    Example:
        >>> lif = LIF(beta=0.5)
        >>> lif(torch.full((4, 1, 2), 0.6))[:, 0, 0]
        tensor([0., 0., 1., 0.])
    """

    def __init__(
        self,
        beta: float | torch.Tensor = 0.9,
        threshold: float | torch.Tensor = 1.0,
        reset: str = "subtract",
        surrogate: str | Surrogate = "fast_sigmoid",
        learn_beta: bool = False,
        learn_threshold: bool = False,
        backend: str = "native",
        *,
        alpha: float | None = None,
        detach_reset: bool = False,
        implementation: str = "auto",
    ):
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; valid: {list(IMPLEMENTATIONS)}"
            )
        if reset not in RESETS:
            raise ValueError(f"unknown reset {reset!r}; valid: {list(RESETS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        self.surrogate = resolve_surrogate(surrogate, alpha)
        beta_t = _as_constant("beta", beta, lambda b: bool(((b >= 0) & (b <= 1)).all()))
        threshold_t = _as_constant(
            "threshold", threshold, lambda t: bool((t > 0).all() and torch.isfinite(t).all())
        )
        if backend == "norse":
            if self.surrogate.name != "fast_sigmoid":
                raise ValueError(
                    f"backend 'norse' supports surrogate 'fast_sigmoid' (Norse's SuperSpike) only, "
                    f"got {self.surrogate.name!r}"
                )
            if bool((beta_t == 1).any()):
                raise ValueError("backend 'norse' needs beta < 1 (Norse has no non-leaky LIFBox)")
            if detach_reset:
                raise ValueError("detach_reset is supported by backend 'native' only")
        if backend == "snntorch" and detach_reset:
            raise ValueError("detach_reset is supported by backend 'native' only")
        self.reset = reset
        self.backend = backend
        self.detach_reset = detach_reset
        self.implementation = implementation
        if learn_beta:
            self.beta = nn.Parameter(beta_t)
        else:
            self.register_buffer("beta", beta_t)
        if learn_threshold:
            self.threshold = nn.Parameter(threshold_t)
        else:
            self.register_buffer("threshold", threshold_t)

    def extra_repr(self) -> str:
        beta = self.beta.item() if self.beta.dim() == 0 else f"[{self.beta.numel()} values]"
        thr = (
            self.threshold.item()
            if self.threshold.dim() == 0
            else f"[{self.threshold.numel()} values]"
        )
        return (
            f"beta={beta}, threshold={thr}, reset={self.reset!r}, "
            f"surrogate={self.surrogate.name!r}, alpha={self.surrogate.alpha}, backend={self.backend!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).spikes

    def run(
        self, x: torch.Tensor, v0: torch.Tensor | None = None, *, return_membrane: bool = False
    ) -> LIFOutput:
        """Run the layer and return spikes, final membrane and (optionally) the membrane trace.

        Args:
            x: ``[T, B, ...]`` input current.
            v0: ``[B, ...]`` initial membrane, zeros when None.
            return_membrane: include the ``[T, B, ...]`` post-reset membrane trace.
        """
        beta = self.beta.clamp(0.0, 1.0)
        threshold = self.threshold
        if self.backend == "native":
            return lif_multistep(
                x,
                v0,
                beta=beta,
                threshold=threshold,
                reset=self.reset,
                surrogate=self.surrogate,
                detach_reset=self.detach_reset,
                return_membrane=return_membrane,
                implementation=self.implementation,
            )
        check_lif_input(x, 2)
        check_lif_parameters(beta, threshold, self.reset)
        if v0 is None:
            v0 = torch.zeros_like(x[0])
        if self.backend == "snntorch":
            return _run_snntorch(
                x, v0, beta, threshold, self.reset, self.surrogate, return_membrane
            )
        return _run_norse(x, v0, beta, threshold, self.reset, self.surrogate, return_membrane)


def _run_snntorch(x, v0, beta, threshold, reset, surrogate, return_membrane) -> LIFOutput:
    import snntorch

    # A fresh Leaky per call: snnTorch keeps every instance in a class-level list and
    # hidden membrane on the module, neither of which may outlive this call.
    leaky = snntorch.Leaky(
        beta=beta,
        threshold=threshold,
        spike_grad=surrogate,
        reset_mechanism=reset,
        reset_delay=False,
    )
    try:
        v = v0
        spikes, membrane = [], []
        for x_t in x.unbind(0):
            s, v = leaky(x_t, v)
            spikes.append(s)
            membrane.append(v)
    finally:
        instances = getattr(snntorch.SpikingNeuron, "instances", None)
        if isinstance(instances, list) and leaky in instances:
            instances.remove(leaky)
    return LIFOutput(torch.stack(spikes), v, torch.stack(membrane) if return_membrane else None)


def _run_norse(x, v0, beta, threshold, reset, surrogate, return_membrane) -> LIFOutput:
    from norse.torch import LIFBoxCell, LIFBoxParameters
    from norse.torch.functional.lif_box import LIFBoxFeedForwardState
    from norse.torch.functional.reset import reset_subtract, reset_value

    dt = 1e-3
    params = LIFBoxParameters(
        tau_mem_inv=(1.0 - beta) / dt,
        v_leak=torch.zeros((), dtype=x.dtype, device=x.device),
        v_th=threshold,
        v_reset=torch.zeros((), dtype=x.dtype, device=x.device),
        method="super",
        alpha=surrogate.alpha,
        reset_method=reset_subtract if reset == "subtract" else reset_value,
    )
    cell = LIFBoxCell(params, dt=dt)
    state = LIFBoxFeedForwardState(v=v0)
    scale = 1.0 / (1.0 - beta)
    spikes, membrane = [], []
    for x_t in x.unbind(0):
        s, state = cell(x_t * scale, state)
        spikes.append(s)
        membrane.append(state.v)
    return LIFOutput(
        torch.stack(spikes), state.v, torch.stack(membrane) if return_membrane else None
    )
