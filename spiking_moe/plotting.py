"""Figures for a run folder and a sweep: accuracy against energy, and per-expert load.

matplotlib is imported lazily with the non-interactive Agg backend, so nothing here needs a
display. Energy reports are read through their public fields only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_run", "plot_sweep"]

_BASELINE_LABELS = {
    "dense_snn": "dense MoE SNN",
    "ann_fp32": "ANN fp32 (same routing)",
    "ann_int8": "ANN int8 (same routing)",
    "dense_ann_fp32": "dense ANN fp32",
    "dense_ann_int8": "dense ANN int8",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path, **layout) -> Path:
    """Lay ``fig`` out (``layout``: :meth:`~matplotlib.figure.Figure.tight_layout`'s
    arguments), write it to ``path`` as a PNG and close it."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_run(report, accuracy: float, batch_size: int, path: str | Path, title: str = "") -> Path:
    """Two panels: test accuracy against energy per sample (this model, with the baselines'
    energies as vertical lines), and tokens per expert for every MoE layer.

    Args:
        report: an :class:`energy.EnergyReport` counted on ``batch_size`` samples.
        accuracy: test accuracy in [0, 1].
        path: PNG file to write.
    """
    plt = _pyplot()
    fig, (ax_energy, ax_load) = plt.subplots(1, 2, figsize=(11, 4.2))
    per_sample_uj = report.totals.energy_pj / batch_size / 1e6
    ax_energy.scatter([per_sample_uj], [100 * accuracy], color="C0", zorder=3, label="this model")
    for i, baseline in enumerate(report.baselines):
        ax_energy.axvline(
            baseline.energy_pj / batch_size / 1e6,
            color=f"C{i + 1}",
            linestyle="--",
            label=f"{_BASELINE_LABELS.get(baseline.name, baseline.name)} ({baseline.ratio:.2g}x)",
        )
    ax_energy.set_xscale("log")
    ax_energy.set_ylim(max(0.0, 100 * accuracy - 10), 100.5)
    ax_energy.set_xlabel(f"energy per sample (uJ, profile {report.profile.name})")
    ax_energy.set_ylabel("test accuracy (%)")
    ax_energy.legend(fontsize=7, loc="lower left")
    ax_energy.set_title("accuracy vs energy")
    if report.experts:
        labels = [e.label for e in report.experts]
        ax_load.bar(range(len(labels)), [e.tokens for e in report.experts], color="C0")
        ax_load.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax_load.set_ylabel(f"tokens routed (of {batch_size} per layer)")
        ax_load.set_title("expert load")
    else:
        ax_load.text(0.5, 0.5, "no experts (dense model)", ha="center", va="center")
        ax_load.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def plot_sweep(rows: Sequence[dict], path: str | Path, profile: str) -> Path:
    """Accuracy against energy per sample, one labelled point per configuration.

    Args:
        rows: dicts with ``label``, ``accuracy`` (0-1) and ``uJ_per_sample``, and optionally
            their standard deviations over seeds (``accuracy_std``, ``uJ_per_sample_std``),
            drawn as error bars.

    Language-model rows (with ``val_bpb`` and ``uJ_per_token``) are drawn as the scaling
    study instead: validation bits per byte and energy per token against the number of
    experts (:func:`_plot_lm_sweep`).
    """
    if rows and "uJ_per_token" in rows[0]:
        return _plot_lm_sweep(rows, path, profile)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, row in enumerate(rows):
        ax.errorbar(
            row["uJ_per_sample"],
            100 * row["accuracy"],
            xerr=row.get("uJ_per_sample_std", 0.0),
            yerr=100 * row.get("accuracy_std", 0.0),
            color=f"C{i % 10}",
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            row["label"],
            (row["uJ_per_sample"], 100 * row["accuracy"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"energy per sample (uJ, profile {profile})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs energy")
    return _save_figure(fig, path)


def _plot_lm_sweep(rows: Sequence[dict], path: str | Path, profile: str) -> Path:
    """Validation bits per byte and energy per token against ``num_experts`` (mean ± std)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: (r["k"], r["num_experts"]))
    fig, (ax_bpb, ax_energy) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({r["k"] for r in rows}):
        sel = [r for r in rows if r["k"] == k]
        experts = [r["num_experts"] for r in sel]
        for ax, key in ((ax_bpb, "val_bpb"), (ax_energy, "uJ_per_token")):
            if all(key in r for r in sel):
                ax.errorbar(
                    experts,
                    [r[key] for r in sel],
                    yerr=[r.get(f"{key}_std", 0.0) for r in sel],
                    fmt="o-",
                    capsize=3,
                    label=f"k={k}",
                )
    for ax in (ax_bpb, ax_energy):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E (equal active parameters)")
        ax.legend()
    ax_bpb.set_ylabel("validation bits per byte")
    ax_bpb.set_title("bits per byte vs experts")
    ax_energy.set_ylabel(f"energy per token (uJ, profile {profile})")
    ax_energy.set_title("energy per token vs experts")
    return _save_figure(fig, path)
