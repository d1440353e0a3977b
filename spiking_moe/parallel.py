r"""Expert parallelism over ``torch.distributed``: each process holds ``E / P`` experts of every
MoE layer, and tokens travel to their experts' process and back with two all-to-alls.

Shape letters: the package legend (:mod:`spiking_moe`): ``P`` expert-parallel processes,
``E`` experts per layer (``E_l = E / P`` local ones), ``T`` time steps (or window length),
``R`` dispatched rows (kept assignments) sent by this process, ``R_in`` rows it receives,
``D``/``O`` features; the job's size is written out, ``world``.

**Layout** (GShard, DeepSpeed-MoE, torchtitan). The ``world`` processes form a
``(world / P) x P`` :class:`~torch.distributed.device_mesh.DeviceMesh` with dimensions
``"replicate"`` and ``"expert"``: the ``P`` processes of a row (consecutive ranks) split the
experts of every layer, process ``i`` of the row holding experts ``[i E_l, (i + 1) E_l)``; the
``world / P`` processes of a column hold the same experts (replicas). Dense parameters
(embeddings, attention, routers, readout) are on every process.

**Forward** of one :class:`~spiking_moe.moe.SpikingMoE` layer, on every process of a row, with
its own tokens (:class:`~spiking_moe.strategies.ExpertParallelExperts`, the layer's expert
strategy once :func:`shard_experts` has split it):

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
divides by ``world`` and sums over the replicas, which is the data-parallel mean
``(1 / world) sum_r dL_r / dtheta``, what DDP gives the dense parameters; an expert no process
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

import torch
import torch.distributed as dist
from torch import nn

from .moe import moe_layers
from .strategies import (
    ExpertParallel,
    ExpertParallelExperts,
    ExpertShard,
    pack_spikes,
    unpack_spikes,
)

__all__ = [
    "ExpertParallel",
    "ExpertParallelExperts",
    "ExpertShard",
    "clip_grad_norm_",
    "expert_parameter_names",
    "init_expert_parallel",
    "is_expert_parallel",
    "pack_spikes",
    "reduce_expert_gradients",
    "shard_experts",
    "unpack_spikes",
]

logger = logging.getLogger(__name__)


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
    layers = moe_layers(model)
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
        if isinstance(layer.experts, ExpertShard):
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
    divided by the world size and summed over the replicas in one flat all-reduce; a parameter whose
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
