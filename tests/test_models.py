"""Classifiers and baselines: outputs, active parameters, readouts, ANN equivalence, training."""

import pickle

import pytest
import torch
from torch import nn

from spiking_moe import LIF
from spiking_moe.models import (
    ANNClassifier,
    ClassifierOutput,
    DenseSNNClassifier,
    SpikingMoEClassifier,
    active_parameter_count,
)
from spiking_moe.moe import SpikingMoE, set_dense
from spiking_moe.router import SpikingRouter

F, C, H, E, K, EH = 10, 3, 16, 4, 2, 8
SMALL = dict(hidden_features=H, k=K, expert_hidden=EH)


def _all_models(layers=1):
    torch.manual_seed(0)
    return {
        "moe": SpikingMoEClassifier(F, C, num_experts=E, num_moe_layers=layers, **SMALL),
        "dense_snn": DenseSNNClassifier(F, C, num_moe_layers=layers, **SMALL),
        "ann_moe": ANNClassifier(F, C, num_experts=E, num_moe_layers=layers, **SMALL),
        "ann": ANNClassifier(F, C, num_experts=None, num_moe_layers=layers, **SMALL),
    }


@pytest.mark.parametrize("name", ["moe", "dense_snn", "ann_moe", "ann"])
def test_every_classifier_returns_classifier_output(name):
    model = _all_models(layers=2)[name]
    out = model(torch.rand(5, 4, F))
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (4, C) and out.aux_loss.dim() == 0
    routed = name in ("moe", "ann_moe")
    assert len(out.routing) == (2 if routed else 0)
    if not routed:
        assert out.aux_loss.item() == 0.0
    else:
        torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.routing))


def test_dense_snn_has_the_moe_active_parameters_up_to_router_and_output_biases():
    layers = 2
    models = _all_models(layers)
    moe, dense = models["moe"], models["dense_snn"]
    expert = 2 * H * EH + EH + H  # H -> EH -> H
    io = (F * H + H) + (H * C + C)
    router = H * E + E
    assert active_parameter_count(moe) == io + layers * (router + K * expert)
    assert active_parameter_count(dense) == io + layers * (2 * H * K * EH + K * EH + H)
    difference = active_parameter_count(moe) - active_parameter_count(dense)
    assert difference == layers * (router + (K - 1) * H)
    # The ANN has the same layers, so the same parameter counts.
    assert active_parameter_count(models["ann_moe"]) == active_parameter_count(moe)
    assert active_parameter_count(models["ann"]) == active_parameter_count(dense)


def test_ann_uses_the_mean_over_time_and_accepts_two_dims():
    ann = _all_models()["ann_moe"]
    x = torch.rand(5, 4, F)
    torch.testing.assert_close(ann(x).logits, ann(x.mean(0)).logits)
    h = torch.relu(ann.input_layer(x.mean(0)))  # the first layer really is Linear -> ReLU
    out = ann.layers[0](h[None])
    torch.testing.assert_close(ann(x).logits, ann.readout(out.spikes[0]))


def test_count_readout_is_the_rate_of_the_last_layer():
    model = _all_models()["moe"]
    x = torch.rand(6, 4, F)
    spikes = model.layers[0](model.input_neuron(model.input_layer(x))).spikes
    torch.testing.assert_close(model(x).logits, model.readout(spikes).mean(0))


def test_membrane_readout_equals_a_leaky_integrator_loop():
    torch.manual_seed(0)
    model = SpikingMoEClassifier(F, C, num_experts=E, readout="membrane", beta=0.7, **SMALL)
    x = torch.rand(6, 4, F)
    spikes = model.layers[0](model.input_neuron(model.input_layer(x))).spikes
    current = model.readout(spikes)
    v, total = torch.zeros(4, C), torch.zeros(4, C)
    for t in range(6):
        v = 0.7 * v + current[t]
        total = total + v
    torch.testing.assert_close(model(x).logits, total / 6)


def test_dense_flag_gives_the_same_logits():
    # float64: the dense path runs every expert on all tokens, the sparse one on its rows, and
    # a GEMM's rounding depends on its row count (and the CPU); float32 could flip a spike and
    # move the logits by a readout weight, float64 leaves them within 1e-15.
    model = _all_models(layers=2)["moe"].double()
    x = torch.rand(6, 8, F, dtype=torch.float64)
    sparse = model(x).logits
    assert set_dense(model, True) == 2
    torch.testing.assert_close(model(x).logits, sparse)
    dense_built = SpikingMoEClassifier(F, C, num_experts=E, num_moe_layers=2, dense=True, **SMALL)
    assert all(m.dense for m in dense_built.modules() if isinstance(m, SpikingMoE))


def test_spiking_router_option_and_module_layout():
    torch.manual_seed(0)
    model = SpikingMoEClassifier(F, C, num_experts=E, router="spiking", **SMALL)
    assert isinstance(model.layers[0].router, SpikingRouter)
    names = dict(model.named_modules())
    for name in (
        "input_layer",
        "input_neuron",
        "layers.0.router",
        "layers.0.experts.3",
        "layers.0.neuron",
        "readout",
    ):
        assert name in names
    assert isinstance(names["input_neuron"], LIF)
    assert model(torch.rand(4, 2, F)).logits.shape == (2, C)


def test_spiking_moe_classifier_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    model = SpikingMoEClassifier(F, 2, num_experts=E, **SMALL)
    x = torch.rand(8, 64, F)
    y = (x[:, :, 0].mean(0) > 0.5).long()
    x[:, :, 1] = x[:, :, 0]  # make the signal stronger
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = model(x)
        loss = nn.functional.cross_entropy(out.logits, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", ["moe", "dense_snn", "ann_moe", "ann"])
def test_state_dict_round_trip_and_pickle(name):
    model = _all_models()[name]
    fresh = _all_models()[name]
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(5, 3, F)
    torch.testing.assert_close(fresh(x).logits, model(x).logits)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SpikingMoEClassifier, dict(readout="last"), "readout"),
        (SpikingMoEClassifier, dict(router="hash"), "router"),
        (SpikingMoEClassifier, dict(num_experts=2, k=3), r"moe\.k must be <= model\.moe\.num_e"),
        (SpikingMoEClassifier, dict(num_moe_layers=0), r"model\.num_layers must be >= 1, got 0"),
        (SpikingMoEClassifier, dict(capacity_factor=0), "capacity_factor"),
        (DenseSNNClassifier, dict(hidden_features=0), "hidden_features"),
        (ANNClassifier, dict(num_experts=0), "num_experts"),
        (SpikingMoEClassifier, dict(readout="membrane", beta=torch.full((16,), 0.9)), "scalar"),
    ],
)
def test_bad_config_is_rejected(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(F, C, **kwargs)


def test_bad_input_is_rejected():
    models = _all_models()
    with pytest.raises(ValueError, match=r"\[T, B, 10\]"):
        models["moe"](torch.rand(4, F))
    with pytest.raises(ValueError, match=r"\[T, B, 10\]"):
        models["dense_snn"](torch.rand(4, 2, F + 1))
    with pytest.raises(ValueError, match=r"\[T, B, 10\]"):
        models["ann"](torch.rand(2, 4, 2, F))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_classifiers_run_on_cuda():
    for model in _all_models().values():
        out = model.cuda()(torch.rand(5, 4, F, device="cuda"))
        assert out.logits.is_cuda
        (out.logits.sum() + out.aux_loss).backward()
