"""The language-model study's tables and scaling plot, from finished runs.

Reads a study folder laid out as the commands below write it (each run folder holds a finished
run's ``result.json``; ``metrics_cmos45_int8.json`` and ``report_cmos45_int8.json`` once
``spiking-moe-energy-report --quantize --profile cmos45_int8`` has re-counted it at int8):

    <study>/<family>/E<E>/seed<s>              # the scaling table: families "spiking", "ann"
    <study>/designs/<design>/E<E>/seed<s>      # the design table (E = 1 and 16)

and prints, as Markdown, one scaling table (per family and E: validation and test bits per
byte, energy per token at fp32 and int8, compute only and with memory traffic, mean ± std over
the seeds) and one design table; ``--plot`` writes validation bits per byte and energy per
token against E for both families. ``E1`` is the dense twin (``lm_dense_snn.toml``, the dense
``lm_ann.toml``); the commands are in docs/results.md (the language-model scaling study).

    python experiments/lm_scaling.py runs/lm_study --plot experiments/results/lm_scaling.png \\
        > experiments/results/lm_scaling.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

FAMILIES = {"spiking": "spiking (multi-level, membrane residual)", "ann": "ANN twin"}
FP32, INT8 = "cmos45", "cmos45_int8"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], fmt: str) -> str:
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return ""
    mean, std = _mean_std(values)
    return f"{fmt.format(mean)} ± {fmt.format(std)}" if len(values) > 1 else fmt.format(mean)


def _per_token(report_path: Path, uj_per_token: float | None) -> tuple[float, float] | None:
    """``(compute, with memory)`` uJ per token from a report and its compute-only uJ/token."""
    if not report_path.exists() or not uj_per_token:
        return None
    totals = json.loads(report_path.read_text())["totals"]
    scale = uj_per_token / totals["compute_pj"]  # 1 / (tokens * 1e6)
    return totals["compute_pj"] * scale, totals["with_memory_pj"] * scale


def run_metrics(folder: Path) -> dict[str, float | None]:
    """One finished run's numbers for the tables."""
    result = json.loads((folder / "result.json").read_text())
    m = result["metrics"]
    row: dict[str, float | None] = {
        "val_bpb": m.get("val/bpb"),
        "bpb": m.get("test/bpb"),
        "firing_rate": None,
        "wall_min": result.get("wall_time_s", 0) / 60,
    }
    if (folder / "report.json").exists():
        totals = json.loads((folder / "report.json").read_text())["totals"]
        row["firing_rate"] = totals["firing_rate"] if totals["neuron_updates"] else None
    fp32 = _per_token(folder / "report.json", m.get("test/energy/uJ_per_token"))
    row["uj_fp32"], row["uj_fp32_mem"] = fp32 or (None, None)
    row["bpb_int8"] = row["uj_int8"] = row["uj_int8_mem"] = None
    int8_metrics = folder / f"metrics_{INT8}.json"
    if int8_metrics.exists():
        q = json.loads(int8_metrics.read_text())
        quantized = q["quantized_metrics"] or q["metrics"]
        row["bpb_int8"] = quantized.get("test/bpb")
        int8 = _per_token(folder / f"report_{INT8}.json", quantized.get("test/energy/uJ_per_token"))
        row["uj_int8"], row["uj_int8_mem"] = int8 or (None, None)
    return row


def collect(folder: Path) -> dict[str, list]:
    """Every seed's numbers under ``folder`` (``seed*`` sub-folders, or the folder itself)."""
    seeds = sorted(p for p in folder.glob("seed*") if (p / "result.json").exists())
    if not seeds and (folder / "result.json").exists():
        seeds = [folder]
    if not seeds:
        sys.exit(f"no finished run (result.json) under {folder}")
    rows = [run_metrics(s) for s in seeds]
    return {key: [r[key] for r in rows] for key in rows[0]} | {"seeds": [s.name for s in seeds]}


def _experts(folder: Path) -> int:
    return int(folder.name[1:])


COLUMNS = (
    ("val_bpb", "val bits/byte", "{:.3f}"),
    ("bpb", "test bits/byte", "{:.3f}"),
    ("uj_fp32", "uJ/token fp32", "{:.4f}"),
    ("uj_fp32_mem", "fp32 + memory", "{:.4f}"),
    ("bpb_int8", "test bits/byte int8", "{:.3f}"),
    ("uj_int8", "uJ/token int8", "{:.4f}"),
    ("uj_int8_mem", "int8 + memory", "{:.4f}"),
    ("firing_rate", "firing rate", "{:.1%}"),
    ("wall_min", "minutes / run", "{:.1f}"),
)


def scaling_table(study: Path) -> tuple[str, dict[str, list[tuple[int, dict]]]]:
    lines = [
        "| model | E | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    series: dict[str, list[tuple[int, dict]]] = {}
    for family, label in FAMILIES.items():
        for folder in sorted((study / family).glob("E*"), key=_experts):
            numbers = collect(folder)
            series.setdefault(family, []).append((_experts(folder), numbers))
            cells = [_cell(numbers[key], fmt) for key, _, fmt in COLUMNS]
            lines.append(f"| {label} | {_experts(folder)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), series


REFERENCE_ROWS = (
    ("spiking", "f: membrane, multi-level, ANN attention (lm_dense_snn)"),
    ("ann", "ANN twin (lm_ann)"),
)


def design_table(study: Path) -> str:
    """Every design's runs, then the study's dense hybrid and dense ANN for reference."""
    lines = [
        "| design | E | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    folders = [
        (design.name, folder)
        for design in sorted((study / "designs").glob("*"))
        for folder in sorted(design.glob("E*"), key=_experts)
    ]
    folders += [(label, study / family / "E1") for family, label in REFERENCE_ROWS]
    for name, folder in folders:
        if not any(folder.glob("**/result.json")):  # not run, or still running
            continue
        numbers = collect(folder)
        cells = [_cell(numbers[key], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {_experts(folder)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(series: dict[str, list[tuple[int, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_energy) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (family, points) in enumerate(series.items()):
        experts = [e for e, _ in points]
        for ax, key in ((ax_bpb, "val_bpb"), (ax_energy, "uj_fp32")):
            stats = [_mean_std(n[key]) for _, n in points]
            ax.errorbar(
                experts,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=FAMILIES[family],
            )
    for ax in (ax_bpb, ax_energy):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 8, 16], ["1 (dense)", "4", "8", "16"])
        ax.set_xlabel("experts E (equal active parameters)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_bpb.set_ylabel("validation bits per byte")
    ax_bpb.set_title("bits per byte vs experts (mean ± std, seeds)")
    ax_energy.set_yscale("log")
    ax_energy.set_ylabel("energy per token (uJ, cmos45 fp32, compute)")
    ax_energy.set_title("energy per token vs experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study folder")
    parser.add_argument("--plot", type=Path, help="PNG to write")
    args = parser.parse_args()
    table, series = scaling_table(args.study)
    print("### Scaling (validation and test bits per byte, energy per token)\n")
    print(table)
    if (args.study / "designs").exists():
        print("\n### Designs\n")
        print(design_table(args.study))
    if args.plot:
        plot(series, args.plot)


if __name__ == "__main__":
    main()
