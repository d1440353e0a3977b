r"""Sparse dispatch and combine: every expert computes on its own tokens only.

Shape letters: the package legend (:mod:`spiking_moe`); the functions here take ``N`` tokens
(a MoE layer passes its ``X`` routed rows), ``A = N K`` assignments of which ``R`` are kept
(``R = A`` without capacity drops).

For token ``n`` with choices :math:`(i_{nj}, g_{nj})_{j<K}` the layer computes

.. math::

    y_{t,n} = \sum_{j<K} g_{nj}\, f_{i_{nj}}(x_{\cdot,n})_t ,

where :math:`f_e` is expert ``e`` on the whole sequence of the token (all ``T`` steps go to the
same experts). :func:`dispatch` sorts the ``A`` assignments by expert (stable argsort, so
tokens keep their order inside an expert), gathers their rows into ``[T, R, D]`` and returns a
frozen :class:`DispatchPlan`; :func:`run_experts` calls expert ``e`` on its contiguous slice
of ``tokens_per_expert[e]`` rows (and not at all when it has none); :func:`combine` scales the
rows by their gates and scatter-adds (``index_add``) them back to ``[T, N, O]``. Gates are
applied in combine, so expert inputs stay binary spikes. Work scales with ``K``, not ``E``.

:func:`dense_masked` is the dense baseline: every expert on every token, weighted by the same
gates scattered into ``[N, E]`` (zero for unchosen experts). Same values, ``E / K`` times the
work; it exists only for comparison.

Activity: :func:`run_experts_with_activity` also returns the spikes of the experts' neuron
populations (:class:`~spiking_moe.activity.Activity`, named ``experts.<e>.<name>``) for
experts that report them (those with ``activity_names`` and ``run``, e.g.
:class:`~spiking_moe.experts.SpikingExpert`); an expert with no rows reports its populations
as idle, so the layout is the same in every call.

Host syncs: :func:`dispatch` reads the ``E`` per-expert counts to the host once
(``tolist``), because slicing the rows for each expert module needs Python ints. Nothing
else synchronises.

:func:`run_experts_grouped` computes the same thing as :func:`run_experts` for a list of
identically shaped :class:`~spiking_moe.experts.SpikingExpert` (or
:class:`~spiking_moe.experts.MLPExpert`) with one grouped GEMM per layer
(``torch._grouped_mm``, rows laid out token-major ``[R T, D]`` so each expert's rows are
contiguous) and one LIF call over all rows, with each expert's beta and threshold gathered per
row. Only the experts that received rows are stacked (their ids come from ``plan.splits``, on
the host already, so no extra sync): an expert with no rows gets no gradient (``grad`` None),
exactly as with :func:`run_experts`, and reports idle activity. It calls the experts'
parameters, not their modules, so module hooks do not fire:
:class:`~spiking_moe.moe.SpikingMoE` takes it by default only on CUDA (on CPU the
``_grouped_mm`` fallback plus the token-major copies is slower than per-expert calls at small
``E``), when :func:`grouped_supported` says yes and no hook is registered.
:func:`run_experts` is its reference, and the tests compare the two (``torch._grouped_mm`` also runs on CPU).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .experts import MLPExpert, SpikingExpert
from .functional.lif import lif_multistep
from .neurons import LIF, SpikingNeuron

__all__ = [
    "Assignments",
    "DispatchPlan",
    "ExpertsOutput",
    "combine",
    "dense_masked",
    "dense_masked_with_activity",
    "dispatch",
    "grouped_supported",
    "grouped_unsupported_reason",
    "run_experts",
    "run_experts_grouped",
    "run_experts_with_activity",
]

logger = logging.getLogger(__name__)

#: The dtypes ``torch._grouped_mm`` computes in.
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Frozen metadata that :func:`dispatch` hands to :func:`combine`.

    Attributes:
        token_index: ``[R]`` int64, the token (column of ``x``) of each grouped row.
        gates: ``[R]`` gate of each grouped row (keeps its autograd graph).
        tokens_per_expert: ``[E]`` int64 rows per expert, on the device.
        splits: the same counts as Python ints (rows of expert ``e`` are the ``e``-th slice).
        num_tokens: ``N``.
    """

    token_index: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    splits: tuple[int, ...]
    num_tokens: int

    @property
    def num_experts(self) -> int:
        return len(self.splits)


class Assignments(NamedTuple):
    """The router's choices for the rows a MoE layer computes, flattened over windows (what
    :func:`dispatch` and the expert strategies of :mod:`spiking_moe.strategies` consume).

    Attributes:
        expert_ids: ``[X, K]`` int64 expert of each assignment.
        gates: ``[X, K]`` gate of each assignment (0 where dropped).
        kept: ``[X, K]`` bool, False where capacity dropped the assignment.
        num_experts: ``E``.
    """

    expert_ids: torch.Tensor
    gates: torch.Tensor
    kept: torch.Tensor
    num_experts: int

    @classmethod
    def of(cls, routing) -> Assignments:
        """From a :class:`~spiking_moe.router.RoutingInfo` (``[W, N, K]`` -> ``[W N, K]``)."""
        K = routing.k
        return cls(
            routing.expert_ids.reshape(-1, K),
            routing.gates.reshape(-1, K),
            routing.kept.reshape(-1, K),
            routing.num_experts,
        )

    def every_expert(self) -> Assignments:
        """Every row to every expert, the unchosen ones with gate 0 (the dense baseline;
        dropped assignments already have gate 0)."""
        X, E = self.expert_ids.shape[0], self.num_experts
        mask_XE = self.gates.new_zeros(X, E).scatter_add(1, self.expert_ids, self.gates)
        every_XE = torch.arange(E, device=self.expert_ids.device).expand(X, -1)
        return Assignments(every_XE, mask_XE, torch.ones_like(every_XE, dtype=torch.bool), E)


def _check_routing(x_TND, expert_ids_NK, gates_NK, num_experts, kept_NK) -> None:
    if x_TND.dim() != 3:
        raise ValueError(f"x must be [T, N, D], got shape {tuple(x_TND.shape)}")
    if expert_ids_NK.dim() != 2 or expert_ids_NK.shape[0] != x_TND.shape[1]:
        raise ValueError(
            f"expert_ids must be [N, K] with N={x_TND.shape[1]} tokens, "
            f"got shape {tuple(expert_ids_NK.shape)}"
        )
    if expert_ids_NK.dtype != torch.int64:
        raise TypeError(f"expert_ids must be int64, got {expert_ids_NK.dtype}")
    if gates_NK.shape != expert_ids_NK.shape:
        raise ValueError(
            f"gates shape {tuple(gates_NK.shape)} != expert_ids shape {tuple(expert_ids_NK.shape)}"
        )
    if kept_NK is not None and kept_NK.shape != expert_ids_NK.shape:
        raise ValueError(
            f"kept shape {tuple(kept_NK.shape)} != expert_ids shape {tuple(expert_ids_NK.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")


def dispatch(
    x_TND: torch.Tensor,
    expert_ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    num_experts: int,
    *,
    kept_NK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DispatchPlan]:
    """Group the token rows by expert.

    Args:
        x_TND: ``[T, N, D]`` expert input (spikes).
        expert_ids_NK: ``[N, K]`` int64 expert of each assignment, values in ``[0, E)``.
        gates_NK: ``[N, K]`` gate of each assignment (applied later, in :func:`combine`).
        num_experts: ``E``.
        kept_NK: ``[N, K]`` bool, False for assignments dropped by capacity (not dispatched);
            None keeps all.

    Returns:
        ``(x_TRD, plan)``: rows grouped by expert (expert 0's rows first, tokens in order
        inside an expert) and the :class:`DispatchPlan` for :func:`combine`.
    """
    _check_routing(x_TND, expert_ids_NK, gates_NK, num_experts, kept_NK)
    N, K = expert_ids_NK.shape
    ids_A = expert_ids_NK.reshape(-1)
    invalid = ((ids_A < 0) | (ids_A >= num_experts)).sum().view(1)
    ids_A = ids_A.clamp(0, num_experts - 1)
    if kept_NK is not None:
        # Dropped assignments get the virtual expert E: they sort last and are cut off.
        ids_A = torch.where(kept_NK.reshape(-1), ids_A, torch.full_like(ids_A, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_A.device)
    counts.scatter_add_(0, ids_A, torch.ones_like(ids_A))
    # The one host sync: split sizes for the expert modules, plus the id check.
    *splits, n_invalid = torch.cat([counts[:num_experts], invalid]).tolist()
    if n_invalid:
        raise ValueError(f"{n_invalid} expert_ids lie outside [0, {num_experts})")
    splits = tuple(splits)
    rows = sum(splits)
    order_R = torch.argsort(ids_A, stable=True)[:rows]
    token_R = torch.div(order_R, K, rounding_mode="floor")
    plan = DispatchPlan(
        token_index=token_R,
        gates=gates_NK.reshape(-1)[order_R],
        tokens_per_expert=counts[:num_experts],
        splits=splits,
        num_tokens=N,
    )
    return x_TND.index_select(1, token_R), plan


class ExpertsOutput(NamedTuple):
    """Result of :func:`run_experts_with_activity`.

    Attributes:
        current: ``[T, R, O]`` expert outputs in the grouped row order.
        activity: spikes of the experts' neuron populations, named ``experts.<e>.<name>``.
    """

    current: torch.Tensor
    activity: Activity


def run_experts(
    experts: Sequence[nn.Module], x_TRD: torch.Tensor, plan: DispatchPlan
) -> torch.Tensor:
    """Run expert ``e`` on its ``plan.splits[e]`` rows only; experts with no rows are not called.

    Args:
        experts: ``E`` modules mapping ``[T, n, D]`` to ``[T, n, O]``.
        x_TRD: grouped rows from :func:`dispatch`.
        plan: the matching :class:`DispatchPlan`.

    Returns:
        ``[T, R, O]`` expert outputs in the grouped row order.
    """
    return run_experts_with_activity(experts, x_TRD, plan).current


def run_experts_with_activity(
    experts: Sequence[nn.Module], x_TRD: torch.Tensor, plan: DispatchPlan, *, grouped: bool = False
) -> ExpertsOutput:
    """:func:`run_experts` (or, with ``grouped=True``, :func:`run_experts_grouped`), also
    returning the experts' spiking activity (module docstring).

    Experts with ``activity_names`` are called through their ``run`` (which goes through
    ``__call__``, so their hooks fire); other modules are called as ``expert(rows)`` and
    report nothing.

    Args:
        experts: ``E`` modules mapping ``[T, n, D]`` to ``[T, n, O]``, one per expert of
            ``plan``.
        x_TRD: ``[T, R, D]`` grouped rows from :func:`dispatch`.
        plan: the matching :class:`DispatchPlan`; expert ``e`` gets the ``plan.splits[e]``
            rows of its slice.
        grouped: take :func:`run_experts_grouped`'s one grouped GEMM per layer instead of one
            call per expert. Not checked here: the caller makes sure
            :func:`grouped_supported` holds for ``experts`` (the hooks of the experts do not
            fire on this path).

    Returns:
        An :class:`ExpertsOutput`: the ``[T, R, O]`` current in the grouped row order, and the
        activity of every reporting expert, named ``experts.<e>.<name>`` in expert order (an
        expert without rows reports its populations idle, so the layout is the same in every
        call).

    Raises:
        ValueError: ``experts`` and ``plan`` disagree on the number of experts.
    """
    if len(experts) != plan.num_experts:
        raise ValueError(f"plan is for {plan.num_experts} experts, got {len(experts)} experts")
    if grouped:
        return _run_grouped(experts, x_TRD, plan)
    outputs, activity = [], []
    for e, (expert, x_rows) in enumerate(
        zip(experts, x_TRD.split(plan.splits, dim=1), strict=True)
    ):
        names = getattr(expert, "activity_names", None)
        if x_rows.shape[1] == 0:
            if names:
                activity.append(Activity.idle(names, x_TRD.device).prefixed(f"experts.{e}"))
            continue
        if names is None:
            outputs.append(expert(x_rows))
            continue
        out = expert.run(x_rows)
        outputs.append(out.current)
        activity.append(out.activity.prefixed(f"experts.{e}"))
    if not outputs:  # every assignment dropped: still return [T, 0, O]
        outputs = [experts[0](x_TRD)]
    return ExpertsOutput(torch.cat(outputs, dim=1), Activity.concat(activity))


def combine(y_TRO: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Scale each row by its gate and scatter-add it back to its token.

    Args:
        y_TRO: ``[T, R, O]`` expert outputs in the grouped order of ``plan``.
        plan: the :class:`DispatchPlan` from :func:`dispatch`.

    Returns:
        ``[T, N, O]``: for each token the gate-weighted sum of its experts' outputs (zero for
        a token whose assignments were all dropped).
    """
    if y_TRO.dim() != 3 or y_TRO.shape[1] != plan.token_index.numel():
        raise ValueError(
            f"expert output must be [T, R={plan.token_index.numel()}, O], "
            f"got shape {tuple(y_TRO.shape)}"
        )
    weighted = y_TRO * plan.gates.to(y_TRO.dtype).view(1, -1, 1)
    out = y_TRO.new_zeros(y_TRO.shape[0], plan.num_tokens, y_TRO.shape[2])
    # In place on the fresh zeros: the out-of-place index_add copies them first.
    return out.index_add_(1, plan.token_index, weighted)


def dense_masked(
    experts: Sequence[nn.Module],
    x_TND: torch.Tensor,
    expert_ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Dense baseline: every expert on every token, masked by the gates.

    Args:
        experts: ``E`` expert modules.
        x_TND: ``[T, N, D]`` input.
        expert_ids_NK, gates_NK: the routing (dropped assignments must already have gate 0).
        num_experts: ``E``.

    Returns:
        ``[T, N, O]``, equal to ``combine(run_experts(...))`` up to float summation order.
    """
    return dense_masked_with_activity(experts, x_TND, expert_ids_NK, gates_NK, num_experts).current


def dense_masked_with_activity(
    experts: Sequence[nn.Module],
    x_TND: torch.Tensor,
    expert_ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    num_experts: int,
) -> ExpertsOutput:
    """:func:`dense_masked`, also returning the experts' activity (every expert on all ``N``
    tokens), named like :func:`run_experts_with_activity` names it."""
    _check_routing(x_TND, expert_ids_NK, gates_NK, num_experts, None)
    if len(experts) != num_experts:
        raise ValueError(f"routing is for {num_experts} experts, got {len(experts)} experts")
    kept = torch.ones_like(expert_ids_NK, dtype=torch.bool)
    mask_NE = Assignments(expert_ids_NK, gates_NK, kept, num_experts).every_expert().gates
    out, activity = None, []
    # Each expert on the input as it is (no gather): the baseline is not made slower than the
    # plain "run everything, mask the result" it stands for.
    for e, expert in enumerate(experts):
        if getattr(expert, "activity_names", None) is None:
            y = expert(x_TND)
        else:
            y, expert_activity = expert.run(x_TND)
            activity.append(expert_activity.prefixed(f"experts.{e}"))
        y = y * mask_NE[:, e].to(y.dtype).view(1, -1, 1)
        out = y if out is None else out + y
    return ExpertsOutput(out, Activity.concat(activity))


def grouped_unsupported_reason(
    experts: Sequence[nn.Module], dtype: torch.dtype = torch.float32
) -> str | None:
    """Why :func:`run_experts_grouped` cannot stand in for :func:`run_experts` exactly, or None
    when it can.

    It can for ``dtype`` float32, bfloat16 or float16 and experts of one class
    (:class:`SpikingExpert` or :class:`MLPExpert`) with equal
    sizes, each a multiple of 16 bytes in ``dtype`` (a ``_grouped_mm`` stride rule), whose
    LIFs are native, share reset, surrogate and ``detach_reset`` and have scalar beta and
    threshold (values may differ per expert), on a torch with ``_grouped_mm``. The grouped path
    reads the experts' parameters and never calls their modules, so hooks on the experts do not
    see it (run ``grouped_gemm="never"`` for that, as the energy counter does).
    """
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if dtype not in GROUPED_DTYPES:
        return f"torch._grouped_mm takes {[str(d) for d in GROUPED_DTYPES]}, not {dtype}"
    if not experts:
        return "no experts"
    first = experts[0]
    if type(first) not in (SpikingExpert, MLPExpert):
        return f"{type(first).__name__} is not a SpikingExpert or MLPExpert"
    shape = (first.in_features, first.hidden_features, first.out_features, first.num_layers)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(size * itemsize % 16 for size in shape[:3]):
        return f"sizes {shape[:3]} in {dtype} are not all multiples of 16 bytes"
    lif_keys = set()
    for e, expert in enumerate(experts):
        if type(expert) is not type(first):
            return f"expert {e} is a {type(expert).__name__}, expert 0 a {type(first).__name__}"
        if (expert.in_features, expert.hidden_features, expert.out_features) != shape[:3]:
            return f"expert {e} has other sizes than expert 0"
        if expert.num_layers != shape[3]:
            return f"expert {e} has {expert.num_layers} layers, expert 0 {shape[3]}"
        for module in expert.modules():
            if isinstance(module, SpikingNeuron) and not isinstance(module, LIF):
                return f"expert {e} has {type(module).__name__} neurons (grouped runs LIF only)"
            if isinstance(module, LIF):
                if module.backend != "native":
                    return f"expert {e} has a {module.backend!r} LIF backend"
                if module.beta.dim() or module.threshold.dim():
                    return f"expert {e} has per-neuron beta or threshold"
                lif_keys.add((module.reset, module.surrogate, module.detach_reset))
    if len(lif_keys) > 1:
        return "the experts' LIFs differ in reset, surrogate or detach_reset"
    return None


def grouped_supported(experts: Sequence[nn.Module], dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`run_experts_grouped` can stand in for :func:`run_experts` exactly
    (:func:`grouped_unsupported_reason` says why not)."""
    return grouped_unsupported_reason(experts, dtype) is None


def run_experts_grouped(
    experts: Sequence[nn.Module], x_TRD: torch.Tensor, plan: DispatchPlan
) -> torch.Tensor:
    """:func:`run_experts` with one grouped GEMM per layer (``torch._grouped_mm``).

    Args:
        experts: experts for which :func:`grouped_supported` is True.
        x_TRD, plan: as for :func:`run_experts`.

    Returns:
        ``[T, R, O]``, equal to ``run_experts(experts, x_TRD, plan)`` up to float rounding
        (the GEMM's summation order).
    """
    return run_experts_with_activity(experts, x_TRD, plan, grouped=True).current


def _run_grouped(experts: Sequence[nn.Module], x_TRD: torch.Tensor, plan: DispatchPlan):
    T, R, _ = x_TRD.shape
    E = len(experts)
    # Only the experts that got rows take part (their ids are on the host already, in
    # plan.splits): an expert with no rows must get no gradient at all, as in run_experts,
    # not the zero gradient that stacking its weights would give it.
    active = [e for e, n in enumerate(plan.splits) if n]
    if not active:  # every assignment dropped: the reference's [T, 0, O] and idle activity
        return run_experts_with_activity(experts, x_TRD, plan)
    device = x_TRD.device
    counts = plan.tokens_per_expert
    active_ids = torch.tensor(active, device=device)
    # Row r belongs to the local (compacted) expert local_of_row[r], i.e. expert active[...].
    local_of_row = torch.repeat_interleave(
        torch.arange(len(active), device=device), counts[active_ids], output_size=R
    )
    expert_of_row = active_ids[local_of_row]
    ends = list(itertools.accumulate(plan.splits[e] * T for e in active))
    offsets = torch.tensor(ends, dtype=torch.int32, device=device)
    h = x_TRD.transpose(0, 1).reshape(R * T, -1)
    modules = [list(experts[e].net) for e in active]
    spikes_E, updates_E, names = [], [], []
    for i, layer in enumerate(modules[0]):
        if isinstance(layer, nn.Linear):
            weight = torch.stack([m[i].weight for m in modules]).transpose(1, 2)
            bias = torch.stack([m[i].bias for m in modules])[local_of_row]
            out = torch._grouped_mm(h, weight, offs=offsets)
            if out.requires_grad:  # its backward refuses an expanded gradient (e.g. of a sum)
                out.register_hook(torch.Tensor.contiguous)
            h = (out.view(R, T, -1) + bias[:, None, :]).view(R * T, -1)
        elif isinstance(layer, LIF):
            beta = torch.stack([m[i].beta for m in modules]).clamp(0.0, 1.0)
            threshold = torch.stack([m[i].threshold for m in modules])
            h_TRU = h.view(R, T, -1).transpose(0, 1)
            spikes = lif_multistep(
                h_TRU,
                beta=beta[local_of_row].view(R, 1),
                threshold=threshold[local_of_row].view(R, 1),
                reset=layer.reset,
                surrogate=layer.surrogate,
                detach_reset=layer.detach_reset,
            ).spikes
            # Each expert's spikes are a segment of the rows: sum them per expert (all E, zero
            # for the idle ones), no sync.
            per_row = spikes.sum((0, 2), dtype=torch.float32)
            spikes_E.append(per_row.new_zeros(E).index_add(0, expert_of_row, per_row))
            updates_E.append(counts * (T * spikes.shape[-1]))
            names.append(f"net.{i}")
            h = spikes.transpose(0, 1).reshape(R * T, -1)
        else:
            h = layer(h)
    if names:  # expert-major, as run_experts_with_activity reports them
        activity = Activity(
            tuple(f"experts.{e}.{n}" for e in range(E) for n in names),
            torch.stack(spikes_E, 1).reshape(-1),
            torch.stack(updates_E, 1).reshape(-1),
        )
    else:
        activity = Activity.empty(device)
    return ExpertsOutput(h.view(R, T, -1).transpose(0, 1), activity)
