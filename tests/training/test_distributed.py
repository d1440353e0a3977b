"""DDP under torchrun: 2 CPU processes with gloo train like one process on twice the batch,
and bias balancing takes the step of the global batch on every rank."""

import json
import sys
from pathlib import Path

import pytest
import torch

from spiking_moe.training import all_gather_objects, all_reduce_sum

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

import ddp_worker  # noqa: E402

from tests.torchrun import torchrun  # noqa: E402


def _torchrun(out: Path, kind: str) -> list[dict]:
    out.mkdir()
    torchrun(
        out / "torchrun.log", 2, str(ROOT / "tests" / "training" / "ddp_worker.py"), str(out), kind
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    ranks = _torchrun(tmp_path / "ddp", "tiny")
    assert ranks[0]["step"] == ranks[1]["step"] == 12
    for name, p0 in ranks[0]["state"].items():
        assert torch.equal(p0, ranks[1]["state"][name]), name
    # Evaluation metrics are summed over both shards, so both ranks report the same numbers.
    assert ranks[0]["metrics"]["val/accuracy"] == ranks[1]["metrics"]["val/accuracy"]

    # Rank r's batch s is every 2nd sample of the same permuted block of 16 that one process
    # with batch 16 takes, and DDP averages the two gradients: the same optimisation.
    trainer, _ = ddp_worker.run(tmp_path / "single", "tiny", rank=0, world_size=1, batch_size=16)
    for name, p in trainer.model.state_dict().items():
        # float64 (ddp_worker.in_float64): the two sums of the gradients agree to about 1e-16.
        torch.testing.assert_close(ranks[0]["state"][name], p, rtol=1e-9, atol=1e-11, msg=name)

    # Only rank 0 wrote sinks and the checkpoint; the loss went down.
    records = [
        json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["step"] == 12
    assert len(list((tmp_path / "ddp").glob("events.out.tfevents*"))) == 1


@pytest.mark.slow
def test_bias_balancing_under_ddp_takes_the_global_batch_step_on_every_rank(tmp_path):
    ranks = _torchrun(tmp_path / "ddp", "moe")
    key = "layers.0.router.expert_bias"
    biases = [r["state"][key] for r in ranks]
    assert biases[0].abs().sum() > 0
    assert torch.equal(biases[0], biases[1])
    trainer, _ = ddp_worker.run(tmp_path / "single", "moe", rank=0, world_size=1, batch_size=16)
    assert torch.equal(biases[0], trainer.model.state_dict()[key])
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], p, rtol=1e-9, atol=1e-11, msg=name)


def test_reductions_are_the_identity_in_a_single_process():
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
