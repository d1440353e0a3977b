"""Callbacks: monitors by hand, windowed routing statistics, bias balancing across
micro-batches, energy counted batch by batch, and evaluation without a Trainer."""

import ast
import math
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny import in_float64
from torch import nn

import energy
from spiking_moe import LIF, Activity
from spiking_moe.data import BatchLoader, InMemoryDataset
from spiking_moe.training import (
    EnergyReportCallback,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
    Trainer,
    evaluate,
    measure_energy,
    seed_everything,
)

callbacks_module = sys.modules["spiking_moe.training.callbacks"]


class Output(NamedTuple):
    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple
    activity: Activity


def _constant_data(n=8, steps=4, features=1):
    return InMemoryDataset(
        torch.zeros(n, features),
        torch.zeros(n, dtype=torch.long),
        encoding="current",
        num_steps=steps,
        num_classes=2,
    )


def test_monitors_count_spikes_and_routing_by_hand(train_config):
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
            logits = spikes.sum((0, 2)).unsqueeze(1) * self.w
            return Output(logits, torch.zeros(()), (info,), Activity.of("lif", spikes))

    data = _constant_data()
    trainer = Trainer(
        Routed(),
        BatchLoader(data, 4),
        train_config(),
        callbacks=[FiringRateMonitor(), RoutingMonitor()],
    )
    metrics = trainer.evaluate(BatchLoader(data, 4), "val")
    assert metrics["val/firing_rate/lif"] == 0.25 and metrics["val/firing_rate/mean"] == 0.25
    # Per batch of 4 tokens: expert 0 got 6 assignments, expert 1 none; 1 dropped.
    assert metrics["val/moe0/load/0"] == 1.0 and metrics["val/moe0/load/1"] == 0.0
    assert metrics["val/moe0/utilisation/0"] == 6 / 4
    assert metrics["val/moe0/max_load_ratio"] == 2.0
    assert metrics["val/moe0/router_entropy"] == pytest.approx(math.log(2) / 2)
    assert metrics["val/moe0/dropped_fraction"] == pytest.approx(2 / (12 + 2))


def test_windowed_routing_statistics_count_every_window_and_token(tiny_moe, train_config):
    """A router with zero weights routes every (window, token) row from its bias alone:
    probabilities [3/4, 1/4] everywhere, so every row picks expert 0."""
    model = tiny_moe(num_experts=2, window=2)
    router = model.layers[0].router
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
    data = InMemoryDataset(
        torch.rand(10, 8), torch.arange(10) % 2, encoding="rate", num_steps=6, num_classes=2
    )  # T = 6: W = 3 windows of 2 steps
    trainer = Trainer(model, BatchLoader(data, 5), train_config(), callbacks=[RoutingMonitor()])
    metrics = trainer.evaluate(BatchLoader(data, 5), "val")
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics["val/moe0/router_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert metrics["val/moe0/utilisation/0"] == 1.0  # all 3 x 10 rows, k = 1
    assert metrics["val/moe0/utilisation/1"] == 0.0
    assert metrics["val/moe0/max_load_ratio"] == 2.0


def test_firing_rates_are_named_like_the_model_s_neuron_modules(
    tiny_moe, two_class_data, train_config
):
    model = tiny_moe(router="spiking")
    trainer = Trainer(
        model, BatchLoader(two_class_data(), 16), train_config(), callbacks=[FiringRateMonitor()]
    )
    val = BatchLoader(two_class_data(40), 40)
    metrics = trainer.evaluate(val, "val")
    names = [k.removeprefix("val/firing_rate/") for k in metrics if "/firing_rate/" in k]
    assert "input_neuron" in names and "layers.0.neuron" in names
    assert "layers.0.router.neuron" in names
    assert any(n.startswith("layers.0.experts.") for n in names)
    for name in names:
        if name != "mean":
            assert isinstance(model.get_submodule(name), LIF), name
            assert 0.0 <= metrics[f"val/firing_rate/{name}"] <= 1.0
    # The mean over all spikes, by hand from the model's own report.
    model.eval()
    ((x, _),) = list(val)  # the very batch (and rate-code noise) that was evaluated
    with torch.no_grad():
        activity = model(x).activity
    assert metrics["val/firing_rate/mean"] == pytest.approx(
        (activity.spikes.sum() / activity.updates.sum()).item(), rel=1e-6
    )


def test_router_bias_balancing_updates_the_bias_outside_autograd(
    tiny_moe, two_class_data, train_config
):
    def fit(model, callbacks):
        seed_everything(0)
        Trainer(
            model,
            BatchLoader(two_class_data(), 16, shuffle=True),
            train_config(max_steps=4),
            callbacks=callbacks,
        ).fit()
        return model.layers[0].router.expert_bias

    bias = fit(tiny_moe(bias_update_rate=0.05), [RouterBiasBalancing()])
    assert bias.abs().sum() > 0 and not bias.requires_grad
    assert fit(tiny_moe(bias_update_rate=0.05), []).abs().sum() == 0


def test_bias_updates_sum_the_loads_of_a_step_s_micro_batches(
    tiny_moe, two_class_data, train_config
):
    """One step of 2 micro-batches of 8 moves the bias as one batch of 16 does (the same
    tokens, routed by the same weights); updating per micro-batch would not.

    In float64: the router sees batches of 8 and 16, GEMMs of other row counts, whose float32
    rounding could turn a near tie of two experts on some CPU; float64 rounding cannot."""
    data = two_class_data(64, encoding="current")

    def bias_after_one_step(batch_size, accum):
        model = in_float64(tiny_moe(bias_update_rate=0.05))
        seed_everything(0)
        loader = BatchLoader(data, batch_size, shuffle=True)
        config = train_config(max_steps=1, batch_size=batch_size, grad_accum_steps=accum)
        Trainer(model, loader, config, callbacks=[RouterBiasBalancing()]).fit()
        return model.layers[0].router.expert_bias.clone()

    whole = bias_after_one_step(16, 1)
    accumulated = bias_after_one_step(8, 2)
    assert whole.abs().sum() > 0
    assert torch.equal(accumulated, whole)


def _eval_inputs(data, batch):
    return [x for x, _ in BatchLoader(data, batch)]


def test_energy_counted_batch_by_batch_equals_one_pass_over_the_whole_set(
    monkeypatch, tiny_moe, two_class_data, train_config
):
    # float64: the counts are of spikes, computed here in batches of 20 and 5 and there in one
    # of 45 (other GEMM row counts, other event-driven or dense choices per call); float32
    # rounding could flip a spike near the threshold on some CPU, float64 rounding cannot.
    model = in_float64(tiny_moe(num_experts=4, k=2))
    data = two_class_data(45)
    seen = []
    real_count = energy.count_operations

    def recording(module, x, **kwargs):
        seen.append(x.shape[1])
        return real_count(module, x, **kwargs)

    callback = EnergyReportCallback("cmos45", prefixes=("val",))
    trainer = Trainer(model, BatchLoader(data, 16), train_config(), callbacks=[callback])
    monkeypatch.setattr(callbacks_module.energy, "count_operations", recording)
    metrics = trainer.evaluate(BatchLoader(data, 20), "val")  # batches of 20, 20, 5
    monkeypatch.undo()
    # Memory: every counting pass saw one evaluation batch (the model and its dense twin),
    # never the set concatenated; between batches the callback keeps integer counts only.
    assert seen == [20, 20, 20, 20, 5, 5]
    assert callback.samples == 45
    assert not any(isinstance(v, torch.Tensor) for v in vars(callback).values())

    whole = measure_energy(model, torch.cat(_eval_inputs(data, 20), dim=1))
    batched = callback.report
    assert batched.totals == whole.totals
    assert batched.baselines == whole.baselines
    assert batched.experts == whole.experts
    assert metrics["val/energy/uJ_per_sample"] == pytest.approx(
        whole.totals.energy_pj / 45 / 1e6, rel=1e-12
    )
    # The dense twin was the model itself, switched for the count and switched back.
    assert not any(layer.dense for layer in model.layers)


def test_energy_is_logged_at_every_validation(tmp_path, train, tiny_moe, train_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = EnergyReportCallback("cmos45", prefixes=("val",))
    train(tmp_path, train_config(max_steps=6, eval_every=2), model=tiny_moe(), callbacks=[callback])
    events = EventAccumulator(str(tmp_path)).Reload()
    for tag in ("val/energy/uJ_per_sample", "val/accuracy", "val_energy/total_pJ"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6], tag


def test_energy_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown energy profile 'nope'"):
        EnergyReportCallback("nope")
    with pytest.raises(ValueError, match="num_batches must be an int >= 0"):
        EnergyReportCallback("cmos45", num_batches=-1)


def test_the_callbacks_module_imports_no_trainer():
    """Hooks receive a CallbackContext; callbacks.py needs nothing of the trainer, not even
    for type annotations (an import under TYPE_CHECKING counts too)."""
    path = Path(callbacks_module.__file__)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert imported and not [m for m in imported if "trainer" in m.lower()], imported


def test_evaluate_runs_the_callbacks_without_a_trainer(tiny_moe, two_class_data):
    """The same metrics as a Trainer's evaluation, with no Trainer, no optimizer and no draw
    from the global random streams; the model's mode is restored."""
    data = two_class_data(40, seed=1)
    model = tiny_moe(num_experts=4, k=2).train()
    before = torch.get_rng_state()
    metrics = evaluate(
        model,
        BatchLoader(data, 16),
        prefix="test",
        callbacks=[FiringRateMonitor(), RoutingMonitor(), EnergyReportCallback("cmos45")],
    )
    assert torch.equal(torch.get_rng_state(), before) and model.training
    # Loss and accuracy by hand over the same batches, in eval mode.
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for x, y in BatchLoader(data, 16):
            logits = model(x).logits
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    assert metrics["test/accuracy"] == correct / 40
    # Float32 sums per batch, then float64 across batches: agree to float32 rounding.
    assert metrics["test/loss"] == pytest.approx(loss / 40, rel=1e-6)
    for key in ("test/moe0/max_load_ratio", "test/firing_rate/mean", "test/energy/uJ_per_sample"):
        assert key in metrics, key
