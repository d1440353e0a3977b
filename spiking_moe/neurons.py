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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .args import NEURON_BACKENDS, ArgsField, NeuronArgs, with_options
from .functional.lif import (
    LIFOutput,
    check_lif_input,
    check_lif_parameters,
    lif_multistep,
)
from .functional.surrogate import Surrogate, resolve_surrogate

__all__ = ["BACKENDS", "LIF", "neuron_args", "plain_neuron_options"]

logger = logging.getLogger(__name__)

BACKENDS = NEURON_BACKENDS


def neuron_args(args: NeuronArgs | None = None, **options) -> NeuronArgs:
    """:class:`~spiking_moe.args.NeuronArgs` from ``args`` (None: the defaults) and keyword
    options, which may also give ``beta``/``threshold`` as tensors (a scalar, or one value per
    neuron) and ``surrogate`` as a :class:`~spiking_moe.functional.surrogate.Surrogate`.

    Raises:
        TypeError: a keyword that is no neuron option.
        ValueError: a bad value (a :class:`~spiking_moe.args.ConfigError` naming the field).
    """
    if args is not None and not isinstance(args, NeuronArgs):
        raise TypeError(f"args must be NeuronArgs or None, got {type(args).__name__}")
    return with_options(args or NeuronArgs(), plain_neuron_options(options), who="LIF")


def plain_neuron_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with tensors of ``beta``/``threshold`` as numbers or per-neuron tuples and a
    :class:`~spiking_moe.functional.surrogate.Surrogate` as its name and ``alpha``: the plain
    values :class:`~spiking_moe.args.NeuronArgs` holds (exact: float32 values are doubles)."""
    options = dict(options)
    for name in ("beta", "threshold"):
        value = options.get(name)
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                raise ValueError(
                    f"{name} must be a scalar or a 1-D per-neuron tensor, got shape "
                    f"{tuple(value.shape)}"
                )
            values = value.detach().cpu().double()
            options[name] = values.item() if value.dim() == 0 else tuple(values.tolist())
    surrogate = options.get("surrogate")
    if isinstance(surrogate, Surrogate):
        alpha = options.get("alpha")
        if alpha is not None and alpha != surrogate.alpha:
            raise ValueError(
                f"alpha={alpha} conflicts with the Surrogate's own alpha={surrogate.alpha}"
            )
        options["surrogate"], options["alpha"] = surrogate.name, surrogate.alpha
    return options


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire layer, time-major.

    Args:
        args: the population's :class:`~spiking_moe.args.NeuronArgs`; None: the defaults.
        **options: neuron options to set, by name (the fields of
            :class:`~spiking_moe.args.NeuronArgs`: ``beta``, ``threshold``, ``reset``,
            ``surrogate``, ``alpha``, ``learn_beta``, ``learn_threshold``, ``detach_reset``,
            ``backend``, ``implementation``); ``beta`` and ``threshold`` may be tensors (a
            scalar, or one value per neuron of the last dim), ``surrogate`` a
            :class:`~spiking_moe.functional.surrogate.Surrogate`. ``backend`` "snntorch" and
            "norse" compute the same layer with ``snntorch.Leaky`` and Norse's ``LIFBoxCell``
            (the module docstring gives the exact mapping); a learnable beta is clamped to
            [0, 1] in the forward pass, like snnTorch's.

    Attributes:
        args: the :class:`~spiking_moe.args.NeuronArgs` it was built from.
        beta, threshold: buffers (parameters when learnable) of the per-neuron or scalar
            constants.

    Shape:
        ``forward(x)``: ``x`` is ``[T, B, ...]`` current; returns spikes of the same shape and
        dtype, values in {0, 1}. No state survives between calls; use :meth:`run` to pass an
        initial membrane and get the final one back.

    Example:
        >>> lif = LIF(beta=0.5)
        >>> lif(torch.full((4, 1, 2), 0.6))[:, 0, 0]
        tensor([0., 0., 1., 0.])
    """

    reset = ArgsField()
    backend = ArgsField()
    detach_reset = ArgsField()
    implementation = ArgsField()

    @property
    def surrogate(self) -> Surrogate:
        """The spike function of ``args.surrogate`` and ``args.alpha``."""
        return resolve_surrogate(self.args.surrogate, self.args.alpha)

    def __init__(self, args: NeuronArgs | None = None, **options):
        super().__init__()
        self.args = args = neuron_args(args, **options)
        for name, learn in (("beta", args.learn_beta), ("threshold", args.learn_threshold)):
            given = options.get(name)
            # A tensor keeps its floating dtype (e.g. a float64 beta for a float64 model).
            dtype = (
                given.dtype
                if isinstance(given, torch.Tensor) and given.is_floating_point()
                else None
            )
            value = torch.tensor(getattr(args, name), dtype=dtype or torch.get_default_dtype())
            if learn:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

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
