"""Write an :class:`~energy.report.EnergyReport` to TensorBoard.

Needs only the writer it is given (``torch.utils.tensorboard.SummaryWriter`` or anything with
the same ``add_*`` methods), so importing this module imports no TensorBoard code.

Tags, all under ``prefix`` (default ``"energy"``):

- scalars: ``total_pJ``, ``synaptic_pJ``, ``neuron_pJ``, ``memory_pJ``, ``firing_rate``,
  ``ratio/<baseline>`` (baseline energy / SNN energy), ``baseline_pJ/<baseline>`` (these follow
  the report's ``include_memory``); both accountings whatever it is: ``compute_pJ``,
  ``with_memory_pJ``, ``ratio_compute/<baseline>``, ``ratio_with_memory/<baseline>``,
  ``baseline_with_memory_pJ/<baseline>``;
  ``expert/<label>/synaptic_ops`` (ACs + MACs), ``expert/<label>/tokens``,
  ``expert/<label>/energy_pJ``;
- histograms: ``expert_load`` (bucket ``i`` holds the tokens routed to expert ``i``),
  ``expert_firing_rate`` and ``layer_firing_rate`` (distributions over experts / neuron layers);
- text: ``report`` (the Markdown tables);
- a custom-scalars layout (category ``prefix``) grouping totals, ratios and per-expert charts,
  so the energy panel organises itself in TensorBoard's "Custom Scalars" tab. TensorBoard
  shows a run's latest layout only, so each writer's layout holds every category written to it
  (``val_energy`` and ``test_energy`` side by side), rewritten only when one is new or changed.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import numpy as np

from .report import EnergyReport

__all__ = ["custom_scalars_layout", "write_report"]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", label)


def _scalars(report: EnergyReport) -> dict[str, float]:
    """Scalar tags (under the prefix) and their values: the list in the module docstring."""
    t = report.totals
    scalars = {
        "total_pJ": t.energy_pj,
        "synaptic_pJ": t.synaptic_energy_pj,
        "neuron_pJ": t.neuron_energy_pj,
        "memory_pJ": t.memory_energy_pj,
        "firing_rate": t.firing_rate,
        "compute_pJ": t.compute_pj,
        "with_memory_pJ": t.with_memory_pj,
    }
    for b in report.baselines:
        scalars[f"ratio/{b.name}"] = b.ratio
        scalars[f"baseline_pJ/{b.name}"] = b.energy_pj
        scalars[f"ratio_compute/{b.name}"] = b.compute_ratio
        scalars[f"ratio_with_memory/{b.name}"] = b.with_memory_ratio
        scalars[f"baseline_with_memory_pJ/{b.name}"] = b.with_memory_pj
    for e in report.experts:
        tag = f"expert/{_safe(e.label)}"
        scalars[f"{tag}/synaptic_ops"] = e.acs + e.macs
        scalars[f"{tag}/tokens"] = e.tokens
        scalars[f"{tag}/energy_pJ"] = e.energy_pj
    return scalars


def custom_scalars_layout(report: EnergyReport, prefix: str = "energy") -> dict:
    """The layout passed to ``SummaryWriter.add_custom_scalars`` (one category, ``prefix``)."""
    esc = re.escape(prefix)
    charts = {
        "total energy (pJ)": ["Multiline", [f"{prefix}/total_pJ", f"{esc}/baseline_pJ/.*"]],
        "energy split (pJ)": [
            "Multiline",
            [f"{prefix}/synaptic_pJ", f"{prefix}/neuron_pJ", f"{prefix}/memory_pJ"],
        ],
        "baseline / SNN energy": ["Multiline", [f"{esc}/ratio/.*"]],
        "total energy with memory traffic (pJ)": [
            "Multiline",
            [f"{prefix}/with_memory_pJ", f"{esc}/baseline_with_memory_pJ/.*"],
        ],
        "baseline / SNN energy, compute only": ["Multiline", [f"{esc}/ratio_compute/.*"]],
        "baseline / SNN energy, with memory traffic": [
            "Multiline",
            [f"{esc}/ratio_with_memory/.*"],
        ],
        "firing rate": ["Multiline", [f"{prefix}/firing_rate"]],
    }
    if report.experts:
        charts["synaptic ops per expert"] = ["Multiline", [f"{esc}/expert/.*/synaptic_ops"]]
        charts["tokens per expert"] = ["Multiline", [f"{esc}/expert/.*/tokens"]]
        charts["energy per expert (pJ)"] = ["Multiline", [f"{esc}/expert/.*/energy_pJ"]]
    return {prefix: charts}


#: The categories each writer's custom-scalars layout holds so far (see the module docstring).
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _write_layout(writer: Any, layout: dict) -> None:
    try:
        written = _LAYOUTS.setdefault(writer, {})
    except TypeError:  # a writer that cannot be weakly referenced: its own layout only
        writer.add_custom_scalars(layout)
        return
    if all(written.get(category) == charts for category, charts in layout.items()):
        return
    written.update(layout)
    writer.add_custom_scalars(dict(written))


def write_report(writer: Any, report: EnergyReport, step: int, prefix: str = "energy") -> None:
    """Log ``report`` at ``step``: scalars, histograms, Markdown text and the layout.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (not flushed here).
        report: the report to log.
        step: global step.
        prefix: tag prefix and custom-scalars category name.
    """
    if not isinstance(report, EnergyReport):
        raise TypeError(f"report must be an EnergyReport, got {type(report).__name__}")
    for tag, value in _scalars(report).items():
        writer.add_scalar(f"{prefix}/{tag}", value, step)
    if report.experts:
        loads = np.array([e.tokens for e in report.experts], dtype=np.float64)
        index = np.arange(len(loads), dtype=np.float64)
        # A raw histogram whose bucket i is expert i: the chart reads as load per expert.
        writer.add_histogram_raw(
            f"{prefix}/expert_load",
            min=0.0,
            max=float(len(loads) - 1),
            num=float(loads.sum()),
            sum=float((index * loads).sum()),
            sum_squares=float((index**2 * loads).sum()),
            bucket_limits=(index + 0.5).tolist(),
            bucket_counts=loads.tolist(),
            global_step=step,
        )
        writer.add_histogram(
            f"{prefix}/expert_firing_rate",
            np.array([e.firing_rate for e in report.experts]),
            step,
        )
    rates = [m.firing_rate for m in report.layers if m.kind == "neuron"]
    if rates:
        writer.add_histogram(f"{prefix}/layer_firing_rate", np.array(rates), step)
    writer.add_text(f"{prefix}/report", report.to_markdown(), step)
    _write_layout(writer, custom_scalars_layout(report, prefix))
