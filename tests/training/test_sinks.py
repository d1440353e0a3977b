"""Metric sinks: JSON lines and TensorBoard, scalars only."""

import json

import pytest
import torch

from spiking_moe.training import JSONLinesSink, MetricSink, TensorBoardSink


def test_json_lines_sink_writes_one_object_per_log(tmp_path):
    sink = JSONLinesSink(tmp_path / "m.jsonl")
    sink.log({"a": torch.tensor(1.5), "b": 2}, step=3)
    sink.log_text("notes", "hello", step=4)
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "a": 1.5, "b": 2.0}, {"step": 4, "tag": "notes", "text": "hello"}]


def test_sinks_refuse_what_is_not_a_scalar(tmp_path):
    tb = TensorBoardSink(tmp_path / "tb")
    assert isinstance(tb, MetricSink)
    with pytest.raises(TypeError, match="metric 'v' must be a scalar"):
        tb.log({"v": torch.ones(3)}, step=0)
    tb.close()
    sink = JSONLinesSink(tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match="metric 'flag' must be a number"):
        sink.log({"flag": True}, step=0)
    sink.close()
