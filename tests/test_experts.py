"""SpikingExpert / MLPExpert: hand-computed traces, layout, bad input, serialisation."""

import pickle

import pytest
import torch

from spiking_moe import LIF
from spiking_moe.experts import MLPExpert, SpikingExpert


def test_spiking_expert_matches_a_hand_computed_trace():
    expert = SpikingExpert(2, 2, 1, beta=0.5, threshold=1.0)
    with torch.no_grad():
        expert.net[0].weight.copy_(1.5 * torch.eye(2))
        expert.net[0].bias.zero_()
        expert.net[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
        expert.net[2].bias.fill_(0.5)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).view(3, 1, 2)
    # neuron 0: h = 1.5 (spike, v .5), 1.75 (spike, v .75), .375 (no)
    # neuron 1: h = 0 (no), 1.5 (spike, v .5), 1.75 (spike)
    # current = [1, 2] . s + .5
    assert expert(x).flatten().tolist() == [1.5, 3.5, 2.5]


def test_layout_has_num_layers_lif_layers_and_named_linears():
    expert = SpikingExpert(4, 8, 3, num_layers=3, beta=0.8)
    kinds = [type(m).__name__ for m in expert.net]
    assert kinds == [
        "EventLinear",
        "LIF",
        "EventLinear",
        "LIF",
        "EventLinear",
        "LIF",
        "EventLinear",
    ]
    assert all(isinstance(m, torch.nn.Linear) for m in expert.net[::2])
    assert expert.net[1].beta.item() == pytest.approx(0.8)
    assert expert(torch.ones(4, 5, 4)).shape == (4, 5, 3)


def test_mlp_expert_has_the_same_parameter_names_as_the_spiking_expert():
    spiking = SpikingExpert(4, 8, 3, num_layers=2)
    mlp = MLPExpert(4, 8, 3, num_layers=2)
    assert [n for n, _ in spiking.named_parameters()] == [n for n, _ in mlp.named_parameters()]
    x = torch.randn(1, 5, 4)
    mlp.load_state_dict(
        {k: v for k, v in spiking.state_dict().items() if "net.1." not in k and "net.3." not in k}
    )
    ref = spiking.net[4](torch.relu(spiking.net[2](torch.relu(spiking.net[0](x)))))
    torch.testing.assert_close(mlp(x), ref)


def test_zero_rows_are_allowed():
    assert SpikingExpert(4, 8, 3)(torch.zeros(6, 0, 4)).shape == (6, 0, 3)


def test_gradient_reaches_every_layer():
    torch.manual_seed(0)
    expert = SpikingExpert(4, 8, 3, num_layers=2)
    expert(torch.bernoulli(torch.full((6, 5, 4), 0.5))).sum().backward()
    for name, p in expert.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 8, 3), {}, "in_features"),
        ((4, 0, 3), {}, r"expert\.hidden must be >= 1, got 0"),
        ((4, 8, 3), {"num_layers": 0}, r"expert\.layers must be >= 1, got 0"),
        ((4, 8, 3), {"reset": "bogus"}, "reset"),
    ],
)
def test_bad_config_is_rejected(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpikingExpert(*args, **kwargs)


def test_bad_input_is_rejected():
    expert = SpikingExpert(4, 8, 3)
    with pytest.raises(ValueError, match=r"\[T, N, 4\]"):
        expert(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="4 input features"):
        expert(torch.zeros(5, 2, 3))
    with pytest.raises(TypeError, match="floating"):
        expert(torch.zeros(5, 2, 4, dtype=torch.int64))


@pytest.mark.parametrize("cls", [SpikingExpert, MLPExpert])
def test_state_dict_round_trip_and_pickle(cls):
    torch.manual_seed(0)
    expert = cls(4, 8, 3, num_layers=2)
    fresh = cls(4, 8, 3, num_layers=2)
    fresh.load_state_dict(expert.state_dict())
    x = torch.bernoulli(torch.full((5, 2, 4), 0.5))
    torch.testing.assert_close(fresh(x), expert(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(expert))(x), expert(x))


def test_neuron_kwargs_reach_every_lif():
    expert = SpikingExpert(4, 8, 3, num_layers=2, threshold=0.25, reset="zero")
    lifs = [m for m in expert.modules() if isinstance(m, LIF)]
    assert len(lifs) == 2
    assert all(m.threshold.item() == 0.25 and m.reset == "zero" for m in lifs)
