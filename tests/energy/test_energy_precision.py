"""Precision-honest energy: profile bits, accuracy at the priced precision, both totals."""

import dataclasses
import json

import pytest
import torch
from energy_cases import TinyMoE, X, small_net, spikes, unit_profile
from torch import nn

import energy
from energy.profiles import get_profile
from energy.tensorboard import write_report

# Round numbers so that the two accountings disagree: with compute only the int8 ANN wins,
# with memory traffic the SNN wins (the ANN reads a weight and an activation per MAC).
UNIT = unit_profile(memory_read_pj=1.0, ann_mac_int8_pj=0.1, weight_bits=8, activation_bits=1)


# ----------------------------------------------------------------------------- profiles


def test_bundled_profiles_state_their_precision():
    bits = {
        name: (get_profile(name).weight_bits, get_profile(name).activation_bits)
        for name in energy.available_profiles()
    }
    assert bits["cmos45"] == (32, 32)
    assert bits["cmos45_fp16"] == (16, 16)
    assert bits["cmos45_int8"] == (8, 8)
    assert bits["loihi"] == (8, 1)  # Davies 2018: up to 8-bit weights; binary spikes
    assert bits["truenorth"] == (2, 1)  # 1-bit crossbar x 4 axon-type weights
    assert bits["spinnaker2"] == (16, 1)


# ----------------------------------------------------------------------------- accuracy


def test_fp32_model_under_an_int8_profile_says_accuracy_not_measured():
    report = energy.estimate(small_net(), X, profile="cmos45_int8")
    needle = "accuracy at 8 bits: not measured (the model ran at 32-bit weights)"
    assert needle in report.verdict
    md = report.to_markdown()
    assert needle in md
    assert (
        "Precision: the profile prices 8-bit weights and 8-bit activations; "
        "the model ran at 32-bit weights." in md
    )


def test_both_accuracies_are_shown_when_measured():
    report = energy.estimate(
        small_net(), X, profile="loihi", accuracy=0.912, accuracy_at_profile_precision=0.871
    )
    assert "not measured" not in report.verdict
    assert (
        "Accuracy at 32-bit weights (as run): 0.912; at 8 bits (the profile's precision): 0.871."
        in report.verdict
    )
    assert report.verdict in report.to_markdown()


def test_no_precision_caveat_when_the_profile_is_at_least_as_precise():
    assert "accuracy" not in energy.estimate(small_net(), X, profile="cmos45").verdict.lower()
    report = energy.estimate(small_net(), X, profile="loihi", model_weight_bits=8, accuracy=0.9)
    assert "Accuracy 0.9 at 8-bit weights, within the profile's 8 bits." in report.verdict


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model_weight_bits": 0}, ValueError),
        ({"model_weight_bits": 8.0}, TypeError),
        ({"accuracy": "high"}, TypeError),
        ({"accuracy_at_profile_precision": float("nan")}, ValueError),
    ],
)
def test_bad_precision_arguments_are_rejected(kwargs, error):
    counts = energy.count_operations(nn.Linear(4, 3), X)
    with pytest.raises(error, match=next(iter(kwargs))):
        energy.build_report(counts, **kwargs)


# ----------------------------------------------------------------------------- JSON


def test_json_round_trip_keeps_the_new_fields():
    report = energy.estimate(
        small_net(),
        X,
        profile="truenorth",
        include_memory=True,
        model_weight_bits=16,
        accuracy=0.93,
        accuracy_at_profile_precision=0.41,
    )
    text = report.to_json()
    back = energy.EnergyReport.from_json(text)
    assert back == report and back.to_json() == text
    assert (back.model_weight_bits, back.accuracy, back.accuracy_at_profile_precision) == (
        16,
        0.93,
        0.41,
    )
    assert (back.profile.weight_bits, back.profile.activation_bits) == (2, 1)
    assert back.totals.compute_pj == report.totals.compute_pj
    assert (
        back.baseline("ann_int8").with_memory_ratio == report.baseline("ann_int8").with_memory_ratio
    )


def test_format_1_json_is_refused_naming_both_formats():
    report = energy.estimate(small_net(), X, profile="loihi")
    data = json.loads(report.to_json())
    # Rewrite it as a report written before precision and the two totals existed.
    data["format"] = 1
    for key in ("model_weight_bits", "accuracy", "accuracy_at_profile_precision"):
        del data[key]
    for key in ("weight_bits", "activation_bits"):
        del data["profile"][key]
    for key in ("compute_pj", "with_memory_pj"):
        del data["totals"][key]
    for row in data["baselines"]:
        for key in ("compute_pj", "compute_ratio", "with_memory_pj", "with_memory_ratio"):
            del row[key]
    with pytest.raises(ValueError, match=r"not an energy report in format 2.*found format 1"):
        energy.EnergyReport.from_json(json.dumps(data))
    # The same file re-tagged as format 2 is missing its required fields, named.
    data["format"] = 2
    with pytest.raises(ValueError, match=r"without the field\(s\) \['model_weight_bits'"):
        energy.EnergyReport.from_json(json.dumps(data))
    for key in ("model_weight_bits", "accuracy", "accuracy_at_profile_precision"):
        data[key] = getattr(report, key)
    with pytest.raises(ValueError, match="weight_bits"):
        energy.EnergyReport.from_json(json.dumps(data))
    data["profile"] = dataclasses.asdict(report.profile)
    with pytest.raises(TypeError, match="compute_pj"):
        energy.EnergyReport.from_json(json.dumps(data))


# ----------------------------------------------------------------------------- two totals


def test_compute_and_memory_totals_by_hand():
    net = small_net()
    with torch.no_grad():
        s = int(net(X).sum())
    assert s > 0
    acs, events, updates = 5 * 3, 5, 2 * 2 * 3
    compute = acs * 0.9 + updates * 5.5 + s * 0.9
    # Memory (energy.counting): reads = AC + MAC + events + MAC + updates, writes = updates +
    # spikes; cmos45 prices 5 pJ per access.
    memory = 5.0 * ((acs + events + updates) + (updates + s))
    ann_macs, ann_outputs = 2 * 4 * 3, 2 * 3
    ann = {
        "ann_fp32": (ann_macs * 4.6, ann_macs * 4.6 + 5.0 * (2 * ann_macs + ann_outputs)),
        "ann_int8": (ann_macs * 0.23, ann_macs * 0.23 + 5.0 * (2 * ann_macs + ann_outputs)),
    }
    for include_memory in (False, True):
        report = energy.estimate(net, X, profile="cmos45", include_memory=include_memory)
        t = report.totals
        assert t.compute_pj == pytest.approx(compute)
        assert t.with_memory_pj == pytest.approx(compute + memory)
        # The historical fields keep their meaning: they follow include_memory.
        assert t.energy_pj == pytest.approx(compute + memory if include_memory else compute)
        for name, (b_compute, b_memory) in ann.items():
            b = report.baseline(name)
            assert b.compute_pj == pytest.approx(b_compute)
            assert b.with_memory_pj == pytest.approx(b_memory)
            assert b.compute_ratio == pytest.approx(b_compute / compute)
            assert b.with_memory_ratio == pytest.approx(b_memory / (compute + memory))
            assert b.energy_pj == pytest.approx(b_memory if include_memory else b_compute)
            assert b.ratio == pytest.approx(b.energy_pj / t.energy_pj)


def test_verdict_and_markdown_under_both_accountings():
    # Linear(4, 3) on 5 events: 15 ACs, 20 reads (15 weights + 5 events); ANN: 24 MACs, 48 reads.
    compute_only = energy.estimate(nn.Linear(4, 3), X, profile=UNIT, model_weight_bits=8)
    assert compute_only.totals.compute_pj == pytest.approx(15.0)
    assert compute_only.totals.with_memory_pj == pytest.approx(35.0)
    ann = compute_only.baseline("ann_int8")
    assert (ann.compute_pj, ann.with_memory_pj) == (pytest.approx(2.4), pytest.approx(50.4))
    assert compute_only.verdict == (
        "An int8 ANN with the same routing would use less energy than this SNN "
        "(6.25x less, compute only) under profile 'unit'. "
        "With memory traffic: the SNN wins (1.44x less energy)."
    )
    with_memory = energy.estimate(
        nn.Linear(4, 3), X, profile=UNIT, include_memory=True, model_weight_bits=8
    )
    assert with_memory.verdict == (
        "The SNN uses less energy than an int8 ANN with the same routing "
        "(1.44x less, with memory traffic). "
        "Compute only: the int8 ANN wins (6.25x less energy)."
    )
    md = compute_only.to_markdown()
    for needle in (
        "| model | ACs | MACs | compute | baseline / SNN | compute + memory "
        "| baseline / SNN, with memory |",
        "| SNN (this model) | 15 | 0 | 15 pJ | 1.00x | 35 pJ | 1.00x |",
        "| ANN, same routing, int8 | 0 | 24 | 2.4 pJ | 0.16x | 50.4 pJ | 1.44x |",
        "| ANN, same routing, fp32 | 0 | 24 | 110 pJ | 7.36x | 158 pJ | 4.53x |",
        "Compute only: 15 pJ; compute + memory traffic: 35 pJ.",
    ):
        assert needle in md, needle
    # The table does not depend on which total the historical fields follow.
    table = md[md.index("### Baselines") : md.index("### Per layer")]
    other = with_memory.to_markdown()
    assert table == other[other.index("### Baselines") : other.index("### Per layer")]


def test_every_baseline_has_both_totals():
    x = spikes(3, 4, 4, p=0.5, seed=2)
    counts = energy.count_operations(TinyMoE(), x)
    dense = energy.count_operations(TinyMoE(dense=True), x)
    report = energy.build_report(counts, "cmos45", dense_counts=dense)
    alone = energy.build_report(dense, "cmos45")  # the dense twin priced as the model
    d = report.baseline("dense_snn")
    assert d.compute_pj == pytest.approx(alone.totals.compute_pj)
    assert d.with_memory_pj == pytest.approx(alone.totals.with_memory_pj)
    assert d.with_memory_ratio == pytest.approx(
        alone.totals.with_memory_pj / report.totals.with_memory_pj
    )
    assert report.baseline("dense_ann_int8").with_memory_pj == pytest.approx(
        alone.baseline("ann_int8").with_memory_pj
    )
    for b in report.baselines:
        assert b.with_memory_pj > b.compute_pj > 0
        assert b.compute_ratio == pytest.approx(b.compute_pj / report.totals.compute_pj)


# ----------------------------------------------------------------------------- TensorBoard


class RecordingWriter:
    """Stands in for SummaryWriter: keeps scalars, ignores the rest."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_tensorboard_logs_both_totals_and_ratios():
    report = energy.estimate(nn.Linear(4, 3), X, profile=UNIT)
    writer = RecordingWriter()
    write_report(writer, report, step=3, prefix="run/energy")
    s = writer.scalars
    assert s["run/energy/total_pJ"] == pytest.approx(15.0)
    assert s["run/energy/compute_pJ"] == pytest.approx(15.0)
    assert s["run/energy/with_memory_pJ"] == pytest.approx(35.0)
    assert s["run/energy/ratio_compute/ann_int8"] == pytest.approx(2.4 / 15)
    assert s["run/energy/ratio_with_memory/ann_int8"] == pytest.approx(50.4 / 35)
    assert s["run/energy/baseline_with_memory_pJ/ann_int8"] == pytest.approx(50.4)
    layout = energy.tensorboard.custom_scalars_layout(report, "run/energy")["run/energy"]
    assert layout["baseline / SNN energy, with memory traffic"][1] == [
        r"run/energy/ratio_with_memory/.*"
    ]
