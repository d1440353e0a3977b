r"""How a MoE layer's experts run: an object with one method, chosen at construction or swapped.

Shape letters: the package legend (:mod:`spiking_moe`).

A :class:`~spiking_moe.moe.SpikingMoE` routes its tokens, then hands its experts, the rows to
compute ``x [T, X, D]`` and the router's :class:`Assignments` to its *expert strategy*, which
dispatches the rows to their experts (:func:`~spiking_moe.dispatch.dispatch`), runs the
experts and combines their gated currents back per row
(:func:`~spiking_moe.dispatch.combine`)::

    strategy(experts, x_TXD, assignments, checked_spikes=...) -> ExpertsOutput  # [T, X, O]

The strategies (in the spirit of torchtitan's token dispatchers):

- :class:`LocalExperts`: every expert in this process: one call per expert that received rows,
  or one grouped GEMM per layer over the experts' stacked weights (``grouped_gemm``);
- :class:`ExpertParallelExperts`: the experts split over ``P`` processes, rows exchanged with
  all-to-alls (:mod:`spiking_moe.parallel` explains the layout and the exchange);
- either with ``every_expert=True``: the dense-MoE baseline, every expert on every row, masked
  by the gates (the same outputs up to float summation order, ``E / K`` times the work).

Strategies are frozen dataclasses that share the fields ``grouped_gemm``, ``spike_exchange``
and ``every_expert`` (the run options of :class:`~spiking_moe.args.MoEArgs`), so a pass that
needs another way of running swaps a layer's strategy for a twin made with
:func:`dataclasses.replace`: the energy counter's pass runs ``grouped_gemm="never"`` (its hooks
must see each expert module's call; the grouped GEMM reads the experts' parameters, not their
modules) and its dense twin ``every_expert=True`` (:func:`spiking_moe.moe.swapped_strategies`).

**Grouped GEMM** (``grouped_gemm``): ``"never"`` calls each expert module; ``"always"`` takes
:func:`~spiking_moe.dispatch.run_experts_grouped` and raises, naming why, when the experts
cannot be grouped (:func:`~spiking_moe.dispatch.grouped_unsupported_reason`); ``"auto"`` takes
it on CUDA, and on CPU when at least :data:`CPU_GROUPED_MIN_EXPERTS` experts received rows,
whenever the experts can be grouped, else one call per expert. Both paths give the same values
and gradients up to float rounding; an expert without rows gets no gradient on either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .activity import Activity
from .args import MoEArgs
from .dispatch import (
    Assignments,
    DispatchPlan,
    ExpertsOutput,
    combine,
    dense_masked_with_activity,
    dispatch,
    grouped_unsupported_reason,
    run_experts_with_activity,
)

__all__ = [
    "CPU_GROUPED_MIN_EXPERTS",
    "ExpertParallel",
    "ExpertParallelExperts",
    "ExpertShard",
    "ExpertStrategy",
    "LocalExperts",
    "exchanges_bits",
    "pack_spikes",
    "unpack_spikes",
]

logger = logging.getLogger(__name__)

#: On CPU, "auto" takes the grouped expert GEMM when at least this many experts received rows:
#: per-expert calls win below it, the grouped path above (measured crossover between 16 and 64
#: routed experts on a 2-core AMD EPYC, 2026-12-02; experiments/benchmarks/RESULTS.md).
CPU_GROUPED_MIN_EXPERTS = 32


def exchanges_bits(spike_exchange: str, checked_spikes: bool) -> bool:
    """Whether rows travel between processes as bits: ``"bits"``, or ``"auto"`` when the
    layer checked that its input is spikes."""
    return spike_exchange == "bits" or (spike_exchange == "auto" and checked_spikes)


@dataclass(frozen=True)
class ExpertStrategy:
    """Base of the expert strategies (module docstring): the run options they share.

    Attributes:
        grouped_gemm: "auto", "never" or "always" (module docstring).
        spike_exchange: "auto", "bits" or "float": how rows of spikes travel between
            processes (used by :class:`ExpertParallelExperts`).
        every_expert: the dense baseline: every expert on every row, masked by the gates.
    """

    grouped_gemm: str = "auto"
    spike_exchange: str = "auto"
    every_expert: bool = False

    def __post_init__(self) -> None:
        # The options are MoEArgs' (declared, and validated, there).
        MoEArgs.check("grouped_gemm", self.grouped_gemm)
        MoEArgs.check("spike_exchange", self.spike_exchange)

    def __call__(
        self,
        experts: Sequence[nn.Module],
        x_TXD: torch.Tensor,
        assignments: Assignments,
        *,
        checked_spikes: bool = False,
    ) -> ExpertsOutput:
        """Dispatch ``x`` to the experts, run them, combine: ``[T, X, O]`` current and the
        experts' activity (``experts.<e>.*`` for all ``E`` experts).

        Args:
            experts: the layer's experts.
            x_TXD: the rows to compute.
            assignments: where each row goes.
            checked_spikes: the layer checked that ``x`` is binary spikes.
        """
        raise NotImplementedError

    def _takes_grouped(self, experts, rows_TRD: torch.Tensor, plan: DispatchPlan) -> bool:
        if self.grouped_gemm == "never":
            return False
        if self.grouped_gemm == "auto":
            busy = sum(rows > 0 for rows in plan.splits)  # host ints: no sync
            wanted = rows_TRD.is_cuda or busy >= CPU_GROUPED_MIN_EXPERTS
            # The experts are inspected (a walk over their modules, each call) only when the
            # grouped path is wanted.
            return wanted and grouped_unsupported_reason(experts, rows_TRD.dtype) is None
        reason = grouped_unsupported_reason(experts, rows_TRD.dtype)
        if reason is not None:
            raise ValueError(f"grouped_gemm='always' but these experts cannot be grouped: {reason}")
        return True


@dataclass(frozen=True)
class LocalExperts(ExpertStrategy):
    """Every expert in this process (module docstring).

    Called as ``strategy(experts, x_TXD, assignments)``: dispatches the kept assignments,
    runs each expert on its rows (or all of them as one grouped GEMM) and combines the gated
    currents into an :class:`~spiking_moe.dispatch.ExpertsOutput` (``[T, X, O]``).

    Attributes:
        grouped_gemm: "auto", "never" or "always": per-expert calls or one grouped GEMM per
            layer (module docstring).
        spike_exchange: "auto", "bits" or "float"; unused here (nothing travels between
            processes), kept so that a layer sharded later keeps the option.
        every_expert: run the dense-MoE baseline instead: every expert on every row, masked
            by the gates (:func:`~spiking_moe.dispatch.dense_masked`).

    Example:
        >>> from spiking_moe.experts import SpikingExpert
        >>> _ = torch.manual_seed(0)
        >>> experts = [SpikingExpert(4, 8, 4) for _ in range(3)]
        >>> ids = torch.tensor([[0], [2]])
        >>> routes = Assignments(ids, torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool), 3)
        >>> LocalExperts()(experts, torch.ones(5, 2, 4), routes).current.shape
        torch.Size([5, 2, 4])
    """

    def __call__(self, experts, x_TXD, assignments, *, checked_spikes=False) -> ExpertsOutput:
        ids, gates, kept, E = assignments
        if self.every_expert:
            return dense_masked_with_activity(experts, x_TXD, ids, gates, E)
        rows_TRD, plan = dispatch(x_TXD, ids, gates, E, kept_NK=kept)
        grouped = self._takes_grouped(list(experts), rows_TRD, plan)
        out = run_experts_with_activity(experts, rows_TRD, plan, grouped=grouped)
        return ExpertsOutput(combine(out.current, plan), out.activity)


# --------------------------------------------------------------------------- expert parallelism


@dataclass(frozen=True, eq=False)
class ExpertParallel:
    """Where this process sits in an expert-parallel job
    (:func:`spiking_moe.parallel.init_expert_parallel`).

    Attributes:
        mesh: the ``(world / P, P)`` device mesh, dimensions ``("replicate", "expert")``.
        size: ``P``, processes that split the experts.
        rank: this process's index among them (it holds experts ``[rank E_l, (rank + 1) E_l)``,
            ``E_l = E / P``).
        world_size: processes in the job.
    """

    mesh: object
    size: int
    rank: int
    world_size: int

    @property
    def group(self) -> dist.ProcessGroup:
        """The ``P`` processes that split the experts (the all-to-all group)."""
        return self.mesh.get_group("expert")

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The ``world / P`` processes holding the same experts as this one."""
        return self.mesh.get_group("replicate")

    @property
    def replicas(self) -> int:
        return self.world_size // self.size

    @property
    def replica_rank(self) -> int:
        """This process's index among the replicas of its experts (0 writes their shard)."""
        return self.mesh.get_local_rank("replicate")

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this process holds, for a layer of ``num_experts``."""
        per = num_experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)


class ExpertShard(nn.Module):
    """The experts of one MoE layer that this process holds, named by their global ids.

    Children are registered as ``"<e>"`` for global expert ``e``, so parameter names (and
    ``state_dict`` keys) are those of the full model: ``layers.0.experts.5.net.0.weight`` on the
    process that holds expert 5. Indexing takes global ids; iteration and ``len`` cover the local
    experts, in order.
    """

    def __init__(self, experts: Mapping[int, nn.Module], num_experts: int):
        super().__init__()
        self.num_experts = int(num_experts)
        for e in sorted(experts):
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert id {e} outside [0, {self.num_experts})")
            self.add_module(str(e), experts[e])
        self.global_ids = tuple(sorted(experts))

    def __getitem__(self, e: int) -> nn.Module:
        if e not in self.global_ids:
            raise KeyError(
                f"expert {e} is not held by this process (it holds {list(self.global_ids)})"
            )
        return self._modules[str(e)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def extra_repr(self) -> str:
        return f"experts {list(self.global_ids)} of {self.num_experts}"


def _a2a(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    received = funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    # Waited on here (autograd-aware), not lazily on first use: kernels called outside the
    # dispatcher (the event-driven CPU synapse in evaluation) read the raw data, which an
    # AsyncCollectiveTensor does not have until waited on.
    return funcol.wait_tensor(received)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_spikes(x_RF: torch.Tensor) -> torch.Tensor:
    """Binary rows ``[R, F]`` (0.0/1.0) as bits: ``[R, ceil(F / 8)]`` uint8, feature ``f`` in bit
    ``f % 8`` of byte ``f // 8``. Values other than 0 and 1 are not representable: check first."""
    R, F = x_RF.shape
    padded = nn.functional.pad(x_RF.to(torch.uint8), (0, -F % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=x_RF.device)
    return (padded.view(R, padded.shape[1] // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_spikes(packed: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_spikes`: ``[R, ceil(F / 8)]`` bytes -> ``[R, F]`` of ``dtype``
    (``F = features``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], 8 * packed.shape[1])[:, :features].to(dtype)


class _BinaryRows(torch.autograd.Function):
    """The rows' exchange for spikes: sent as bits (32x fewer bytes than float32); their
    gradients, real numbers, come back as floats."""

    @staticmethod
    def forward(ctx, x_RF, output_splits, input_splits, group):
        ctx.splits, ctx.group = (list(output_splits), list(input_splits)), group
        packed = pack_spikes(x_RF)
        received = packed.new_empty(sum(output_splits), packed.shape[1])
        dist.all_to_all_single(received, packed, output_splits, input_splits, group=group)
        return unpack_spikes(received, x_RF.shape[1], x_RF.dtype)

    @staticmethod
    def backward(ctx, grad_RF):
        output_splits, input_splits = ctx.splits
        grad_RF = grad_RF.contiguous()
        returned = grad_RF.new_empty(sum(input_splits), grad_RF.shape[1])
        dist.all_to_all_single(returned, grad_RF, input_splits, output_splits, group=ctx.group)
        return returned, None, None, None


@dataclass(frozen=True, eq=False)
class ExpertParallelExperts(ExpertStrategy):
    """The experts of a layer split over the ``P`` processes of ``ep`` (:mod:`spiking_moe.parallel`
    has the layout, the steps and the exchange volume): dispatch as in one process, exchange the
    per-expert row counts, send the rows (all ``T`` steps of a row together, as bits when they
    are spikes), run each local expert on the rows each source sent it, send the currents back,
    combine as in one process. With ``every_expert`` every row goes to every expert's process.

    ``experts`` must be the layer's :class:`ExpertShard`. Collective: every process of the group
    must call it as often as the others.

    Attributes:
        ep: the :class:`ExpertParallel` layout.
    """

    ep: ExpertParallel | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ep, ExpertParallel):
            raise TypeError(f"ep must be an ExpertParallel layout, got {type(self.ep).__name__}")

    def __call__(self, experts, x_TXD, assignments, *, checked_spikes=False) -> ExpertsOutput:
        if self.every_expert:
            assignments = assignments.every_expert()
        ids, gates, kept, E = assignments
        rows_TRD, plan = dispatch(x_TXD, ids, gates, E, kept_NK=kept)
        out = self._exchange_and_run(experts, rows_TRD, plan, checked_spikes)
        return ExpertsOutput(combine(out.current, plan), out.activity)

    def _exchange_and_run(self, experts, grouped_TRD, plan, checked_spikes) -> ExpertsOutput:
        ep = self.ep
        P, E = ep.size, plan.num_experts
        per = E // P
        T, R, D = grouped_TRD.shape
        device = grouped_TRD.device
        rows_RF = grouped_TRD.transpose(0, 1).reshape(R, T * D)
        # Each process gets the counts of the rows it will receive per local expert, and one
        # more number per source: whether rows that are not spikes are about to travel as bits,
        # which they cannot (checked when the layer did not check its input; every process must
        # learn of it, or the others would wait in the exchange). One exchange, one host read.
        bits = exchanges_bits(self.spike_exchange, checked_spikes)
        check = bits and not checked_spikes
        graded = ((rows_RF != 0) & (rows_RF != 1)).any() if check else torch.tensor(False)
        send_counts = torch.tensor(plan.splits, dtype=torch.int64, device=device).view(P, per)
        send_counts = torch.cat([send_counts, graded.to(device, torch.int64).expand(P, 1)], 1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts.view(-1), send_counts.view(-1), group=ep.group)
        received_counts = recv_counts.tolist()  # [P sources][local experts..., graded flag]
        if any(row[per] for row in received_counts):
            raise ValueError(
                "spike_exchange='bits' but rows that are not spikes (values other than 0 and 1) "
                "reached the exchange on at least one process: use spike_exchange='float' or "
                "'auto' for graded inputs"
            )
        recv_splits = tuple(n for row in received_counts for n in row[:per])  # source-major
        send_rows = [sum(plan.splits[s * per : (s + 1) * per]) for s in range(P)]
        recv_rows = [sum(row[:per]) for row in received_counts]
        if bits:
            received = _BinaryRows.apply(rows_RF, recv_rows, send_rows, ep.group)
        else:
            received = _a2a(rows_RF, recv_rows, send_rows, ep.group)
        R_in = received.shape[0]
        rows_TRD = received.view(R_in, T, D).transpose(0, 1)
        local = [experts[e] for e in ep.local_experts(E)]
        blocks = local * P  # block (source s, local expert j) is "virtual expert" s * per + j
        block_plan = DispatchPlan(
            token_index=torch.arange(R_in, device=device),
            gates=torch.ones(R_in, device=device),
            tokens_per_expert=recv_counts[:, :per].reshape(-1),
            splits=recv_splits,
            num_tokens=R_in,
        )
        # Every process takes the same path: the choice depends on the layer, not on its rows.
        grouped = self._takes_grouped(blocks, rows_TRD, block_plan)
        out = run_experts_with_activity(blocks, rows_TRD, block_plan, grouped=grouped)
        O = out.current.shape[-1]
        current = _a2a(
            out.current.transpose(0, 1).reshape(R_in, T * O), send_rows, recv_rows, ep.group
        )
        current_TRO = current.view(R, T, O).transpose(0, 1)
        names = getattr(local[0], "activity_names", None)
        if not names or not len(out.activity):
            return ExpertsOutput(current_TRO, Activity.empty(device))
        # Activity rows: [P sources, E_l experts x populations] here; each source gets its row,
        # and receives one from every owner: [P owners, E_l x populations] = the global order.
        width = per * len(names)
        spikes = _a2a(out.activity.spikes, [width] * P, [width] * P, ep.group)
        updates = torch.empty_like(out.activity.updates)
        dist.all_to_all_single(updates, out.activity.updates.contiguous(), group=ep.group)
        activity = Activity(
            tuple(f"experts.{e}.{n}" for e in range(E) for n in names), spikes, updates
        )
        return ExpertsOutput(current_TRO, activity)
