"""Where metrics go: TensorBoard event files and JSON lines.

A sink has ``log(metrics, step)`` and ``close()``; ``log_text`` and ``log_hparams`` are
optional. The trainer sends to its sinks on rank 0 only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["JSONLinesSink", "MetricSink", "TensorBoardSink", "as_scalar"]


@runtime_checkable
class MetricSink(Protocol):
    """Where metrics go: any object with :meth:`log` and :meth:`close` is a sink.

    A protocol, checked by structure (``isinstance(obj, MetricSink)`` holds for any object with
    both methods; no subclassing needed) and never constructed itself: the parameters below
    are those of its methods. The :class:`~spiking_moe.training.trainer.Trainer` calls them
    on rank 0 only, and calls two optional methods when a sink has them:
    ``log_text(tag, text, step)`` (e.g. a Markdown table) and
    ``log_hparams(hparams, metrics)`` (once, from
    :meth:`~spiking_moe.training.trainer.Trainer.close`, with the run's latest ``val/`` and
    ``test/`` metrics). :class:`TensorBoardSink` and :class:`JSONLinesSink` implement all four.

    Args:
        metrics: of ``log`` and ``log_hparams``: ``{name: value}`` scalars named like
            ``"train/loss"`` (the trainer sends floats; a sink may accept one-element
            tensors too, through :func:`as_scalar`).
        step: of ``log`` and ``log_text``: the optimizer step the values belong to.
        tag: of ``log_text``: the text's name.
        text: of ``log_text``: the text.
        hparams: of ``log_hparams``: flat ``{name: value}`` run settings.
    """

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record the scalars ``metrics`` at ``step``."""

    def close(self) -> None:
        """Flush and release what the sink holds; it is not used afterwards."""


def as_scalar(name: str, value: Any) -> float:
    """``value`` (a number or a one-element tensor) as a float; TypeError naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


class TensorBoardSink:
    """Scalars, text and hparams into a TensorBoard event file.

    Args:
        log_dir: the run folder.
        purge_step: on resume, hide events logged at or after this step by the interrupted run.

    Attributes:
        writer: the ``SummaryWriter``, for anything richer (histograms, custom layouts).
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, as_scalar(name, value), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        def plain(v):
            return v if isinstance(v, (bool, int, float, str)) else str(v)

        experiment, start, end = hparams_summary(
            {k: plain(v) for k, v in hparams.items()},
            {k: as_scalar(k, v) for k, v in metrics.items()},
        )
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JSONLinesSink:
    """One JSON object per line (``{"step": 10, "train/loss": 0.3, ...}``), appended, flushed.

    ``log_text`` writes ``{"step": ..., "tag": ..., "text": ...}`` lines and ``log_hparams``
    one ``{"hparams": {...}, "metrics": {...}}`` line into the same file; each line is flushed
    as it is written, so the file is readable while the run goes on.

    Args:
        path: the file (``metrics.jsonl`` in a run folder); its folder is created. It is
            opened for appending: a resumed run continues the file of the interrupted one.
        purge_step: on resume, drop the records the interrupted run wrote at or after this
            step (what :class:`TensorBoardSink`'s ``purge_step`` hides), and its closing
            hparams record, so that each step appears once. The file is rewritten atomically.

    Attributes:
        path: the file, as a ``Path``.
    """

    def __init__(self, path: str | Path, *, purge_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if purge_step is not None and self.path.exists():
            self._purge(purge_step)
        self._file = open(self.path, "a")

    def _purge(self, purge_step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            if step is not None and step < purge_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text("".join(kept))
        os.replace(staging, self.path)

    def _write(self, record: Mapping[str, Any]) -> None:
        # Metrics are numbers by now (as_scalar); an hparam JSON cannot encode (a Path, a
        # tuple of objects) is written as its str, as TensorBoardSink does.
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"step": step, **{k: as_scalar(k, v) for k, v in metrics.items()}})

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._write({"step": step, "tag": tag, "text": text})

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self._write(
            {"hparams": dict(hparams), "metrics": {k: as_scalar(k, v) for k, v in metrics.items()}}
        )

    def close(self) -> None:
        self._file.close()
