"""Expert parallelism (spiking_moe.parallel) in 2 and 4 gloo processes against one process that
holds every expert: outputs, routing, activity, losses and gradients of a layer; optimizer
steps of a model; the errors of a bad layout.

The processes are started with ``torch.multiprocessing.spawn``; each writes its results to a
file that the test (the one process) compares with its own computation. The single-process
reference runs the same model on each process's shard of the global batch and averages the
losses (what data parallelism optimises); without a capacity limit that is the pass over the
global batch.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import tiny_moe

from spiking_moe.experts import MLPExpert, SpikingExpert
from spiking_moe.models import active_parameter_count
from spiking_moe.moe import SpikingMoE
from spiking_moe.nir import export_bundle
from spiking_moe.parallel import (
    ExpertShard,
    clip_grad_norm_,
    expert_parameter_names,
    init_expert_parallel,
    pack_spikes,
    reduce_expert_gradients,
    shard_experts,
    unpack_spikes,
)
from spiking_moe.router import RateRouter

T, B, D, O, E = 4, 6, 16, 16, 8  # B: tokens per process

CASES = {
    "plain": dict(),
    "capacity": dict(capacity_factor=0.75),
    "shared": dict(shared=2),
    "window": dict(window=2, steps=5),
    "sequence": dict(sequence=3),
    "top1": dict(k=1),
    "dense": dict(dense=True),
    "mlp": dict(mlp=True),  # experts without spiking activity (the ANN twins' MLPExpert)
    "grouped": dict(grouped_gemm="always"),  # one grouped GEMM over the (source, expert) blocks
    "float": dict(spike_exchange="float"),  # rows as floats instead of bits
    "unchecked": dict(spike_exchange="bits", check_spikes=False),  # bits, checked as they go
}


def make_layer(case: str) -> SpikingMoE:
    options = CASES[case]
    torch.manual_seed(0)
    k = options.get("k", 2)
    router = RateRouter(
        D,
        E,
        k,
        window=options.get("window"),
        capacity_factor=options.get("capacity_factor"),
        bias_update_rate=0.0,
    )
    if options.get("mlp"):
        experts = [MLPExpert(D, 12, O) for _ in range(E)]
    else:
        experts = [SpikingExpert(D, 12, O, threshold=0.3) for _ in range(E)]
    shared = [SpikingExpert(D, 8, O, threshold=0.3) for _ in range(options.get("shared", 0))]
    layer = SpikingMoE(
        router=router,
        experts=experts,
        shared_experts=shared,
        grouped_gemm=options.get("grouped_gemm", "auto"),
        spike_exchange=options.get("spike_exchange", "auto"),
        check_spikes=options.get("check_spikes", True),
    )
    layer.dense = options.get("dense", False)
    if case == "grouped":
        # torch._grouped_mm takes no float64, so this case stays float32 and is made exact
        # instead: parameters on a grid of 2^-6 (|w| <= 1/2) and binary (or rate, multiples of
        # 1/4) inputs give sums that float32 holds exactly in any order, so no GEMM's
        # summation order can flip a spike.
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.round(p * 64) / 64)
        return layer
    # float64: the processes compute the experts in other kernels and sum gradients in other
    # orders than one process; in float32 that rounding (about 1e-7) could flip a spike whose
    # membrane lies that close to the threshold on some CPU. In float64 it is about 1e-16.
    return layer.double()


def layer_dtype(case: str) -> torch.dtype:
    return torch.float32 if case == "grouped" else torch.float64


def shard_input(case: str, world: int, rank: int) -> torch.Tensor:
    options = CASES[case]
    generator = torch.Generator().manual_seed(1)
    steps = options.get("steps", T)
    if "sequence" in options:
        x = torch.rand(steps, B * world, options["sequence"], D, generator=generator) < 0.3
    else:
        x = torch.rand(steps, B * world, D, generator=generator) < 0.3
    return x.to(layer_dtype(case))[:, rank * B : (rank + 1) * B]


def shard_loss(out, rank: int) -> torch.Tensor:
    """Depends on every output spike, the aux loss and the activity (each rank its own)."""
    generator = torch.Generator().manual_seed(100 + rank)
    weights = torch.randn(out.spikes.shape, generator=generator).to(out.spikes.dtype)
    return (out.spikes * weights).sum() + out.aux_loss + 0.01 * out.activity.spikes.sum()


def _init(rank: int, world: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=world
    )


def _entry(rank: int, world: int, folder: str, target, args) -> None:
    folder = Path(folder)
    try:
        _init(rank, world, folder)
        result = target(rank, world, *args)
    except Exception as error:  # report it to the test instead of hanging the others
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    torch.save(result, folder / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def run_processes(tmp_path: Path, world: int, target, *args) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, str(tmp_path), target, args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _grads(module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()
    }


# ----------------------------------------------------------------------------- layer workers


def layer_worker(rank: int, world: int, size: int, cases: list[str]) -> dict:
    ep = init_expert_parallel(size)
    results = {}
    for case in cases:
        layer = make_layer(case)
        shard_experts(layer, ep)
        out = layer(shard_input(case, world, rank))
        loss = shard_loss(out, rank)
        loss.backward()
        reduce_expert_gradients(layer, ep)
        expert_names = set(expert_parameter_names(layer))
        for name, p in layer.named_parameters():  # what DDP does for the dense parameters
            if name not in expert_names and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        results[case] = {
            "spikes": out.spikes.detach(),
            "tokens_per_expert": out.routing.tokens_per_expert,
            "dropped": int(out.routing.dropped),
            "activity": (out.activity.names, out.activity.spikes.detach(), out.activity.updates),
            "loss": loss.detach(),
            "grads": _grads(layer),
            "local": list(layer.experts.global_ids),
        }
    return results


def reference(case: str, world: int) -> dict:
    layer = make_layer(case)
    outs, losses = [], []
    for rank in range(world):
        out = layer(shard_input(case, world, rank))
        loss = shard_loss(out, rank)
        outs.append(out)
        losses.append(loss)
    torch.stack(losses).mean().backward()
    return {"outs": outs, "losses": losses, "grads": _grads(layer)}


# Gradients. float64: below 4 here, sums of at most a few hundred terms; another summation
# order moves them by n * 2^-53 * sum|terms| < 1e-12; a wrong scale, a missing reduction or a
# misrouted row errs by far more.
# float32 (the grouped case, world 2 only): both sides run the same single-threaded kernels
# on the same operands, and sum two shard gradients (a + b in either order, the 1/2 exact), so
# only a kernel's memory alignment could move a result, by a few ulps (1e-7 of the largest
# term): far inside rtol 1e-4.
GRAD_TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
}


def check_layer(results: list[dict], world: int, cases: list[str]) -> None:
    for result in results:
        assert "error" not in result, result.get("trace")
    for case in cases:
        ref = reference(case, world)
        if case == "capacity":
            assert sum(int(o.routing.dropped) for o in ref["outs"]) > 0, "capacity must drop"
        seen_experts = set()
        for rank, result in enumerate(results):
            got, out = result[case], ref["outs"][rank]
            # Exact: float64 (or the grouped case's exact float32) leaves no spike to chance.
            assert torch.equal(got["spikes"], out.spikes.detach()), (case, rank)
            assert torch.equal(got["tokens_per_expert"], out.routing.tokens_per_expert)
            assert got["dropped"] == int(out.routing.dropped)
            names, spikes, updates = got["activity"]
            assert names == out.activity.names
            torch.testing.assert_close(spikes, out.activity.spikes.detach())
            assert torch.equal(updates, out.activity.updates)
            torch.testing.assert_close(got["loss"], ref["losses"][rank].detach())
            for name, grad in got["grads"].items():
                expected = ref["grads"][name]
                if expected is None:
                    assert grad is None, (case, name)
                else:
                    assert grad is not None, (case, name)
                    torch.testing.assert_close(grad, expected, **GRAD_TOLERANCE[grad.dtype])
            seen_experts.update(result[case]["local"])
            # A process holds only its experts: E / P of them, named by their global ids.
            held = {n.split(".")[1] for n in got["grads"] if n.startswith("experts.")}
            assert held == {str(e) for e in result[case]["local"]}
        assert seen_experts == set(range(E))


@pytest.mark.parametrize(
    "world, size, cases",
    [
        (2, 2, sorted(CASES)),
        (4, 4, ["plain", "capacity"]),
        (4, 2, ["plain", "shared"]),  # two replicas of each expert
    ],
)
@pytest.mark.usefixtures("one_thread")  # the reference runs the workers' one-thread kernels
def test_expert_parallel_layer_equals_one_process_holding_all_experts(tmp_path, world, size, cases):
    results = run_processes(tmp_path, world, layer_worker, size, cases)
    check_layer(results, world, cases)


# ----------------------------------------------------------------------------- model training


def make_model():
    # float64: the processes sum gradients in another order than one process does, and Adam's
    # normalisation of tiny gradients amplifies float32 rounding past any tolerance that would
    # still catch a wrong reduction (1.6e-5 after three steps on an AMD EPYC). In float64 the
    # rounding stays near 1e-13, so the comparison below can be tight on every CPU.
    return tiny_moe(num_experts=4, k=2, bias_update_rate=0.0).double()


def model_batches(world: int, steps: int):
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = (torch.rand(T, 4 * world, 8, generator=generator) < 0.4).double()
        y = torch.randint(0, 2, (4 * world,), generator=generator)
        yield x, y


def model_loss(model, x, y):
    out = model(x)
    return torch.nn.functional.cross_entropy(out.logits, y) + out.aux_loss


def train_worker(rank: int, world: int, size: int, steps: int, max_norm: float) -> dict:
    ep = init_expert_parallel(size)
    torch.manual_seed(rank)  # different inits per process: sharding takes rank 0's model
    model = make_model()
    if rank:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    shard_experts(model, ep)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model, buffers=True)
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    norms = []
    for x, y in model_batches(world, steps):
        shard = slice(rank * 4, (rank + 1) * 4)
        optimizer.zero_grad(set_to_none=True)
        model_loss(ddp, x[:, shard], y[shard]).backward()
        reduce_expert_gradients(model, ep)
        norms.append(clip_grad_norm_(model, max_norm, ep))
        optimizer.step()
    try:
        export_bundle(model, Path(os.environ["EP_TEST_DIR"]) / f"bundle{rank}")
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {
        "state": model.state_dict(),
        "norms": torch.stack(norms),
        "active": active_parameter_count(model),
        "export_refused": refused,
    }


def train_reference(world: int, steps: int, max_norm: float):
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    norms = []
    for x, y in model_batches(world, steps):
        optimizer.zero_grad(set_to_none=True)
        losses = [
            model_loss(model, x[:, r * 4 : (r + 1) * 4], y[r * 4 : (r + 1) * 4])
            for r in range(world)
        ]
        torch.stack(losses).mean().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
    return model.state_dict(), torch.stack(norms)


@pytest.mark.parametrize("world, size", [(2, 2), (4, 2)])
def test_optimizer_steps_with_expert_parallelism_match_one_process(
    tmp_path, world, size, monkeypatch
):
    monkeypatch.setenv("EP_TEST_DIR", str(tmp_path))
    steps, max_norm = 3, 0.04
    results = run_processes(tmp_path, world, train_worker, size, steps, max_norm)
    for result in results:
        assert "error" not in result, result.get("trace")
    state, norms = train_reference(world, steps, max_norm)
    assert (norms > max_norm).all(), "the clip must act for the test to check it"
    held = set()
    active = active_parameter_count(make_model())
    for result in results:
        assert result["active"] == active
        assert "expert-parallel" in result["export_refused"]
        torch.testing.assert_close(result["norms"], norms, rtol=1e-9, atol=1e-11)
        for name, value in result["state"].items():
            torch.testing.assert_close(value, state[name], rtol=1e-9, atol=1e-11, msg=name)
            held.add(name)
    assert held == set(state), "the processes together hold every parameter"


# ----------------------------------------------------------------------------- bad layouts


def bad_layout_worker(rank: int, world: int) -> dict:
    errors = {}
    try:
        init_expert_parallel(3)
    except ValueError as error:
        errors["size"] = str(error)
    ep = init_expert_parallel(2)
    torch.manual_seed(0)
    odd = SpikingMoE(router=RateRouter(D, 3, 1), experts=[SpikingExpert(D, 4, O) for _ in range(3)])
    try:
        shard_experts(odd, ep)
    except ValueError as error:
        errors["experts"] = str(error)
    experts = 4 if rank == 0 else 6
    mismatched = SpikingMoE(
        router=RateRouter(D, experts, 1),
        experts=[SpikingExpert(D, 4, O) for _ in range(experts)],
    )
    try:
        shard_experts(mismatched, ep)
    except ValueError as error:
        errors["mismatch"] = str(error)
    graded = make_layer("unchecked")
    shard_experts(graded, ep)
    x = shard_input("unchecked", world, rank)
    if rank == 1:
        x = x * 0.5  # graded values on one process only: both must stop
    try:
        graded(x)
    except ValueError as error:
        errors["graded"] = str(error)
    return errors


def test_bad_layouts_are_clear_errors(tmp_path):
    results = run_processes(tmp_path, 2, bad_layout_worker)
    for errors in results:
        assert "error" not in errors, errors.get("trace")
        assert "expert_parallel = 3 does not divide the world size 2" in errors["size"]
        assert "3 experts, not divisible by expert_parallel = 2" in errors["experts"]
        assert "[4]" in errors["mismatch"] and "[6]" in errors["mismatch"], errors["mismatch"]
        assert "spike_exchange='bits' but rows that are not spikes" in errors["graded"]


def test_spikes_pack_eight_to_a_byte_and_unpack_exactly():
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]])
    packed = pack_spikes(x)
    # Feature f is bit f % 8 of byte f // 8: 1 + 128, then 1; 2, then 0.
    assert packed.dtype == torch.uint8 and packed.tolist() == [[129, 1], [2, 0]]
    assert torch.equal(unpack_spikes(packed, 9, torch.float64), x.double())
    for features in (1, 8, 13, 64):
        spikes = (torch.rand(7, features) < 0.5).float()
        assert torch.equal(unpack_spikes(pack_spikes(spikes), features, torch.float32), spikes)
    assert pack_spikes(torch.zeros(0, 5)).shape == (0, 1)


def test_expert_shard_names_and_indexing():
    experts = {2: SpikingExpert(4, 3, 4), 3: SpikingExpert(4, 3, 4)}
    shard = ExpertShard(experts, num_experts=4)
    assert len(shard) == 2 and list(shard) == [experts[2], experts[3]]
    assert shard[3] is experts[3]
    assert {n.split(".")[0] for n, _ in shard.named_parameters()} == {"2", "3"}
    with pytest.raises(
        KeyError, match=r"expert 0 is not held by this process \(it holds \[2, 3\]\)"
    ):
        shard[0]
    with pytest.raises(ValueError, match="outside"):
        ExpertShard({4: SpikingExpert(4, 3, 4)}, num_experts=4)


def test_expert_parallelism_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torchrun"):
        init_expert_parallel(2)


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
