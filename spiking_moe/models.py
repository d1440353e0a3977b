r"""Classifiers built from the MoE layer, and the baselines every comparison uses.

Legend: ``T`` time steps, ``B`` batch, ``F`` input features, ``H`` hidden features,
``C`` classes.

All three classifiers share one layout, so that their modules line up for energy counting:
``input_layer`` (Linear on the raw input, analog or spikes: the model is encoder-agnostic) ->
``input_neuron`` -> ``layers`` (``num_moe_layers`` blocks) -> ``readout`` (Linear to ``C``).

* :class:`SpikingMoEClassifier`: each block is a :class:`~spiking_moe.moe.SpikingMoE` with
  ``num_experts`` :class:`~spiking_moe.experts.SpikingExpert` (``H -> expert_hidden -> H``).
  ``dense=True`` runs every expert on every token (the dense-MoE baseline).
* :class:`DenseSNNClassifier`: each block is one dense spiking expert of width
  ``k * expert_hidden`` plus a LIF, i.e. the same *active* parameters per token as ``k``
  experts. Exactly: a MoE block's active parameters (router plus ``k`` experts) exceed the
  dense block's by the router (``H E + E``) and ``(k - 1) H`` output biases
  (:func:`active_parameter_count`).
* :class:`ANNClassifier`: the same layers with ``ReLU`` instead of ``LIF``, one time step (a
  ``[T, B, F]`` input is averaged over ``T``), with the same MoE structure (a router on the
  activations, :class:`~spiking_moe.experts.MLPExpert` experts); ``num_experts=None`` gives the
  dense ANN with blocks of width ``k * expert_hidden``.

Readouts of the spiking models, from the last block's spikes :math:`s_t`:
``"count"``: :math:`\text{logits} = W \frac{1}{T}\sum_t s_t + b` (the spike counts, which equals
the mean over ``T`` of the readout current); ``"membrane"``: the readout current
:math:`I_t = W s_t + b` drives a non-firing leaky integrator :math:`v_t = \beta v_{t-1} + I_t`
and :math:`\text{logits} = \frac{1}{T}\sum_t v_t`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .experts import MLPExpert, SpikingExpert
from .moe import SpikingMoE
from .neurons import LIF
from .router import RateRouter, RoutingInfo, SpikingRouter
from .synapses import EventLinear

__all__ = [
    "ANNClassifier",
    "ClassifierOutput",
    "DenseSNNClassifier",
    "READOUTS",
    "ROUTERS",
    "SpikingMoEClassifier",
    "active_parameter_count",
]

READOUTS = ("count", "membrane")
ROUTERS = ("rate", "spiking")


class ClassifierOutput(NamedTuple):
    """Result of every classifier here.

    Attributes:
        logits: ``[B, C]``.
        aux_loss: scalar, the sum of the MoE layers' balancing losses (zero without MoE).
        routing: one :class:`~spiking_moe.router.RoutingInfo` per MoE layer, in order.
        activity: spikes of every LIF population, named like the modules
            (``input_neuron``, ``layers.<l>.experts.<e>.net.1``, ``layers.<l>.neuron``, ...);
            empty for the ANN. Training reads it for the activity penalty and firing rates.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple[RoutingInfo, ...]
    activity: Activity


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


class _DenseBlock(nn.Module):
    """``expert`` (current) followed by ``neuron``: the dense stand-in for a MoE layer.

    ``forward`` returns ``(spikes, activity)``: the same pair every call.
    """

    def __init__(self, expert: nn.Module, neuron: nn.Module):
        super().__init__()
        self.expert = expert
        self.neuron = neuron

    def forward(self, x_TBH: torch.Tensor) -> tuple[torch.Tensor, Activity]:
        current, activity = self.expert.run(x_TBH)
        out = self.neuron(current)
        parts = [activity.prefixed("expert")]
        if isinstance(self.neuron, LIF):
            parts.append(Activity.of("neuron", out))
        return out, Activity.concat(parts)


class _Classifier(nn.Module):
    """Shared forward: input layer, blocks (MoE or dense), readout."""

    in_features: int

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{name} input must be [T, B, {self.in_features}], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} input must be floating point, got dtype {x.dtype}")
        return x

    def _blocks(self, h_TBH: torch.Tensor, activity: list[Activity]):
        """Run the blocks; append their activity (named ``layers.<l>.*``) to ``activity``."""
        routing: list[RoutingInfo] = []
        aux = h_TBH.new_zeros(())
        for l, layer in enumerate(self.layers):
            if isinstance(layer, SpikingMoE):
                out = layer(h_TBH)
                h_TBH = out.spikes
                routing.append(out.routing)
                aux = aux + out.aux_loss
                activity.append(out.activity.prefixed(f"layers.{l}"))
            else:
                h_TBH, block_activity = layer(h_TBH)
                activity.append(block_activity.prefixed(f"layers.{l}"))
        return h_TBH, aux, tuple(routing)


class _SpikingClassifier(_Classifier):
    def _init_io(self, in_features, num_classes, hidden_features, readout, neuron_kwargs):
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("hidden_features", hidden_features)
        _check_choice("readout", readout, READOUTS)
        self.in_features = in_features
        self.num_classes = num_classes
        self.readout_mode = readout
        # EventLinear: event-driven products on spikes (and on sparse rates) when gradients
        # are off; an analog input is dense and takes the dense product.
        self.input_layer = EventLinear(in_features, hidden_features)
        self.input_neuron = LIF(**neuron_kwargs)
        self.readout = EventLinear(hidden_features, num_classes)
        if readout == "membrane" and self.input_neuron.beta.dim() != 0:
            raise ValueError("readout='membrane' needs a scalar beta, got a per-neuron beta")

    def forward(self, x_TBF: torch.Tensor) -> ClassifierOutput:
        """Classify a ``[T, B, F]`` input (analog current or spikes) -> :class:`ClassifierOutput`."""
        x_TBF = self._check_input(x_TBF)
        h_TBH = self.input_neuron(self.input_layer(x_TBF))
        activity = [Activity.of("input_neuron", h_TBH)]
        h_TBH, aux, routing = self._blocks(h_TBH, activity)
        if self.readout_mode == "count":
            logits = self.readout(h_TBH.mean(0))
        else:
            logits = _leaky_mean(self.readout(h_TBH), self.input_neuron.beta.clamp(0, 1))
        return ClassifierOutput(logits, aux, routing, Activity.concat(activity))


def _leaky_mean(current_TBC: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mean over T of ``v_t = beta v_{t-1} + I_t`` (``v_{-1} = 0``) without a time loop.

    ``sum_t v_t = sum_s I_s * sum_{j=0}^{T-1-s} beta^j``.
    """
    T = current_TBC.shape[0]
    powers_T = beta.to(current_TBC.dtype) ** torch.arange(T, device=current_TBC.device)
    weight_T = torch.cumsum(powers_T, 0).flip(0)
    return torch.einsum("s,sbc->bc", weight_T, current_TBC) / T


class SpikingMoEClassifier(_SpikingClassifier):
    """Spiking MoE classifier: input Linear -> LIF -> MoE layers -> readout.

    Args:
        in_features: input size ``F``.
        num_classes: ``C``.
        hidden_features: ``H``, width between layers.
        num_experts: experts per MoE layer ``E``.
        k: experts per token.
        num_moe_layers: number of MoE layers.
        expert_hidden: hidden width of each expert.
        expert_layers: hidden LIF layers per expert.
        readout: "count" or "membrane" (module docstring).
        router: "rate" (:class:`~spiking_moe.router.RateRouter`) or "spiking"
            (:class:`~spiking_moe.router.SpikingRouter`).
        dense: start in dense-MoE mode (every expert on every token).
        window, capacity_factor, noise, balance_weight, z_loss_weight, bias_update_rate,
        renormalize:
            passed to every router.
        **neuron_kwargs: passed to every LIF (``beta``, ``threshold``, ``reset``,
            ``surrogate``, ...); the membrane readout uses the same ``beta`` (a scalar).

    Shape:
        ``forward(x)``: ``[T, B, F]`` -> :class:`ClassifierOutput` (logits ``[B, C]``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = SpikingMoEClassifier(10, 3, hidden_features=16, num_experts=4, k=2,
        ...                              expert_hidden=8)
        >>> out = model(torch.rand(5, 2, 10))
        >>> out.logits.shape, len(out.routing)
        (torch.Size([2, 3]), 1)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden_features: int = 128,
        num_experts: int = 8,
        k: int = 2,
        num_moe_layers: int = 1,
        expert_hidden: int = 64,
        expert_layers: int = 1,
        readout: str = "count",
        router: str = "rate",
        dense: bool = False,
        window: int | None = None,
        capacity_factor: float | None = None,
        noise: float = 0.0,
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        bias_update_rate: float = 1e-3,
        renormalize: bool = True,
        **neuron_kwargs,
    ):
        super().__init__()
        _check_positive_int("num_moe_layers", num_moe_layers)
        _check_choice("router", router, ROUTERS)
        self._init_io(in_features, num_classes, hidden_features, readout, neuron_kwargs)
        router_kwargs = dict(
            window=window,
            capacity_factor=capacity_factor,
            noise=noise,
            balance_weight=balance_weight,
            z_loss_weight=z_loss_weight,
            bias_update_rate=bias_update_rate,
            renormalize=renormalize,
        )
        layers = []
        for _ in range(num_moe_layers):
            if router == "rate":
                gate = RateRouter(hidden_features, num_experts, k, **router_kwargs)
            else:
                gate = SpikingRouter(
                    hidden_features, num_experts, k, **router_kwargs, **neuron_kwargs
                )
            experts = [
                SpikingExpert(
                    hidden_features,
                    expert_hidden,
                    hidden_features,
                    num_layers=expert_layers,
                    **neuron_kwargs,
                )
                for _ in range(num_experts)
            ]
            # The input is LIF output, binary by construction: no need to check it per call.
            layers.append(
                SpikingMoE(
                    router=gate,
                    experts=experts,
                    neuron=LIF(**neuron_kwargs),
                    dense=dense,
                    check_spikes=False,
                )
            )
        self.layers = nn.ModuleList(layers)


class DenseSNNClassifier(_SpikingClassifier):
    """Dense spiking baseline with the active parameters of :class:`SpikingMoEClassifier`.

    Each MoE layer becomes one :class:`~spiking_moe.experts.SpikingExpert` of width
    ``k * expert_hidden`` followed by a LIF (block submodules ``expert`` and ``neuron``).
    Takes the same arguments as the MoE classifier except the routing ones.

    Example:
        >>> model = DenseSNNClassifier(10, 3, hidden_features=16, k=2, expert_hidden=8)
        >>> model(torch.rand(5, 2, 10)).logits.shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden_features: int = 128,
        k: int = 2,
        num_moe_layers: int = 1,
        expert_hidden: int = 64,
        expert_layers: int = 1,
        readout: str = "count",
        **neuron_kwargs,
    ):
        super().__init__()
        _check_positive_int("num_moe_layers", num_moe_layers)
        _check_positive_int("k", k)
        self._init_io(in_features, num_classes, hidden_features, readout, neuron_kwargs)
        self.layers = nn.ModuleList(
            _DenseBlock(
                SpikingExpert(
                    hidden_features,
                    k * expert_hidden,
                    hidden_features,
                    num_layers=expert_layers,
                    **neuron_kwargs,
                ),
                LIF(**neuron_kwargs),
            )
            for _ in range(num_moe_layers)
        )


class ANNClassifier(_Classifier):
    """The equivalent ANN: same layers, ``ReLU`` instead of ``LIF``, one time step.

    Args:
        in_features, num_classes, hidden_features, k, num_moe_layers, expert_hidden,
            expert_layers, dense, capacity_factor, noise, balance_weight, z_loss_weight,
            bias_update_rate, renormalize: as in :class:`SpikingMoEClassifier`.
        num_experts: experts per MoE layer (routed by a
            :class:`~spiking_moe.router.RateRouter` on the activations, ``window=None``), or
            None for the dense ANN whose blocks have width ``k * expert_hidden``.

    Shape:
        ``forward(x)``: ``[T, B, F]`` (averaged over ``T``) or ``[B, F]`` ->
        :class:`ClassifierOutput`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> ann = ANNClassifier(10, 3, hidden_features=16, num_experts=4, k=2, expert_hidden=8)
        >>> x = torch.rand(5, 2, 10)
        >>> torch.allclose(ann(x).logits, ann(x.mean(0)).logits)
        True
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden_features: int = 128,
        num_experts: int | None = 8,
        k: int = 2,
        num_moe_layers: int = 1,
        expert_hidden: int = 64,
        expert_layers: int = 1,
        dense: bool = False,
        capacity_factor: float | None = None,
        noise: float = 0.0,
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        bias_update_rate: float = 1e-3,
        renormalize: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("num_classes", num_classes),
            ("hidden_features", hidden_features),
            ("k", k),
            ("num_moe_layers", num_moe_layers),
        ):
            _check_positive_int(name, value)
        self.in_features = in_features
        self.num_classes = num_classes
        self.input_layer = nn.Linear(in_features, hidden_features)
        self.input_neuron = nn.ReLU()
        layers: list[nn.Module] = []
        for _ in range(num_moe_layers):
            if num_experts is None:
                expert = MLPExpert(
                    hidden_features, k * expert_hidden, hidden_features, num_layers=expert_layers
                )
                layers.append(_DenseBlock(expert, nn.ReLU()))
                continue
            layers.append(
                SpikingMoE(
                    router=RateRouter(
                        hidden_features,
                        num_experts,
                        k,
                        capacity_factor=capacity_factor,
                        noise=noise,
                        balance_weight=balance_weight,
                        z_loss_weight=z_loss_weight,
                        bias_update_rate=bias_update_rate,
                        renormalize=renormalize,
                    ),
                    experts=[
                        MLPExpert(
                            hidden_features,
                            expert_hidden,
                            hidden_features,
                            num_layers=expert_layers,
                        )
                        for _ in range(num_experts)
                    ],
                    neuron=nn.ReLU(),
                    dense=dense,
                    check_spikes=False,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.readout = nn.Linear(hidden_features, num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        """Classify ``[T, B, F]`` (mean over ``T``) or ``[B, F]`` -> :class:`ClassifierOutput`."""
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            x = x.unsqueeze(0)
        x_1BF = self._check_input(x).mean(0, keepdim=True)
        h_1BH = self.input_neuron(self.input_layer(x_1BF))
        activity: list[Activity] = []  # ReLU layers: no spikes to report
        h_1BH, aux, routing = self._blocks(h_1BH, activity)
        return ClassifierOutput(self.readout(h_1BH[0]), aux, routing, Activity.concat(activity))


def active_parameter_count(model: nn.Module) -> int:
    """Parameters one token uses: all of them, except that in each
    :class:`~spiking_moe.moe.SpikingMoE` only ``k`` of the ``E`` (equal-sized) experts count.
    """
    total = sum(p.numel() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, SpikingMoE):
            sizes = [sum(p.numel() for p in e.parameters()) for e in layer.experts]
            if len(set(sizes)) > 1:
                raise ValueError(f"experts differ in size {sizes}: active count is ambiguous")
            # Under expert parallelism this process holds len(sizes) of the E experts.
            total += (layer.router.k - len(sizes)) * sizes[0]
    return total
