"""Attention in the counter: products (``matmul_mask`` protocol), softmax, shared experts.

Product modules are written here and in ``energy_cases``, following the protocol of
:mod:`energy.rules`, because ``energy`` recognises them by attribute, never by class.
"""

import contextlib
import dataclasses

import pytest
import torch
from energy_cases import (
    THRESHOLD,
    AnnAttention,
    MatMul,
    SpikingAttention,
    Threshold,
    assert_equal_except_calls,
    graded,
    masked_product,
    spikes,
)
from torch import nn

import energy

NEG_INF = float("-inf")


class CausalScores(nn.Module):
    """Spiking ``Q K^T``, protocol as a class attribute."""

    matmul_mask = "output"

    def forward(self, a, b):
        return masked_product(self.matmul_mask, a, b)


class QKV(nn.Module):
    """``q, k, v`` from given tensors: the attention products alone."""

    def __init__(self):
        super().__init__()
        self.scores = CausalScores()
        self.mix = MatMul("contraction")

    def forward(self, q, k, v):
        return self.mix(self.scores(q, k.transpose(-2, -1)), v)


# Q, K, V of one head, [T=1, B=1, S=3, d=2].
Q = torch.tensor([[[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]])
K = torch.tensor([[[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]])
V = torch.tensor([[[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]])


# ----------------------------------------------------------------------------- hand counts


def test_causal_spiking_attention_hand_counts():
    counts = energy.count_operations(QKV(), Q, K, V)
    scores, mix = counts.layer("scores"), counts.layer("mix")
    # Q K^T, both binary so Q's events drive it; row m sees keys 0..m:
    #   row 0 [1, 0]: 1 event x 1 key; row 1 [1, 1]: 2 x 2; row 2 [0, 1]: 1 x 3  -> 8 ACs.
    # Computed terms: d * S(S+1)/2 = 2 * 6 = 12.
    assert (scores.kind, scores.input_kind) == ("matmul", "spikes")
    assert (scores.acs, scores.macs, scores.input_events, scores.dense_macs) == (8, 0, 4, 12)
    # scores = [[1, 0, 0], [2, 1, 0], [1, 1, 0]]: graded (a 2), so V's events drive the mix.
    # V event at row k feeds the output rows m >= k, 3 - k of them:
    #   (0, 0), (0, 1): 3 each; (1, 1): 2; (2, 0): 1  -> 9 ACs.
    assert (mix.acs, mix.macs, mix.input_events, mix.dense_macs) == (9, 0, 4, 12)
    assert (scores.fan_in, scores.fan_out, mix.fan_in, mix.fan_out) == (0, 0, 0, 0)
    assert scores.ann_macs == 12 and mix.ann_macs == 12  # T = 1
    assert (scores.rows, scores.tokens) == (3, 3)  # one row per query


def test_contraction_mask_with_binary_values_and_graded_scores():
    # [T=2, B=1, H=2, S=3, S=3] scores (lower triangle 0.5), [.., 3, 2] values.
    scores = torch.full((2, 1, 2, 3, 3), 0.5).tril()
    v = torch.zeros(2, 1, 2, 3, 2)
    v[0, 0, 0] = 1  # all 6 events: rows 0, 1, 2 reach 3, 2, 1 outputs  -> 2 * (3 + 2 + 1) = 12
    v[0, 0, 1, 2] = 1  # last row, 2 events reaching row 2 only            -> 2
    v[1, 0, 0, 0, 0] = 1  # first row, one event reaching rows 0..2        -> 3
    mix = energy.count_operations(MatMul("contraction"), scores, v).layer("")
    assert (mix.acs, mix.macs, mix.input_events, mix.input_kind) == (17, 0, 9, "spikes")
    # 4 leading indices x N=2 x S(S+1)/2=6 terms; time-major, so the ANN does one step of 2.
    assert (mix.dense_macs, mix.ann_macs) == (48, 24)


@pytest.mark.parametrize(
    "mask, a_shape, b_shape, macs",
    [
        (None, (1, 2, 3, 4), (1, 2, 4, 5), 2 * 3 * 4 * 5),
        ("output", (1, 2, 3, 4), (1, 2, 4, 3), 2 * 4 * 6),  # K * S(S+1)/2 per head
        ("contraction", (1, 2, 3, 3), (1, 2, 3, 5), 2 * 5 * 6),  # N * S(S+1)/2 per head
    ],
)
def test_graded_times_graded_is_macs_of_the_computed_terms(mask, a_shape, b_shape, macs):
    c = energy.count_operations(MatMul(mask), graded(*a_shape), graded(*b_shape, seed=2))
    c = c.layer("")
    assert (c.acs, c.macs, c.dense_macs, c.ann_macs) == (0, macs, macs, macs)
    assert (c.input_events, c.binary_calls, c.input_kind) == (0, 0, "graded")


def test_unmasked_product_counts_the_binary_operand():
    a_bin = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])  # [1, M=2, K=3]: 3 events
    c = energy.count_operations(MatMul(), a_bin, graded(1, 3, 4)).layer("")
    assert (c.acs, c.input_events) == (3 * 4, 3)  # each event reaches N = 4 outputs
    b_bin = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    c = energy.count_operations(MatMul(), graded(1, 2, 3), b_bin).layer("")
    assert (c.acs, c.input_events) == (5 * 2, 5)  # each event reaches M = 2 rows


def test_output_mask_with_binary_right_operand():
    # a graded [1, M=3, K=2], b binary [1, K=2, N=3]; event (k, n) reaches rows m >= n: 3 - n.
    b = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])
    # (0, 0): 3; (0, 2): 1; (1, 1): 2; (1, 2): 1  -> 7
    c = energy.count_operations(MatMul("output"), graded(1, 3, 2), b).layer("")
    assert (c.acs, c.macs, c.input_events) == (7, 0, 4)


def test_bad_mask_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="matmul_mask"):
        energy.count_operations(MatMul("upper"), graded(1, 2, 2), graded(1, 2, 2))
    with pytest.raises(ValueError, match="M == N"):
        energy.count_operations(MatMul("output"), graded(1, 3, 2), graded(1, 2, 4))
    with pytest.raises(ValueError, match="same leading dims"):
        energy.count_operations(MatMul(), graded(2, 3, 2), graded(1, 2, 4), time_steps=1)


# ----------------------------------------------------------------------------- softmax


class CausalFill(nn.Module):
    """Masked scores get -inf (inputs may not hold Inf), plus one more in the last step."""

    def forward(self, x_TBSS):
        S = x_TBSS.shape[-1]
        x = x_TBSS.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), NEG_INF)
        x[-1, :, -1, 0] = NEG_INF
        return x


def test_softmax_costs_three_per_finite_score():
    softmax = nn.Sequential(CausalFill(), nn.Softmax(dim=-1))
    # [T=2, B=1, 3, 3]: 6 visible scores in step 0, 5 in step 1.
    c = energy.count_operations(softmax, graded(2, 1, 3, 3)).layer("1")
    assert c.kind == "softmax"
    assert (c.macs, c.dense_macs, c.acs, c.input_events) == (3 * 11, 3 * 11, 0, 0)
    assert c.ann_macs == (3 * 6 + 3 * 5) // 2  # time-major: one step's worth (floored mean)
    assert (c.rows, c.tokens, c.input_kind) == (6, 3, "graded")


# ----------------------------------------------------------------------------- ANN twin

# One head, B=1, S=3, d=2, per step: three Linear(2, 2) on 3 tokens = 3 * 12 MACs; scores
# d * S(S+1)/2 = 12; softmax 3 * 6 = 18; mix d * 6 = 12.
ANN_MACS = 3 * 12 + 12 + 18 + 12
# Writes: q, k, v 3 * 6; scores 9; softmax 9; mix 6.
ANN_OUTPUTS = 18 + 9 + 9 + 6


def test_ann_twin_counts_its_softmax_attention_by_hand():
    counts = energy.count_operations(AnnAttention(), graded(1, 1, 3, 2))
    assert counts.layer("softmax").macs == 18
    assert counts.total("acs") == 0
    assert counts.total("macs") == counts.total("ann_macs") == ANN_MACS
    assert counts.total("ann_outputs") == ANN_OUTPUTS


def test_ann_softmax_flag_adds_the_softmax_the_ann_would_run():
    x = spikes(2, 1, 3, 2, p=0.5, seed=3)  # [T=2, B, S, d]
    with_softmax = energy.count_operations(SpikingAttention(), x, neuron_adapters=[THRESHOLD])
    plain = energy.count_operations(
        SpikingAttention(ann_softmax=False), x, neuron_adapters=[THRESHOLD]
    )
    assert with_softmax.total("ann_macs") == ANN_MACS
    assert plain.total("ann_macs") == ANN_MACS - 18
    assert with_softmax.layer("scores").dense_macs == plain.layer("scores").dense_macs == 2 * 12
    assert with_softmax.total("ann_outputs") == ANN_OUTPUTS


def test_derived_ann_baseline_equals_the_counted_ann_twin():
    snn = energy.count_operations(
        SpikingAttention(), spikes(2, 1, 3, 2, p=0.5, seed=3), neuron_adapters=[THRESHOLD]
    )
    twin = energy.count_operations(AnnAttention(), graded(1, 1, 3, 2))
    for name in ("ann_fp32", "ann_int8"):
        derived = energy.build_report(snn, include_memory=True).baseline(name)
        counted = energy.build_report(twin, include_memory=True).baseline(name)
        assert derived.macs == counted.macs == ANN_MACS
        assert derived.energy_pj == pytest.approx(counted.energy_pj)
    # cmos45: int8 MAC 0.23 pJ, 2 reads per MAC and a write per output, 5 pJ each.
    int8 = energy.build_report(snn, include_memory=True).baseline("ann_int8")
    assert int8.energy_pj == pytest.approx(ANN_MACS * 0.23 + (2 * ANN_MACS + ANN_OUTPUTS) * 5.0)


# ----------------------------------------------------------------------------- host syncs


@contextlib.contextmanager
def host_reads_forbidden():
    """On CPU, the ways a hook would read a tensor's value on the host raise instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value during the forward pass")

    names = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.setattr(torch.Tensor, name, refuse)
        yield


class Guarded(nn.Module):
    def __init__(self, inner, guard):
        super().__init__()
        self.inner, self.guard = inner, guard

    def forward(self, x):
        with self.guard():
            return self.inner(x)


def test_the_cpu_guard_catches_a_host_read():
    with host_reads_forbidden(), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(()) > 0)


@pytest.mark.parametrize(
    "make, x",
    [(SpikingAttention, spikes(2, 3, 4, 2, p=0.5, seed=5)), (AnnAttention, graded(1, 3, 4, 2))],
)
def test_attention_hooks_read_nothing_on_the_host(make, x, accelerator_accumulation):
    # On the CPU itself counts are read as ints (free there); what must not read anything is
    # the accelerator path, run here on CPU tensors.
    counts = energy.count_operations(
        Guarded(make(), host_reads_forbidden), x, neuron_adapters=[THRESHOLD]
    )
    plain = energy.count_operations(make(), x, neuron_adapters=[THRESHOLD])
    assert counts.total("acs") + counts.total("macs") > 0
    for layer in plain.layers:
        got = counts.layer(f"inner.{layer.name}")
        assert dataclasses.replace(got, name=layer.name, order=0) == dataclasses.replace(
            layer, order=0
        )


@contextlib.contextmanager
def cuda_syncs_forbidden():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
@pytest.mark.parametrize(
    "make, x",
    [(SpikingAttention, spikes(2, 3, 4, 2, p=0.5, seed=5)), (AnnAttention, graded(1, 3, 4, 2))],
)
def test_attention_hooks_do_not_synchronise_the_host_on_cuda(make, x):
    counts = energy.count_operations(
        Guarded(make(), cuda_syncs_forbidden).cuda(), x.cuda(), neuron_adapters=[THRESHOLD]
    )
    plain = energy.count_operations(make(), x, neuron_adapters=[THRESHOLD])
    for layer in plain.layers:
        got = counts.layer(f"inner.{layer.name}")
        assert dataclasses.replace(got, name=layer.name, order=0) == dataclasses.replace(
            layer, order=0
        )


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize(
    "make, x",
    [(SpikingAttention, spikes(2, 5, 4, 4, p=0.5, seed=6)), (AnnAttention, graded(1, 5, 4, 4))],
)
def test_merged_batches_equal_one_pass(make, x):
    model = make(d=4)
    whole = energy.count_operations(model, x, neuron_adapters=[THRESHOLD])
    passes = [
        energy.count_operations(model, x[:, b], neuron_adapters=[THRESHOLD])
        for b in (slice(0, 2), slice(2, 5))
    ]
    merged = energy.merge_counts(*passes)
    assert whole.total("acs") + whole.total("macs") > 0
    if make is SpikingAttention:
        assert whole.layer("scores").acs > 0 and whole.layer("mix").acs > 0
        # Scores above 1 in every batch: the mix is driven by V's spikes in each pass alike.
        assert all(c.layer("mix").input_events == c.layer("v_lif").spikes for c in passes)
    assert_equal_except_calls(merged, whole)


# ----------------------------------------------------------------------------- groups


class Expert(nn.Module):
    def __init__(self, d=2, hidden=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), Threshold(), nn.Linear(hidden, d))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Attention, one shared expert on every token, two routed ones (tokens 0-1 and 2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.attn = SpikingAttention()
        self.shared_experts = nn.ModuleList([Expert()])
        self.experts = nn.ModuleList([Expert(), Expert()])

    def forward(self, x_TBSD):
        a = self.attn(x_TBSD)
        routed = torch.cat((self.experts[0](a[:, :, :2]), self.experts[1](a[:, :, 2:])), dim=2)
        return self.shared_experts[0](a) + routed


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x):
        return self.layers[0](x)


def test_shared_and_routed_experts_are_groups_that_sum_to_the_totals():
    x = spikes(2, 2, 3, 2, p=0.5, seed=8)  # [T=2, B=2, S=3, d=2]
    counts = energy.count_operations(Stack(), x, neuron_adapters=[THRESHOLD])
    groups = counts.groups()
    shared, e0, e1 = "layers.0.shared_experts.0", "layers.0.experts.0", "layers.0.experts.1"
    assert list(groups) == [e0, e1, shared]  # call order
    assert counts.layer(f"{shared}.net.0").group == shared
    assert counts.layer(f"{e1}.net.2").group == e1
    assert counts.layer("layers.0.attn.scores").group is None
    # Tokens per step: shared sees B * S = 6, expert 0 B * 2 = 4, expert 1 B * 1 = 2; each
    # token costs 2 * 4 + 4 * 2 = 16 MACs per step, over T = 2 steps.
    assert (groups[shared].tokens, groups[e0].tokens, groups[e1].tokens) == (6, 4, 2)
    assert groups[shared].dense_macs == 2 * 6 * 16
    assert groups[e0].dense_macs + groups[e1].dense_macs == 2 * 6 * 16
    ungrouped = [m for m in counts.layers if m.group is None]
    for field in ("acs", "macs", "dense_macs", "ann_macs", "neuron_updates", "spikes"):
        grouped = sum(getattr(g, field) for g in groups.values())
        assert grouped + sum(getattr(m, field) for m in ungrouped) == counts.total(field), field
    assert counts.total("acs") > 0


# ----------------------------------------------------------------------------- report


def test_report_prices_and_lists_the_products():
    counts = energy.count_operations(QKV(), Q, K, V)  # 8 + 9 ACs over 4 + 4 events
    report = energy.build_report(counts, "cmos45")
    rows = {m.name: m for m in report.layers}
    assert rows["scores"].energy_pj == pytest.approx(8 * 0.9)
    assert rows["mix"].energy_pj == pytest.approx(9 * 0.9)
    with_mem = energy.build_report(counts, "cmos45", include_memory=True)
    # One read per AC (the other operand) and per input event, 5 pJ each.
    assert with_mem.totals.energy_pj == pytest.approx((8 + 9) * 0.9 + (8 + 4 + 9 + 4) * 5.0)
    text = report.to_markdown()
    assert "| `scores` | matmul |  | spikes | 3 | 8 | 0 |" in text
    assert "| `mix` | matmul |  | spikes | 3 | 9 | 0 |" in text


def test_report_prices_softmax_at_the_mac_price():
    twin = energy.count_operations(AnnAttention(), graded(1, 1, 3, 2))
    report = energy.build_report(twin, "cmos45", include_memory=True)
    softmax = next(m for m in report.layers if m.name == "softmax")
    # 18 MACs at 4.6 pJ; memory as for 18 MACs: 2 reads each at 5 pJ.
    assert softmax.energy_pj == pytest.approx(18 * 4.6 + 36 * 5.0)
    assert "| `softmax` | softmax |" in report.to_markdown()
