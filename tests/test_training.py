"""Trainer: learning, exact resume, atomic checkpoints, NaN stop, signals, hooks, sinks, CLI."""

import dataclasses
import json
import math
import os
import signal
from typing import NamedTuple

import pytest
import torch
from torch import nn

import spiking_moe.training as training
from spiking_moe import LIF
from spiking_moe.cli import train_main
from spiking_moe.config import TrainConfig
from spiking_moe.data import BatchLoader, InMemoryDataset
from spiking_moe.monitors import FiringRateMonitor, RoutingMonitor
from spiking_moe.training import (
    Callback,
    JSONLinesSink,
    NonFiniteLossError,
    TensorBoardSink,
    Trainer,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    unpack_output,
)


class Output(NamedTuple):
    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple = ()


class TinySNN(nn.Module):
    """Linear -> LIF -> Linear, mean over time; dropout so that the torch RNG matters."""

    def __init__(self, features=8, hidden=16, classes=2, aux_weight=0.0):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.lif = LIF(beta=0.8, threshold=0.5)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, classes)
        self.aux_weight = aux_weight

    def forward(self, x_TBF):
        logits = self.fc2(self.drop(self.lif(self.fc1(x_TBF)))).mean(0)
        aux = self.aux_weight * self.fc1.weight.pow(2).sum()
        return Output(logits, aux)


def _dataset(n=72, seed=0):
    """Two rate-coded classes with different firing-probability prototypes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    prototypes = torch.tensor([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    x = (prototypes[y] + 0.1 * torch.randn(n, 8, generator=g)).clamp(0, 1)
    return InMemoryDataset(x, y, encoding="rate", num_steps=6, num_classes=2)


def _config(**overrides):
    base = dict(
        max_steps=14,
        batch_size=16,
        lr=2e-2,
        warmup_steps=2,
        log_every=1,
        device="cpu",
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


class Recorder(Callback):
    """Per-step losses; optionally asks the trainer to stop (or signals itself) at a step."""

    def __init__(self, stop_at=None, signal_at=None):
        self.losses = {}
        self.stop_at, self.signal_at = stop_at, signal_at

    def on_train_batch_end(self, trainer, batch, output, loss):
        self.losses[trainer.step] = loss.item()
        if trainer.step == self.stop_at:
            trainer.request_stop()
        if trainer.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


def _train(out_dir, config, *, resume=False, model=None, callbacks=(), **kwargs):
    seed_everything(0)
    model = model or TinySNN()
    train = BatchLoader(_dataset(), config.batch_size, shuffle=True, seed=config.seed)
    val = BatchLoader(_dataset(40, seed=1), 20)
    trainer = Trainer(
        model,
        train,
        config,
        out_dir=out_dir,
        val_loader=val,
        callbacks=callbacks,
        resume=resume,
        **kwargs,
    )
    result = trainer.fit()
    trainer.close()
    return trainer, result


def test_tiny_model_learns_and_tensorboard_holds_scalars_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class ReportStub(Callback):
        """Stands in for the energy report: scalars returned, Markdown text logged."""

        def on_eval_end(self, trainer, prefix):
            if prefix == "test":
                trainer.log_text("energy/report", "| layer | SOPs |\n| --- | --- |\n| fc1 | 42 |")
                return {"test/energy/per_sample_pJ": 42.0}
            return None

    recorder = Recorder()
    seed_everything(0)
    trainer = Trainer(
        TinySNN(),
        BatchLoader(_dataset(), 16, shuffle=True),
        _config(max_steps=40, log_every=5),
        out_dir=tmp_path,
        val_loader=BatchLoader(_dataset(40, seed=1), 20),
        callbacks=[recorder, ReportStub(), FiringRateMonitor()],
        hparams={"train.lr": 0.02, "model.kind": "tiny"},
    )
    result = trainer.fit()
    test = trainer.evaluate(BatchLoader(_dataset(40, seed=2), 20), "test")
    trainer.close()
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert test["test/accuracy"] > 0.9 and result.metrics["val/accuracy"] > 0.9
    assert test["test/energy/per_sample_pJ"] == 42.0

    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/accuracy",
        "train/lr",
        "val/accuracy",
        "test/energy/per_sample_pJ",
        "test/firing_rate/lif",
    ):
        assert tag in scalars, tag
    train_loss = events.Scalars("train/loss")
    assert [e.step for e in train_loss] == list(range(5, 41, 5))
    assert train_loss[0].value == pytest.approx(sum(losses[:5]) / 5, rel=1e-5)
    text_tags = [t for t in events.Tags()["tensors"] if t.startswith("energy/report")]
    assert text_tags
    text = events.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "| fc1 | 42 |" in text
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("tag") == "energy/report" for r in lines)
    assert lines[-1]["hparams"]["model.kind"] == "tiny"


def test_resume_equals_an_uninterrupted_run(tmp_path):
    """7 steps, stop (mid-epoch 2), resume to 14 == 14 steps in one go: weights and losses."""
    config = _config(max_steps=14)
    straight = Recorder()
    trainer_c, _ = _train(tmp_path / "straight", config, callbacks=[straight])

    first = Recorder(stop_at=7)
    _, result_a = _train(tmp_path / "split", config, callbacks=[first])
    assert result_a.interrupted and result_a.step == 7
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 7
    second = Recorder()
    trainer_b, result_b = _train(tmp_path / "split", config, callbacks=[second], resume=True)
    assert result_b.step == 14 and not result_b.interrupted
    assert sorted(second.losses) == list(range(8, 15))
    for step in range(8, 15):
        assert second.losses[step] == straight.losses[step], step
    for (name, a), b in zip(
        trainer_c.model.state_dict().items(), trainer_b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer, _ = _train(tmp_path, _config(max_steps=5))
    path = tmp_path / "checkpoint.pt"
    before = load_checkpoint(path)
    assert before["step"] == 5

    def killed(src, dst):
        raise OSError("simulated kill between write and replace")

    trainer.step = 99
    with torch.no_grad():
        trainer.model.fc1.weight.add_(1.0)
    monkeypatch.setattr(training.os, "replace", killed)
    with pytest.raises(OSError, match="simulated kill"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    after = load_checkpoint(path)  # weights_only=True
    assert after["step"] == 5
    assert torch.equal(after["model"]["fc1.weight"], before["model"]["fc1.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_checkpoint_loads_with_weights_only_and_holds_rng_state(tmp_path):
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "c.pt")
    trainer, _ = _train(tmp_path / "run", _config(max_steps=3))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch"} <= set(
        state
    )
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["a"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


class NaNAt(TinySNN):
    def __init__(self, bad_call, value=float("nan")):
        super().__init__()
        self.calls, self.bad_call, self.value = 0, bad_call, value

    def forward(self, x_TBF):
        out = super().forward(x_TBF)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                return Output(out.logits * self.value, out.aux_loss)
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, value):
    config = _config(max_steps=20, checkpoint_every=2)
    with pytest.raises(
        NonFiniteLossError, match=r"at step 5;.*checkpoint .*checkpoint\.pt \(step 4\) is kept"
    ) as info:
        _train(tmp_path, config, model=NaNAt(5, value))
    assert info.value.step == 5
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_sigterm_saves_a_checkpoint_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    _, result = _train(tmp_path, _config(max_steps=14), callbacks=[Recorder(signal_at=3)])
    assert result.interrupted and result.signal == signal.SIGTERM and result.step == 3
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_aux_loss_is_added_to_the_loss(tmp_path):
    model = TinySNN(aux_weight=0.5)
    trainer, _ = _train(None, _config(max_steps=6, log_every=6), model=model)
    # train/loss is CE + aux: the logged window means differ by the mean aux loss.
    m = trainer.metrics
    assert m["train/aux_loss"] > 0
    assert m["train/loss"] == pytest.approx(
        m["train/cross_entropy"] + m["train/aux_loss"], rel=1e-6
    )


def _moe_model(bias_update_rate):
    from spiking_moe import SpikingMoEClassifier

    torch.manual_seed(0)
    return SpikingMoEClassifier(
        8,
        2,
        hidden_features=16,
        num_experts=4,
        k=1,
        expert_hidden=8,
        bias_update_rate=bias_update_rate,
        threshold=0.5,
    )


def test_router_bias_balancing_callback_updates_the_bias_outside_autograd():
    from spiking_moe.training import RouterBiasBalancing

    balanced = _moe_model(0.05)
    _train(None, _config(max_steps=4), model=balanced, callbacks=[RouterBiasBalancing()])
    bias = balanced.layers[0].router.expert_bias
    assert bias.abs().sum() > 0 and not bias.requires_grad
    untouched = _moe_model(0.05)
    _train(None, _config(max_steps=4), model=untouched)
    assert untouched.layers[0].router.expert_bias.abs().sum() == 0


def _mean_rate(model):
    data = _dataset()
    x_TBF, _ = data.get_batch(torch.arange(len(data)), torch.Generator().manual_seed(0))
    rates = []
    hook = model.lif.register_forward_hook(lambda m, a, out: rates.append(out.mean().item()))
    model.eval()
    with torch.no_grad():
        model(x_TBF)
    hook.remove()
    return rates[0]


def test_spike_rate_penalty_lowers_firing_above_the_target_only():
    config = dict(max_steps=30, lr=5e-2)
    free, _ = _train(None, _config(**config))
    penalised, _ = _train(None, _config(spike_rate_penalty=5.0, spike_rate_target=0.05, **config))
    rate_free, rate_penalised = _mean_rate(free.model), _mean_rate(penalised.model)
    assert rate_free > 0.1
    assert rate_penalised < 0.6 * rate_free
    # A hinge: the target is a floor the penalty never pushes below.
    assert rate_penalised > 0.02
    # Closing the trainer takes its activity hooks off the model.
    assert not penalised.model.lif._forward_hooks
    # The penalty is logged inside the auxiliary loss (TinySNN has none of its own).
    assert penalised.metrics["train/aux_loss"] >= 0 and free.metrics["train/aux_loss"] == 0


def test_spike_rate_penalty_needs_a_spiking_model():
    model = nn.Sequential(nn.Flatten(0, 1))  # no LIF inside
    with pytest.raises(ValueError, match="no LIF module"):
        Trainer(model, BatchLoader(_dataset(), 16), _config(spike_rate_penalty=1.0))


def test_monitors_count_spikes_and_routing_by_hand():
    class Info(NamedTuple):
        probs: torch.Tensor
        tokens_per_expert: torch.Tensor
        dropped: torch.Tensor

    class Routed(nn.Module):
        """LIF(beta=0.5) on a constant 0.6 fires at t=2 only over 4 steps: rate 1/4."""

        def __init__(self):
            super().__init__()
            self.lif = LIF(beta=0.5)
            self.w = nn.Parameter(torch.zeros(2))

        def forward(self, x_TBF):
            spikes = self.lif(torch.full((4, x_TBF.shape[1], 3), 0.6))
            b = x_TBF.shape[1]
            probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).repeat(b // 2, 1)
            info = Info(probs, torch.tensor([3 * b // 2, 0]), torch.tensor(1))
            return Output(spikes.sum((0, 2)).unsqueeze(1) * self.w, torch.zeros(()), (info,))

    data = InMemoryDataset(
        torch.zeros(8, 1),
        torch.zeros(8, dtype=torch.long),
        encoding="current",
        num_steps=4,
        num_classes=2,
    )
    trainer = Trainer(
        Routed(), BatchLoader(data, 4), _config(), callbacks=[FiringRateMonitor(), RoutingMonitor()]
    )
    metrics = trainer.evaluate(BatchLoader(data, 4), "val")
    assert metrics["val/firing_rate/lif"] == 0.25 and metrics["val/firing_rate/mean"] == 0.25
    # Per batch of 4 tokens: expert 0 got 6 assignments, expert 1 none; 1 dropped.
    assert metrics["val/moe0/load/0"] == 1.0 and metrics["val/moe0/load/1"] == 0.0
    assert metrics["val/moe0/utilisation/0"] == 6 / 4
    assert metrics["val/moe0/max_load_ratio"] == 2.0
    assert metrics["val/moe0/router_entropy"] == pytest.approx(math.log(2) / 2)
    assert metrics["val/moe0/dropped_fraction"] == pytest.approx(2 / (12 + 2))
    assert not trainer.model.lif._forward_hooks  # hooks removed after evaluation


def test_sinks_and_output_contract(tmp_path):
    sink = JSONLinesSink(tmp_path / "m.jsonl")
    sink.log({"a": torch.tensor(1.5), "b": 2}, step=3)
    sink.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 3, "a": 1.5, "b": 2.0}
    tb = TensorBoardSink(tmp_path / "tb")
    with pytest.raises(TypeError, match="metric 'v' must be a scalar"):
        tb.log({"v": torch.ones(3)}, step=0)
    tb.close()
    logits = torch.zeros(2, 3)
    assert unpack_output(logits)[0] is logits and unpack_output(logits)[1] is None
    with pytest.raises(TypeError, match=r"\.logits"):
        unpack_output({"logits": logits})


def test_cli_trains_refuses_to_overwrite_and_resumes(tmp_path):
    config = tmp_path / "tiny.toml"
    text = (
        '[data]\nname = "digits"\nnum_steps = 4\n'
        '[model]\nkind = "dense_snn"\nhidden_features = 32\nexpert_hidden = 16\n'
        "[train]\nmax_steps = {steps}\nbatch_size = 64\nlr = 5e-3\nlog_every = 5\nprogress = false\n"
    )
    config.write_text(text.format(steps=10))
    out = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    assert train_main(["--config", str(config), "--out", str(out)]) == 2
    config.write_text(text.format(steps=15))
    assert train_main(["--config", str(config), "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 15
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("test/accuracy" in r for r in records)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = -1\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "bad")]) == 2


def test_compile_path_trains_like_eager_and_checkpoints_plain_names(tmp_path, monkeypatch, caplog):
    """torch.compile (dynamo with the eager backend, to keep the test fast) changes nothing."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(module):
        compiled.append(module)
        return real_compile(module, backend="eager")

    config = _config(max_steps=6, amp=True)  # amp on CPU: warned about and ignored
    plain, _ = _train(tmp_path / "plain", config)
    monkeypatch.setattr(torch, "compile", eager_compile)
    with caplog.at_level("WARNING", logger="spiking_moe.training"):
        fast, _ = _train(tmp_path / "compiled", dataclasses.replace(config, compile=True))
    assert len(compiled) == 2  # the training forward and the evaluation forward
    assert "bf16 autocast on CUDA only" in caplog.text
    for (name, a), b in zip(
        plain.model.state_dict().items(), fast.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert set(saved) == set(plain.model.state_dict())


def test_cli_trains_a_spiking_moe_and_writes_the_energy_report(tmp_path):
    """The main job end to end: the run folder holds report.json/.md/.png, and TensorBoard
    holds the energy scalars (with the dense-MoE and ANN ratios) and the report's text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import energy

    config = tmp_path / "moe.toml"
    config.write_text(
        '[data]\nname = "digits"\nencoding = "latency"\nnum_steps = 4\n'
        '[model]\nkind = "moe"\nhidden_features = 32\nnum_experts = 4\nk = 1\n'
        "expert_hidden = 16\nbias_balancing = 0.01\n"
        "[train]\nmax_steps = 12\nbatch_size = 64\nlr = 5e-3\nlog_every = 4\nprogress = false\n"
        "spike_rate_penalty = 1.0\nspike_rate_target = 0.1\n"
        '[energy]\nprofile = "loihi"\n'
    )
    out = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    report = energy.EnergyReport.from_json((out / "report.json").read_text())
    assert report.profile.name == "loihi"
    assert len(report.experts) == 4
    # Every test token is routed to exactly one expert (k = 1, no capacity limit).
    assert sum(e.tokens for e in report.experts) == report.layers[0].tokens
    assert report.baseline("dense_snn").ratio > 1  # routing saves synaptic operations
    assert "Energy report" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    events = EventAccumulator(str(out), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "test/energy/uJ_per_sample",
        "test/energy/ratio_dense_snn",
        "test/energy/ratio_ann_fp32",
        "test_energy/total_pJ",
    ):
        assert tag in scalars, tag
    texts = [t for t in events.Tags()["tensors"] if "test_energy" in t]
    assert texts, "the Markdown report must be logged as text"
