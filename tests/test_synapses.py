"""EventLinear: an nn.Linear with the event-driven product, used by the spiking layers."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import energy
from spiking_moe import EventLinear, SpikingMoEClassifier
from spiking_moe.functional import event as event_module
from spiking_moe.training import count_energy


def _spikes(shape, p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < p).float()


def test_loads_an_nn_linear_state_dict_and_gives_its_outputs():
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    layer = EventLinear(40, 12)
    layer.load_state_dict(linear.state_dict())
    assert list(layer.state_dict()) == list(linear.state_dict())
    x = _spikes((6, 5, 40), 0.1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-6)
        # Small integer weights: every partial sum is exact, so the results are equal.
        layer.weight.copy_(torch.randint(-3, 4, (12, 40)).float())
        layer.bias.zero_()
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    # The other way: its state_dict loads into a plain Linear.
    linear.load_state_dict(layer.state_dict())
    assert torch.equal(linear.weight, layer.weight)


def test_graded_and_dense_inputs_give_the_dense_product():
    torch.manual_seed(1)
    layer = EventLinear(30, 7)
    with torch.no_grad():
        analog = torch.randn(4, 3, 30)  # dense: above the break-even, the dense product runs
        torch.testing.assert_close(layer(analog), F.linear(analog, layer.weight, layer.bias))
        rates = _spikes((4, 3, 30), 0.1) * torch.rand(4, 3, 30)  # sparse graded values
        torch.testing.assert_close(layer(rates), F.linear(rates, layer.weight, layer.bias))


def test_takes_the_event_driven_kernel_with_gradients_off_and_the_dense_product_with_them_on(
    monkeypatch,
):
    calls = []
    real = event_module._forward

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(event_module, "_forward", spy)
    layer = EventLinear(32, 8)
    x = _spikes((5, 4, 32), 0.05)
    layer(x).sum().backward()  # training: F.linear
    assert calls == []
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1 and calls[0] is not None


def test_gradients_equal_nn_linear_in_training_with_and_without_train_events():
    torch.manual_seed(2)
    reference = nn.Linear(20, 6)
    x = _spikes((3, 4, 20), 0.2).requires_grad_()
    reference(x).pow(2).sum().backward()
    for train_events in (False, True):
        layer = EventLinear(20, 6, train_events=train_events)
        layer.load_state_dict(reference.state_dict())
        x2 = x.detach().clone().requires_grad_()
        layer(x2).pow(2).sum().backward()
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
        torch.testing.assert_close(x2.grad, x.grad)


def test_the_cached_transpose_follows_every_weight_change():
    torch.manual_seed(3)
    layer = EventLinear(16, 4)
    x = _spikes((2, 3, 16), 0.3)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(2)  # an in-place change, like an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.load_state_dict({"weight": torch.ones(4, 16), "bias": torch.zeros(4)})
        torch.testing.assert_close(layer(x), x.sum(-1, keepdim=True).expand(2, 3, 4))
    assert not torch.equal(first, layer(x).detach())
    assert "_weight_t" not in layer.state_dict()


def test_bad_input_names_the_problem():
    layer = EventLinear(8, 3)
    with torch.no_grad():
        with pytest.raises((ValueError, RuntimeError), match="8"):
            layer(torch.zeros(2, 5))
        with pytest.raises(TypeError):
            layer(torch.zeros(2, 8, dtype=torch.int64))
        assert layer(torch.zeros(0, 8)).shape == (0, 3)
        transposed = _spikes((8, 4), 0.3).t()  # non-contiguous
        torch.testing.assert_close(
            layer(transposed), F.linear(transposed, layer.weight, layer.bias)
        )
    with pytest.raises(ValueError, match="implementation"):
        EventLinear(8, 3, implementation="fast")


def test_spiking_layers_use_it():
    model = SpikingMoEClassifier(10, 3, hidden_features=16, num_experts=4, k=2, expert_hidden=8)
    assert isinstance(model.input_layer, EventLinear) and isinstance(model.readout, EventLinear)
    assert all(isinstance(m, EventLinear) for m in model.layers[0].experts[0].net[::2])
    assert type(model.layers[0].router.proj) is nn.Linear  # rates, dense: a plain Linear


def test_a_model_evaluated_event_driven_gives_the_same_predictions_and_energy_counts():
    """The same trained-like model with its EventLinears forced dense: same predictions, and the
    energy counter counts both alike."""
    torch.manual_seed(4)
    model = SpikingMoEClassifier(
        24, 5, hidden_features=64, num_experts=4, k=1, expert_hidden=64, threshold=0.4
    ).eval()
    x = _spikes((8, 32, 24), 0.15, seed=5)
    with torch.no_grad():
        event_out = model(x)
        event_counts, _ = count_energy(model, x)
        for module in model.modules():
            if isinstance(module, EventLinear):
                module.implementation = "dense"
        dense_out = model(x)
        dense_counts, _ = count_energy(model, x)
    assert event_out.activity.spikes.sum() > 0
    assert torch.equal(event_out.logits.argmax(-1), dense_out.logits.argmax(-1))
    torch.testing.assert_close(event_out.logits, dense_out.logits, rtol=1e-5, atol=1e-5)
    assert event_counts.total("acs") == dense_counts.total("acs")
    assert event_counts.total("macs") == dense_counts.total("macs")
    assert event_counts.total("spikes") == dense_counts.total("spikes")
    report = energy.build_report(event_counts, "cmos45")
    assert report.totals.acs > 0
