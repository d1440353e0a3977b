"""Training with expert parallelism (``train.expert_parallel``) under torchrun with gloo.

Oracles: plain DDP (``expert_parallel = 1``) on the same processes and data, which
:mod:`spiking_moe.parallel` must reproduce (DDP itself is tested against one process in
test_distributed.py); the uninterrupted run, which a stopped and resumed one must equal bit for
bit; and one process evaluating the gathered checkpoint on the whole set, which the
expert-parallel evaluation (batches cut so every rank makes the same number of calls) must
equal. The workers are tests/training/ep_worker.py and the experiments/train.py command.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from spiking_moe.config import ConfigError, TrainConfig, apply_overrides, load_config
from spiking_moe.data import BatchLoader
from spiking_moe.experiment import (
    check_experiment,
    evaluate_checkpoint,
    gather_checkpoint,
    load_trained_model,
)
from spiking_moe.training import (
    CheckpointError,
    CheckpointLayoutError,
    FiringRateMonitor,
    RoutingMonitor,
    Trainer,
    gather_expert_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from spiking_moe.training.checkpoint import load_expert_shard, remove_stale_expert_shards
from tests.tiny import tiny_moe, two_class_data
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

import ep_worker  # noqa: E402


def _run_worker(out: Path, world: int) -> list[dict]:
    out.mkdir()
    torchrun(
        out / "torchrun.log", world, str(ROOT / "tests" / "training" / "ep_worker.py"), str(out)
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_training(ranks: list[dict], out: Path, world: int) -> None:
    """Expert parallelism trains like DDP, resumes exactly and refuses bad layouts."""
    held = set()
    for rank, result in enumerate(ranks):
        # Processes 0 and 1 of each group of 2 hold experts [0, 1] and [2, 3].
        assert result["local_experts"] == [[0, 1], [2, 3]][rank % 2]
        ep, ddp = result["ep"], result["ddp"]
        experts = {k for k in ep if k.startswith("layers.0.experts.")}
        assert {k.split(".")[3] for k in experts} == {str(e) for e in result["local_experts"]}
        held |= set(ep)
        for name, value in ep.items():  # float64 (ep_worker.model): 1e-15 apart
            torch.testing.assert_close(value, ddp[name], rtol=1e-9, atol=1e-11, msg=name)
        # Stopped after step 3 (the middle of an epoch with 2 processes, the end of one
        # with 4), resumed from the sharded checkpoint: the uninterrupted run, bit for bit.
        assert result["stopped_interrupted"] and result["stopped_step"] == ep_worker.STOP_AT
        assert result["resumed_step"] == ep_worker.STEPS
        for name, value in ep.items():
            assert torch.equal(value, result["resumed"][name]), name
        # Evaluation cut batches (29 samples, batches of 7: ranks hold unequal numbers of
        # batches) yet sums what DDP's uncut evaluation sums.
        final, oracle = result["ep_final"], result["ddp_final"]
        assert final.keys() == oracle.keys()
        for key, value in final.items():
            assert value == pytest.approx(oracle[key], rel=1e-5, abs=1e-7), key
    assert held == set(ranks[0]["ddp"]), "the processes together hold every entry"
    bias = ranks[0]["ep"]["layers.0.router.expert_bias"]
    assert bias.abs().sum() > 0, "bias balancing must act for the test to check it"
    norms = [
        r["train/grad_norm"]
        for r in _records(out / "ep" / "metrics.jsonl")
        if "train/grad_norm" in r
    ]
    assert len(norms) == ep_worker.STEPS and min(norms) > 0.05, "the clip must act"

    errors = ranks[-1]["errors"]
    not_dividing = 4 if world == 2 else 3
    message = f"train.expert_parallel = {not_dividing} does not divide the world size {world}"
    assert message in errors["world"]
    assert "3 experts, not divisible by expert_parallel = 2" in errors["experts"]
    assert errors["layout_type"] == "CheckpointLayoutError"
    assert f"train.expert_parallel = 2 over {world} processes" in errors["layout"]
    assert "spiking-moe-gather" in errors["layout"]
    if world == 4:
        assert "expert_parallel = 2 over 4 processes" in errors["relayout"]
        assert "expert_parallel = 4 over 4" in errors["relayout"]
    assert "cannot be cut into that many" in errors["eval"]


@pytest.mark.slow
def test_two_processes_train_like_ddp_resume_exactly_and_gather(tmp_path):
    ranks = _run_worker(tmp_path / "run", 2)
    _check_training(ranks, tmp_path / "run", 2)
    run = tmp_path / "run" / "ep"

    # The index and the shards of the last two checkpoints (steps 4 and 6); no stale ones.
    index = load_checkpoint(run / "checkpoint.pt")
    assert index["step"] == 6 and "model" not in index
    assert sorted(p.name for p in run.glob("checkpoint.expert*")) == [
        f"checkpoint.expert{i}of2.step0000000{s}.pt" for i in (0, 1) for s in (4, 6)
    ]

    # Gathered: every entry of every rank, and the optimizer state in the whole model's order.
    gathered = gather_expert_checkpoint(run / "checkpoint.pt")
    whole = ep_worker.model()
    assert gathered["parameter_names"] == [n for n, _ in whole.named_parameters()]
    assert gathered["train_config"]["expert_parallel"] == 1
    for result in ranks:
        for name, value in result["ep"].items():
            assert torch.equal(gathered["model"][name], value), name
    position = {n: i for i, n in enumerate(gathered["parameter_names"])}
    for shard_index in (0, 1):
        shard = load_expert_shard(index, run / "checkpoint.pt", shard_index)
        for i, name in enumerate(shard["parameter_names"]):
            mine = shard["optimizer"]["state"].get(i)
            theirs = gathered["optimizer"]["state"].get(position[name])
            assert (mine is None) == (theirs is None), name
            if mine is not None:
                assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"]), name

    # One process evaluates the gathered model on the whole set: the expert-parallel numbers.
    whole.load_state_dict(gathered["model"])
    val = BatchLoader(two_class_data(29, seed=1, encoding="current"), 7)
    train = BatchLoader(two_class_data(64), 8, shuffle=True)
    callbacks = [FiringRateMonitor(), RoutingMonitor()]
    single = Trainer(whole, train, ep_worker.config(1), sinks=[], callbacks=callbacks)
    metrics = single.evaluate(val, "final")
    assert metrics.keys() == ranks[0]["ep_final"].keys()
    for key, value in ranks[0]["ep_final"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

    # ... and resumes it: same step, same optimizer state, one more step.
    path = save_checkpoint(gathered, tmp_path / "gathered" / "checkpoint.pt")
    resumed = Trainer(
        ep_worker.model(), train, ep_worker.config(1, max_steps=7), sinks=[], resume_from=path
    )
    assert resumed.step == 6
    state = resumed.optimizer.state_dict()["state"]
    for i, entry in gathered["optimizer"]["state"].items():
        assert torch.equal(state[i]["exp_avg"], entry["exp_avg"])
    assert resumed.fit().step == 7

    # A sharded checkpoint in one process: a clear error that names the gather.
    with pytest.raises(CheckpointLayoutError, match="expert_parallel = 2 over 2 processes.*gather"):
        Trainer(ep_worker.model(), train, ep_worker.config(1), out_dir=run, resume=True)
    with pytest.raises(CheckpointLayoutError, match="nothing to gather"):
        gather_expert_checkpoint(path)

    _check_crash_consistency(run)


def _check_crash_consistency(run: Path) -> None:
    """The index commits its shards: newer shards without an index (a crash between the
    writes) are ignored and cleaned; a damaged or foreign shard names the previous index."""
    index_path = run / "checkpoint.pt"
    index = load_checkpoint(index_path)
    for i in (0, 1):  # step 8's shards written, then a crash before its index
        shard = load_expert_shard(index, index_path, i)
        shard["step"] = 8
        torch.save(shard, run / f"checkpoint.expert{i}of2.step00000008.pt")
    assert gather_expert_checkpoint(index_path)["step"] == 6
    removed = remove_stale_expert_shards(index_path)
    assert sorted(p.name for p in removed) == [
        "checkpoint.expert0of2.step00000008.pt",
        "checkpoint.expert1of2.step00000008.pt",
    ]
    assert len(list(run.glob("checkpoint.expert*"))) == 4  # steps 4 and 6 kept

    shard_path = run / index["expert_parallel"]["shards"][1]
    foreign = run / "checkpoint.expert1of2.step00000004.pt"
    shard_path.write_bytes(foreign.read_bytes())  # another step's shard under this name
    with pytest.raises(CheckpointError, match="holds step 4.*names step 6") as caught:
        gather_expert_checkpoint(index_path)
    assert caught.value.previous == run / "checkpoint.prev.pt"
    shard_path.write_bytes(shard_path.read_bytes()[:1000])  # cut short
    with pytest.raises(CheckpointError, match="needs its expert shard.*--resume-from"):
        gather_expert_checkpoint(index_path)
    assert gather_expert_checkpoint(run / "checkpoint.prev.pt")["step"] == 4


@pytest.mark.slow
def test_four_processes_with_two_replicas_of_each_expert_train_like_ddp(tmp_path):
    ranks = _run_worker(tmp_path / "run", 4)
    _check_training(ranks, tmp_path / "run", 4)
    # Replicas hold equal experts; only the first of each wrote its shard.
    for name, value in ranks[0]["ep"].items():
        assert torch.equal(value, ranks[2]["ep"][name]), name
    index = load_checkpoint(tmp_path / "run" / "ep" / "checkpoint.pt")
    assert index["expert_parallel"]["size"] == 2 and index["expert_parallel"]["world_size"] == 4
    assert len(index["rng"]) == 4


def _train_command(config: str, out: Path, *overrides: str) -> list[str]:
    sets = [f"--set={o}" for o in ("train.device='cpu'", "train.progress=false", *overrides)]
    return [str(ROOT / "experiments" / "train.py"), f"--config={config}", f"--out={out}", *sets]


@pytest.mark.slow
def test_torchrun_trains_a_classifier_expert_parallel_and_the_gathered_checkpoint_scores_the_same(
    tmp_path,
):
    from spiking_moe.cli import energy_report_main, export_main, gather_main

    run = tmp_path / "run"
    torchrun(
        tmp_path / "torchrun.log",
        2,
        *_train_command(
            str(ROOT / "experiments" / "configs" / "default.toml"),
            run,
            "data.encoding='current'",  # no rate-code noise: per-rank draws would differ
            "model.hidden_features=32",
            "model.expert_hidden=16",
            "train.max_steps=8",
            "train.batch_size=32",
            "train.eval_batch_size=64",
            "train.warmup_steps=2",
            "train.expert_parallel=2",
        ),
    )
    reported = json.loads((run / "result.json").read_text())["metrics"]
    assert 0 < reported["test/accuracy"] < 1

    # The index itself is refused with the way out; the gathered checkpoint is read by all.
    assert energy_report_main([f"--checkpoint={run / 'checkpoint.pt'}", "--profile=cmos45"]) == 2
    with pytest.raises(CheckpointLayoutError, match="spiking-moe-gather"):
        load_trained_model(run / "checkpoint.pt")
    assert gather_main([f"--checkpoint={run / 'checkpoint.pt'}", f"--out={run}"]) == 2
    gathered = tmp_path / "gathered"
    assert gather_main([f"--checkpoint={run / 'checkpoint.pt'}", f"--out={gathered}"]) == 0
    assert json.loads((gathered / "config.json").read_text())["train"]["expert_parallel"] == 1

    model, config = load_trained_model(gathered / "checkpoint.pt")
    assert config.train.expert_parallel == 1
    assert len(model.layers[0].experts) == config.model.moe.num_experts
    assert (
        energy_report_main([f"--checkpoint={gathered / 'checkpoint.pt'}", "--profile=cmos45"]) == 0
    )
    energy = json.loads((gathered / "report_cmos45.json").read_text())
    assert energy["accuracy"] == reported["test/accuracy"]
    evaluation = evaluate_checkpoint(gathered / "checkpoint.pt", "cmos45")
    assert evaluation.metrics["test/loss"] == pytest.approx(reported["test/loss"], rel=1e-6)
    assert (
        export_main([f"--checkpoint={gathered / 'checkpoint.pt'}", f"--out={tmp_path / 'nir'}"])
        == 0
    )


@pytest.mark.slow
def test_torchrun_trains_the_language_model_expert_parallel(tmp_path):
    run = tmp_path / "run"
    torchrun(
        tmp_path / "torchrun.log",
        2,
        *_train_command(
            str(ROOT / "experiments" / "configs" / "lm_moe.toml"),
            run,
            f"data.text_paths=['{ROOT / 'spiking_moe' / 'config.py'}']",
            "data.context=16",
            "data.eval_windows=33",  # 17 and 16 windows per rank: 3 and 2 batches of 8
            "model.hidden_features=16",
            "model.num_heads=2",
            "model.expert_hidden=8",
            "model.shared_hidden=8",
            "model.num_experts=4",
            "train.max_steps=3",
            "train.eval_every=0",
            "train.batch_size=4",
            "train.eval_batch_size=8",
            "train.expert_parallel=2",
        ),
    )
    reported = json.loads((run / "result.json").read_text())["metrics"]
    gathered = gather_checkpoint(run / "checkpoint.pt", tmp_path / "gathered")
    evaluation = evaluate_checkpoint(gathered, "cmos45")
    for key in ("test/bpb", "test/accuracy"):
        assert evaluation.metrics[key] == pytest.approx(reported[key], rel=1e-6), key


def test_expert_parallel_settings_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.expert_parallel must be >= 1, got 0"):
        TrainConfig(expert_parallel=0)
    base = load_config(ROOT / "experiments" / "configs" / "default.toml")  # 4 experts
    monkeypatch.setenv("WORLD_SIZE", "4")
    bad = {
        "train.expert_parallel=3": "expert_parallel = 3 does not divide model.moe.num_experts = 4",
        "model.kind='dense_snn'": "model.kind = 'dense_snn' with model.moe.num_experts = 4 has no MoE",
    }
    for override, message in bad.items():
        config = apply_overrides(base, ["train.expert_parallel=2", override])
        with pytest.raises(ConfigError, match=message):
            check_experiment(config, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "6")
    config = apply_overrides(base, ["train.expert_parallel=4"])
    with pytest.raises(ConfigError, match="expert_parallel = 4 does not divide the world size 6"):
        check_experiment(config, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "8")
    check_experiment(config, tmp_path / "run")

    monkeypatch.delenv("WORLD_SIZE")
    loader = BatchLoader(two_class_data(16), 8)
    with pytest.raises(ValueError, match="expert_parallel = 2 needs a multi-process job"):
        Trainer(tiny_moe(), loader, ep_worker.config(2))
