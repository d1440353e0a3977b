r"""The spiking mixture-of-experts layer.

Legend: ``T`` time steps, ``B`` batch, ``S`` sequence positions, ``N`` tokens (``B`` or
``B S``), ``D`` input features, ``O`` output features, ``E`` experts, ``K`` experts per token,
``W`` routing windows, ``L`` window length.

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

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .dispatch import (
    ExpertsOutput,
    combine,
    dense_masked_with_activity,
    dispatch,
    grouped_supported,
    run_experts_with_activity,
)
from .neurons import LIF
from .router import RoutingInfo

__all__ = [
    "CPU_GROUPED_MIN_EXPERTS",
    "GROUPED_GEMM",
    "SPIKE_EXCHANGE",
    "MoEOutput",
    "SpikingMoE",
    "set_dense",
    "update_router_biases",
]

logger = logging.getLogger(__name__)

GROUPED_GEMM = ("auto", "never", "always")
SPIKE_EXCHANGE = ("auto", "bits", "float")

#: On CPU, "auto" takes the grouped expert GEMM when at least this many experts received rows:
#: per-expert calls win below it, the grouped path above (measured crossover between 16 and 64
#: routed experts on a 2-core AMD EPYC, 2026-12-02; experiments/benchmarks/RESULTS.md).
CPU_GROUPED_MIN_EXPERTS = 32


class MoEOutput(NamedTuple):
    """Result of :class:`SpikingMoE`.

    Attributes:
        spikes: ``[T, B, O]`` (or ``[T, B, S, O]``) output spikes in {0, 1}.
        routing: the router's :class:`~spiking_moe.router.RoutingInfo`.
        aux_loss: scalar balancing loss to add to the task loss (``routing.aux_loss``).
        activity: spikes of the layer's neuron populations
            (:class:`~spiking_moe.activity.Activity`): ``router.*`` (a spiking router),
            ``experts.<e>.*`` (every expert, idle ones with zero updates),
            ``shared_experts.<m>.*`` and ``neuron`` (the output LIF), named like the
            submodules.
    """

    spikes: torch.Tensor
    routing: RoutingInfo
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


class SpikingMoE(nn.Module):
    """Spiking MoE layer: router, sparse dispatch to spiking experts, output LIF.

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
        dense: run every expert on every token, masked by the same gates (the dense-MoE
            baseline; same outputs, ``E / K`` times the work). A plain attribute: toggle it
            any time, or with :func:`set_dense` for a whole model. Under expert parallelism
            every token is sent to every expert's process.
        check_spikes: check on every call that the input is binary (one reduction and one
            host sync); set False to skip it in training or to feed analog values on purpose.
        grouped_gemm: "auto" computes the experts with one grouped GEMM per layer
            (:func:`~spiking_moe.dispatch.run_experts_grouped`) on CUDA, and on CPU when at
            least :data:`CPU_GROUPED_MIN_EXPERTS` experts received rows, whenever
            :func:`~spiking_moe.dispatch.grouped_supported` allows it (same-shaped experts,
            no hooks), else one call per expert; "never" always calls each expert module;
            "always" takes the grouped path on any device when supported (``torch._grouped_mm``
            has a CPU fallback, float32/bfloat16/float16). Same values and gradients either
            way: the grouped path stacks only the experts that received rows, so an expert
            with none gets no gradient (``grad`` stays None) on both paths. On CPU the
            grouped path is flat in the number of experts but slower for few of them (its
            token-major layout costs copies the per-expert calls do not pay), hence the
            threshold (the MoE scaling benchmark in ``experiments/benchmarks/RESULTS.md``).
        spike_exchange: how an expert-parallel layer sends its rows to the experts' processes:
            "bits" (spikes, 8 per byte: 32x fewer bytes than float32), "float", or "auto"
            (default): bits when ``check_spikes`` verifies on every call that the input is
            spikes, floats otherwise. "bits" without ``check_spikes`` checks the rows it sends.
        expert_parallel: an :class:`~spiking_moe.parallel.ExpertParallel` layout: ``experts``
            are all ``E`` experts (identical on every process, e.g. built from one seed), of
            which this process keeps its ``E / P`` and exchanges tokens with the others
            (:mod:`spiking_moe.parallel`). None (default): one process holds every expert. For a
            whole model use :func:`~spiking_moe.parallel.shard_experts`, which also makes the
            processes' weights identical.

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
        expert_parallel=None,
    ):
        super().__init__()
        if grouped_gemm not in GROUPED_GEMM:
            raise ValueError(f"unknown grouped_gemm {grouped_gemm!r}; valid: {list(GROUPED_GEMM)}")
        if spike_exchange not in SPIKE_EXCHANGE:
            raise ValueError(
                f"unknown spike_exchange {spike_exchange!r}; valid: {list(SPIKE_EXCHANGE)}"
            )
        if not isinstance(router, nn.Module):
            raise TypeError(f"router must be an nn.Module, got {type(router).__name__}")
        experts = list(experts)
        if not experts or not all(isinstance(e, nn.Module) for e in experts):
            raise TypeError("experts must be a non-empty sequence of nn.Module")
        if len(experts) != router.num_experts:
            raise ValueError(
                f"router has num_experts={router.num_experts} but {len(experts)} experts were given"
            )
        for e, expert in enumerate(experts):
            expert_in = getattr(expert, "in_features", router.in_features)
            if expert_in != router.in_features:
                raise ValueError(
                    f"expert {e} has in_features={expert_in}, router has {router.in_features}"
                )
        shared_experts = list(shared_experts)
        if not all(isinstance(e, nn.Module) for e in shared_experts):
            raise TypeError("shared_experts must be a sequence of nn.Module")
        for m, expert in enumerate(shared_experts):
            expert_in = getattr(expert, "in_features", router.in_features)
            if expert_in != router.in_features:
                raise ValueError(
                    f"shared expert {m} has in_features={expert_in}, router has {router.in_features}"
                )
        outs = {getattr(expert, "out_features", None) for expert in experts + shared_experts} - {
            None
        }
        if len(outs) > 1:
            raise ValueError(f"experts disagree on out_features: {sorted(outs)}")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared_experts = nn.ModuleList(shared_experts)
        self.neuron = LIF() if neuron is None else neuron
        self.dense = bool(dense)
        self.check_spikes = bool(check_spikes)
        self.grouped_gemm = grouped_gemm
        self.spike_exchange = spike_exchange
        self.in_features = router.in_features
        self.out_features = outs.pop() if outs else None
        self.expert_parallel = None
        self._declare_expert_steps()
        if expert_parallel is not None:
            self.shard_experts(expert_parallel)

    def _declare_expert_steps(self) -> None:
        """Tell the energy counter (:mod:`energy.counting`'s ``energy_time_steps``) that a
        windowed router's experts run on ``L``-step rows: their ANN equivalent is one step per
        (window, token) row, not one per ``L`` of them."""
        window = getattr(self.router, "window", None)
        self.experts.energy_time_steps = window

    @property
    def num_experts(self) -> int:
        """``E``, all experts of the layer (under expert parallelism, not only the local ones)."""
        return self.router.num_experts

    def exchanges_bits(self) -> bool:
        """Whether, under expert parallelism, this layer sends its rows as bits (the
        ``spike_exchange`` argument)."""
        if self.spike_exchange == "float":
            return False
        return self.spike_exchange == "bits" or self.check_spikes

    def shard_experts(self, expert_parallel) -> None:
        """Keep only this process's experts (:mod:`spiking_moe.parallel`); not collective."""
        from .parallel import ExpertShard

        if self.expert_parallel is not None:
            raise ValueError("this MoE layer is already expert-parallel")
        if self.num_experts % expert_parallel.size:
            raise ValueError(
                f"{self.num_experts} experts are not divisible by expert_parallel = "
                f"{expert_parallel.size}"
            )
        local = expert_parallel.local_experts(self.num_experts)
        self.experts = ExpertShard({e: self.experts[e] for e in local}, self.num_experts)
        self.expert_parallel = expert_parallel
        self._declare_expert_steps()

    def extra_repr(self) -> str:
        parallel = f", expert_parallel={self.expert_parallel.size}" if self.expert_parallel else ""
        return f"dense={self.dense}, check_spikes={self.check_spikes}{parallel}"

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> MoEOutput:
        """Route, compute, combine and fire.

        Args:
            x: spikes ``[T, B, D]`` or ``[T, B, S, D]``.
            residual: optional shortcut current of the output's shape, added to the combined
                current before the output neuron (module docstring).
        """
        x_TND, lead = self._flatten(x)
        if len(lead) == 3:  # a sequence: capacity must be served in position order
            routing = self.router(x_TND, priority_N=_position_major(*lead[1:], x.device))
        else:
            routing = self.router(x_TND)
        T, N, _ = x_TND.shape
        window = routing.window
        K = routing.k
        rows_TXD = x_TND if window is None else _to_windows(x_TND, window)
        ids_XK = routing.expert_ids.reshape(-1, K)
        gates_XK = routing.gates.reshape(-1, K)
        if self.dense and self.expert_parallel is not None:
            # The dense baseline across processes: every token dispatched to every expert, its
            # unchosen experts with gate 0 (dense_masked's mask), through the same exchange.
            X = ids_XK.shape[0]
            mask_XE = gates_XK.new_zeros(X, self.num_experts).scatter_add(1, ids_XK, gates_XK)
            every_XE = torch.arange(self.num_experts, device=x.device).expand(X, -1)
            grouped_TRD, plan = dispatch(rows_TXD, every_XE, mask_XE, self.num_experts)
            experts = self._run_experts(grouped_TRD, plan)
            current = combine(experts.current, plan)
        elif self.dense:
            experts = dense_masked_with_activity(
                self.experts, rows_TXD, ids_XK, gates_XK, self.num_experts
            )
            current = experts.current
        else:
            kept_XK = routing.kept.reshape(-1, K)
            grouped_TRD, plan = dispatch(
                rows_TXD, ids_XK, gates_XK, self.num_experts, kept_NK=kept_XK
            )
            experts = self._run_experts(grouped_TRD, plan)
            current = combine(experts.current, plan)
        if window is not None:
            current = _from_windows(current, T, N)
        activity = [routing.activity.prefixed("router"), experts.activity]
        for m, expert in enumerate(self.shared_experts):
            shared = expert.run(x_TND)
            current = current + shared.current
            activity.append(shared.activity.prefixed(f"shared_experts.{m}"))
        if residual is not None:
            if residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != current.shape[-1]:
                raise ValueError(
                    f"residual must have shape {(*x.shape[:-1], current.shape[-1])}, "
                    f"got {tuple(residual.shape)}"
                )
            current = current + residual.reshape(current.shape)
        spikes = self.neuron(current)
        if isinstance(self.neuron, LIF):
            activity.append(Activity.of("neuron", spikes))
        return MoEOutput(
            spikes.reshape(*lead, spikes.shape[-1]),
            routing,
            routing.aux_loss,
            Activity.concat(activity),
        )

    def _run_experts(self, grouped_TRD: torch.Tensor, plan) -> ExpertsOutput:
        mode = self.grouped_gemm
        experts = list(self.experts)
        busy = sum(rows > 0 for rows in plan.splits)  # host ints: no sync
        grouped = (
            mode == "always"
            or (mode == "auto" and (grouped_TRD.is_cuda or busy >= CPU_GROUPED_MIN_EXPERTS))
        ) and grouped_supported(experts, grouped_TRD.dtype)
        if self.expert_parallel is not None:
            from .parallel import run_experts_parallel

            # No fallback on error here: every process must take part in the same exchanges.
            return run_experts_parallel(self, grouped_TRD, plan, grouped=grouped)
        if grouped:
            try:
                return run_experts_with_activity(experts, grouped_TRD, plan, grouped=True)
            except RuntimeError as error:  # e.g. a dtype or GPU the kernel does not take
                logger.debug("grouped GEMM unavailable (%s); one call per expert", error)
        return run_experts_with_activity(experts, grouped_TRD, plan)

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


def _position_major(B: int, S: int, device) -> torch.Tensor:
    """``[B S]`` capacity priority of token ``n = b S + s``: ``s B + b`` (position first)."""
    return (
        torch.arange(S, device=device) * B + torch.arange(B, device=device).unsqueeze(1)
    ).reshape(-1)


def _to_windows(x_TND: torch.Tensor, window: int) -> torch.Tensor:
    """``[T, N, D]`` -> ``[L, W N, D]``: window ``w``'s steps of token ``n`` in column ``w N + n``.

    The last window is zero-padded to ``L`` steps; :func:`_from_windows` cuts the padding off.
    """
    T, N, D = x_TND.shape
    W = -(-T // window)
    padded = nn.functional.pad(x_TND, (0, 0, 0, 0, 0, W * window - T))
    return padded.view(W, window, N, D).transpose(0, 1).reshape(window, W * N, D)


def _from_windows(y_LXO: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``[L, W N, O]`` -> ``[T, N, O]``."""
    L, X, O = y_LXO.shape
    W = X // N
    return y_LXO.view(L, W, N, O).transpose(0, 1).reshape(W * L, N, O)[:T]


def set_dense(model: nn.Module, dense: bool) -> int:
    """Set ``dense`` on every :class:`SpikingMoE` inside ``model``.

    Returns:
        The number of MoE layers changed (0 if the model has none).
    """
    layers = [m for m in model.modules() if isinstance(m, SpikingMoE)]
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
            the ones that produced ``routing`` (true for the classifiers in
            :mod:`spiking_moe.models`, whose ``ClassifierOutput.routing`` follows that order).
        routing: one :class:`RoutingInfo` per MoE layer, or a sequence of such tuples (one per
            micro-batch since the last optimizer step) whose loads are summed per layer.
        reduce: applied to the summed loads ``[L, E]`` before the update, e.g. a sum over
            data-parallel ranks, so that every rank takes the step of the global batch.
    """
    layers = [m for m in model.modules() if isinstance(m, SpikingMoE)]
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
        loads_LE = torch.stack(
            [
                torch.stack([batch[i].selected_load() for batch in batches]).sum(0)
                for i in range(len(layers))
            ]
        )
        if reduce is not None:
            loads_LE = reduce(loads_LE)
        for layer, load_E in zip(layers, loads_LE, strict=True):
            layer.router.update_bias_from_load(load_E)
