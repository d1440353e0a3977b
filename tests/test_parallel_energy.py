"""Energy under expert parallelism: the counts of 2 and 4 gloo processes, gathered, against one
process holding every expert.

Each process counts its shard of the global batch (:func:`count_energy`,
:func:`count_operations_parallel`, :func:`measure_energy`, and :class:`EnergyReportCallback`
driven through its hooks); the test process (one process, no sharding) builds the same model
from the same seed and is the oracle twice over:

- *shards*: it counts each process's shard in turn and merges the counts. Expert-parallel
  counts must equal these exactly, field by field (``calls`` too: an owner calls an expert
  once per process that sent it rows, one process once per shard that routed to it), and so
  must the reports. With a capacity limit this is the only oracle: drops are decided per
  process.
- *global*: without a capacity limit, one pass over the global batch; every field matches but
  ``calls``/``binary_calls`` (one call per process instead of one), and every report field but
  ``LayerEnergy.calls``.

The dense twin (every expert on every token, across processes) is held to the same oracles.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_parallel import run_processes
from tiny import tiny_moe

import energy
from spiking_moe import SpikingMoELM
from spiking_moe.parallel import init_expert_parallel, shard_experts
from spiking_moe.training import (
    EnergyReportCallback,
    count_energy,
    count_operations_parallel,
    expert_parallel_counts,
    measure_energy,
)
from spiking_moe.training.distributed import all_gather_objects

T, B = 6, 5  # B: samples per process and batch
NUM_BATCHES = 2  # counted by the callback, of the 3 evaluated
PROFILE = "cmos45"

CASES = {
    "plain": dict(num_moe_layers=2),
    "capacity": dict(capacity_factor=0.75),
    # Windows of 2 of the 6 steps: the experts' calls are not time-major for the counter.
    "window": dict(window=2),
    "idle": dict(idle=3),  # expert 3 of every layer is chosen by no token
}


# The counts are of spikes, and the oracles compute them in other batches (shards, the global
# batch) and kernels (an owner's calls per source, the event-driven or the dense product as each
# call's density decides) than the processes: in float32 that rounding (about 1e-7) could flip
# a spike near the threshold on some CPU, in float64 (about 1e-16) it cannot. So the models and
# inputs are float64.


def make_model(case: str):
    options = dict(CASES[case])
    idle = options.pop("idle", None)
    model = tiny_moe(num_experts=4, k=2, **options).double().eval()
    if idle is not None:
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer[idle] = -1e4
    return model


def global_batches(world: int, n: int = NUM_BATCHES + 1):
    generator = torch.Generator().manual_seed(5)
    for _ in range(n):
        x = (torch.rand(T, B * world, 8, generator=generator) < 0.4).double()
        y = torch.randint(0, 2, (B * world,), generator=generator)
        yield x, y


def shard(batch, rank: int):
    x, y = batch
    return x[:, rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]


def fake_trainer(model):
    """What the callback's hooks read from a Trainer."""
    return SimpleNamespace(model=model, device=torch.device("cpu"), step=0, tensorboard_writer=None)


def run_callback(model, batches, num_batches=NUM_BATCHES):
    callback = EnergyReportCallback(PROFILE, num_batches=num_batches, prefixes=("test",))
    trainer = fake_trainer(model)
    callback.on_eval_start(trainer, "test")
    for batch in batches:
        callback.on_eval_batch_end(trainer, "test", batch, output=None)
    metrics = callback.on_eval_end(trainer, "test")
    return callback, metrics


# ----------------------------------------------------------------------------- worker


def energy_worker(rank: int, world: int, size: int, cases: list[str]) -> dict:
    ep = init_expert_parallel(size)
    results = {}
    for case in cases:
        model = shard_experts(make_model(case), ep)
        x, _ = shard(next(global_batches(world)), rank)
        counts, dense = count_energy(model, x)
        shards = all_gather_objects((counts, dense))
        callback, metrics = run_callback(model, [shard(b, rank) for b in global_batches(world)])
        results[case] = {
            "counts": energy.merge_counts(*(c for c, _ in shards)),
            "dense": energy.merge_counts(*(d for _, d in shards)),
            "parallel": count_operations_parallel(model, x),
            "measured": measure_energy(model, x, PROFILE),
            "callback": (callback.report, callback.counts, callback.dense_counts),
            "callback_metrics": (metrics, callback.samples),
        }
    return results


# ----------------------------------------------------------------------------- oracles


def shards_oracle(case: str, world: int):
    """One process counts every process's shard of the first batch in turn; merged."""
    model = make_model(case)
    batch = next(global_batches(world))
    passes = [count_energy(model, shard(batch, r)[0]) for r in range(world)]
    return (
        energy.merge_counts(*(c for c, _ in passes)),
        energy.merge_counts(*(d for _, d in passes)),
    )


def callback_oracle(case: str, world: int):
    """One process's callback fed every process's shard of each counted batch."""
    model = make_model(case)
    batches = list(global_batches(world))[:NUM_BATCHES]
    shards = [shard(b, r) for b in batches for r in range(world)]
    return run_callback(model, shards, num_batches=0)


def assert_counts_equal(got, expected, ignore=()):
    assert got.time_steps == expected.time_steps
    assert [m.name for m in got.layers] == [m.name for m in expected.layers]
    for g, e in zip(got.layers, expected.layers, strict=True):
        for field in dataclasses.fields(g):
            if field.name not in ignore:
                assert getattr(g, field.name) == getattr(e, field.name), (g.name, field.name)
    assert got.groups() == expected.groups()  # per-expert totals and loads
    for total in ("acs", "macs", "neuron_updates", "spikes", "memory_reads", "memory_writes"):
        assert got.total(total) == expected.total(total)


def without_calls(report):
    layers = tuple(dataclasses.replace(m, calls=0) for m in report.layers)
    return dataclasses.replace(report, layers=layers)


def check(results: list[dict], world: int, cases: list[str]) -> None:
    for result in results:
        assert "error" not in result, result.get("trace")
    for case in cases:
        counts, dense = shards_oracle(case, world)
        report = energy.build_report(counts, PROFILE, dense_counts=dense)
        assert counts.total("spikes") > 0 and counts.total("acs") > 0
        expert_calls = [m.calls for m in counts.layers if m.group and m.kind == "linear"]
        assert max(expert_calls) > 1, "some expert must get rows from several processes"
        for rank, result in enumerate(results):
            got = result[case]
            # Every process holds the merged counts and the report.
            assert_counts_equal(got["counts"], counts)
            assert_counts_equal(got["dense"], dense)
            assert_counts_equal(got["parallel"], counts)
            assert energy.build_report(got["counts"], PROFILE, dense_counts=got["dense"]) == report
            assert got["measured"] == report, (case, rank)
        if case == "capacity":
            model = make_model(case)
            batch = next(global_batches(world))
            drops = [int(model(shard(batch, r)[0]).routing[0].dropped) for r in range(world)]
            assert sum(drops) > 0, "the capacity limit must drop assignments"
        else:
            x, _ = next(global_batches(world))
            one_counts, one_dense = count_energy(make_model(case), x)
            one_report = energy.build_report(one_counts, PROFILE, dense_counts=one_dense)
            for result in results:
                got = result[case]
                ignore = ("calls", "binary_calls")
                assert_counts_equal(got["counts"], one_counts, ignore)
                assert_counts_equal(got["dense"], one_dense, ignore)
                assert without_calls(got["measured"]) == without_calls(one_report)
        if case == "idle":
            for label, group in counts.groups().items():
                if label.endswith("experts.3"):
                    assert group.tokens == 0 and group.acs == 0
            idle = [m for m in counts.layers if ".experts.3." in m.name]
            assert idle and all(m.calls == 0 for m in idle)
            assert counts.layers[-len(idle) :] == tuple(idle), "idle experts are listed last"
        callback, metrics = callback_oracle(case, world)
        for result in results:
            report, got_counts, got_dense = result[case]["callback"]
            assert_counts_equal(got_counts, callback.counts)
            assert_counts_equal(got_dense, callback.dense_counts)
            assert report == callback.report
            assert result[case]["callback_metrics"] == (metrics, callback.samples)
        assert callback.samples == NUM_BATCHES * world * B


@pytest.mark.parametrize(
    "world, size, cases",
    [
        (2, 2, sorted(CASES)),
        (4, 4, ["capacity", "idle"]),
        (4, 2, ["window"]),  # two replicas of each expert
    ],
)
def test_expert_parallel_energy_equals_one_process(tmp_path, world, size, cases):
    results = run_processes(tmp_path, world, energy_worker, size, cases)
    check(results, world, cases)


# ----------------------------------------------------------------------------- language model


def tiny_lm():
    """Attention (products and softmax), a shared expert and T = 2 steps per token."""
    torch.manual_seed(0)
    model = SpikingMoELM(
        256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16, shared_experts=1, num_steps=2
    )
    return model.double().eval()


def lm_ids(world: int):
    return torch.randint(0, 256, (3 * world, 8), generator=torch.Generator().manual_seed(3))


def lm_worker(rank: int, world: int) -> dict:
    model = shard_experts(tiny_lm(), init_expert_parallel(world))
    shards = all_gather_objects(count_energy(model, lm_ids(world)[rank * 3 : (rank + 1) * 3]))
    return {
        "counts": energy.merge_counts(*(c for c, _ in shards)),
        "dense": energy.merge_counts(*(d for _, d in shards)),
    }


def test_expert_parallel_energy_of_a_language_model_equals_one_process(tmp_path):
    world = 2
    results = run_processes(tmp_path, world, lm_worker)
    model, ids = tiny_lm(), lm_ids(world)
    passes = [count_energy(model, ids[r * 3 : (r + 1) * 3]) for r in range(world)]
    counts = energy.merge_counts(*(c for c, _ in passes))
    dense = energy.merge_counts(*(d for _, d in passes))
    one_counts, one_dense = count_energy(model, ids)
    assert any(m.kind == "matmul" for m in counts.layers)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert_counts_equal(result["counts"], counts)
        assert_counts_equal(result["dense"], dense)
        assert_counts_equal(result["counts"], one_counts, ("calls", "binary_calls"))
        assert_counts_equal(result["dense"], one_dense, ("calls", "binary_calls"))


def test_in_one_process_the_parallel_count_is_the_plain_count():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = make_model("window")
    x, _ = next(global_batches(1))
    counts = energy.count_operations(model, x)
    assert expert_parallel_counts(model, counts) is counts  # no expert-parallel layer
    assert count_operations_parallel(model, x) == counts
