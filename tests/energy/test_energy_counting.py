"""Operation counts against hand counts, plain-loop oracles and peer frameworks."""

import itertools

import pytest
import torch
from energy_cases import ADDITIVE, PER_CALL, THRESHOLD, Threshold, make_snn, spikes
from torch import nn

import energy
from energy.counting import LayerCounts
from spiking_moe import LIF

# ----------------------------------------------------------------------------- hand counts


def test_linear_binary_input_counts_events_times_fan_out():
    fc = nn.Linear(4, 3)
    x = torch.tensor(
        [
            [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
            [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )  # [T=2, B=2, 4]: 5 events
    c = energy.count_operations(fc, x).layer("")
    assert (c.input_events, c.acs, c.macs) == (5, 15, 0)
    assert c.input_kind == "spikes"
    assert (c.rows, c.tokens) == (4, 2)
    assert c.ann_macs == 2 * 4 * 3  # 2 tokens, one step


def test_conv2d_binary_input_hand_counted_borders_and_stride():
    # 3x3 kernel, padding 1: an event in the corner feeds 4 output positions, one next to
    # it (1, 1) feeds all 9; two output channels each.
    conv = nn.Conv2d(1, 2, 3, padding=1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1
    x[0, 0, 1, 1] = 1
    c = energy.count_operations(conv, x).layer("")
    assert c.acs == (4 + 9) * 2
    assert c.input_events == 2
    # Stride 2 on 5x5 (outputs centred on rows/cols 0, 2, 4): event (1, 1) is seen by the 4
    # outputs centred on {0, 2} x {0, 2}; (2, 2) by the one at (2, 2); (0, 4) by (0, 4).
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = x[0, 0, 0, 4] = 1
    assert energy.count_operations(conv, x).layer("").acs == 4 + 1 + 1


def test_conv2d_groups_fan_out_is_out_channels_per_group():
    conv = nn.Conv2d(4, 6, 1, groups=2)  # each input channel reaches 3 output channels
    x = torch.zeros(1, 4, 2, 2)
    x[0, 0, 0, 0] = x[0, 1, 1, 1] = x[0, 3, 0, 1] = x[0, 2, 1, 0] = x[0, 2, 0, 0] = 1
    assert energy.count_operations(conv, x).layer("").acs == 5 * 3


def conv2d_synapse_events_loop(x, conv):
    """Plain loop: for every output element, count the events wired to it."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    B, C, H, W = x.shape
    G = conv.groups
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cin_g, cout_g = C // G, conv.out_channels // G
    total = 0
    for b, co, i, j in itertools.product(range(B), range(conv.out_channels), range(Ho), range(Wo)):
        g = co // cout_g
        for ci, a, d in itertools.product(range(g * cin_g, (g + 1) * cin_g), range(kh), range(kw)):
            r, s = i * sh - ph + a * dh, j * sw - pw + d * dw
            if conv.padding_mode == "circular":
                r, s = r % H, s % W
            elif not (0 <= r < H and 0 <= s < W):
                continue
            total += int(x[b, ci, r, s] != 0)
    return total


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
        dict(in_channels=2, out_channels=2, kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2)),
        dict(in_channels=4, out_channels=2, kernel_size=2, groups=2, padding=1, stride=2),
        dict(in_channels=1, out_channels=2, kernel_size=3, padding=1, padding_mode="circular"),
    ],
)
def test_conv2d_acs_match_a_plain_loop(kwargs):
    conv = nn.Conv2d(**kwargs)
    x = spikes(2, kwargs["in_channels"], 5, 6, p=0.4, seed=1)
    c = energy.count_operations(conv, x, time_steps=1).layer("")
    assert c.acs == conv2d_synapse_events_loop(x, conv)
    per_output = kwargs["in_channels"] // kwargs.get("groups", 1) * conv.weight[0, 0].numel()
    assert c.dense_macs == conv(x).numel() * per_output


def test_conv1d_and_conv3d_are_counted():
    conv1 = nn.Conv1d(1, 1, 3)
    x1 = torch.zeros(1, 1, 5)
    x1[0, 0, 2] = 1  # in the middle: all 3 valid outputs see it
    assert energy.count_operations(conv1, x1).layer("").acs == 3
    conv3 = nn.Conv3d(1, 2, 2)
    x3 = torch.zeros(1, 1, 3, 3, 3)
    x3[0, 0, 1, 1, 1] = 1  # centre of a 3-cube: all 2x2x2 outputs see it
    assert energy.count_operations(conv3, x3).layer("").acs == 8 * 2


def test_analog_first_layer_counts_macs_and_spiking_second_layer_counts_acs():
    net = nn.Sequential(nn.Linear(3, 4), LIF(beta=0.5, threshold=0.5), nn.Linear(4, 2))
    x = torch.rand(5, 2, 3) + 0.1  # [T, B, 3] graded current
    with torch.no_grad():
        s = net[1](net[0](x))
    counts = energy.count_operations(net, x)
    first, neuron, second = counts.layer("0"), counts.layer("1"), counts.layer("2")
    assert (first.macs, first.acs, first.input_kind) == (5 * 2 * 3 * 4, 0, "graded")
    assert (second.acs, second.macs, second.input_kind) == (int(s.sum()) * 2, 0, "spikes")
    assert neuron.neuron_updates == 5 * 2 * 4
    assert neuron.spikes == int(s.sum())


def test_two_valued_tensor_that_is_not_zero_one_is_graded():
    fc = nn.Linear(2, 2)
    x = torch.tensor([[[0.0, 0.37], [0.37, 0.0]]])  # two values, but not spikes
    c = energy.count_operations(fc, x).layer("")
    assert (c.acs, c.macs, c.input_kind) == (0, 2 * 2 * 2, "graded")


def test_half_precision_spikes_are_binary():
    fc = nn.Linear(3, 2).half()
    x = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float16)
    if not _half_linear_supported(fc, x):
        pytest.skip("this torch build has no float16 Linear on CPU")
    assert energy.count_operations(fc, x).layer("").acs == 4


def _half_linear_supported(fc, x):
    try:
        fc(x)
    except RuntimeError:
        return False
    return True


def test_layer_fed_spikes_then_current_is_mixed():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) + self.fc(x * 0.5)

    c = energy.count_operations(TwoCalls(), torch.ones(3, 1, 2)).layer("fc")
    assert c.input_kind == "mixed"
    assert (c.acs, c.macs, c.binary_calls, c.calls) == (3 * 2 * 2, 3 * 2 * 2, 1, 2)


def test_spikes_scaled_in_place_after_the_neuron_are_recounted_as_graded():
    class HalveInPlace(nn.Module):
        def forward(self, x):
            return x.mul_(0.5)

    net = nn.Sequential(LIF(beta=0.5), HalveInPlace(), nn.Linear(3, 2))
    counts = energy.count_operations(net, torch.full((4, 2, 3), 0.6))
    assert counts.layer("0").spikes == 6  # taken before the in-place change
    assert counts.layer("2").input_kind == "graded"
    assert counts.layer("2").macs == 4 * 2 * 3 * 2


def test_neuron_updates_and_spikes_of_a_hand_traced_lif():
    # beta 0.5, constant 0.6: h = 0.6, 0.9, 1.05 (spike), 0.625 -> spikes 0, 0, 1, 0.
    lif = LIF(beta=0.5)
    c = energy.count_operations(lif, torch.full((4, 2, 3), 0.6)).layer("")
    assert (c.kind, c.neuron_updates, c.spikes) == ("neuron", 4 * 2 * 3, 2 * 3)
    assert c.firing_rate == pytest.approx(0.25)


# ----------------------------------------------------------------------------- ANN baseline


def test_ann_macs_equal_in_times_out_times_tokens():
    T, B = 3, 7
    net = nn.Sequential(nn.Linear(6, 5), LIF(), nn.Linear(5, 4), LIF())
    counts = energy.count_operations(net, spikes(T, B, 6))
    assert counts.total("ann_macs") == B * (6 * 5 + 5 * 4)
    report = energy.build_report(counts, "cmos45")
    assert report.baseline("ann_fp32").energy_pj == pytest.approx(B * (6 * 5 + 5 * 4) * 4.6)
    assert report.baseline("ann_int8").energy_pj == pytest.approx(B * (6 * 5 + 5 * 4) * 0.23)


def test_ann_macs_of_step_loop_and_once_per_forward_layers():
    T, B, D, E = 4, 3, 5, 2

    class StepLoopWithRouter(nn.Module):
        """snnTorch-style loop over T for fc; router runs once on rates."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.router = nn.Linear(D, E)

        def forward(self, x):
            out = torch.stack([self.fc(x_t) for x_t in x])
            return out, self.router(x.mean(0))

    counts = energy.count_operations(StepLoopWithRouter(), spikes(T, B, D))
    fc, router = counts.layer("fc"), counts.layer("router")
    assert (fc.calls, fc.tokens, fc.ann_macs) == (T, B, B * D * D)
    assert fc.acs > 0 and fc.macs == 0
    assert (router.calls, router.tokens, router.ann_macs) == (1, B, B * D * E)
    assert router.macs == B * D * E  # rates are graded


def test_time_folded_into_the_batch_is_recognised_for_the_ann_count():
    T, B = 4, 8  # B divisible by T: shapes alone could not tell folded time from a batch
    net = nn.Sequential(
        nn.Flatten(0, 1),  # a view of the [T, B, ...] input: folded time
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Unflatten(0, (T, B)),
        LIF(beta=0.8, threshold=0.3),
        nn.Flatten(0, 1),
        nn.MaxPool2d(2),  # new tensor, still folded time: tracked through the module
        nn.Conv2d(2, 2, 3, padding=1),
    )
    x = spikes(T, B, 1, 4, 4, p=0.5, seed=8)
    counts = energy.count_operations(net, x)
    for name in ("1", "6"):
        layer = counts.layer(name)
        assert layer.rows == T * B and layer.tokens == B, name
        assert layer.ann_macs * T == layer.dense_macs, name

    class RouterOnRates(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(3, 2)

        def forward(self, x_TBD):
            return self.router(x_TBD.mean(0))  # [B, D], once per forward: no time

    router = energy.count_operations(RouterOnRates(), spikes(T, B, 3)).layer("router")
    assert (router.tokens, router.ann_macs) == (B, B * 3 * 2)


# ----------------------------------------------------------------------------- invariances


def test_counts_add_up_when_the_batch_is_split():
    net = make_snn()
    x = spikes(6, 10, 1, 5, 5, p=0.4, seed=3)  # [T, B, C, H, W]
    whole = energy.count_operations(net, x)
    halves = [energy.count_operations(net, x[:, :4]), energy.count_operations(net, x[:, 4:])]
    assert whole.total("acs") > 0 and whole.total("spikes") > 0
    for layer in whole.layers:
        parts = [h.layer(layer.name) for h in halves]
        for field in ADDITIVE:
            if field in PER_CALL:  # per call, not per token
                continue
            assert getattr(layer, field) == sum(getattr(p, field) for p in parts), (
                layer.name,
                field,
            )


def test_counts_are_int64_exact_beyond_float32_precision():
    # 2**24 + 4096 events: a float32 accumulator would stall at 2**24.
    fc = nn.Linear(1 << 12, 3, bias=False)
    x = torch.ones(1, (1 << 12) + 1, 1 << 12)
    assert energy.count_operations(fc, x).layer("").acs == ((1 << 24) + (1 << 12)) * 3


# ----------------------------------------------------------------------------- peers


def test_snntorch_two_layer_step_loop_network():
    snntorch = pytest.importorskip("snntorch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
            self.lif1, self.lif2 = snntorch.Leaky(beta=0.9), snntorch.Leaky(beta=0.9)

        def forward(self, x):
            mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
            record = []
            for x_t in x:
                spk1, mem1 = self.lif1(self.fc1(x_t), mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                record.append((spk1, spk2))
            return record

    T, B = 6, 4
    net = Net()
    x = torch.rand(T, B, 5) * 2
    with torch.no_grad():
        record = net(x)
    s1 = sum(int(a.sum()) for a, _ in record)
    s2 = sum(int(b.sum()) for _, b in record)
    counts = energy.count_operations(net, x)
    assert counts.layer("fc1").macs == T * B * 5 * 8
    assert counts.layer("fc2").acs == s1 * 3 and counts.layer("fc2").macs == 0
    assert (counts.layer("lif1").neuron_updates, counts.layer("lif1").spikes) == (T * B * 8, s1)
    assert (counts.layer("lif2").neuron_updates, counts.layer("lif2").spikes) == (T * B * 3, s2)
    assert s1 > 0
    assert counts.layer("fc2").ann_macs == B * 8 * 3


def test_norse_sequential_network():
    norse = pytest.importorskip("norse.torch")
    torch.manual_seed(2)
    net = norse.SequentialState(nn.Linear(5, 8), norse.LIF(), nn.Linear(8, 3), norse.LIF())
    T, B = 8, 3
    x = torch.rand(T, B, 5) * 40
    with torch.no_grad():
        s1, _ = net[1](net[0](x))
        s2, _ = net[3](net[2](s1))
    counts = energy.count_operations(net, x)
    assert counts.layer("0").macs == T * B * 5 * 8
    assert counts.layer("2").acs == int(s1.sum()) * 3
    assert (counts.layer("1").neuron_updates, counts.layer("1").spikes) == (
        T * B * 8,
        int(s1.sum()),
    )
    assert (counts.layer("3").neuron_updates, counts.layer("3").spikes) == (
        T * B * 3,
        int(s2.sum()),
    )
    assert int(s1.sum()) > 0


def test_spikingjelly_multistep_network():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(3)
    net = nn.Sequential(
        layer.Conv2d(1, 2, 3, padding=1, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(2 * 4 * 4, 3, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
    )
    with torch.no_grad():  # strong enough to make the first LIF layer fire
        net[0].weight.fill_(0.6)
        net[0].bias.zero_()
    T, B = 4, 2
    x = spikes(T, B, 1, 4, 4, p=0.5, seed=4)
    with torch.no_grad():
        s1 = net[1](net[0](x))
        functional.reset_net(net)
    counts = energy.count_operations(net, x)
    functional.reset_net(net)
    oracle = conv2d_synapse_events_loop(x.flatten(0, 1), net[0])
    assert counts.layer("0").acs == oracle and counts.layer("0").tokens == B
    assert counts.layer("3").acs == int(s1.sum()) * 3
    assert counts.layer("1").neuron_updates == T * B * 2 * 4 * 4
    assert counts.layer("1").spikes == int(s1.sum()) > 0


def test_custom_neuron_adapter():
    class Heaviside(nn.Module):
        def forward(self, x):
            return (x > 0).float(), x

    adapter = energy.NeuronAdapter("heaviside", lambda m: isinstance(m, Heaviside))
    x = torch.tensor([[[1.0, -1.0, 2.0]]])
    assert energy.count_operations(Heaviside(), x, neuron_adapters=[adapter]).layer("").spikes == 2


# ----------------------------------------------------------------------------- experts


class StubMoE(nn.Module):
    """Explicit routing: expert e runs on tokens ``assignment[e]`` only (dense: on all)."""

    def __init__(self, d, h, assignment, seed=0, identical=False):
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(d, len(assignment))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, h), LIF(beta=0.8, threshold=0.4), nn.Linear(h, d))
            for _ in assignment
        )
        if identical:
            for e in self.experts[1:]:
                e.load_state_dict(self.experts[0].state_dict())
        self.neuron = LIF(beta=0.8, threshold=0.4)
        self.assignment = [torch.as_tensor(a, dtype=torch.long) for a in assignment]
        self.dense = False

    def forward(self, x_TBD):
        self.router(x_TBD.mean(0))
        out = torch.zeros_like(x_TBD)
        everyone = torch.arange(x_TBD.shape[1])
        for expert, ids in zip(self.experts, self.assignment, strict=True):
            if self.dense:
                gate = torch.zeros(x_TBD.shape[1])
                gate[ids] = 1.0
                out += expert(x_TBD[:, everyone]) * gate[:, None]
            elif len(ids):
                out[:, ids] += expert(x_TBD[:, ids])
        return self.neuron(out)


class Wrapper(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)


ASSIGNMENT = [[0, 2, 5], [1, 2, 3, 4], [], [0, 1, 3, 4, 5]]  # top-2 over 6 tokens, expert 2 idle


def same_counts(a: LayerCounts, b: LayerCounts):
    return all(getattr(a, f) == getattr(b, f) for f in ADDITIVE) and a.kind == b.kind


def test_per_expert_counts_equal_each_expert_alone_on_its_routed_tokens():
    moe = Wrapper(StubMoE(6, 10, ASSIGNMENT))
    x = spikes(5, 6, 6, p=0.5, seed=5)
    counts = energy.count_operations(moe, x)
    groups = counts.groups()
    assert list(groups) == ["moe.experts.0", "moe.experts.1", "moe.experts.3", "moe.experts.2"]
    for e, ids in enumerate(ASSIGNMENT):
        label = f"moe.experts.{e}"
        assert groups[label].tokens == len(ids)
        if not ids:
            assert groups[label].acs == groups[label].neuron_updates == 0
            continue
        alone = energy.count_operations(moe.moe.experts[e], x[:, ids])
        for i, layer in enumerate(alone.layers):
            assert same_counts(counts.layer(f"{label}.{i}"), layer), (label, i)
        assert groups[label].acs == alone.total("acs") > 0
        assert groups[label].spikes == alone.total("spikes")
    assert counts.layer("moe.router").group is None
    assert counts.layer("moe.neuron").group is None


def test_explicit_groups_mapping_relabels_the_same_counts():
    moe = Wrapper(StubMoE(6, 10, ASSIGNMENT))
    x = spikes(5, 6, 6, p=0.5, seed=5)
    by_name = energy.count_operations(moe, x).groups()
    explicit = energy.count_operations(
        moe,
        x,
        groups={"left": ["moe.experts.0", "moe.experts.1"], "right": "moe.experts.3"},
    ).groups()
    assert set(explicit) == {"left", "right"}
    left = explicit["left"]
    assert left.acs == by_name["moe.experts.0"].acs + by_name["moe.experts.1"].acs
    assert explicit["right"].spikes == by_name["moe.experts.3"].spikes


def test_dense_moe_baseline_exceeds_sparse_by_experts_over_k():
    E, k, B = 4, 2, 6
    moe = Wrapper(StubMoE(6, 10, ASSIGNMENT, identical=True))
    # Every token carries the same spike train, so each expert costs the same per token and
    # the dense/sparse ratio of expert operations is exactly (E * B) / (k * B) = E / k.
    x = spikes(5, 1, 6, p=0.5, seed=6).expand(5, B, 6).contiguous()
    sparse = energy.count_operations(moe, x).groups()
    moe.moe.dense = True
    dense = energy.count_operations(moe, x).groups()
    for field in ("acs", "neuron_updates", "spikes"):
        s = sum(getattr(g, field) for g in sparse.values())
        d = sum(getattr(g, field) for g in dense.values())
        assert s > 0 and d * k == s * E, field
    assert all(g.tokens == B for g in dense.values())


def test_report_dense_baselines_with_a_dense_twin():
    moe = Wrapper(StubMoE(6, 10, ASSIGNMENT)).eval()
    twin = Wrapper(StubMoE(6, 10, ASSIGNMENT)).eval()
    twin.moe.dense = True
    x = spikes(5, 6, 6, p=0.5, seed=7)
    report = energy.estimate(moe, x, dense_model=twin)
    dense_snn = report.baseline("dense_snn")
    assert dense_snn.energy_pj > report.totals.energy_pj
    assert dense_snn.ratio == pytest.approx(dense_snn.energy_pj / report.totals.energy_pj)
    assert report.baseline("dense_ann_fp32").macs > report.baseline("ann_fp32").macs
    expert0 = next(e for e in report.experts if e.label == "moe.experts.0")
    assert (expert0.tokens, expert0.dense_tokens) == (3, 6)
    assert expert0.dense_energy_pj > expert0.energy_pj


# ----------------------------------------------------------------------------- bad input


def test_model_without_countable_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no countable layers.*ReLU"):
        energy.count_operations(nn.Sequential(nn.ReLU()), torch.ones(2, 1, 3))


def test_nan_input_is_rejected():
    x = torch.ones(2, 1, 3)
    x[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="input tensor 0.*NaN"):
        energy.count_operations(nn.Linear(3, 2), x)
    x[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="input tensor 0.*Inf"):
        energy.count_operations(nn.Linear(3, 2), x)
    huge = torch.full((2, 1, 3), 3e38)  # its sum overflows, yet every value is finite
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight.fill_(1e-3)
    assert energy.count_operations(fc, huge, time_steps=2).layer("").macs == 12


def test_nan_output_is_rejected():
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="output contains NaN"):
        energy.count_operations(fc, torch.ones(2, 1, 3))


def test_unknown_group_prefix_is_rejected():
    with pytest.raises(ValueError, match="'experts.9' matches no countable module"):
        energy.count_operations(
            nn.Sequential(nn.Linear(3, 2)), torch.ones(2, 1, 3), groups={"x": "experts.9"}
        )


def test_bad_time_steps_and_model_type():
    with pytest.raises(ValueError, match="time_steps"):
        energy.count_operations(nn.Linear(3, 2), torch.ones(2, 3), time_steps=0)
    with pytest.raises(TypeError, match="nn.Module"):
        energy.count_operations(lambda x: x, torch.ones(2, 3))


def test_hooks_are_removed_after_counting_and_after_an_error():
    fc = nn.Linear(3, 2)
    energy.count_operations(fc, torch.ones(2, 1, 3))
    assert not fc._forward_hooks
    with pytest.raises(RuntimeError):
        energy.count_operations(fc, torch.ones(2, 1, 4))  # wrong width
    assert not fc._forward_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_counting_hooks_do_not_synchronise_the_host_on_cuda():
    class NoSync(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return self.inner(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    x = spikes(6, 10, 1, 5, 5, p=0.4, seed=3)
    net = NoSync(make_snn(Threshold)).cuda()
    counts = energy.count_operations(net, x.cuda(), neuron_adapters=[THRESHOLD])
    cpu = energy.count_operations(make_snn(Threshold), x, neuron_adapters=[THRESHOLD])
    assert cpu.total("acs") > 0 and cpu.total("spikes") > 0
    for layer in cpu.layers:
        assert same_counts(counts.layer(f"inner.{layer.name}"), layer), layer.name


# ----------------------------------------------------------------------------- declared steps


class Windows(nn.Module):
    """Runs its layer on [L, W B, F] windows of a [T, B, F] input (T = W L), fresh per window."""

    def __init__(self, window, declare):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.window = window
        if declare:
            self.energy_time_steps = window

    def forward(self, x_TBF):
        T, B, F = x_TBF.shape
        W = T // self.window
        rows = x_TBF.view(W, self.window, B, F).transpose(0, 1).reshape(self.window, W * B, F)
        return self.fc(rows)


def test_declared_time_steps_make_windowed_calls_one_ann_step_per_window_row():
    T, B, L = 6, 4, 2
    x = spikes(T, B, 5, p=0.4)
    declared = energy.count_operations(Windows(L, declare=True), x).layer("fc")
    # Hand count: W = 3 windows x 4 tokens = 12 rows of 2 steps; the ANN runs each row once.
    assert (declared.rows, declared.tokens) == (T * B, (T // L) * B)
    assert declared.ann_macs == (T // L) * B * 5 * 3
    assert declared.dense_macs == T * B * 5 * 3
    # Undeclared, the call is taken as once per forward: every one of its rows an ANN step.
    undeclared = energy.count_operations(Windows(L, declare=False), x).layer("fc")
    assert (undeclared.tokens, undeclared.ann_macs) == (T * B, T * B * 5 * 3)
    assert undeclared.acs == declared.acs  # the spiking counts do not depend on it


def test_bad_declared_time_steps_are_rejected():
    model = Windows(2, declare=True)
    model.energy_time_steps = 0
    with pytest.raises(ValueError, match=r"module '': energy_time_steps must be a positive int"):
        energy.count_operations(model, spikes(6, 4, 5))


def test_windowed_moe_experts_count_one_ann_step_per_routed_window_row():
    from spiking_moe.experts import SpikingExpert
    from spiking_moe.moe import SpikingMoE
    from spiking_moe.router import RateRouter

    torch.manual_seed(0)
    T, N, D, E, L = 6, 5, 8, 4, 2
    moe = SpikingMoE(
        router=RateRouter(D, E, 2, window=L),
        experts=[SpikingExpert(D, 12, D, threshold=0.3) for _ in range(E)],
    )
    x = spikes(T, N, D, p=0.4)
    routed = moe(x).routing.tokens_per_expert.tolist()  # (window, token) rows per expert
    counts = energy.count_operations(moe, x)
    assert sum(routed) == (T // L) * N * 2
    for e, rows in enumerate(routed):
        first = counts.layer(f"experts.{e}.net.0")
        assert (first.tokens, first.ann_macs) == (rows, rows * D * 12), e
        assert first.dense_macs == rows * L * D * 12
