"""merge_counts: counts of several passes add up to those of one pass over all the inputs."""

import dataclasses
import functools

import pytest
import torch
from energy_cases import assert_equal_except_calls, graded, spikes
from torch import nn

import energy
import spiking_moe
from energy import OperationCounts
from spiking_moe import LIF

T = 5
BATCHES = (slice(0, 2), slice(2, 5), slice(5, 9))  # uneven on purpose: 2 + 3 + 4 tokens


def count_batches(model, x):
    """Counts of each batch (``x`` is ``[T, B, ...]``) and of one pass over all of ``x``."""
    passes = [energy.count_operations(model, x[:, b]) for b in BATCHES]
    return passes, energy.count_operations(model, x)


def report_without_calls(report: energy.EnergyReport) -> energy.EnergyReport:
    return dataclasses.replace(
        report, layers=tuple(dataclasses.replace(m, calls=0) for m in report.layers)
    )


class StepLoop(nn.Module):
    """snnTorch-style loop: one call per time step, plus a router on rates once per forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.router = nn.Linear(6, 2)
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)
        self.lif = LIF(beta=0.8, threshold=0.3)

    def forward(self, x_TBF):
        self.router(x_TBF.mean(0))
        out = []
        for t in range(x_TBF.shape[0]):
            s_1BH = self.lif(self.fc1(x_TBF[t]).unsqueeze(0))
            out.append(self.fc2(s_1BH[0]))
        return torch.stack(out)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), LIF(beta=0.8, threshold=0.3), nn.Linear(10, 3))


MODELS = {
    "spiking_mlp": (mlp, lambda: spikes(T, 9, 6, p=0.4, seed=3)),
    "graded_first_layer": (mlp, lambda: graded(T, 9, 6)),
    "step_loop": (StepLoop, lambda: spikes(T, 9, 6, p=0.4, seed=4)),
}


def merged_and_whole(name):
    """The batches of a MODELS case, merged, and one pass over all of them."""
    make, data = MODELS[name]
    passes, whole = count_batches(make(), data())
    return energy.merge_counts(*passes), whole


# ----------------------------------------------------------------------------- plain models


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_batches_equal_one_pass_over_their_concatenation(name):
    merged, whole = merged_and_whole(name)
    assert whole.total("spikes") > 0 and whole.total("acs") > 0
    assert_equal_except_calls(merged, whole)
    for layer in merged.layers:  # each batch calls every layer as often as the whole set does
        assert layer.calls == len(BATCHES) * whole.layer(layer.name).calls, layer.name
        assert layer.binary_calls == len(BATCHES) * whole.layer(layer.name).binary_calls


def test_merged_counts_match_hand_counts_of_the_whole_set():
    model, x = mlp(), spikes(T, 9, 6, p=0.4, seed=3)
    passes, _ = count_batches(model, x)
    first = energy.merge_counts(*passes).layer("0")
    assert first.acs == int(x.sum()) * 10  # every input event reaches 10 synapses
    assert (first.tokens, first.rows, first.ann_macs) == (9, T * 9, 9 * 6 * 10)
    x = graded(T, 9, 6)
    first = energy.merge_counts(*count_batches(model, x)[0]).layer("0")
    assert (first.macs, first.acs, first.input_kind) == (T * 9 * 6 * 10, 0, "graded")


def test_step_loop_tokens_are_one_forward_worth_per_batch():
    passes, _ = count_batches(StepLoop(), spikes(T, 9, 6, p=0.4, seed=4))
    merged = energy.merge_counts(*passes)
    for name in ("fc1", "fc2"):  # T calls per batch, 9 tokens in all
        layer = merged.layer(name)
        assert (layer.calls, layer.rows, layer.tokens) == (3 * T, T * 9, 9)
    router = merged.layer("router")
    assert (router.calls, router.tokens, router.input_kind) == (3, 9, "graded")
    assert router.ann_macs == 9 * 6 * 2


@pytest.mark.parametrize("name", list(MODELS))
def test_report_of_merged_batches_equals_report_of_the_whole_set(name):
    merged, whole = merged_and_whole(name)
    got = energy.build_report(merged, "cmos45", include_memory=True)
    want = energy.build_report(whole, "cmos45", include_memory=True)
    assert want.break_even_firing_rate is not None or want.baseline("ann_int8").ratio < 1
    assert report_without_calls(got) == report_without_calls(want)
    assert report_without_calls(energy.EnergyReport.from_json(got.to_json())) == (
        report_without_calls(want)
    )
    assert [m.calls for m in got.layers] == [len(BATCHES) * m.calls for m in want.layers]


# ----------------------------------------------------------------------------- MoE


def moe_model():
    """k=1 over 4 experts, routed so that each batch leaves some expert without tokens."""
    torch.manual_seed(0)
    model = spiking_moe.SpikingMoEClassifier(
        8, 3, hidden_features=16, num_experts=4, k=1, expert_hidden=8
    ).eval()
    router = model.layers[0].router
    with torch.no_grad():
        router.proj.weight.normal_(0, 3.0)  # spread the untrained router's choices
        router.expert_bias[2] = 1.0
        router.expert_bias[3] = -1e4  # expert 3 is never chosen: idle in every pass
    return model


def moe_input():
    g = torch.Generator().manual_seed(0)
    rate_1BF = torch.rand(1, 9, 8, generator=g)  # each token its own input rates
    return (torch.rand(6, 9, 8, generator=g) < rate_1BF).float()


def expert_tokens(counts):
    return {label: g.tokens for label, g in counts.groups().items()}


def test_moe_per_expert_counts_of_merged_batches_equal_the_whole_set():
    model, x = moe_model(), moe_input()
    passes, whole = count_batches(model, x)
    loads = [expert_tokens(p) for p in passes]
    labels = [f"layers.0.experts.{e}" for e in range(4)]
    # Premise: an expert idle in one batch but not in all, and expert 3 idle everywhere.
    assert any(load[label] == 0 for load in loads for label in labels[:3])
    assert all(expert_tokens(whole)[label] > 0 for label in labels[:3])
    assert all(load[labels[3]] == 0 for load in loads)

    merged = energy.merge_counts(*passes)
    assert merged.groups() == whole.groups()
    assert_equal_except_calls(merged, whole)
    for label in labels[:3]:  # the load adds up, and each expert is called once per batch it got
        assert merged.groups()[label].tokens == sum(load[label] for load in loads)
        first = merged.layer(f"{label}.net.0")
        assert first.calls == sum(load[label] > 0 for load in loads)
    assert list(merged.groups())[-1] == labels[3]  # never ran: listed last, zero counts
    assert merged.groups()[labels[3]].acs == merged.layer(f"{labels[3]}.net.0").calls == 0


def test_moe_dense_twin_merges_too_and_the_reports_agree():
    model, x = moe_model(), moe_input()
    passes, whole = count_batches(model, x)
    assert spiking_moe.moe.set_dense(model, True) == 1
    try:
        dense_passes, dense_whole = count_batches(model, x)
    finally:
        spiking_moe.moe.set_dense(model, False)
    dense = energy.merge_counts(*dense_passes)
    assert dense.groups() == dense_whole.groups()
    assert_equal_except_calls(dense, dense_whole)
    # Dense: every expert sees every token, the one the router never picks included.
    assert all(g.tokens == 9 for g in dense.groups().values())

    got = energy.build_report(energy.merge_counts(*passes), "cmos45", dense_counts=dense)
    want = energy.build_report(whole, "cmos45", dense_counts=dense_whole)
    assert want.baseline("dense_snn").ratio > 1 and want.experts
    assert report_without_calls(got) == report_without_calls(want)
    assert [e.dense_tokens for e in got.experts] == [9, 9, 9, 9]


def test_accumulating_batch_by_batch_equals_merging_all_at_once():
    model, x = moe_model(), moe_input()
    passes, _ = count_batches(model, x)
    assert functools.reduce(energy.merge_counts, passes) == energy.merge_counts(*passes)
    merged = energy.merge_counts(*passes)
    assert merged == energy.merge_counts(merged)  # a merged total merges like one pass
    # Plain ints only: a running total over any number of batches holds no tensors.
    assert all(
        type(getattr(m, f.name)) is int
        for m in merged.layers
        for f in dataclasses.fields(m)
        if f.name not in ("name", "kind", "group")
    )


@pytest.mark.parametrize("make", [moe_model, mlp])
def test_merging_a_single_pass_returns_equal_counts(make):
    model = make()
    x = moe_input() if make is moe_model else spikes(T, 9, 6, p=0.4, seed=3)
    counts = energy.count_operations(model, x)
    assert energy.merge_counts(counts) == counts


class ContentRouted(nn.Module):
    """Token b goes to expert ``argmax(x[0, b, :E])``; experts run in index order, if used."""

    def __init__(self, num_experts=12, d=12):
        super().__init__()
        torch.manual_seed(5)
        self.router = nn.Linear(d, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4), LIF(beta=0.8, threshold=0.3)) for _ in range(num_experts)
        )
        self.readout = nn.Linear(d, 2)

    def forward(self, x_TBD):
        self.router(x_TBD.mean(0))
        choice_B = x_TBD[0, :, : len(self.experts)].argmax(-1)
        for e, expert in enumerate(self.experts):
            ids = (choice_B == e).nonzero().flatten()
            if len(ids):
                expert(x_TBD[:, ids])
        return self.readout(x_TBD)


def routed_to(experts, seed):
    x = spikes(T, len(experts), 12, p=0.3, seed=seed)
    x[0] = 0
    x[0, torch.arange(len(experts)), torch.tensor(experts)] = 1  # the choice, at t = 0
    return x


def test_experts_that_never_share_a_batch_come_in_the_order_one_pass_calls_them():
    # Batch one uses experts 2 and 10, batch two 3 and 11: no batch shows 3 before 10, and
    # as strings "10" sorts before "3".
    model = ContentRouted()
    a, b = routed_to([2, 10], seed=1), routed_to([3, 11], seed=2)
    merged = energy.merge_counts(
        energy.count_operations(model, a), energy.count_operations(model, b)
    )
    whole = energy.count_operations(model, torch.cat([a, b], 1))
    idle = [e for e in range(12) if e not in (2, 3, 10, 11)]
    assert list(merged.groups()) == [f"experts.{e}" for e in (2, 3, 10, 11, *idle)]
    assert_equal_except_calls(merged, whole)
    assert [m.order for m in merged.layers] == list(range(len(merged.layers)))


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.extra, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, use_extra: bool):
        h = self.fc1(x)
        if use_extra:
            h = self.extra(h)
        return self.fc2(h)


def test_a_module_that_ran_in_one_pass_only_keeps_its_counts_in_call_order():
    model, x = Branch(), spikes(T, 3, 4, p=0.5, seed=6)
    without = energy.count_operations(model, x, False)
    with_extra = energy.count_operations(model, x, True)
    assert [m.name for m in without.layers] == ["fc1", "fc2"]
    merged = energy.merge_counts(without, with_extra)
    assert [m.name for m in merged.layers] == ["fc1", "extra", "fc2"]
    assert dataclasses.replace(merged.layer("extra"), order=0) == dataclasses.replace(
        with_extra.layer("extra"), order=0
    )
    assert merged.layer("fc1").acs == 2 * without.layer("fc1").acs == 2 * int(x.sum()) * 4


def test_binary_check_is_per_batch_so_an_exactly_binary_batch_is_charged_acs():
    # Documented limit of batch-by-batch counting: a graded layer whose input happens to be
    # exactly 0/1 in one batch counts ACs there, where one pass over all of it counts MACs.
    fc = nn.Linear(3, 2)
    binary, analog = torch.ones(T, 2, 3), torch.full((T, 2, 3), 0.5)
    merged = energy.merge_counts(
        energy.count_operations(fc, binary), energy.count_operations(fc, analog)
    ).layer("")
    whole = energy.count_operations(fc, torch.cat([binary, analog], 1)).layer("")
    assert (merged.acs, merged.macs, merged.input_kind) == (T * 2 * 3 * 2, T * 2 * 3 * 2, "mixed")
    assert (whole.acs, whole.macs, whole.input_kind) == (0, T * 4 * 3 * 2, "graded")
    assert merged.dense_macs == whole.dense_macs  # what does not depend on the check adds up


# ----------------------------------------------------------------------------- errors


def test_merging_different_time_steps_names_both():
    fc = nn.Linear(3, 2)
    a = energy.count_operations(fc, torch.ones(2, 1, 3))
    b = energy.count_operations(fc, torch.ones(3, 1, 3))
    with pytest.raises(ValueError, match=r"time_steps=2.*time_steps=3"):
        energy.merge_counts(a, b)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (lambda: nn.Sequential(LIF(beta=0.8)), "kind"),
        (lambda: nn.Sequential(nn.Linear(3, 4)), "fan_out"),
        (lambda: nn.Sequential(nn.Linear(5, 2)), "fan_in"),
    ],
)
def test_merging_a_different_module_under_the_same_name_names_it(other, field):
    x3 = torch.ones(2, 1, 3)
    a = energy.count_operations(nn.Sequential(nn.Linear(3, 2)), x3)
    model = other()
    b = energy.count_operations(model, torch.ones(2, 1, 5) if field == "fan_in" else x3)
    with pytest.raises(ValueError, match=rf"module '0' has {field}="):
        energy.merge_counts(a, b)


def test_merging_the_same_module_in_different_groups_names_it():
    net, x = nn.Sequential(nn.Linear(3, 2)), torch.ones(2, 1, 3)
    grouped = energy.count_operations(net, x, groups={"expert": "0"})
    with pytest.raises(ValueError, match=r"module '0' has group='expert'.*group=None"):
        energy.merge_counts(grouped, energy.count_operations(net, x))


def test_merging_nothing_or_not_counts_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        energy.merge_counts()
    counts = energy.count_operations(nn.Linear(3, 2), torch.ones(2, 1, 3))
    with pytest.raises(TypeError, match="argument 1 must be OperationCounts, got dict"):
        energy.merge_counts(counts, {})


def test_a_pass_that_names_a_module_twice_is_refused():
    counts = energy.count_operations(nn.Linear(3, 2), torch.ones(2, 1, 3))
    twice = OperationCounts(layers=counts.layers * 2, time_steps=counts.time_steps)
    with pytest.raises(ValueError, match="counts module '' twice"):
        energy.merge_counts(twice)
