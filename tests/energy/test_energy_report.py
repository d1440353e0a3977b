"""Energy reports: hand-priced energies, baselines, verdict, JSON and Markdown."""

import math

import pytest
import torch
from energy_cases import TinyMoE, X, small_net, spikes, unit_profile
from torch import nn

import energy
from spiking_moe import LIF


def test_snn_energy_priced_by_hand_with_and_without_memory():
    net = small_net()
    with torch.no_grad():
        s = int(net(X).sum())
    assert s > 0
    acs, updates = 5 * 3, 2 * 2 * 3
    report = energy.estimate(net, X, profile="cmos45")
    assert report.totals.energy_pj == pytest.approx(acs * 0.9 + updates * 5.5 + s * 0.9)
    assert report.totals.memory_energy_pj == 0
    with_mem = energy.estimate(net, X, profile="cmos45", include_memory=True)
    reads, writes = (
        acs + 5 + updates,
        updates + s,
    )  # weights, input events, membrane; membrane, spikes
    assert with_mem.totals.memory_energy_pj == pytest.approx(5.0 * (reads + writes))
    ann_macs = 2 * 4 * 3  # 2 tokens, one step
    assert with_mem.baseline("ann_fp32").energy_pj == pytest.approx(
        ann_macs * 4.6 + 2 * ann_macs * 5.0 + 2 * 3 * 5.0
    )
    assert report.layers[0].energy_pj == pytest.approx(acs * 0.9)


def test_profile_changes_the_price_not_the_counts():
    net = small_net()
    cmos, loihi = energy.estimate(net, X), energy.estimate(net, X, profile="loihi")
    assert cmos.totals.acs == loihi.totals.acs == 15
    s = loihi.totals.spikes
    assert loihi.totals.energy_pj == pytest.approx(15 * 23.6 + 12 * 52.0 + s * 3.5)
    # The ANN baselines stay on the conventional accelerator.
    assert loihi.baseline("ann_int8").energy_pj == cmos.baseline("ann_int8").energy_pj


def test_user_profile_object_is_accepted():
    p = unit_profile(mac_pj=10)
    report = energy.estimate(nn.Linear(4, 3), X, profile=p)
    assert report.totals.energy_pj == 15 and report.profile == p


def test_verdict_follows_the_int8_comparison():
    # Small dense layer with neurons: the int8 ANN (24 MACs x 0.23 pJ) beats the SNN.
    report = energy.estimate(small_net(), X)
    assert report.baseline("ann_int8").energy_pj < report.totals.energy_pj
    assert report.baseline("ann_int8").ratio < 1
    assert report.verdict.startswith("An int8 ANN with the same routing would use less energy")
    assert report.break_even_firing_rate == 0.0
    # A wide layer with one event: 1000 ACs against 10**6 int8 MACs, the SNN wins.
    x = torch.zeros(1, 1, 1000)
    x[0, 0, 7] = 1
    net = nn.Sequential(nn.Linear(1000, 1000), LIF(threshold=100.0))
    wide = energy.estimate(net, x)
    assert wide.totals.energy_pj == pytest.approx(1000 * 0.9 + 1000 * 5.5)
    assert wide.baseline("ann_int8").energy_pj == pytest.approx(1000 * 1000 * 0.23)
    assert wide.verdict.startswith("The SNN uses less energy than an int8 ANN")


def test_break_even_rate_solves_the_energy_balance():
    # Wide fan-in, sparse input: the SNN beats the int8 ANN, so a break-even rate exists.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(1000, 100), LIF(threshold=0.02), nn.Linear(100, 100), LIF())
    x = (torch.rand(2, 2, 1000) < 0.005).float()
    report = energy.estimate(net, x)
    t, p = report.totals, report.profile
    activity = t.acs * p.ac_pj + t.spikes * p.spike_pj
    fixed = t.macs * p.mac_pj + t.neuron_updates * p.neuron_update_pj
    scale = report.break_even_firing_rate / t.firing_rate
    assert fixed + activity * scale == pytest.approx(report.baseline("ann_int8").energy_pj)
    assert report.break_even_firing_rate > t.firing_rate > 0
    assert f"{report.break_even_firing_rate:.1%}" in report.verdict


def test_silent_network_has_infinite_ratios_that_survive_json():
    report = energy.estimate(nn.Linear(4, 3), torch.zeros(2, 1, 4))
    assert report.totals.energy_pj == 0
    assert math.isinf(report.baseline("ann_fp32").ratio)
    assert energy.EnergyReport.from_json(report.to_json()) == report


def moe_report(**kwargs):
    x = spikes(3, 4, 4, p=0.5, seed=2)
    return energy.estimate(TinyMoE(), x, dense_model=TinyMoE(dense=True), **kwargs)


def test_json_round_trip_is_exact():
    report = moe_report(profile="truenorth", include_memory=True)
    text = report.to_json()
    back = energy.EnergyReport.from_json(text)
    assert back == report
    assert back.to_json() == text
    with pytest.raises(ValueError, match="not an energy report"):
        energy.EnergyReport.from_json('{"format": 99}')


def test_markdown_shows_every_table_and_the_verdict():
    report = moe_report()
    md = report.to_markdown()
    assert md.startswith("## Energy report: profile `cmos45`")
    for needle in (
        "Horowitz",
        "### Baselines",
        "| Dense MoE SNN (every expert on every token) |",
        "| ANN, same routing, fp32 |",
        "| ANN, same routing, int8 |",
        "| Dense ANN (every expert), fp32 |",
        "| Dense ANN (every expert), int8 |",
        "### Per layer",
        "| `experts.1.0` | linear | experts.1 | spikes | 3 |",
        "### Per expert",
        "dense / routed",
        report.verdict,
    ):
        assert needle in md, needle
    expert1 = next(e for e in report.experts if e.label == "experts.1")
    assert (expert1.index, expert1.tokens, expert1.dense_tokens) == (1, 3, 4)
    assert [b.name for b in report.baselines] == [
        "dense_snn",
        "ann_fp32",
        "ann_int8",
        "dense_ann_fp32",
        "dense_ann_int8",
    ]


def test_dense_ann_counts_every_expert_on_every_token():
    report = moe_report()
    per_token = 4 * 6 + 6 * 4
    assert report.baseline("dense_ann_fp32").macs == 3 * 4 * per_token  # 3 experts x 4 tokens
    assert report.baseline("ann_fp32").macs == (2 + 3 + 3) * per_token


def test_mismatched_dense_counts_are_rejected():
    a = energy.count_operations(nn.Linear(4, 3), torch.ones(2, 1, 4))
    b = energy.count_operations(nn.Linear(4, 3), torch.ones(3, 1, 4))
    with pytest.raises(ValueError, match="T=3"):
        energy.build_report(a, dense_counts=b)
