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


def test_json_lines_sink_purges_what_a_resumed_run_logs_again(tmp_path):
    """Like TensorBoard's purge_step: a run resumed from step 3 logs steps 4.. again, so the
    interrupted run's records from step 4 on (a line cut short included) and its closing
    hparams record go; the rest stays as it was."""
    path = tmp_path / "m.jsonl"
    sink = JSONLinesSink(path)
    for step in range(1, 7):
        sink.log({"loss": 1.0 / step}, step=step)
    sink.log_text("notes", "at five", step=5)
    sink.log_hparams({"lr": 0.1}, {"test/accuracy": 0.5})
    sink.close()
    with open(path, "a") as file:
        file.write('{"step": 7, "lo')  # the interruption cut the last line
    resumed = JSONLinesSink(path, purge_step=4)
    resumed.log({"loss": 0.2}, step=4)
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3] == {"step": 4, "loss": 0.2} and records[0] == {"step": 1, "loss": 1.0}
    assert not list(tmp_path.glob("*.tmp"))


def test_json_lines_sink_writes_hparams_json_cannot_encode_as_text(tmp_path):
    from pathlib import Path

    sink = JSONLinesSink(tmp_path / "m.jsonl")
    sink.log_hparams({"data.root": Path("/data/shd"), "lr": 0.1}, {"test/accuracy": 0.5})
    sink.close()
    (record,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert record["hparams"] == {"data.root": "/data/shd", "lr": 0.1}
