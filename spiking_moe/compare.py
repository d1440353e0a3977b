"""Spiking MoE, dense SNN and ANN twin of one config at equal precision: accuracy and energy
per sample for every (model, precision), compute only and with memory traffic.

:func:`run_comparison` trains the three models of one config (:func:`twin_config`) over
seeds, or takes their checkpoints, then evaluates each on the test set at full precision and
after post-training quantization (PTQ) to each width in ``bits``, plus, for each width in
``qat_bits``, a run trained with quantization-aware training (``train.quantize_bits``) and
evaluated as its integer model. Every evaluation counts its own activity (a quantized model
can spike differently), and the counts are priced under every profile in ``profiles``.

Precision of the rows: ``fp32`` is the trained model; ``int8``/``int4`` its PTQ copy with
integer weights per output channel (:mod:`spiking_moe.quantization`); inputs to every Linear
are quantized to 8 bits at either weight width (W8A8, W4A8), calibrated on training batches,
where they are graded: every Linear of the ANN twin and a spiking model's analog input layer
(spikes and spike counts are exact as they are). ``int4 QAT`` rows come from their own
training runs.

An energy cell is marked ``†`` when the row's weights are wider than the profile prices
(an fp32 model priced at 8-bit arithmetic): that energy belongs to a model whose accuracy was
not measured; the row at the profile's precision is the one to read. No bundled profile
prices 4-bit arithmetic; under an 8-bit profile a 4-bit row is priced as 8-bit (its memory
traffic, in 8-bit words, is an upper bound).

Outputs in the comparison folder: ``comparison.md`` (the table and who wins at equal
precision), ``comparison.json`` (every evaluation and the summary), ``comparison.png`` and the
table and scalars in TensorBoard (``tensorboard --logdir <out>``); the training runs are in
``<out>/runs/<kind>[_qat<bits>]/seed<s>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import MODEL_KINDS, ConfigError, ExperimentConfig, apply_overrides
from .data import DATASETS
from .evaluation import (
    build_loaders,
    config_from_checkpoint,
    evaluate_test_set,
    load_run,
    model_weight_bits,
    quantize_trained,
)
from .experiment import check_experiment, finished_result, run_seeds
from .quantization import SUPPORTED_BITS
from .training import CHECKPOINT_NAME, check_energy_profile, load_checkpoint, profile_precision

__all__ = [
    "KINDS",
    "Comparison",
    "Evaluation",
    "comparison_name",
    "evaluate_precisions",
    "run_comparison",
    "twin_config",
]

logger = logging.getLogger(__name__)

#: The compared models, as ``model.kind`` values, in table order: every kind there is.
KINDS = MODEL_KINDS
_KIND_NAMES = {"moe": "spiking MoE", "dense_snn": "dense SNN", "ann": "ANN twin"}


def twin_config(config: ExperimentConfig, kind: str) -> ExperimentConfig:
    """``config`` with ``model.kind = kind`` and everything else kept: the dense SNN has the
    MoE's active parameters; the ANN twin has the same layers and routing with ReLU, reads the
    data itself (``data.encoding = "current"`` where the dataset has it; it averages its input
    over ``T``, so rate-coded spikes would only add noise) and has no spike-rate penalty."""
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; valid: {list(KINDS)}")
    overrides = [f"model.kind={kind}"]
    if kind == "ann":
        if "current" in DATASETS[config.data.name].encodings:
            overrides.append("data.encoding=current")
        overrides.append("train.spike_rate_penalty=0.0")
    twin = apply_overrides(config, overrides)
    return dataclasses.replace(twin, name=f"{config.name}_{kind}")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One (model, precision, seed) on the test set.

    Attributes:
        kind: ``model.kind``.
        precision: ``"fp32"``, ``"int8"``, ``"int4"`` (PTQ) or ``"int4 QAT"``.
        weight_bits: the weights' width (32, 8, 4).
        seed: ``train.seed`` of the run.
        run: the checkpoint evaluated.
        accuracy: test accuracy.
        firing_rate: the counted spikes per neuron update (0 for the ANN).
        unit: what energy is per: "sample" (or "token" for a language model).
        energy_uj: ``{profile: {"compute": uJ per unit, "with_memory": uJ per unit}}``.
        bpb: test bits per byte of a language model (None for a classifier).
    """

    kind: str
    precision: str
    weight_bits: int
    seed: int
    run: str
    accuracy: float
    firing_rate: float
    unit: str
    energy_uj: dict[str, dict[str, float]]
    bpb: float | None = None


def _precision_label(bits: int, qat: bool) -> str:
    return "fp32" if bits == 32 else f"int{bits}" + (" QAT" if qat else "")


def evaluate_precisions(
    checkpoint: str | Path,
    *,
    bits: Sequence[int] = (8, 4),
    profiles: Sequence[str] = ("cmos45", "cmos45_int8"),
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> list[Evaluation]:
    """Evaluate a run's checkpoint as trained and after PTQ to each width in ``bits``.

    A QAT checkpoint (``train.quantize_bits``) is evaluated once, as its integer model; a
    full-precision one at fp32 and at every width in ``bits``. Each evaluation counts its own
    activity and prices it under every profile.
    """
    run = load_run(checkpoint, overrides=overrides, device=device)
    config, trained = run.config, run.model
    train_loader, _, test_loader = build_loaders(config, run.data)
    trained_bits = model_weight_bits(config)
    qat = trained_bits < 32
    widths = [trained_bits] if qat else [32, *bits]
    evaluations = []
    for width in widths:
        model = trained if width == 32 else quantize_trained(trained, width, train_loader)
        metrics, counted = evaluate_test_set(
            model, config, test_loader, step=run.step, profile=profiles[0]
        )
        if counted.report is None:
            raise ValueError(f"{checkpoint}: the test set counted no samples")
        energy_uj = {}
        for profile in profiles:
            report = counted.report_under(profile)
            energy_uj[profile] = {
                "compute": report.totals.compute_pj / counted.samples / 1e6,
                "with_memory": report.totals.with_memory_pj / counted.samples / 1e6,
            }
        evaluations.append(
            Evaluation(
                kind=config.model.kind,
                precision=_precision_label(width, qat),
                weight_bits=width,
                seed=config.train.seed,
                run=str(run.checkpoint),
                accuracy=metrics["test/accuracy"],
                firing_rate=counted.report.totals.firing_rate,
                unit=counted.unit,
                energy_uj=energy_uj,
                bpb=metrics.get("test/bpb"),
            )
        )
        logger.info(
            "%s %s seed %d: accuracy %.4f, %.4g uJ per %s under %s (compute only)",
            config.model.kind,
            evaluations[-1].precision,
            config.train.seed,
            metrics["test/accuracy"],
            energy_uj[profiles[0]]["compute"],
            counted.unit,
            profiles[0],
        )
    return evaluations


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every evaluation of a comparison, and its summary per (model, precision).

    Attributes:
        name: the config's name.
        profiles: the profiles priced, in column order.
        evaluations: every :class:`Evaluation`.
    """

    name: str
    profiles: tuple[str, ...]
    evaluations: tuple[Evaluation, ...]

    def groups(self) -> list[tuple[str, str, list[Evaluation]]]:
        """``(kind, precision, evaluations)`` in table order: kinds as :data:`KINDS`,
        precisions widest first, QAT after PTQ."""
        keys = sorted(
            {(e.kind, e.precision, e.weight_bits) for e in self.evaluations},
            key=lambda k: (
                KINDS.index(k[0]) if k[0] in KINDS else len(KINDS),
                -k[2],
                k[1].endswith("QAT"),
            ),
        )
        return [
            (
                kind,
                precision,
                [e for e in self.evaluations if (e.kind, e.precision) == (kind, precision)],
            )
            for kind, precision, _ in keys
        ]

    def summary(self) -> list[dict[str, Any]]:
        """One row per (model, precision): mean and std over seeds of accuracy, accuracy drop
        from fp32 (paired by seed: the same run quantized, or the fp32 run of the QAT run's
        seed), firing rate and energy per unit under each profile."""
        fp32 = {(e.kind, e.seed): e.accuracy for e in self.evaluations if e.weight_bits == 32}
        rows = []
        for kind, precision, evals in self.groups():
            accuracy, accuracy_std = _mean_std([e.accuracy for e in evals])
            drops = [fp32[e.kind, e.seed] - e.accuracy for e in evals if (e.kind, e.seed) in fp32]
            row: dict[str, Any] = {
                "kind": kind,
                "model": _KIND_NAMES.get(kind, kind),
                "precision": precision,
                "weight_bits": evals[0].weight_bits,
                "seeds": sorted(e.seed for e in evals),
                "unit": evals[0].unit,
                "accuracy": accuracy,
                "accuracy_std": accuracy_std,
                "firing_rate": statistics.fmean(e.firing_rate for e in evals),
            }
            if all(e.bpb is not None for e in evals):
                row["bpb"], row["bpb_std"] = _mean_std([e.bpb for e in evals])
            if precision != "fp32" and len(drops) == len(evals):
                row["drop"], row["drop_std"] = _mean_std(drops)
            for profile in self.profiles:
                for accounting in ("compute", "with_memory"):
                    values = [e.energy_uj[profile][accounting] for e in evals]
                    mean, std = _mean_std(values)
                    row[f"{profile}/{accounting}"] = mean
                    row[f"{profile}/{accounting}_std"] = std
            rows.append(row)
        return rows

    def verdicts(self) -> list[str]:
        """Who wins at equal precision under each profile, compute only and with memory."""
        rows = self.summary()
        sentences = []
        for profile in self.profiles:
            bits = profile_precision(profile)[0]
            at = [
                r for r in rows if r["weight_bits"] == bits and not r["precision"].endswith("QAT")
            ]
            if len({r["kind"] for r in at}) < 2:
                continue
            unit = at[0]["unit"]
            for accounting, words in (
                ("compute", "compute only"),
                ("with_memory", "with memory traffic"),
            ):
                ranked = sorted(at, key=lambda r: r[f"{profile}/{accounting}"])
                best, runner = ranked[0], ranked[1]
                listed = ", ".join(
                    f"{r['model']} {r[f'{profile}/{accounting}']:.4g} uJ "
                    f"({100 * r['accuracy']:.2f}% accuracy)"
                    for r in ranked
                )
                ratio = runner[f"{profile}/{accounting}"] / best[f"{profile}/{accounting}"]
                sentences.append(
                    f"Under `{profile}` at {bits}-bit weights, {words}: {listed} per {unit}; "
                    f"the {best['model']} uses least ({ratio:.2f}x less than the {runner['model']})."
                )
        return sentences

    def targets(self) -> list[str]:
        """The quantization cost of the spiking MoE: PTQ int8 (target <= 0.5 points) and QAT
        int4 (target <= 1.5 points), measured against fp32 runs of the same seeds."""
        lines = []
        for row in self.summary():
            if row["kind"] != "moe" or "drop" not in row:
                continue
            target = {"int8": 0.5, "int4 QAT": 1.5}.get(row["precision"])
            drop, std = 100 * row["drop"], 100 * row["drop_std"]
            line = f"Spiking MoE {row['precision']}: {drop:+.2f} ± {std:.2f} accuracy points lost"
            if target is not None:
                line += f" (target <= {target}: {'met' if drop <= target else 'NOT met'})"
            lines.append(line + ".")
        return lines

    def to_markdown(self) -> str:
        rows = self.summary()
        unit = rows[0]["unit"] if rows else "sample"
        lm = any("bpb" in row for row in rows)
        headers = ["model", "precision", "accuracy (%)", "lost (points)"]
        headers += ["bits per byte"] if lm else []
        headers.append("firing rate")
        for profile in self.profiles:
            headers += [f"{profile} compute (uJ/{unit})", f"{profile} + memory (uJ/{unit})"]
        headers.append("seeds")
        lines = [
            f"## Precision comparison: {self.name}",
            "",
            "Accuracy mean ± std over seeds; `lost` is the fp32 accuracy of the same seed minus "
            "this one. Energy per "
            f"{unit} under each profile, compute only and with memory traffic. "
            "† the weights are wider than the profile prices (accuracy at that precision: "
            "the profile's own row).",
            "",
            "| " + " | ".join(headers) + " |",
            "| " + " | ".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + " |",
        ]
        for row in rows:
            cells = [
                row["model"],
                row["precision"],
                f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f}",
                f"{100 * row['drop']:+.2f} ± {100 * row['drop_std']:.2f}" if "drop" in row else "",
            ]
            if lm:
                cells.append(f"{row['bpb']:.4f} ± {row['bpb_std']:.4f}" if "bpb" in row else "")
            cells.append(f"{row['firing_rate']:.2%}" if row["kind"] != "ann" else "")
            for profile in self.profiles:
                mark = "†" if row["weight_bits"] > profile_precision(profile)[0] else ""
                cells += [
                    f"{row[f'{profile}/compute']:.4g}{mark}",
                    f"{row[f'{profile}/with_memory']:.4g}{mark}",
                ]
            cells.append(",".join(str(s) for s in row["seeds"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *self.verdicts(), "", *self.targets()]
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "profiles": list(self.profiles),
                "summary": self.summary(),
                "evaluations": [dataclasses.asdict(e) for e in self.evaluations],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Comparison:
        data = json.loads(text)
        return cls(
            data["name"],
            tuple(data["profiles"]),
            tuple(Evaluation(**e) for e in data["evaluations"]),
        )

    def write(self, out: str | Path) -> None:
        """``comparison.md``/``.json``/``.png`` and the table and scalars in TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(self.to_markdown())
        (out / "comparison.json").write_text(self.to_json())
        self.plot(out / "comparison.png")
        writer = SummaryWriter(log_dir=str(out))
        try:
            writer.add_text("comparison/table", self.to_markdown(), 0)
            for row in self.summary():
                tag = f"comparison/{row['kind']}/{row['precision'].replace(' ', '_')}"
                writer.add_scalar(f"{tag}/accuracy", row["accuracy"], 0)
                for profile in self.profiles:
                    for accounting in ("compute", "with_memory"):
                        value = row[f"{profile}/{accounting}"]
                        writer.add_scalar(f"{tag}/{profile}/uJ_{accounting}", value, 0)
        finally:
            writer.close()

    def plot(self, path: str | Path) -> Path:
        """Accuracy against energy per unit, one panel per profile; filled markers with
        memory traffic, hollow compute only; error bars the std over seeds."""
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        from .plotting import _pyplot, _save_figure

        plt = _pyplot()
        rows = self.summary()
        fig, axes = plt.subplots(
            1, len(self.profiles), figsize=(5.5 * len(self.profiles), 4.2), squeeze=False
        )
        markers = {"fp32": "o", "int8": "s", "int4": "^", "int4 QAT": "v", "int8 QAT": "D"}
        for ax, profile in zip(axes[0], self.profiles, strict=True):
            for row in rows:
                color = f"C{KINDS.index(row['kind']) if row['kind'] in KINDS else 3}"
                marker = markers.get(row["precision"], "x")
                for accounting, face in (("with_memory", color), ("compute", "none")):
                    ax.errorbar(
                        row[f"{profile}/{accounting}"],
                        100 * row["accuracy"],
                        yerr=100 * row["accuracy_std"],
                        fmt=marker,
                        color=color,
                        markerfacecolor=face,
                        label=f"{row['model']} {row['precision']}"
                        if accounting == "with_memory"
                        else None,
                    )
            ax.set_xscale("log")
            # Ticks at 1, 2, 5 per decade, plainly labelled (default labels overlap or vanish
            # when the values span less than two decades).
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"energy per {rows[0]['unit'] if rows else 'sample'} (uJ, {profile})")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{profile}: filled = with memory, hollow = compute only", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.suptitle(f"{self.name}: accuracy vs energy at each precision")
        return _save_figure(fig, path, rect=(0, 0, 0.82, 1))


def comparison_name(config: ExperimentConfig | None, checkpoints: Sequence[str | Path] = ()) -> str:
    """The config's name, or, for checkpoints, the first one's stored config name without the
    ``_<kind>`` suffix :func:`twin_config` adds (``default_moe`` -> ``default``)."""
    if config is not None:
        return config.name
    path = Path(checkpoints[0])
    name = config_from_checkpoint(load_checkpoint(path), path).name
    for kind in KINDS:
        name = name.removesuffix(f"_{kind}")
    return name


def _check_widths(name: str, values: Sequence[int]) -> None:
    bad = [b for b in values if b not in SUPPORTED_BITS]
    if bad:
        raise ConfigError(f"{name} must be among {list(SUPPORTED_BITS)}, got {bad}")


def run_comparison(
    config: ExperimentConfig | None,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    kinds: Sequence[str] = KINDS,
    bits: Sequence[int] = (8, 4),
    qat_bits: Sequence[int] = (4,),
    profiles: Sequence[str] = ("cmos45", "cmos45_int8"),
    checkpoints: Sequence[str | Path] = (),
    device: str | None = None,
    overrides: Sequence[str] = (),
    reuse_finished: bool = False,
) -> tuple[Comparison | None, int | None]:
    """Train (or take) the models, evaluate every precision, write the comparison to ``out``.

    Args:
        config: the experiment (its ``model.kind`` is replaced per :func:`twin_config`);
            None when ``checkpoints`` are given.
        out: the comparison folder (runs in ``out/runs``).
        seeds: ``train.seed`` values of the trained runs.
        kinds: which of :data:`KINDS` to train.
        bits: PTQ widths.
        qat_bits: widths to train with QAT (one more run per kind and seed each).
        profiles: energy profiles to price under (the first counts; all price the counts).
        checkpoints: evaluate these runs instead of training (their stored configs say the
            kind, seed and QAT width); ``config``, ``seeds``, ``kinds`` and ``qat_bits`` are
            then unused.
        device: ``train.device`` for training and evaluation.
        overrides: ``section.key=value`` for every trained run (and every evaluation).
        reuse_finished: read back runs already finished in ``out/runs`` instead of training.

    Returns:
        ``(comparison, signal)``: the comparison (None when interrupted) and the signal that
        interrupted training (None when every run finished).

    Raises:
        ConfigError: bad widths, profiles, kinds or seeds, before any work.
    """
    _check_widths("bits", bits)
    _check_widths("qat_bits", qat_bits)
    if not profiles:
        raise ConfigError("profiles must name at least one energy profile")
    for profile in profiles:
        check_energy_profile(profile)
    out = Path(out)
    overrides = [*overrides, *([f"train.device={device}"] if device else [])]
    if checkpoints:
        missing = [str(c) for c in checkpoints if not Path(c).is_file()]
        if missing:
            raise FileNotFoundError(f"no checkpoint at {missing}")
        runs = [Path(c) for c in checkpoints]
        name = comparison_name(config, checkpoints)
    else:
        if config is None:
            raise ConfigError("give a config to train, or checkpoints to evaluate")
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must name at least one seed, each once; got {list(seeds)}")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"unknown model kinds {bad}; valid: {list(KINDS)}")
        if not kinds or len(set(kinds)) != len(kinds):
            raise ConfigError(f"kinds must name at least one model, each once; got {list(kinds)}")
        if len(set(qat_bits)) != len(qat_bits):
            raise ConfigError(f"qat_bits must name each width once; got {list(qat_bits)}")
        plan = [(twin_config(config, kind), kind, 0) for kind in kinds]
        plan += [
            (apply_overrides(twin_config(config, kind), [f"train.quantize_bits={b}"]), kind, b)
            for b in qat_bits
            for kind in kinds
        ]
        folders = [out / "runs" / (f"{kind}_qat{qat}" if qat else kind) for _, kind, qat in plan]
        for (run_config, _, _), folder in zip(plan, folders, strict=True):
            for seed in seeds:  # every folder and config checked before the first run trains
                run = folder / f"seed{seed}"
                if not (reuse_finished and finished_result(run) is not None):
                    check_experiment(apply_overrides(run_config, overrides), run)
        runs = []
        for (run_config, _, _), folder in zip(plan, folders, strict=True):
            results, _ = run_seeds(
                run_config, folder, seeds, overrides=overrides, reuse_finished=reuse_finished
            )
            if results[-1].interrupted:
                return None, results[-1].signal or 0
            runs += [r.out / CHECKPOINT_NAME for r in results]
        name = config.name
    evaluations: list[Evaluation] = []
    for checkpoint in runs:
        evaluations += evaluate_precisions(
            checkpoint, bits=bits, profiles=profiles, overrides=overrides
        )
    comparison = Comparison(name, tuple(profiles), tuple(evaluations))
    comparison.write(out)
    logger.info("comparison written to %s (tensorboard --logdir %s)", out, out)
    return comparison, None
