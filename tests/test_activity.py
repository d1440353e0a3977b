"""Activity: what models report about their spikes, checked against hooks on their LIFs."""

import pytest
import torch

from spiking_moe import LIF, Activity, SpikingExpert
from spiking_moe.models import ANNClassifier, DenseSNNClassifier, SpikingMoEClassifier


def test_activity_records_compose_by_name():
    a = Activity.of("lif", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert a.names == ("lif",) and a.spikes.tolist() == [3.0] and a.updates.tolist() == [4]
    both = Activity.concat([a.prefixed("block"), Activity.empty(), Activity.idle(["idle"])])
    assert both.names == ("block.lif", "idle")
    assert both.rates().tolist() == [0.75, 0.0]  # an idle population has rate 0, not NaN
    with pytest.raises(ValueError, match="distinct names"):
        Activity.concat([a, a])
    with pytest.raises(ValueError, match=r"needs spikes and updates of shape \[2\]"):
        Activity(("a", "b"), torch.zeros(3), torch.zeros(2, dtype=torch.int64))


def _hooked_spikes(model):
    """Oracle: spikes and updates of every LIF module call, by module name (test-only hooks)."""
    seen = {}

    def record(name):
        def hook(module, args, output):
            spikes, updates = seen.get(name, (0.0, 0))
            seen[name] = (spikes + output.sum().item(), updates + output.numel())

        return hook

    handles = [
        m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, LIF)
    ]
    return seen, handles


@pytest.mark.parametrize("router", ["rate", "spiking"])
def test_moe_classifier_reports_every_lif_population_as_hooks_see_it(router):
    torch.manual_seed(0)
    model = SpikingMoEClassifier(
        10,
        3,
        hidden_features=16,
        num_experts=4,
        k=2,
        expert_hidden=16,
        router=router,
        threshold=0.5,
    )
    seen, handles = _hooked_spikes(model)
    out = model(torch.rand(6, 9, 10) * 2)
    for h in handles:
        h.remove()
    activity = out.activity
    reported = dict(
        zip(
            activity.names,
            zip(activity.spikes.tolist(), activity.updates.tolist(), strict=True),
            strict=True,
        )
    )
    # Every hooked LIF appears under its module name with the same counts.
    for name, (spikes, updates) in seen.items():
        assert reported[name] == (pytest.approx(spikes), updates), name
    # Experts that got no tokens are reported too, idle (zero updates), so the layout is fixed.
    idle = [n for n in reported if n not in seen]
    assert all(reported[n] == (0.0, 0) for n in idle)
    assert all(isinstance(model.get_submodule(n), LIF) for n in reported)
    assert sum(reported[f"layers.0.experts.{e}.net.1"][1] for e in range(4)) == 6 * 9 * 2 * 16


def test_grouped_gemm_reports_the_same_activity_as_per_expert_calls():
    torch.manual_seed(0)
    model = SpikingMoEClassifier(
        10, 3, hidden_features=16, num_experts=4, k=2, expert_hidden=16, threshold=0.5
    )
    x = torch.rand(6, 9, 10) * 2
    loop = model(x).activity
    model.layers[0].grouped_gemm = "always"
    grouped = model(x).activity
    assert grouped.names == loop.names
    torch.testing.assert_close(grouped.spikes, loop.spikes)
    assert torch.equal(grouped.updates, loop.updates)
    # The penalty trains through the reported spikes: gradients reach the experts.
    grouped.rates().sum().backward()
    assert model.layers[0].experts[0].net[0].weight.grad is not None


def test_dense_mode_and_the_dense_snn_report_fixed_layouts_and_the_ann_none():
    torch.manual_seed(0)
    model = SpikingMoEClassifier(10, 3, hidden_features=16, num_experts=4, k=1, expert_hidden=8)
    x = torch.rand(5, 4, 10)
    sparse = model(x).activity
    model.layers[0].dense = True
    dense = model(x).activity
    assert dense.names == sparse.names
    # Dense: every expert computes on every token.
    for e in range(4):
        i = dense.names.index(f"layers.0.experts.{e}.net.1")
        assert dense.updates[i].item() == 5 * 4 * 8
    snn = DenseSNNClassifier(10, 3, hidden_features=16, k=1, expert_hidden=8)
    assert snn(x).activity.names == ("input_neuron", "layers.0.expert.net.1", "layers.0.neuron")
    ann = ANNClassifier(10, 3, hidden_features=16, num_experts=4, k=1, expert_hidden=8)
    assert len(ann(x).activity) == 0


def test_expert_run_goes_through_call_so_its_hooks_fire():
    expert = SpikingExpert(4, 8, 4, threshold=0.2)
    calls = []
    expert.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    out = expert.run(torch.ones(3, 2, 4))
    assert calls == [torch.Size([3, 2, 4])]
    assert out.activity.names == ("net.1",) == expert.activity_names
    torch.testing.assert_close(out.current, expert(torch.ones(3, 2, 4)))
