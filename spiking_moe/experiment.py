"""One experiment from its config: build the run, train, test, write the run folder.

:func:`run_experiment` reads top to bottom: config -> data -> model -> train (with router
balancing, monitors and energy callbacks) -> test -> ``report.json``/``.md``/``.png``.
:func:`run_seeds` repeats it over seeds and summarises mean and standard deviation, which is
how results are reported (float results differ across CPUs, so one seed is not a result).

Reading a trained run back (evaluating a checkpoint, re-counting its energy, gathering an
expert-parallel one, generating text) is :mod:`spiking_moe.evaluation`; its names are
importable from here too. The command-line entry points in :mod:`spiking_moe.cli` parse
arguments and map errors to exit codes; everything they run is here, in
:mod:`spiking_moe.evaluation` and in :mod:`spiking_moe.sweep`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed

from .config import ConfigError, ExperimentConfig, apply_overrides, config_to_dict, flatten_config
from .data import build_datasets

# Reading a run back lives in evaluation; these names were importable from here and still are.
from .evaluation import (
    CALIBRATION_BATCHES,
    CheckpointEvaluation,
    build_loaders,
    build_model_for,
    config_from_checkpoint,
    evaluate_checkpoint,
    gather_checkpoint,
    generate_text,
    load_language_model,
    load_run,
    load_trained_model,
    model_weight_bits,
    quantize_trained,
    write_profile_report,
)
from .plotting import plot_run
from .training import (
    CHECKPOINT_NAME,
    EnergyReportCallback,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
    Trainer,
    check_energy_profile,
    init_distributed,
    resolve_device,
    seed_everything,
)

__all__ = [
    "CALIBRATION_BATCHES",
    "SUMMARY_METRICS",
    "CheckpointEvaluation",
    "ExperimentResult",
    "build_loaders",
    "build_model_for",
    "check_experiment",
    "config_from_checkpoint",
    "evaluate_checkpoint",
    "finished_result",
    "gather_checkpoint",
    "generate_text",
    "load_language_model",
    "load_trained_model",
    "model_weight_bits",
    "quantize_trained",
    "run_experiment",
    "run_seeds",
    "summarize",
    "summary_table",
    "write_profile_report",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` returns.

    Attributes:
        out: the run folder.
        metrics: the last validation's metrics (``val/...``) and the test evaluation's
            (``test/accuracy``, ``test/loss``, ``test/bpb`` for a language model, with the
            energy report on: ``test/energy/uJ_per_sample``, ``test/energy/ratio_<baseline>``;
            MoE models: ``test/moe<l>/max_load_ratio``, ...). Empty when interrupted.
        wall_time_s: training time (``Trainer.fit``).
        report: the test set's :class:`energy.EnergyReport` (None with ``energy.enabled =
            false`` and on ranks other than 0).
        samples: test samples the report counted.
        interrupted: stopped by a signal before the end (a checkpoint was saved).
        signal: the signal number when ``interrupted``.
        config: the config the run used (overrides applied).
    """

    out: Path
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    report: Any = None
    samples: int = 0
    interrupted: bool = False
    signal: int | None = None
    config: ExperimentConfig | None = None


#: Written last by a finished run: its metrics and wall time (what sweeps and seeds read back).
RESULT_NAME = "result.json"


def finished_result(out: str | Path) -> ExperimentResult | None:
    """The :class:`ExperimentResult` of a finished run in ``out`` (its ``result.json``), or
    None when ``out`` holds no finished run. The energy report is not loaded
    (``report.json`` beside it holds it)."""
    path = Path(out) / RESULT_NAME
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return ExperimentResult(Path(out), dict(record["metrics"]), float(record["wall_time_s"]))


def check_experiment(config: ExperimentConfig, out: Path, *, resume: bool = False) -> None:
    """Fail before any work: unusable device, unknown energy profile, a missing teacher
    checkpoint, or ``out`` already holding a run that is not being resumed (FileExistsError)."""
    resolve_device(config.train.device)
    if config.energy.enabled:
        check_energy_profile(config.energy.profile)
    teacher = config.train.distill_from
    if teacher and not Path(teacher).is_file():
        raise ConfigError(f"train.distill_from: no checkpoint at {teacher!r}")
    if (Path(out) / CHECKPOINT_NAME).exists() and not resume:
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or pick another --out"
        )
    _check_expert_parallel(config)


def _check_expert_parallel(config: ExperimentConfig) -> None:
    """``train.expert_parallel`` needs MoE layers whose expert count it divides, and a job
    whose world size (``torchrun``'s ``WORLD_SIZE``) it divides."""
    size, model = config.train.expert_parallel, config.model
    if size == 1:
        return
    num_experts = model.moe.num_experts
    if model.kind == "dense_snn" or (model.kind == "ann" and num_experts == 1):
        raise ConfigError(
            f"train.expert_parallel = {size} splits MoE experts over processes, but "
            f"model.kind = {model.kind!r} with model.moe.num_experts = {num_experts} has no "
            "MoE layer"
        )
    if num_experts % size:
        raise ConfigError(
            f"train.expert_parallel = {size} does not divide model.moe.num_experts = "
            f"{num_experts}: each process holds num_experts / expert_parallel experts"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % size:
        raise ConfigError(
            f"train.expert_parallel = {size} does not divide the world size {world}: launch "
            f"with torchrun --nproc_per_node=<a multiple of {size}> (over all hosts, the "
            "number of processes must be a multiple too)"
        )


def _write_energy_files(
    out: Path, report, samples: int, accuracy: float, name: str, unit: str = "sample"
) -> None:
    """``report.json``, ``report.md`` (headed by the energy per sample, or per token for a
    language model) and ``report.png`` (accuracy vs energy, expert load)."""
    (out / "report.json").write_text(report.to_json())
    per_unit_uj = report.totals.energy_pj / samples / 1e6
    head = (
        f"**Energy per {unit}: {per_unit_uj:.4g} uJ** (total over {samples:,} {unit}s counted)\n\n"
    )
    (out / "report.md").write_text(head + report.to_markdown())
    plot_run(report, accuracy, samples, out / "report.png", title=name)


def run_experiment(
    config: ExperimentConfig,
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
    resume: bool = False,
    resume_from: str | Path | None = None,
) -> ExperimentResult:
    """Train ``config`` into the run folder ``out``, evaluate on the test set, write the
    energy report files. Under ``torchrun`` every rank calls it (DDP; rank 0 writes; with
    ``train.expert_parallel = P`` the experts are split over groups of ``P`` processes and the
    checkpoint is sharded: :func:`~spiking_moe.evaluation.gather_checkpoint` makes it a
    single-process one).

    Seeds python, numpy and torch with ``train.seed`` before building the model (its initial
    weights) and with ``train.seed + rank`` before training (dropout, router noise: the
    Trainer seeds nothing).

    Args:
        config: the experiment.
        out: run folder (checkpoint, TensorBoard events, ``metrics.jsonl``, ``config.json``,
            ``report.json``/``.md``/``.png``).
        overrides: ``section.key=value`` strings applied to ``config``
            (:func:`~spiking_moe.config.apply_overrides`) and recorded in ``config.json``.
        device: overrides ``config.train.device`` (the same as ``train.device=...``).
        resume: continue from ``out/checkpoint.pt``.
        resume_from: continue from this checkpoint file instead.

    Raises:
        ConfigError, FileExistsError: from :func:`check_experiment`, before any work.
        CheckpointError: the checkpoint to resume from is damaged (names the previous one).
    """
    overrides = [*overrides, *([f"train.device={device}"] if device else [])]
    config, out = apply_overrides(config, overrides), Path(out)
    resuming = resume or resume_from is not None
    check_experiment(config, out, resume=resuming)
    dist_info = init_distributed(config.train.device)  # single process unless under torchrun
    data = build_datasets(config.data)
    train_loader, val_loader, test_loader = build_loaders(config, data, dist_info)

    seed_everything(config.train.seed)  # the model's initial weights
    model = build_model_for(config, data)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d parameters", type(model).__name__, num_params)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # The data's identity (the text corpus's files, sizes and sha256) makes runs comparable.
        record = {
            **config_to_dict(config),
            "overrides": list(overrides),
            "data_metadata": dict(data.metadata),
        }
        (out / "config.json").write_text(json.dumps(record, indent=2))

    teacher = None
    if config.train.distill_from:
        teacher = load_run(config.train.distill_from, device=config.train.device).model
        logger.info(
            "distilling from %s (%s, alpha %g, tau %g)",
            config.train.distill_from,
            type(teacher).__name__,
            config.train.distill_weight,
            config.train.distill_temperature,
        )
    callbacks = [RouterBiasBalancing(), FiringRateMonitor(), RoutingMonitor()]
    energy_callback = None
    if config.energy.enabled:
        # Energy at every validation during training; the final report on the test set.
        energy_callback = EnergyReportCallback(
            config.energy.profile, num_batches=config.energy.num_batches
        )
        callbacks.append(energy_callback)
    # This rank's streams for training (dropout, router noise); a resume restores the
    # checkpoint's instead.
    seed_everything(config.train.seed + dist_info.rank)
    with Trainer(
        model,
        train_loader,
        config.train,
        out_dir=out,
        val_loader=val_loader,
        callbacks=callbacks,
        hparams=flatten_config(config),
        resume=resume,
        resume_from=resume_from,
        checkpoint_extra={"experiment": config_to_dict(config)},
        teacher=teacher,
    ) as trainer:
        fit = trainer.fit()
        if fit.interrupted:
            return ExperimentResult(
                out, wall_time_s=fit.wall_time_s, interrupted=True, signal=fit.signal, config=config
            )
        test = trainer.evaluate(test_loader, "test")
    # The last validation beside the test metrics (val bits/byte is what the LM study reads).
    metrics = {**{k: v for k, v in fit.metrics.items() if k.startswith("val/")}, **test}
    report = None
    if energy_callback is not None:
        report = energy_callback.report_under(
            config.energy.profile,
            model_weight_bits=model_weight_bits(config),
            accuracy=test["test/accuracy"],
        )
    samples = energy_callback.samples if energy_callback is not None else 0
    if dist_info.is_main:
        if report is not None:
            _write_energy_files(
                out, report, samples, test["test/accuracy"], config.name, energy_callback.unit
            )
        (out / RESULT_NAME).write_text(
            json.dumps({"metrics": metrics, "wall_time_s": fit.wall_time_s}, indent=2)
        )
    logger.info(
        "done in %.1f s: test accuracy %.4f%s; run folder %s (tensorboard --logdir %s)",
        fit.wall_time_s,
        test["test/accuracy"],
        f", {test['test/bpb']:.4f} bits per byte" if "test/bpb" in test else "",
        out,
        out.parent,
    )
    return ExperimentResult(out, metrics, fit.wall_time_s, report, samples, config=config)


# --------------------------------------------------------------------------- seeds

#: Metrics summarised over seeds: (key in ExperimentResult.metrics, summary name).
SUMMARY_METRICS = (
    ("test/accuracy", "accuracy"),
    ("test/bpb", "bpb"),
    ("val/bpb", "val_bpb"),
    ("test/energy/uJ_per_sample", "uJ_per_sample"),
    ("test/energy/uJ_per_token", "uJ_per_token"),
    ("test/energy/ratio_dense_snn", "ratio_dense_snn"),
    ("test/energy/ratio_ann_fp32", "ratio_ann_fp32"),
    ("test/energy/ratio_ann_int8", "ratio_ann_int8"),
    ("test/firing_rate/mean", "firing_rate"),
)


def summarize(results: Sequence[ExperimentResult]) -> dict[str, Any]:
    """Mean and sample standard deviation over runs of :data:`SUMMARY_METRICS` (and of the
    worst MoE layer's ``max_load_ratio`` and the wall time).

    Returns:
        ``{"runs": n, "<name>": mean, "<name>_std": std, ...}``; a metric missing from any
        run is left out; ``std`` is 0 for a single run.
    """
    values: dict[str, list[float]] = {}
    for r in results:
        m = dict(r.metrics)
        loads = [
            v for k, v in m.items() if k.startswith("test/moe") and k.endswith("/max_load_ratio")
        ]
        if loads:
            m["max_load_ratio"] = max(loads)
        m["wall_time_s"] = r.wall_time_s
        for key, name in (
            *SUMMARY_METRICS,
            ("max_load_ratio", "max_load_ratio"),
            ("wall_time_s", "wall_time_s"),
        ):
            if key in m:
                values.setdefault(name, []).append(m[key])
    summary: dict[str, Any] = {"runs": len(results)}
    for name, vs in values.items():
        if len(vs) != len(results):
            continue
        summary[name] = statistics.fmean(vs)
        summary[f"{name}_std"] = statistics.stdev(vs) if len(vs) > 1 else 0.0
    return summary


def _cell(summary: dict[str, Any], name: str, fmt: str) -> str:
    """``mean ± std``; a ``g`` format shows the std to 2 significant digits and the mean to
    the same decimal place (0.1514 ± 0.00034 -> 0.15142 ± 0.00034)."""
    if name not in summary or not math.isfinite(summary[name]):
        return ""
    mean = summary[name]
    if summary["runs"] < 2:
        return fmt.format(mean)
    std = summary[f"{name}_std"]
    if std <= 1e-9 * abs(mean):  # float rounding (identical energies over seeds): no spread
        std = 0.0
    if fmt.endswith("g}") and std > 0:
        decimals = max(0, 1 - math.floor(math.log10(std)))
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


#: Columns of :func:`summary_table`: (summary name, header, format).
_SUMMARY_COLUMNS = (
    ("accuracy", "test accuracy", "{:.2%}"),
    ("val_bpb", "val bits/byte", "{:.3f}"),
    ("bpb", "test bits/byte", "{:.3f}"),
    ("uJ_per_sample", "energy / sample (uJ)", "{:.4g}"),
    ("uJ_per_token", "energy / token (uJ)", "{:.4g}"),
    ("ratio_dense_snn", "dense MoE / SNN", "{:.2f}x"),
    ("ratio_ann_fp32", "ANN fp32 / SNN", "{:.2f}x"),
    ("ratio_ann_int8", "ANN int8 / SNN", "{:.2f}x"),
    ("firing_rate", "firing rate", "{:.2%}"),
    ("max_load_ratio", "max / mean expert load", "{:.2f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
)


def summary_table(rows: Sequence[dict[str, Any]], leading: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown table of summaries (mean ± std over seeds): ``leading`` ``(key, header)``
    columns first (e.g. the number of experts), then the metrics present in any row."""
    columns = [c for c in _SUMMARY_COLUMNS if any(c[0] in row for row in rows)]
    headers = [h for _, h in leading] + [h for _, h, _ in columns] + ["seeds"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" for _ in headers) + " |"]
    for row in rows:
        cells = [str(row[k]) for k, _ in leading]
        cells += [_cell(row, name, fmt) for name, _, fmt in columns]
        cells.append(str(row["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_seeds(
    config: ExperimentConfig,
    out: str | Path,
    seeds: Sequence[int],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    reuse_finished: bool = False,
) -> tuple[list[ExperimentResult], dict[str, Any] | None]:
    """:func:`run_experiment` once per ``train.seed`` in ``seeds``, into ``out/seed<s>``.

    With ``reuse_finished``, a seed whose folder holds a finished run (:func:`finished_result`)
    is read back instead of trained again (e.g. seeds trained by parallel processes).

    The data split (``data.seed``) stays fixed, so the seeds vary the initial weights, the
    batch order and the encoding noise. Writes ``out/seeds.json`` (every run's test metrics
    and the summary) and ``out/seeds.md`` (the summary as a table).

    Returns:
        ``(results, summary)``: the finished runs and their :func:`summarize`; the summary is
        None and nothing is written when a run was interrupted (the last result says so).
    """
    out = Path(out)
    results = []
    for seed in seeds:
        result = finished_result(out / f"seed{seed}") if reuse_finished else None
        if result is not None:
            logger.info("seed %d: reusing the finished run in %s", seed, result.out)
        else:
            result = run_experiment(
                config,
                out / f"seed{seed}",
                overrides=[*overrides, f"train.seed={seed}"],
                resume=resume,
            )
        results.append(result)
        if result.interrupted:
            return results, None
    summary = summarize(results)
    if init_distributed(config.train.device).is_main:
        runs = [
            {"seed": s, "out": str(r.out), **r.metrics} for s, r in zip(seeds, results, strict=True)
        ]
        (out / "seeds.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
        (out / "seeds.md").write_text(
            summary_table([{"config": config.name, **summary}], [("config", "config")])
        )
    return results, summary
