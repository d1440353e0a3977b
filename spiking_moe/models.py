r"""Classifiers built from the MoE layer, and the baselines every comparison uses.

Shape letters: the package legend (:mod:`spiking_moe`); ``F`` the data's features, ``D`` the
hidden width, ``V`` the classes.

All three classifiers are built from one :class:`~spiking_moe.args.ModelArgs` (the twins of a
comparison take the same args) and share one layout, so that their modules line up for energy
counting: ``input_layer`` (Linear on the raw input, analog or spikes: the model is
encoder-agnostic) -> ``input_neuron`` -> ``layers`` (``num_layers`` FFNs, each returning a
:class:`~spiking_moe.moe.MoEOutput`) -> ``readout`` (Linear to ``V``).

* :class:`SpikingMoEClassifier`: each layer is a :class:`~spiking_moe.moe.SpikingMoE` with
  ``moe.num_experts`` :class:`~spiking_moe.experts.SpikingExpert` (``D -> expert.hidden -> D``).
  ``dense=True`` runs every expert on every token (the dense-MoE baseline).
* :class:`DenseSNNClassifier`: each layer is one dense spiking expert of width
  ``args.active_ffn_hidden`` (``k * expert.hidden``, plus the shared experts' widths) and a
  LIF (:class:`~spiking_moe.moe.DenseFFN`), i.e. the same *active* parameters per token as the
  MoE. Exactly: a MoE layer's active parameters (router plus ``k`` experts) exceed the dense
  layer's by the router (``D E + E``) and ``(k - 1) D`` output biases
  (:func:`active_parameter_count`).
* :class:`ANNClassifier`: the same layers with ``ReLU`` instead of ``LIF``, one time step (a
  ``[T, B, F]`` input is averaged over ``T``), with the same MoE structure (a rate router on the
  activations, :class:`~spiking_moe.experts.MLPExpert` experts) when ``moe.num_experts > 1``,
  else the dense ANN with layers of width ``args.active_ffn_hidden``.

Readouts of the spiking models, from the last layer's spikes :math:`s_t`:
``"count"``: :math:`\text{logits} = W \frac{1}{T}\sum_t s_t + b` (the spike counts, which equals
the mean over ``T`` of the readout current); ``"membrane"``: the readout current
:math:`I_t = W s_t + b` drives a non-firing leaky integrator :math:`v_t = \beta v_{t-1} + I_t`
and :math:`\text{logits} = \frac{1}{T}\sum_t v_t`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .activity import Activity
from .args import READOUTS, ModelArgs, with_options
from .args import ROUTER_KINDS as ROUTERS
from .experts import MLPExpert, SpikingExpert
from .moe import DenseFFN, SpikingMoE
from .neurons import make_neuron, plain_neuron_options
from .router import RateRouter, RoutingInfo, build_router
from .strategies import LocalExperts
from .synapses import EventLinear

__all__ = [
    "READOUTS",
    "ROUTERS",
    "ANNClassifier",
    "ClassifierOutput",
    "DenseSNNClassifier",
    "ModelOutput",
    "SpikingMoEClassifier",
    "active_parameter_count",
    "model_args",
    "moe_ffn",
]


class ModelOutput(NamedTuple):
    """Result of every model of the package (the classifiers here and the language models of
    :mod:`spiking_moe.transformer`): what training reads, so the trainer never reaches into a
    model.

    Attributes:
        logits: ``[B, V]`` (a language model: ``[B, S, V]``).
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


#: The classifiers' name for :class:`ModelOutput`.
ClassifierOutput = ModelOutput


def model_args(args: ModelArgs | None, options: Mapping[str, Any], *, who: str) -> ModelArgs:
    """``args`` (None: the defaults) with a constructor's keyword options applied (flat names
    such as ``num_experts``, ``noise``, ``beta``: :data:`spiking_moe.args.FLAT_NAMES`)."""
    if args is None:
        args = ModelArgs()
    elif not isinstance(args, ModelArgs):
        raise TypeError(f"args must be ModelArgs or None, got {type(args).__name__}")
    elif type(args) is not ModelArgs:  # e.g. a config's ModelConfig: the args part of it
        args = ModelArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelArgs)})
    return with_options(args, plain_neuron_options(options), who=who)


def moe_ffn(
    args: ModelArgs, *, spiking: bool, neuron: nn.Module, dense: bool = False
) -> SpikingMoE:
    """A MoE FFN of width ``args.hidden_features`` built from ``args``: the router, the routed
    and shared experts (spiking, or the ANN twin's :class:`~spiking_moe.experts.MLPExpert` read
    by a rate router), ``neuron`` on the combined current. Its input is spikes (or the ANN's
    activations) by construction, so the per-call binary check is skipped, and under expert
    parallelism spiking rows travel as bits (``spike_exchange="auto"``; checked as they go)."""
    H, moe = args.hidden_features, args.moe
    if spiking:
        router = build_router(H, moe.num_experts, moe.k, args.router, args.neuron)

        def make_expert(hidden: int) -> nn.Module:
            return SpikingExpert(H, hidden, H, num_layers=args.expert.layers, neuron=args.neuron)
    else:
        router = RateRouter(H, moe.num_experts, moe.k, args=args.router.replace(kind="rate"))

        def make_expert(hidden: int) -> nn.Module:
            return MLPExpert(H, hidden, H, num_layers=args.expert.layers)

    exchange = moe.spike_exchange
    if exchange == "auto":
        # Binary spikes travel as bits; counts (multi-level neurons) and currents as floats.
        exchange = "bits" if spiking and args.neuron.kind == "lif" else "float"
    return SpikingMoE(
        router=router,
        experts=[make_expert(args.expert.hidden) for _ in range(moe.num_experts)],
        shared_experts=[make_expert(args.shared_hidden) for _ in range(moe.shared_experts)],
        neuron=neuron,
        check_spikes=False,
        strategy=LocalExperts(moe.grouped_gemm, exchange, dense),
    )


def dense_ffn(
    args: ModelArgs, *, spiking: bool, neuron: nn.Module, width: int | None = None
) -> DenseFFN:
    """The dense twin of :func:`moe_ffn`: one expert of ``width`` (default
    ``args.active_ffn_hidden``, the MoE's active width) and ``neuron``."""
    H, layers = args.hidden_features, args.expert.layers
    width = args.active_ffn_hidden if width is None else width
    if spiking:
        expert = SpikingExpert(H, width, H, num_layers=layers, neuron=args.neuron)
    else:
        expert = MLPExpert(H, width, H, num_layers=layers)
    return DenseFFN(expert, neuron)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def run_layers(layers: nn.ModuleList, h: torch.Tensor, activity: list[Activity], prefix: str):
    """Run FFN layers (each returning a :class:`~spiking_moe.moe.MoEOutput`) in order; append
    their activity (named ``<prefix>.<l>.*``) to ``activity``. Returns ``(h, aux_loss,
    routing)``."""
    routing: list[RoutingInfo] = []
    aux = h.new_zeros(())
    for l, layer in enumerate(layers):
        out = layer(h)
        h = out.spikes
        aux = aux + out.aux_loss
        if out.routing is not None:
            routing.append(out.routing)
        activity.append(out.activity.prefixed(f"{prefix}.{l}"))
    return h, aux, tuple(routing)


class _Classifier(nn.Module):
    """What the three classifiers share: one constructor (sizes, args, options), the input
    check and the readout mode. Each builds its layers in :meth:`_build`."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        args: ModelArgs | None = None,
        dense: bool = False,
        **options,
    ):
        super().__init__()
        # num_experts=None asks for the dense model (the ANN twin; the dense SNN is dense).
        without_experts = options.get("num_experts", 0) is None
        if without_experts:
            del options["num_experts"]
        args = model_args(args, options, who=type(self).__name__)
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        self.args = args
        self.in_features = in_features
        self.num_classes = num_classes
        routed = not without_experts and args.moe.num_experts > 1
        if without_experts and isinstance(self, SpikingMoEClassifier):
            raise ValueError("SpikingMoEClassifier needs num_experts (None builds no MoE layer)")
        self._build(args, dense=dense, routed=routed)

    def _build(self, args: ModelArgs, *, dense: bool, routed: bool) -> None:
        raise NotImplementedError

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

    @property
    def readout_mode(self) -> str:
        return self.args.readout


class _SpikingClassifier(_Classifier):
    def _init_io(self, args: ModelArgs) -> None:
        # EventLinear: event-driven products on spikes (and on sparse rates) when gradients
        # are off; an analog input is dense and takes the dense product.
        self.input_layer = EventLinear(self.in_features, args.hidden_features)
        self.input_neuron = make_neuron(args.neuron)
        self.readout = EventLinear(args.hidden_features, self.num_classes)
        if args.readout == "membrane" and self.input_neuron.beta.dim() != 0:
            raise ValueError("readout='membrane' needs a scalar beta, got a per-neuron beta")

    def forward(self, x_TBF: torch.Tensor) -> ModelOutput:
        """Classify a ``[T, B, F]`` input (analog current or spikes) -> :class:`ModelOutput`."""
        x_TBF = self._check_input(x_TBF)
        h_TBD = self.input_neuron(self.input_layer(x_TBF))
        activity = [Activity.of("input_neuron", h_TBD)]
        h_TBD, aux, routing = run_layers(self.layers, h_TBD, activity, "layers")
        if self.args.readout == "count":
            logits = self.readout(h_TBD.mean(0))
        else:
            logits = leaky_mean(self.readout(h_TBD), self.input_neuron.beta.clamp(0, 1))
        return ModelOutput(logits, aux, routing, Activity.concat(activity))


def leaky_mean(current_TBV: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mean over T of ``v_t = beta v_{t-1} + I_t`` (``v_{-1} = 0``) without a time loop.

    ``sum_t v_t = sum_s I_s * sum_{j=0}^{T-1-s} beta^j``.
    """
    T = current_TBV.shape[0]
    powers_T = beta.to(current_TBV.dtype) ** torch.arange(T, device=current_TBV.device)
    weight_T = torch.cumsum(powers_T, 0).flip(0)
    return torch.einsum("s,sbc->bc", weight_T, current_TBV) / T


class SpikingMoEClassifier(_SpikingClassifier):
    """Spiking MoE classifier: input Linear -> LIF -> MoE layers -> readout.

    Args:
        in_features: input size ``F``.
        num_classes: number of classes ``V``.
        args: the model's :class:`~spiking_moe.args.ModelArgs` (None: the defaults).
        dense: start in dense-MoE mode (every expert on every token).
        **options: model options by name, flat (``hidden_features``, ``num_experts``, ``k``,
            ``num_moe_layers``, ``expert_hidden``, ``expert_layers``, ``readout``, ``router``
            ("rate" or "spiking"), ``window``, ``capacity_factor``, ``noise``,
            ``balance_weight``, ``z_loss_weight``, ``bias_update_rate``, ``renormalize``, and
            every neuron option: ``beta``, ``threshold``, ``reset``, ``surrogate``, ...;
            :data:`spiking_moe.args.FLAT_NAMES`) or nested (``router=RouterArgs(...)``). The
            membrane readout uses the neurons' ``beta`` (a scalar).

    Shape:
        ``forward(x)``: ``[T, B, F]`` -> :class:`ModelOutput` (logits ``[B, V]``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = SpikingMoEClassifier(10, 3, hidden_features=16, num_experts=4, k=2,
        ...                              expert_hidden=8)
        >>> out = model(torch.rand(5, 2, 10))
        >>> out.logits.shape, len(out.routing), model.args.moe.num_experts
        (torch.Size([2, 3]), 1, 4)
    """

    def _build(self, args: ModelArgs, *, dense: bool, routed: bool) -> None:
        self._init_io(args)
        self.layers = nn.ModuleList(
            moe_ffn(args, spiking=True, neuron=make_neuron(args.neuron), dense=dense)
            for _ in range(args.num_layers)
        )


class DenseSNNClassifier(_SpikingClassifier):
    """Dense spiking baseline with the active parameters of :class:`SpikingMoEClassifier`.

    Each MoE layer becomes one :class:`~spiking_moe.experts.SpikingExpert` of width
    ``args.active_ffn_hidden`` followed by a LIF (a :class:`~spiking_moe.moe.DenseFFN`,
    submodules ``expert`` and ``neuron``). Takes the same arguments as the MoE classifier (so
    the twins take one set of args; the routing options and ``dense`` change nothing here).

    Args:
        in_features: input size ``F``.
        num_classes: number of classes ``V``.
        args: the model's :class:`~spiking_moe.args.ModelArgs` (None: the defaults); the
            layers' width is its ``active_ffn_hidden``
            (``k * expert.hidden + shared_experts * shared_hidden``).
        dense: accepted for the MoE classifier's signature; no effect.
        **options: model options by name, as for :class:`SpikingMoEClassifier` (flat, e.g.
            ``hidden_features``, ``k``, ``expert_hidden``, ``readout``, ``beta``, or nested).
            ``k`` and the expert widths set the layers' width; ``num_experts`` and the router
            options are validated and stored in ``args``, and build nothing.

    Shape:
        ``forward(x)``: ``[T, B, F]`` -> :class:`ModelOutput` (logits ``[B, V]``, no routing,
        zero ``aux_loss``).

    Example:
        >>> model = DenseSNNClassifier(10, 3, hidden_features=16, k=2, expert_hidden=8)
        >>> model(torch.rand(5, 2, 10)).logits.shape
        torch.Size([2, 3])
    """

    def _build(self, args: ModelArgs, *, dense: bool, routed: bool) -> None:
        self._init_io(args)
        self.layers = nn.ModuleList(
            dense_ffn(args, spiking=True, neuron=make_neuron(args.neuron))
            for _ in range(args.num_layers)
        )


class ANNClassifier(_Classifier):
    """The equivalent ANN: same layers, ``ReLU`` instead of ``LIF``, one time step.

    With ``moe.num_experts > 1`` each layer is routed (a
    :class:`~spiking_moe.router.RateRouter` on the activations, ``window`` unset,
    :class:`~spiking_moe.experts.MLPExpert` experts); ``num_experts=None`` or 1 gives the dense
    ANN, whose layers have width ``args.active_ffn_hidden``.

    Args:
        in_features, num_classes, args, dense: as :class:`SpikingMoEClassifier`.
        **options: as :class:`SpikingMoEClassifier` (the neuron options are accepted and
            unused).

    Shape:
        ``forward(x)``: ``[T, B, F]`` (averaged over ``T``) or ``[B, F]`` ->
        :class:`ModelOutput`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> ann = ANNClassifier(10, 3, hidden_features=16, num_experts=4, k=2, expert_hidden=8)
        >>> x = torch.rand(5, 2, 10)
        >>> torch.allclose(ann(x).logits, ann(x.mean(0)).logits)
        True
    """

    def _build(self, args: ModelArgs, *, dense: bool, routed: bool) -> None:
        self.input_layer = nn.Linear(self.in_features, args.hidden_features)
        self.input_neuron = nn.ReLU()
        if routed:
            unwindowed = args.replace(router=args.router.replace(window=None))
            layers = [
                moe_ffn(unwindowed, spiking=False, neuron=nn.ReLU(), dense=dense)
                for _ in range(args.num_layers)
            ]
        else:
            layers = [
                dense_ffn(args, spiking=False, neuron=nn.ReLU()) for _ in range(args.num_layers)
            ]
        self.layers = nn.ModuleList(layers)
        self.readout = nn.Linear(args.hidden_features, self.num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Classify ``[T, B, F]`` (mean over ``T``) or ``[B, F]`` -> :class:`ModelOutput`."""
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            x = x.unsqueeze(0)
        x_1BF = self._check_input(x).mean(0, keepdim=True)
        h_1BD = self.input_neuron(self.input_layer(x_1BF))
        activity: list[Activity] = []  # ReLU layers: no spikes to report
        h_1BD, aux, routing = run_layers(self.layers, h_1BD, activity, "layers")
        return ModelOutput(self.readout(h_1BD[0]), aux, routing, Activity.concat(activity))


def active_parameter_count(model: nn.Module) -> int:
    """Parameters one token uses: all of them, except that in each
    :class:`~spiking_moe.moe.SpikingMoE` only ``k`` of the ``E`` (equal-sized) experts count.

    Shared experts and routers count in full. The count is the sparse one (``k`` experts) also
    for a layer running as the dense-MoE baseline (:func:`~spiking_moe.moe.set_dense`). Under
    expert parallelism the experts this process does not hold are not in ``model``; the count
    still adds exactly ``k`` experts per layer, so it is the same on every process.

    Args:
        model: any module; its :class:`~spiking_moe.moe.SpikingMoE` layers are found among its
            submodules (a model without one counts every parameter).

    Returns:
        The number of scalar parameters (``numel``) one token is computed with. For a
        :class:`SpikingMoEClassifier` and its :class:`DenseSNNClassifier` twin, they differ by
        the routers and ``k - 1`` experts' output biases per layer (module docstring).

    Raises:
        ValueError: a MoE layer whose experts differ in parameter count.
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
