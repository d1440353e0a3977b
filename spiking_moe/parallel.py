r"""Expert parallelism over ``torch.distributed``: each process holds ``E / P`` experts of every
MoE layer, and tokens travel to their experts' process and back with two all-to-alls.

Legend: ``W`` processes (world), ``P`` expert-parallel size, ``E`` experts per layer,
``E_l = E / P`` local experts, ``T`` time steps (or window length), ``R`` dispatched rows
(kept assignments) sent by this process, ``R_in`` rows it receives, ``D``/``O`` features.

**Layout** (GShard, DeepSpeed-MoE, torchtitan). The ``W`` processes form a
``(W / P) x P`` :class:`~torch.distributed.device_mesh.DeviceMesh` with dimensions
``"replicate"`` and ``"expert"``: the ``P`` processes of a row (consecutive ranks) split the
experts of every layer, process ``i`` of the row holding experts ``[i E_l, (i + 1) E_l)``; the
``W / P`` processes of a column hold the same experts (replicas). Dense parameters
(embeddings, attention, routers, readout) are on every process.

**Forward** of one :class:`~spiking_moe.moe.SpikingMoE` layer, on every process of a row, with
its own tokens:

1. route (the router is global: every token may pick any of the ``E`` experts) and
   :func:`~spiking_moe.dispatch.dispatch` as in one process: rows grouped by expert, so by the
   process that owns it;
2. exchange the per-expert row counts (``all_to_all_single`` of ``E`` ints, one host read:
   the receiving side needs them as split sizes);
3. send the rows, all ``T`` steps of a token together (token-major ``[R, T D]``), with the
   autograd-aware ``all_to_all_single``; rows arrive grouped by source process, then by local
   expert. Rows of spikes travel as bits, 8 per byte (:func:`pack_spikes`; the layer's
   ``spike_exchange``: by default whenever its input is checked to be spikes), their gradients
   as floats;
4. run each local expert on the rows each source sent it, one call per (source, expert) block
   (or the grouped GEMM over the same blocks): the experts are per-row functions, so this equals
   one call on all the expert's rows, and it gives each source's share of the experts' spiking
   activity exactly;
5. send the currents back with the reverse all-to-all (and the activity with a third, small
   one), and :func:`~spiking_moe.dispatch.combine` as in one process.

Hence each process's outputs, routing (``tokens_per_expert``), losses and activity equal those of
one process holding all experts, run on that process's tokens; without a capacity limit that is
the single-process pass over the global batch cut into shards. With a capacity limit the drops
are decided per process (GShard's "groups": a process's tokens), exactly as one process would
decide them on that shard.

**Backward** runs through both exchanges (``all_to_all_single_autograd`` returns each source's
gradient to it), so after ``loss.backward()`` the owner of an expert holds
``sum_r dL_r / dtheta`` over the processes ``r`` of its row. :func:`reduce_expert_gradients`
divides by ``W`` and sums over the replicas, which is the data-parallel mean
``(1 / W) sum_r dL_r / dtheta``, what DDP gives the dense parameters; an expert no process
routed to keeps ``grad = None`` (as in one process). Dense parameters are left to DDP, which
must ignore the expert parameters and buffers (:func:`expert_parameter_names`).

**Exchange volume** per layer and step, per process, float32: forward sends its ``R`` rows
(``R T D`` values) and returns the ``R_in`` currents it computed (``R_in T O``), backward the
same amounts the other way, so ``4 T (D + O) (R + R_in)`` bytes, about ``8 R T (D + O)`` with
balanced routing; with the rows as bits the forward rows take ``R ceil(T D / 8)`` bytes instead
of ``4 R T D``; ``R = N k`` (tokens times experts per token, fewer with capacity drops), of
which about ``R / P`` stay on the process (still copied by the collective). Linear in tokens,
``k``, ``T`` and width, independent of ``E``. Measured (to the byte) by
``experiments/benchmarks/expert_parallel.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .activity import Activity

__all__ = [
    "ExpertParallel",
    "ExpertShard",
    "clip_grad_norm_",
    "expert_parameter_names",
    "init_expert_parallel",
    "is_expert_parallel",
    "pack_spikes",
    "reduce_expert_gradients",
    "run_experts_parallel",
    "shard_experts",
    "unpack_spikes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ExpertParallel:
    """Where this process sits in an expert-parallel job (:func:`init_expert_parallel`).

    Attributes:
        mesh: the ``(W / P, P)`` device mesh, dimensions ``("replicate", "expert")``.
        size: ``P``, processes that split the experts.
        rank: this process's index among them (it holds experts ``[rank E_l, (rank + 1) E_l)``).
        world_size: ``W``.
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
        """The ``W / P`` processes holding the same experts as this one."""
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


def init_expert_parallel(size: int, device_type: str | None = None) -> ExpertParallel:
    """The expert-parallel layout of the running ``torch.distributed`` job.

    Args:
        size: ``P``, processes that split the experts; must divide the world size.
        device_type: "cpu" or "cuda" for the mesh; default: "cuda" when the process group's
            backend is nccl, else "cpu".

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: ``size`` below 1 or not dividing the world size.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"expert_parallel must be an int >= 1, got {size!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert parallelism needs a torch.distributed process group: launch with torchrun "
            "(or call torch.distributed.init_process_group first)"
        )
    world = dist.get_world_size()
    if world % size:
        raise ValueError(
            f"expert_parallel = {size} does not divide the world size {world}: each group of "
            f"{size} processes splits the experts, so the {world} processes must form whole groups"
        )
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(
        device_type, (world // size, size), mesh_dim_names=("replicate", "expert")
    )
    return ExpertParallel(mesh, size, mesh.get_local_rank("expert"), world)


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


def _moe_layers(model: nn.Module) -> list:
    """The MoE layers of ``model``: modules that can shard their experts (``SpikingMoE``; by
    that method, so that this module needs no import of ``moe``, which imports it)."""
    return [m for m in model.modules() if callable(getattr(m, "shard_experts", None))]


def shard_experts(model: nn.Module, ep: ExpertParallel) -> nn.Module:
    """Make ``model`` expert-parallel in place: keep this process's experts of every MoE layer.

    Collective: every process of the job calls it with the same model architecture. First every
    parameter and buffer is broadcast from rank 0 (so all processes start from rank 0's model,
    experts included, as DDP does for dense parameters); then each
    :class:`~spiking_moe.moe.SpikingMoE` keeps experts ``ep.local_experts(E)`` in an
    :class:`ExpertShard` and exchanges tokens with the other ``P - 1`` processes.

    Returns:
        ``model``.

    Raises:
        ValueError: no MoE layer, ``P`` not dividing a layer's ``E``, a layer already sharded,
            or processes whose models differ in layers or expert counts (the numbers named).
    """
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SpikingMoE layer to make expert-parallel")
    counts = [layer.num_experts for layer in layers]
    everyone = [None] * ep.world_size
    dist.all_gather_object(everyone, counts)
    for rank, theirs in enumerate(everyone):
        if theirs != counts:
            raise ValueError(
                f"processes disagree on the MoE layers' expert counts: rank {dist.get_rank()} "
                f"has {counts}, rank {rank} has {theirs}"
            )
    for i, layer in enumerate(layers):
        if layer.expert_parallel is not None:
            raise ValueError(f"MoE layer {i} is already expert-parallel")
        if layer.num_experts % ep.size:
            raise ValueError(
                f"MoE layer {i} has {layer.num_experts} experts, not divisible by "
                f"expert_parallel = {ep.size}"
            )
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    for layer in layers:
        layer.shard_experts(ep)
    logger.info(
        "expert parallelism: process %d of %d holds experts %s of each of %d MoE layers",
        ep.rank,
        ep.size,
        list(ep.local_experts(counts[0])) if len(set(counts)) == 1 else "(per layer)",
        len(layers),
    )
    return model


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether some layer of ``model`` holds only this process's experts."""
    return any(isinstance(m, ExpertShard) for m in model.modules())


def expert_parameter_names(model: nn.Module, *, buffers: bool = False) -> list[str]:
    """Names of the parameters (and, with ``buffers``, buffers) that live in an
    :class:`ExpertShard`. DDP must ignore both (``buffers=True``): each process of a group
    holds different experts, so it must neither average their gradients nor broadcast their
    buffers."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertShard):
            names += [f"{prefix}.{name}" for name, _ in module.named_parameters()]
            if buffers:
                names += [f"{prefix}.{name}" for name, _ in module.named_buffers()]
    return names


def _expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()]


def _reduction_dtype(params) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (never narrower)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def reduce_expert_gradients(model: nn.Module, ep: ExpertParallel) -> None:
    """Turn the owners' summed expert gradients into the data-parallel mean (module docstring).

    Call after the backward of the last micro-batch of a step, on every process. Gradients are
    divided by ``W`` and summed over the replicas in one flat all-reduce; a parameter whose
    gradient is None on every replica stays None.
    """
    params = _expert_parameters(model)
    if not params:
        return
    device = params[0].device
    # At least float32 (half-precision gradients are summed wider), float64 kept as it is.
    dtype = _reduction_dtype(params)
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
            for p in params
        ]
        + [present]
    )
    flat.div_(ep.world_size)
    if ep.replicas > 1:
        dist.all_reduce(flat, group=ep.replica_group)
    offset = 0
    seen = flat[-len(params) :] > 0
    for p, any_grad in zip(params, seen.tolist(), strict=True):
        n = p.numel()
        if any_grad:
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        else:
            p.grad = None
        offset += n


def clip_grad_norm_(
    model: nn.Module, max_norm: float, ep: ExpertParallel | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole expert-parallel model.

    The norm counts every dense parameter once and every expert once (the experts' squared norms
    are summed over the ``P`` processes of a row; replicas hold equal gradients after
    :func:`reduce_expert_gradients`), so it is the norm one process would compute. Returns it.
    """
    if ep is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    expert_ids = {id(p) for p in _expert_parameters(model)}
    dense = [p for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    experts = [p for p in _expert_parameters(model) if p.grad is not None]
    device = next(model.parameters()).device
    dtype = _reduction_dtype(dense + experts)
    zero = torch.zeros((), device=device, dtype=dtype)
    dense_sq = sum((p.grad.to(dtype).pow(2).sum() for p in dense), zero)
    expert_sq = sum((p.grad.to(dtype).pow(2).sum() for p in experts), zero).reshape(1)
    dist.all_reduce(expert_sq, group=ep.group)
    total = (dense_sq + expert_sq[0]).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in dense + experts:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


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


def unpack_spikes(bits_RB: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_spikes`: ``[R, features]`` of ``dtype``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits_RB.device)
    bits = (bits_RB.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bits_RB.shape[0], 8 * bits_RB.shape[1])[:, :features].to(dtype)


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


def run_experts_parallel(layer, grouped_TRD: torch.Tensor, plan, *, grouped: bool = False):
    """Steps 2-5 of the module docstring for one :class:`~spiking_moe.moe.SpikingMoE` layer.

    Args:
        layer: the expert-parallel layer (its ``experts`` an :class:`ExpertShard`).
        grouped_TRD: ``[T, R, D]`` rows from :func:`~spiking_moe.dispatch.dispatch` over all
            ``E`` global experts.
        plan: the matching :class:`~spiking_moe.dispatch.DispatchPlan`.
        grouped: compute the local experts with the grouped GEMM.

    Returns:
        :class:`~spiking_moe.dispatch.ExpertsOutput`: ``[T, R, O]`` currents in ``grouped_TRD``'s
        row order, and the activity of all ``E`` experts due to this process's tokens (named
        ``experts.<e>.<population>``, the single-process layout).
    """
    from .dispatch import DispatchPlan, ExpertsOutput, run_experts_with_activity

    ep: ExpertParallel = layer.expert_parallel
    P, E = ep.size, plan.num_experts
    per = E // P
    T, R, D = grouped_TRD.shape
    device = grouped_TRD.device
    rows_RF = grouped_TRD.transpose(0, 1).reshape(R, T * D)
    # Each process gets the counts of the rows it will receive per local expert, and one more
    # number per source: whether rows that are not spikes are about to travel as bits, which
    # they cannot (checked when the layer does not check its input; every process must learn
    # of it, or the others would wait in the exchange). One exchange and one host read.
    checks_rows = layer.spike_exchange == "bits" and not layer.check_spikes
    graded = ((rows_RF != 0) & (rows_RF != 1)).any() if checks_rows else torch.tensor(False)
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
    if layer.exchanges_bits():
        received = _BinaryRows.apply(rows_RF, recv_rows, send_rows, ep.group)
    else:
        received = _a2a(rows_RF, recv_rows, send_rows, ep.group)
    R_in = received.shape[0]
    rows_TRD = received.view(R_in, T, D).transpose(0, 1)
    local = [layer.experts[e] for e in ep.local_experts(E)]
    blocks = local * P  # block (source s, local expert j) is "virtual expert" s * per + j
    block_plan = DispatchPlan(
        token_index=torch.arange(R_in, device=device),
        gates=torch.ones(R_in, device=device),
        tokens_per_expert=recv_counts[:, :per].reshape(-1),
        splits=recv_splits,
        num_tokens=R_in,
    )
    out = run_experts_with_activity(blocks, rows_TRD, block_plan, grouped=grouped)
    O = out.current.shape[-1]
    current = _a2a(out.current.transpose(0, 1).reshape(R_in, T * O), send_rows, recv_rows, ep.group)
    current_TRO = current.view(R, T, O).transpose(0, 1)
    names = getattr(local[0], "activity_names", None)
    if not names or not len(out.activity):
        return ExpertsOutput(current_TRO, Activity.empty(device))
    # Activity rows: [P sources, E_l experts x populations] here; each source gets its row, and
    # receives one from every owner: [P owners, E_l x populations] = the global expert order.
    width = per * len(names)
    spikes = _a2a(out.activity.spikes, [width] * P, [width] * P, ep.group)
    updates = torch.empty_like(out.activity.updates)
    dist.all_to_all_single(updates, out.activity.updates.contiguous(), group=ep.group)
    activity = Activity(tuple(f"experts.{e}.{n}" for e in range(E) for n in names), spikes, updates)
    return ExpertsOutput(current_TRO, activity)
