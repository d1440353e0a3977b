"""Trainer: learning, exact resume, gradient accumulation, NaN stop, signals, activity penalty."""

import dataclasses
import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from tiny import in_float64
from torch import nn

from spiking_moe import Activity
from spiking_moe.data import BatchLoader
from spiking_moe.moe import SpikingMoE
from spiking_moe.training import (
    Callback,
    FiringRateMonitor,
    NonFiniteLossError,
    Trainer,
    activity_penalty,
    load_checkpoint,
    seed_everything,
    unpack_output,
)


class Recorder(Callback):
    """Per-step losses; optionally asks the trainer to stop (or signals itself) at a step."""

    def __init__(self, stop_at=None, signal_at=None):
        self.losses = {}
        self.stop_at, self.signal_at = stop_at, signal_at

    def on_train_step_end(self, trainer, outputs, loss):
        self.losses[trainer.step] = loss.item()
        if trainer.step == self.stop_at:
            trainer.request_stop()
        if trainer.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_tiny_model_learns_and_tensorboard_holds_scalars_and_text(
    tmp_path, tiny_snn, two_class_data, train_config
):
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
        tiny_snn(),
        BatchLoader(two_class_data(), 16, shuffle=True),
        train_config(max_steps=40, log_every=5),
        out_dir=tmp_path,
        val_loader=BatchLoader(two_class_data(40, seed=1), 20),
        callbacks=[recorder, ReportStub(), FiringRateMonitor()],
        hparams={"train.lr": 0.02, "model.kind": "tiny"},
    )
    result = trainer.fit()
    test = trainer.evaluate(BatchLoader(two_class_data(40, seed=2), 20), "test")
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


def test_resume_equals_an_uninterrupted_run(tmp_path, train, train_config):
    """7 steps, stop (mid-epoch 2), resume to 14 == 14 steps in one go: weights and losses."""
    config = train_config(max_steps=14)
    straight = Recorder()
    trainer_c, _ = train(tmp_path / "straight", config, callbacks=[straight])

    first = Recorder(stop_at=7)
    _, result_a = train(tmp_path / "split", config, callbacks=[first])
    assert result_a.interrupted and result_a.step == 7
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 7
    second = Recorder()
    trainer_b, result_b = train(tmp_path / "split", config, callbacks=[second], resume=True)
    assert result_b.step == 14 and not result_b.interrupted
    assert sorted(second.losses) == list(range(8, 15))
    for step in range(8, 15):
        assert second.losses[step] == straight.losses[step], step
    for (name, a), b in zip(
        trainer_c.model.state_dict().items(), trainer_b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_gradient_accumulation_equals_one_batch_of_the_combined_size(
    train, tiny_snn, two_class_data, train_config
):
    """Batches of 8 accumulated in pairs take the optimizer steps of batches of 16.

    The loader takes consecutive slices of one permutation, so micro-batches 2s and 2s+1 of
    size 8 are the two halves of batch s of size 16. A constant-current encoding and no
    dropout make the micro-batches' data and forward exactly those of the halves; the mean
    loss over two equal halves has the gradient of the mean over the whole batch.

    In float64: the halves run GEMMs of other row counts and their gradients add up in another
    order, and AdamW divides each gradient by its own magnitude, so float32 rounding of a tiny
    gradient (1e-7 of its terms) could become a step of lr on some CPU; in float64 (1e-16, far
    below Adam's eps 1e-8) the runs agree to about 1e-16.
    """
    data = two_class_data(64, encoding="current")  # 4 batches of 16, 8 of 8: no remainder
    torch.manual_seed(0)
    initial = tiny_snn(dropout=0.0).double().state_dict()
    models = []
    for _ in range(2):
        model = in_float64(tiny_snn(dropout=0.0))
        model.load_state_dict(initial)
        models.append(model)
    big, _ = train(None, train_config(max_steps=6, batch_size=16), model=models[0], data=data)
    accumulated, _ = train(
        None,
        train_config(max_steps=6, batch_size=8, grad_accum_steps=2),
        model=models[1],
        data=data,
    )
    assert accumulated.step == big.step == 6
    assert accumulated.steps_per_epoch == big.steps_per_epoch == 4
    for name, a in big.model.state_dict().items():
        assert not torch.equal(a, initial[name]) or name.startswith("lif"), name
        torch.testing.assert_close(
            accumulated.model.state_dict()[name], a, rtol=1e-9, atol=1e-11, msg=name
        )
    # The logged loss is the mean over the micro-batches, i.e. over the 16 samples.
    assert accumulated.metrics["train/loss"] == pytest.approx(big.metrics["train/loss"], rel=1e-4)


def test_resume_is_exact_with_gradient_accumulation(tmp_path, train, train_config):
    config = train_config(max_steps=8, batch_size=8, grad_accum_steps=3)
    straight = Recorder()
    full, _ = train(tmp_path / "straight", config, callbacks=[straight])
    _, stopped = train(tmp_path / "split", config, callbacks=[Recorder(stop_at=4)])
    assert stopped.step == 4
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["batch_in_epoch"] == 12 % 9
    second = Recorder()
    resumed, _ = train(tmp_path / "split", config, callbacks=[second], resume=True)
    assert [second.losses[s] for s in range(5, 9)] == [straight.losses[s] for s in range(5, 9)]
    for name, a in full.model.state_dict().items():
        assert torch.equal(a, resumed.model.state_dict()[name]), name


def test_too_few_batches_for_one_accumulated_step_is_an_error(
    tiny_snn, two_class_data, train_config
):
    loader = BatchLoader(two_class_data(32), 16)  # 2 batches per epoch
    with pytest.raises(ValueError, match="fewer than train.grad_accum_steps = 3"):
        Trainer(tiny_snn(), loader, train_config(grad_accum_steps=3))


class NaNAt(nn.Module):
    def __init__(self, inner, bad_call, value=float("nan")):
        super().__init__()
        self.inner, self.calls, self.bad_call, self.value = inner, 0, bad_call, value

    def forward(self, x_TBF):
        out = self.inner(x_TBF)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                return out._replace(logits=out.logits * self.value)
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    tmp_path, train, tiny_snn, train_config, value
):
    config = train_config(max_steps=20, checkpoint_every=2)
    with pytest.raises(
        NonFiniteLossError, match=r"at step 5;.*checkpoint .*checkpoint\.pt \(step 4\) is kept"
    ) as info:
        train(tmp_path, config, model=NaNAt(tiny_snn(), 5, value))
    assert info.value.step == 5
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_sigterm_saves_a_checkpoint_and_restores_handlers(tmp_path, train, train_config):
    before = signal.getsignal(signal.SIGTERM)
    _, result = train(tmp_path, train_config(max_steps=14), callbacks=[Recorder(signal_at=3)])
    assert result.interrupted and result.signal == signal.SIGTERM and result.step == 3
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_aux_loss_is_added_to_the_loss(train, tiny_snn, train_config):
    trainer, _ = train(None, train_config(max_steps=6, log_every=6), model=tiny_snn(aux_weight=0.5))
    # train/loss is CE + aux: the logged window means differ by the mean aux loss.
    m = trainer.metrics
    assert m["train/aux_loss"] > 0
    assert m["train/loss"] == pytest.approx(
        m["train/cross_entropy"] + m["train/aux_loss"], rel=1e-6
    )


def test_activity_penalty_is_the_mean_hinge_over_populations_that_ran():
    activity = Activity(
        ("a", "b", "idle"),
        torch.tensor([30.0, 2.0, 0.0]),
        torch.tensor([100, 100, 0]),
    )
    # rates 0.3 and 0.02 against a target of 0.1: (0.2 + 0) / 2 populations that ran
    assert activity_penalty(activity, 0.1).item() == pytest.approx(0.1)
    assert activity_penalty(activity, 0.5).item() == 0.0


def _mean_rate(model, data):
    x_TBF, _ = data.get_batch(torch.arange(len(data)), torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(x_TBF).activity.rates()[0].item()


def test_spike_rate_penalty_lowers_firing_above_the_target_only(
    train, two_class_data, train_config
):
    config = dict(max_steps=30, lr=5e-2, log_every=30)  # train/* metrics: means over all steps
    free, _ = train(None, train_config(**config))
    penalised, _ = train(
        None, train_config(spike_rate_penalty=5.0, spike_rate_target=0.05, **config)
    )
    data = two_class_data()
    rate_free, rate_penalised = _mean_rate(free.model, data), _mean_rate(penalised.model, data)
    assert rate_free > 0.1
    assert rate_penalised < 0.6 * rate_free
    # A hinge: the target is a floor the penalty never pushes below.
    assert rate_penalised > 0.02
    # The trainer registered nothing on the model.
    assert not penalised.model.lif._forward_hooks and not penalised.model.lif._forward_pre_hooks
    # The penalty is logged inside the auxiliary loss (the tiny model has none of its own).
    assert penalised.metrics["train/aux_loss"] > 0 and free.metrics["train/aux_loss"] == 0


def test_spike_rate_penalty_needs_a_model_that_reports_activity(two_class_data, train_config):
    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x_TBF):
            return self.fc(x_TBF).mean(0)  # logits only: no activity

    trainer = Trainer(
        Silent(), BatchLoader(two_class_data(), 16), train_config(spike_rate_penalty=1.0)
    )
    with pytest.raises(ValueError, match=r"reports no spiking activity.*\.activity"):
        trainer.fit()


def test_spike_rate_penalty_keeps_the_grouped_expert_gemm(
    monkeypatch, train, tiny_moe, train_config
):
    """The penalty reads the model's reported activity, so nothing disables grouped GEMM."""
    # The package's ``dispatch`` attribute is the function; the module is in sys.modules.
    dispatch = sys.modules["spiking_moe.dispatch"]
    grouped_calls = []
    real = dispatch._run_grouped

    def counting(*args, **kwargs):
        grouped_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "_run_grouped", counting)
    model = tiny_moe(expert_hidden=16)  # sizes that are multiples of 16 bytes
    for layer in model.modules():
        if isinstance(layer, SpikingMoE):
            layer.grouped_gemm = "always"
    trainer, _ = train(
        None,
        train_config(max_steps=3, spike_rate_penalty=1.0, spike_rate_target=0.0),
        model=model,
    )
    validation_batches = 2  # the final validation: 40 samples in batches of 20
    assert len(grouped_calls) == 3 + validation_batches
    assert trainer.metrics["train/aux_loss"] > 0


def test_removed_hook_is_a_clear_error(tiny_snn, two_class_data, train_config):
    class Old(Callback):
        def on_train_batch_end(self, trainer, batch, output, loss):
            pass

    with pytest.raises(
        TypeError, match="on_train_batch_end is no longer called.*on_train_step_end"
    ):
        Trainer(tiny_snn(), BatchLoader(two_class_data(), 16), train_config(), callbacks=[Old()])


def test_output_contract():
    logits = torch.zeros(2, 3)
    assert unpack_output(logits)[0] is logits and unpack_output(logits)[1] is None
    with pytest.raises(TypeError, match=r"\.logits"):
        unpack_output({"logits": logits})


def test_compile_path_trains_like_eager_and_checkpoints_plain_names(
    tmp_path, train, train_config, monkeypatch, caplog
):
    """torch.compile (dynamo with the eager backend, to keep the test fast) changes nothing."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(module):
        compiled.append(module)
        return real_compile(module, backend="eager")

    config = train_config(max_steps=6, amp=True)  # amp on CPU: warned about and ignored
    plain, _ = train(tmp_path / "plain", config)
    monkeypatch.setattr(torch, "compile", eager_compile)
    with caplog.at_level("WARNING", logger="spiking_moe.training"):
        fast, _ = train(tmp_path / "compiled", dataclasses.replace(config, compile=True))
    assert len(compiled) == 2  # the training forward and the evaluation forward
    assert "bf16 autocast on CUDA only" in caplog.text
    # The eager backend runs the captured graph with the same kernels on the same shapes, so the
    # states agree to the bit on any CPU (measured: 0); the tolerance is only a margin.
    for (name, a), b in zip(
        plain.model.state_dict().items(), fast.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert set(saved) == set(plain.model.state_dict())


def test_a_fresh_start_leaves_the_random_streams_to_the_caller(
    tiny_snn, two_class_data, train_config
):
    """Building the Trainer changes no global stream, and training draws (dropout) continue
    the caller's: another caller seed, other losses; the same one, the same losses."""

    def losses(caller_seed):
        torch.manual_seed(0)
        model = tiny_snn()  # the same initial weights every time
        loader = BatchLoader(two_class_data(), 16, shuffle=True)  # its own seeded order
        recorder = Recorder()
        seed_everything(caller_seed)
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        trainer = Trainer(model, loader, train_config(max_steps=3), callbacks=[recorder])
        assert torch.equal(torch.get_rng_state(), before[0])
        assert np.array_equal(np.random.get_state()[1], before[1])
        assert random.getstate() == before[2]
        trainer.fit()
        return [recorder.losses[step] for step in (1, 2, 3)]

    first = losses(1)
    assert losses(1) == first
    assert losses(2) != first
