"""TensorBoard: write a report, read the event file back, find every piece."""

import pytest
import torch
from energy_cases import TinyMoE, spikes
from torch import nn

import energy
from energy.tensorboard import custom_scalars_layout, write_report

pytest.importorskip("tensorboard")


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_written_report_reads_back(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    x = spikes(3, 4, 4, p=0.5, seed=0)
    report = energy.estimate(TinyMoE(ids=((0, 1), (1, 2, 3), (0, 2))), x, profile="loihi")
    writer = SummaryWriter(str(tmp_path))
    write_report(writer, report, step=7)
    writer.close()
    acc = read_events(tmp_path)

    def scalar(tag):
        (event,) = acc.Scalars(tag)
        assert event.step == 7
        return event.value

    assert scalar("energy/total_pJ") == pytest.approx(report.totals.energy_pj, rel=1e-6)
    assert scalar("energy/ratio/ann_int8") == pytest.approx(
        report.baseline("ann_int8").ratio, rel=1e-6
    )
    assert scalar("energy/ratio/ann_fp32") == pytest.approx(
        report.baseline("ann_fp32").ratio, rel=1e-6
    )
    for e in report.experts:
        assert scalar(f"energy/expert/{e.label}/synaptic_ops") == e.acs + e.macs
        assert scalar(f"energy/expert/{e.label}/tokens") == e.tokens
    assert [e.tokens for e in report.experts] == [2, 3, 2]

    (load,) = acc.Histograms("energy/expert_load")
    assert list(load.histogram_value.bucket) == [2.0, 3.0, 2.0]
    assert acc.Histograms("energy/layer_firing_rate")[0].histogram_value.num == 3

    (text,) = acc.Tensors("energy/report/text_summary")
    assert text.tensor_proto.string_val[0].decode() == report.to_markdown()

    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "energy"
    titles = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert titles["baseline / SNN energy"] == [r"energy/ratio/.*"]
    assert "synaptic ops per expert" in titles


def test_layout_keeps_every_category_written_to_a_writer(tmp_path):
    """TensorBoard shows a run's latest layout only: after a validation report and a test
    report, it must hold both categories (it once held the test one alone); and an unchanged
    layout is not written again."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    report = energy.estimate(
        TinyMoE(ids=((0, 1), (1, 2, 3), (0, 2))), spikes(3, 4, 4, p=0.5, seed=0)
    )
    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        write_report(writer, report, step=step, prefix="val_energy")
    write_report(writer, report, step=3, prefix="test_energy")
    writer.close()
    configs = read_events(tmp_path).Tensors("custom_scalars__config__")
    layouts = []
    for config in configs:
        layout = layout_pb2.Layout()
        layout.ParseFromString(config.tensor_proto.string_val[0])
        layouts.append([category.title for category in layout.category])
    assert layouts[-1] == ["val_energy", "test_energy"]
    assert len(layouts) <= 2  # one per new category, not one per report


def test_layout_without_experts_has_no_expert_charts():
    report = energy.estimate(nn.Linear(4, 3), torch.ones(2, 1, 4))
    charts = custom_scalars_layout(report, prefix="run1/energy")["run1/energy"]
    assert "synaptic ops per expert" not in charts
    assert charts["total energy (pJ)"][1][0] == "run1/energy/total_pJ"


def test_write_report_rejects_other_objects():
    with pytest.raises(TypeError, match="EnergyReport"):
        write_report(object(), {"total": 1}, step=0)
