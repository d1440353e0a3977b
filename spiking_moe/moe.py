r"""The spiking mixture-of-experts layer.

Shape letters: the package legend (:mod:`spiking_moe`).

For input spikes :math:`x \in \{0,1\}^{T \times N \times D}` the layer computes

.. math::

    I_{t,n} = \sum_{j<K} g_{nj}\, f_{i_{nj}}(x_{\cdot,n})_t, \qquad
    s = \mathrm{LIF}(I),

with the router's choices :math:`(i_{nj}, g_{nj})` and experts :math:`f_e` that return
synaptic current (:mod:`spiking_moe.dispatch`). The output is binary spikes ``[T, ..., O]``.

**Shared experts** (DeepSeekMoE, Dai et al. 2024): ``shared_experts`` :math:`g_1..g_M` run on
every token, ungated, beside the routed top-k: :math:`I = \sum_j g_{nj} f_{i_{nj}}(x) +
\sum_m g_m(x)`. **Shortcut current**: ``forward(x, residual=r)`` adds ``r`` to the current
before the output LIF (a membrane shortcut: the residual enters the neuron's membrane, so the
output stays spikes).

**Sequences** (``[T, B, S, D]``): tokens are the ``N = B S`` positions, flattened
``n = b S + s``. With a capacity limit the drop policy is *first come, first served in
position order* instead of largest gate first: assignments are kept in order of position
(then batch row), so a token at position ``s`` only competes with positions ``<= s`` and a
later position can never evict an earlier one's expert (routing stays causal).

With a windowed router (``window = L``) each (window, token) pair is a separate row for the
experts, routed by that window's ids: the experts run on ``L``-step slices with fresh state
(a token may change experts between windows, so expert state cannot carry over), while the
output LIF integrates over the whole sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .args import GROUPED_GEMM, SPIKE_EXCHANGE
from .dispatch import Assignments
from .neurons import LIF, SpikingNeuron
from .router import RoutingInfo
from .strategies import (
    CPU_GROUPED_MIN_EXPERTS,
    ExpertParallel,
    ExpertParallelExperts,
    ExpertShard,
    ExpertStrategy,
    LocalExperts,
    exchanges_bits,
)

__all__ = [
    "CPU_GROUPED_MIN_EXPERTS",
    "GROUPED_GEMM",
    "SPIKE_EXCHANGE",
    "DenseFFN",
    "MoEOutput",
    "SpikingMoE",
    "moe_layers",
    "set_dense",
    "swapped_strategies",
    "update_router_biases",
]


class MoEOutput(NamedTuple):
    """Result of :class:`SpikingMoE`, and of every FFN of the package's models (a dense one
    reports no routing).

    Attributes:
        spikes: ``[T, B, O]`` (or ``[T, B, S, O]``) output spikes in {0, 1} (the ANN twins'
            FFNs: their real-valued output).
        routing: the router's :class:`~spiking_moe.router.RoutingInfo` (None for a dense FFN).
        aux_loss: scalar balancing loss to add to the task loss (``routing.aux_loss``; 0 for
            a dense FFN).
        activity: spikes of the layer's neuron populations
            (:class:`~spiking_moe.activity.Activity`): ``router.*`` (a spiking router),
            ``experts.<e>.*`` (every expert, idle ones with zero updates),
            ``shared_experts.<m>.*`` and ``neuron`` (the output LIF), named like the
            submodules.
    """

    spikes: torch.Tensor
    routing: RoutingInfo | None
    aux_loss: torch.Tensor
    activity: Activity


def check_binary(x: torch.Tensor, what: str = "input") -> None:
    """Raise ValueError unless every value of ``x`` is exactly 0 or 1 (NaN fails too).

    One reduction on the device and one host sync.
    """
    if bool(((x != 0) & (x != 1)).any()):
        raise ValueError(
            f"{what} must be binary spikes (every value exactly 0 or 1); got values outside "
            f"{{0, 1}} in shape {tuple(x.shape)}. Encode analog data first (spiking_moe.encoding) "
            "or pass check_spikes=False."
        )


def _check_parts(router, experts, shared_experts) -> int | None:
    """Validate the parts; return the experts' common ``out_features`` (None if unknown)."""
    if not isinstance(router, nn.Module):
        raise TypeError(f"router must be an nn.Module, got {type(router).__name__}")
    if not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TypeError("experts must be a non-empty sequence of nn.Module")
    if not all(isinstance(e, nn.Module) for e in shared_experts):
        raise TypeError("shared_experts must be a sequence of nn.Module")
    if len(experts) != router.num_experts:
        raise ValueError(
            f"router has num_experts={router.num_experts} but {len(experts)} experts were given"
        )
    for what, group in (("expert", experts), ("shared expert", shared_experts)):
        for e, expert in enumerate(group):
            expert_in = getattr(expert, "in_features", router.in_features)
            if expert_in != router.in_features:
                raise ValueError(
                    f"{what} {e} has in_features={expert_in}, router has {router.in_features}"
                )
    outs = {getattr(e, "out_features", None) for e in [*experts, *shared_experts]} - {None}
    if len(outs) > 1:
        raise ValueError(f"experts disagree on out_features: {sorted(outs)}")
    return outs.pop() if outs else None


class _StrategyField:
    """A :class:`SpikingMoE` attribute that reads a field of the layer's expert strategy, and
    on assignment swaps the strategy for a copy with the field changed (strategies are frozen,
    so no other layer sharing one sees the change)."""

    def __init__(self, field: str, doc: str, convert=None):
        self.field, self.__doc__, self.convert = field, doc, convert

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer.strategy, self.field)

    def __set__(self, layer, value) -> None:
        value = self.convert(value) if self.convert is not None else value
        layer.strategy = dataclasses.replace(layer.strategy, **{self.field: value})


class SpikingMoE(nn.Module):
    """Spiking MoE layer: router, sparse dispatch to spiking experts, output LIF.

    The forward pass reads: route -> the expert strategy (dispatch, run the experts, combine
    their gated currents: :mod:`spiking_moe.strategies`) -> shared experts -> shortcut current
    -> output neuron.

    Args:
        router: a :class:`~spiking_moe.router.RateRouter` or
            :class:`~spiking_moe.router.SpikingRouter` (anything with ``in_features``,
            ``num_experts``, ``k``, ``window`` that maps ``[T, N, D]`` to ``RoutingInfo``).
        experts: ``E`` modules mapping ``[T, n, D]`` spikes to ``[T, n, O]`` current, e.g.
            :class:`~spiking_moe.experts.SpikingExpert`; stored as ``nn.ModuleList``.
        shared_experts: modules of the same kind computed on every token, ungated, their
            current added to the routed experts' (DeepSeekMoE); empty by default.
        neuron: output neuron on the combined current; None makes a default
            :class:`~spiking_moe.neurons.LIF`. (The ANN baseline passes ``nn.ReLU()``.)
        dense: start as the dense-MoE baseline (every expert on every token, masked by the
            same gates: same outputs, ``E / K`` times the work); the :attr:`dense` property
            and :func:`set_dense` switch it any time.
        check_spikes: check on every call that the input is binary (one reduction and one
            host sync); set False to skip it in training or to feed analog values on purpose.
        grouped_gemm: "auto", "never" or "always": whether the experts run as one grouped
            GEMM per layer (:mod:`spiking_moe.strategies`).
        spike_exchange: "auto", "bits" or "float": how an expert-parallel layer sends its rows
            (bits: 8 spikes per byte, 32x fewer bytes than float32; auto: bits when
            ``check_spikes`` verifies on every call that the input is spikes; "bits" without
            ``check_spikes`` checks the rows it sends).
        expert_parallel: an :class:`~spiking_moe.strategies.ExpertParallel` layout: ``experts``
            are all ``E`` experts (identical on every process, e.g. built from one seed), of
            which this process keeps its ``E / P`` and exchanges tokens with the others
            (:mod:`spiking_moe.parallel`; for a whole model use
            :func:`~spiking_moe.parallel.shard_experts`).
        strategy: how the experts run, given whole (an
            :class:`~spiking_moe.strategies.ExpertStrategy`), instead of ``dense``,
            ``grouped_gemm`` and ``spike_exchange``.

    Shapes:
        ``forward(x)``: ``x`` ``[T, B, D]`` or ``[T, B, S, D]`` -> :class:`MoEOutput` with
        ``spikes`` of the same leading shape and ``O`` features. Tokens are the ``B`` (or
        ``B S``) columns; all ``T`` steps of a token go to the same experts (per window when
        the router is windowed). The ``RoutingInfo`` is over the ``N = B S`` flattened tokens
        (per-token fields ``[W, N, ...]``, ``W = 1`` unwindowed).

    Example:
        >>> from spiking_moe.experts import SpikingExpert
        >>> from spiking_moe.router import RateRouter
        >>> _ = torch.manual_seed(0)
        >>> moe = SpikingMoE(
        ...     router=RateRouter(8, num_experts=4, k=2),
        ...     experts=[SpikingExpert(8, 16, 8) for _ in range(4)],
        ... )
        >>> out = moe(torch.bernoulli(torch.full((6, 5, 8), 0.5)))
        >>> out.spikes.shape, int(out.routing.tokens_per_expert.sum())
        (torch.Size([6, 5, 8]), 10)
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: Sequence[nn.Module],
        shared_experts: Sequence[nn.Module] = (),
        neuron: nn.Module | None = None,
        dense: bool = False,
        check_spikes: bool = True,
        grouped_gemm: str = "auto",
        spike_exchange: str = "auto",
        expert_parallel: ExpertParallel | None = None,
        strategy: ExpertStrategy | None = None,
    ):
        super().__init__()
        experts, shared_experts = list(experts), list(shared_experts)
        self.out_features = _check_parts(router, experts, shared_experts)
        if strategy is None:
            strategy = LocalExperts(grouped_gemm, spike_exchange, bool(dense))
        elif (dense, grouped_gemm, spike_exchange) != (False, "auto", "auto"):
            raise ValueError("pass either strategy or dense/grouped_gemm/spike_exchange, not both")
        if not isinstance(strategy, ExpertStrategy):
            raise TypeError(f"strategy must be an ExpertStrategy, got {type(strategy).__name__}")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared_experts = nn.ModuleList(shared_experts)
        self.neuron = LIF() if neuron is None else neuron
        self.check_spikes = bool(check_spikes)
        self.in_features = router.in_features
        self.strategy = strategy
        self._declare_expert_steps()
        if expert_parallel is not None:
            self.shard_experts(expert_parallel)

    def _declare_expert_steps(self) -> None:
        """Tell the energy counter (:mod:`energy.counting`'s ``energy_time_steps``) that a
        windowed router's experts run on ``L``-step rows: their ANN equivalent is one step per
        (window, token) row, not one per ``L`` of them."""
        self.experts.energy_time_steps = getattr(self.router, "window", None)

    @property
    def num_experts(self) -> int:
        """``E``, all experts of the layer (under expert parallelism, not only the local ones)."""
        return self.router.num_experts

    dense = _StrategyField(
        "every_expert",
        "Whether the layer runs as the dense-MoE baseline (every expert on every token).",
        bool,
    )
    grouped_gemm = _StrategyField("grouped_gemm", "The strategy's grouped_gemm option.")
    spike_exchange = _StrategyField("spike_exchange", "The strategy's spike_exchange option.")

    @property
    def expert_parallel(self) -> ExpertParallel | None:
        """The layer's :class:`~spiking_moe.strategies.ExpertParallel` layout (None: every
        expert in this process)."""
        return getattr(self.strategy, "ep", None)

    def exchanges_bits(self) -> bool:
        """Whether, under expert parallelism, this layer sends its rows as bits."""
        return exchanges_bits(self.spike_exchange, self.check_spikes)

    def shard_experts(self, expert_parallel: ExpertParallel) -> None:
        """Keep only this process's experts and exchange tokens with the others' (not
        collective; :func:`spiking_moe.parallel.shard_experts` does a whole model)."""
        if isinstance(self.experts, ExpertShard):
            raise ValueError("this MoE layer is already expert-parallel")
        if self.num_experts % expert_parallel.size:
            raise ValueError(
                f"{self.num_experts} experts are not divisible by expert_parallel = "
                f"{expert_parallel.size}"
            )
        local = expert_parallel.local_experts(self.num_experts)
        self.experts = ExpertShard({e: self.experts[e] for e in local}, self.num_experts)
        s = self.strategy
        self.strategy = ExpertParallelExperts(
            s.grouped_gemm, s.spike_exchange, s.every_expert, ep=expert_parallel
        )
        self._declare_expert_steps()

    def extra_repr(self) -> str:
        return f"check_spikes={self.check_spikes}, strategy={self.strategy!r}"

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> MoEOutput:
        """Route, run the experts, combine and fire.

        Args:
            x: spikes ``[T, B, D]`` or ``[T, B, S, D]``.
            residual: optional shortcut current of the output's shape, added to the combined
                current before the output neuron (module docstring).
        """
        x_TND, lead = self._flatten(x)
        T, N, _ = x_TND.shape
        routing = self._route(x_TND, lead)
        rows_TXD = _to_windows(x_TND, routing.window)
        experts = self.strategy(
            self.experts, rows_TXD, Assignments.of(routing), checked_spikes=self.check_spikes
        )
        current = _from_windows(experts.current, T, N, routing.window)
        activity = [routing.activity.prefixed("router"), experts.activity]
        for m, expert in enumerate(self.shared_experts):
            shared = expert.run(x_TND)
            current = current + shared.current
            activity.append(shared.activity.prefixed(f"shared_experts.{m}"))
        if residual is not None:
            current = current + _as_current(residual, x, current)
        spikes = self.neuron(current)
        if isinstance(self.neuron, SpikingNeuron):
            activity.append(Activity.of("neuron", spikes))
        spikes = spikes.reshape(*lead, spikes.shape[-1])
        return MoEOutput(spikes, routing, routing.aux_loss, Activity.concat(activity))

    def _route(self, x_TND: torch.Tensor, lead: tuple[int, ...]) -> RoutingInfo:
        if len(lead) != 3:
            return self.router(x_TND)
        # A sequence [T, B, S]: capacity is served in position order, so token n = b S + s
        # has priority s B + b (routing stays causal).
        B, S = lead[1:]
        priority_N = torch.arange(S, device=x_TND.device) * B + torch.arange(
            B, device=x_TND.device
        ).unsqueeze(1)
        return self.router(x_TND, priority_N=priority_N.reshape(-1))

    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SpikingMoE input must be a torch.Tensor, got {type(x).__name__}")
        D = self.in_features
        if x.dim() not in (3, 4):
            raise ValueError(
                f"SpikingMoE input must be [T, B, {D}] or [T, B, S, {D}], "
                f"got {x.dim()} dims, shape {tuple(x.shape)}"
            )
        if x.shape[-1] != D:
            raise ValueError(f"SpikingMoE expects {D} input features, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"SpikingMoE input must be floating point, got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"SpikingMoE input is empty: shape {tuple(x.shape)}")
        if self.check_spikes:
            check_binary(x, "SpikingMoE input")
        return x.reshape(x.shape[0], -1, D), tuple(x.shape[:-1])


class DenseFFN(nn.Module):
    """A dense FFN with the MoE layer's contract: one expert (current) and a neuron, called as
    ``ffn(x, residual=r)`` and returning a :class:`MoEOutput` without routing, so that a model
    runs its MoE layers and their dense twins alike.

    Args:
        expert: a module with ``run(x [T, N, D]) -> (current [T, N, O], activity)``, e.g. a
            :class:`~spiking_moe.experts.SpikingExpert` (or an ANN's
            :class:`~spiking_moe.experts.MLPExpert`).
        neuron: the output neuron (a :class:`~spiking_moe.neurons.LIF`; an ANN's ``nn.ReLU`` or
            ``nn.Identity``).

    Example:
        >>> from spiking_moe.experts import SpikingExpert
        >>> ffn = DenseFFN(SpikingExpert(8, 16, 8), LIF())
        >>> out = ffn(torch.ones(4, 2, 3, 8))
        >>> out.spikes.shape, out.routing, out.activity.names
        (torch.Size([4, 2, 3, 8]), None, ('expert.net.1', 'neuron'))
    """

    def __init__(self, expert: nn.Module, neuron: nn.Module):
        super().__init__()
        self.expert = expert
        self.neuron = neuron
        self.in_features = getattr(expert, "in_features", None)
        self.out_features = getattr(expert, "out_features", None)

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> MoEOutput:
        """``x`` ``[T, B, D]`` or ``[T, B, S, D]`` (tokens flattened for the expert)."""
        lead = x.shape[:-1]
        current, activity = self.expert.run(x.reshape(x.shape[0], -1, x.shape[-1]))
        if residual is not None:
            current = current + _as_current(residual, x, current)
        out = self.neuron(current)
        parts = [activity.prefixed("expert")]
        if isinstance(self.neuron, SpikingNeuron):
            parts.append(Activity.of("neuron", out))
        out = out.reshape(*lead, out.shape[-1])
        return MoEOutput(out, None, x.new_zeros(()), Activity.concat(parts))


def _as_current(residual: torch.Tensor, x: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The shortcut current in the combined current's ``[T, N, O]`` layout (shape checked)."""
    if residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != current.shape[-1]:
        raise ValueError(
            f"residual must have shape {(*x.shape[:-1], current.shape[-1])}, "
            f"got {tuple(residual.shape)}"
        )
    return residual.reshape(current.shape)


def _to_windows(x_TND: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[T, N, D]`` -> ``[L, W N, D]``: window ``w``'s steps of token ``n`` in column ``w N + n``
    (``x`` itself without windows).

    The last window is zero-padded to ``L`` steps; :func:`_from_windows` cuts the padding off.
    """
    if window is None:
        return x_TND
    T, N, D = x_TND.shape
    W = -(-T // window)
    padded = nn.functional.pad(x_TND, (0, 0, 0, 0, 0, W * window - T))
    return padded.view(W, window, N, D).transpose(0, 1).reshape(window, W * N, D)


def _from_windows(y_LXO: torch.Tensor, T: int, N: int, window: int | None) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``[L, W N, O]`` -> ``[T, N, O]``."""
    if window is None:
        return y_LXO
    L, X, O = y_LXO.shape
    W = X // N
    return y_LXO.view(L, W, N, O).transpose(0, 1).reshape(W * L, N, O)[:T]


def moe_layers(model: nn.Module) -> list[SpikingMoE]:
    """The :class:`SpikingMoE` layers of ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, SpikingMoE)]


@contextlib.contextmanager
def swapped_strategies(model: nn.Module, **changes) -> Iterator[list[SpikingMoE]]:
    """Run every MoE layer of ``model`` with its expert strategy's fields changed (e.g.
    ``every_expert=True``: the dense baseline; ``grouped_gemm="never"``: one call per expert,
    which hooks see), restoring the strategies afterwards, also on error.

    Args:
        model: a module; its :class:`SpikingMoE` layers (:func:`moe_layers`) are changed, a
            model without any is run as it is.
        **changes: fields of the layers' :class:`~spiking_moe.strategies.ExpertStrategy`
            (``grouped_gemm``, ``spike_exchange``, ``every_expert``) and their new values, set
            on every layer by :func:`dataclasses.replace` (an unknown field is a TypeError).

    Yields:
        The :class:`SpikingMoE` layers that were changed, in ``model.modules()`` order.

    Example:
        >>> from spiking_moe.models import SpikingMoEClassifier
        >>> model = SpikingMoEClassifier(4, 2, hidden_features=16, num_experts=4, k=1)
        >>> with swapped_strategies(model, every_expert=True) as layers:
        ...     [layer.dense for layer in layers]
        [True]
        >>> model.layers[0].dense
        False
    """
    layers = moe_layers(model)
    saved = [layer.strategy for layer in layers]
    try:
        for layer, strategy in zip(layers, saved, strict=True):
            layer.strategy = dataclasses.replace(strategy, **changes)
        yield layers
    finally:
        for layer, strategy in zip(layers, saved, strict=True):
            layer.strategy = strategy


def set_dense(model: nn.Module, dense: bool) -> int:
    """Set :attr:`SpikingMoE.dense` on every MoE layer inside ``model``.

    Args:
        model: a module; each :class:`SpikingMoE` among its submodules (``model`` itself
            included) is switched.
        dense: True for the dense-MoE baseline (every expert on every token, masked by the
            gates), False for sparse dispatch.

    Returns:
        The number of MoE layers changed (0 if the model has none).
    """
    layers = moe_layers(model)
    for layer in layers:
        layer.dense = bool(dense)
    return len(layers)


def update_router_biases(
    model: nn.Module,
    routing: Sequence[RoutingInfo] | Sequence[Sequence[RoutingInfo]],
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Aux-loss-free balancing step for every MoE layer of ``model``.

    Args:
        model: a module whose :class:`SpikingMoE` layers, in ``model.modules()`` order, are
            the ones that produced ``routing`` (true for the models in :mod:`spiking_moe.models`
            and :mod:`spiking_moe.transformer`, whose output's ``routing`` follows that order).
        routing: one :class:`RoutingInfo` per MoE layer, or a sequence of such tuples (one per
            micro-batch since the last optimizer step) whose loads are summed per layer.
        reduce: applied to the summed loads before the update (one tensor, one row of ``E``
            loads per MoE layer), e.g. a sum over data-parallel ranks, so that every rank takes
            the step of the global batch.
    """
    layers = moe_layers(model)
    routing = list(routing)
    batches = [routing] if routing and isinstance(routing[0], RoutingInfo) else routing
    for batch in batches:
        if len(batch) != len(layers):
            raise ValueError(
                f"model has {len(layers)} MoE layers but {len(batch)} RoutingInfo were given"
            )
    if not layers or not batches:
        return
    with torch.no_grad():
        layer_loads = torch.stack(
            [
                torch.stack([batch[i].selected_load() for batch in batches]).sum(0)
                for i in range(len(layers))
            ]
        )
        if reduce is not None:
            layer_loads = reduce(layer_loads)
        for layer, load_E in zip(layers, layer_loads, strict=True):
            layer.router.update_bias_from_load(load_E)
