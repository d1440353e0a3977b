r"""Experts: the feed-forward blocks a mixture-of-experts layer routes tokens to.

Shape letters: the package legend (:mod:`spiking_moe`); ``N`` are the tokens routed
to this expert, ``I``/``O`` its input and output features, ``U`` the neurons of a hidden layer.

A :class:`SpikingExpert` with ``num_layers = n`` computes, for input spikes
:math:`s^{(0)}_t \in \{0, 1\}^I`,

.. math::

    s^{(l)} = \mathrm{LIF}\big(W_l\, s^{(l-1)} + b_l\big), \quad l = 1..n, \qquad
    y_t = W_{n+1}\, s^{(n)}_t + b_{n+1},

i.e. ``Linear -> LIF -> ... -> Linear``. It returns the synaptic current :math:`y` (not
spikes): the MoE layer sums the gated currents of the chosen experts and fires one LIF
population on the sum, so what flows between layers stays binary. The Linear layers run on
``T`` and ``N`` folded together; only the LIF steps over ``T``. The LIF state lives inside one
call: a routed expert sees different tokens every call, so no state may survive it.

``forward`` returns the current only; ``SpikingExpert.run`` returns it with the
:class:`~spiking_moe.activity.Activity` of the hidden LIF layers (``net.1``, ``net.3``, ...),
which the MoE layer reports in its output for the activity penalty and firing-rate metrics.

:class:`MLPExpert` is the ANN twin (``ReLU`` instead of ``LIF``) with the same parameter
layout, used by the equivalent-ANN baseline.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .args import ExpertArgs, NeuronArgs
from .neurons import SpikingNeuron, make_neuron, neuron_args
from .synapses import EventLinear

__all__ = ["ExpertOutput", "MLPExpert", "SpikingExpert"]


class ExpertOutput(NamedTuple):
    """Result of an expert's ``run``.

    Attributes:
        current: ``[T, N, O]`` output current.
        activity: spikes of the expert's LIF layers, named by their path (``net.1``, ...).
    """

    current: torch.Tensor
    activity: Activity


def _check_width(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_input(x: torch.Tensor, in_features: int, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{who} input must be [T, N, {in_features}], got shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{who} expects {in_features} input features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} input must be floating point, got dtype {x.dtype}")


class _FeedForwardExpert(nn.Module):
    """``Linear -> act -> ... -> Linear`` in an ``nn.Sequential`` named ``net``.

    Parameter names are ``net.0.weight`` (first Linear), ``net.1.*`` (first neuron), ...,
    so energy counting can attribute every operation to ``experts.<e>.net.<i>``.
    """

    #: LIF neurons and event-driven synapses (True), or ReLU and plain Linears (the ANN twin).
    spiking: bool

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        num_layers: int = 1,
        neuron: NeuronArgs | None = None,
        **neuron_options,
    ):
        super().__init__()
        _check_width("in_features", in_features)
        _check_width("out_features", out_features)
        self.args = ExpertArgs(hidden=hidden_features, layers=num_layers)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.num_layers = num_layers
        if self.spiking:
            neuron = neuron_args(neuron, **neuron_options)
            linear, make_act = EventLinear, lambda: make_neuron(neuron)
        elif neuron is not None or neuron_options:
            raise TypeError(f"{type(self).__name__} has no neurons: got neuron options")
        else:
            linear, make_act = nn.Linear, nn.ReLU
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [linear(width, hidden_features), make_act()]
            width = hidden_features
        layers.append(linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, num_layers={self.num_layers}"
        )

    @property
    def activity_names(self) -> tuple[str, ...]:
        """Names of the populations :meth:`run` reports (its LIF layers), in order."""
        return tuple(
            f"net.{i}" for i, layer in enumerate(self.net) if isinstance(layer, SpikingNeuron)
        )

    def forward(
        self, x_TNI: torch.Tensor, *, activity: list[Activity] | None = None
    ) -> torch.Tensor:
        """``[T, N, in]`` -> ``[T, N, out]`` current.

        Args:
            x_TNI: input.
            activity: when given, the :class:`~spiking_moe.activity.Activity` of the LIF
                layers is appended to this caller-owned list (what :meth:`run` uses: the
                return type stays one tensor, and nothing is kept on the module).
        """
        _check_input(x_TNI, self.in_features, type(self).__name__)
        if activity is None:
            return self.net(x_TNI)
        h, parts = x_TNI, []
        for i, layer in enumerate(self.net):
            h = layer(h)
            if isinstance(layer, SpikingNeuron):
                parts.append(Activity.of(f"net.{i}", h))
        activity.append(Activity.concat(parts))
        return h

    def run(self, x_TNI: torch.Tensor) -> ExpertOutput:
        """The current and the spikes of every LIF layer (:class:`ExpertOutput`).

        Runs through ``__call__``, so hooks on the expert fire as for ``expert(x)``.
        """
        activity: list[Activity] = []
        current = self(x_TNI, activity=activity)
        return ExpertOutput(current, activity[0])


class SpikingExpert(_FeedForwardExpert):
    """Spiking feed-forward expert: spikes ``[T, N, in]`` -> synaptic current ``[T, N, out]``.

    Args:
        in_features: input size ``I``.
        hidden_features: size ``U`` of each hidden LIF layer.
        out_features: output size ``O``.
        num_layers: number of hidden ``Linear -> LIF`` layers (>= 1).
        neuron: the hidden populations' :class:`~spiking_moe.args.NeuronArgs`.
        **neuron_options: neuron options by name (``beta``, ``threshold``, ``reset``,
            ``surrogate``, ...: the fields of :class:`~spiking_moe.args.NeuronArgs`).

    The input is expected to be binary spikes; the MoE layer checks that once per call, so the
    expert does not repeat the check for every routed slice. Zero rows (``N = 0``) are allowed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> expert = SpikingExpert(8, 16, 4, beta=0.9)
        >>> expert(torch.ones(5, 3, 8)).shape
        torch.Size([5, 3, 4])
    """

    spiking = True


class MLPExpert(_FeedForwardExpert):
    """ANN twin of :class:`SpikingExpert`: ``Linear -> ReLU -> ... -> Linear``.

    Same arguments (no neuron settings) and the same parameter names, so the equivalent-ANN
    baseline has exactly the layers of the spiking model. Input ``[T, N, in]`` (``T = 1`` for
    the one-step ANN), output ``[T, N, out]``.

    Args:
        in_features: input size ``I``.
        hidden_features: size ``U`` of each hidden ``ReLU`` layer.
        out_features: output size ``O``.
        num_layers: number of hidden ``Linear -> ReLU`` layers (>= 1).
        neuron: accepted for a signature shared with :class:`SpikingExpert`; must be None (an
            ANN has no neurons: anything else is a TypeError).
        **neuron_options: likewise; must be empty.
    """

    spiking = False
