"""One experiment from its config: build the run, train, test, write the run folder; and
re-count a trained run's energy from its checkpoint.

:func:`run_experiment` reads top to bottom: config -> data -> model -> train (with router
balancing, monitors and energy callbacks) -> test -> ``report.json``/``.md``/``.png``.
:func:`run_seeds` repeats it over seeds and summarises mean and standard deviation, which is
how results are reported (float results differ across CPUs, so one seed is not a result).
:func:`evaluate_checkpoint` rebuilds a run from the config stored in its checkpoint;
:func:`gather_checkpoint` turns an expert-parallel run's sharded checkpoint into the
single-process one that it and the other checkpoint readers take.

The command-line entry points in :mod:`spiking_moe.cli` parse arguments and map errors to
exit codes; everything they run is here (and in :mod:`spiking_moe.sweep`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from .config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_to_dict,
    flatten_config,
)
from .data import DATASETS, TEXT_VOCAB, BatchLoader, DataSplits, build_datasets
from .factory import build_model
from .plotting import plot_run
from .quantization import (
    SUPPORTED_BITS,
    CalibrationError,
    is_spiking,
    prepare_qat,
    quantize_model,
)
from .training import (
    CHECKPOINT_NAME,
    DistInfo,
    EnergyReportCallback,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
    Trainer,
    check_energy_profile,
    init_distributed,
    load_checkpoint,
    profile_precision,
    resolve_device,
    seed_everything,
    write_energy_report,
)
from .training.checkpoint import (
    check_single_process,
    gather_expert_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointEvaluation",
    "ExperimentResult",
    "SUMMARY_METRICS",
    "build_loaders",
    "CALIBRATION_BATCHES",
    "build_model_for",
    "check_experiment",
    "config_from_checkpoint",
    "evaluate_checkpoint",
    "gather_checkpoint",
    "generate_text",
    "load_language_model",
    "load_trained_model",
    "model_weight_bits",
    "quantize_trained",
    "finished_result",
    "run_experiment",
    "run_seeds",
    "summarize",
    "summary_table",
    "write_profile_report",
]

logger = logging.getLogger(__name__)


def build_loaders(config: ExperimentConfig, data: DataSplits, dist_info: DistInfo | None = None):
    """``(train, val or None, test)`` loaders, sharded for this rank.

    Evaluation order and noise depend only on the config, so re-evaluating a checkpoint sees
    the very batches its run was tested on.
    """
    dist_info = dist_info or DistInfo()
    shard = dict(rank=dist_info.rank, world_size=dist_info.world_size)
    batch, eval_batch = config.train.batch_size, config.train.eval_batch_size
    train = BatchLoader(data.train, batch, shuffle=True, seed=config.train.seed, **shard)
    val = BatchLoader(data.val, eval_batch, **shard) if data.val else None
    return train, val, BatchLoader(data.test, eval_batch, **shard)


def build_model_for(config: ExperimentConfig, data: DataSplits) -> torch.nn.Module:
    """The model of ``config.model`` for the shapes of ``data``."""
    return build_model(
        config.model,
        in_features=data.num_features,
        num_classes=data.num_classes,
        num_steps=data.num_steps,
        context=getattr(data, "context", 0),
    )


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
    """Fail before any work: unusable device, unknown energy profile, or ``out`` already
    holding a run that is not being resumed (FileExistsError)."""
    resolve_device(config.train.device)
    if config.energy.enabled:
        check_energy_profile(config.energy.profile)
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
    checkpoint is sharded: :func:`gather_checkpoint` makes it a single-process one).

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
        ConfigError, RuntimeError, ValueError, FileExistsError: from
            :func:`check_experiment`, before any work.
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

    callbacks = [RouterBiasBalancing(), FiringRateMonitor(), RoutingMonitor()]
    energy_callback = None
    if config.energy.enabled:
        # Energy at every validation during training; the final report on the test set.
        energy_callback = EnergyReportCallback(
            config.energy.profile, num_batches=config.energy.num_batches
        )
        callbacks.append(energy_callback)
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


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` returns.

    Attributes:
        config: the experiment config stored in the checkpoint (overrides applied).
        step: the checkpoint's optimizer step.
        metrics: the test evaluation's metrics (``test/accuracy``, ``test/loss``,
            ``test/energy/...``), computed exactly as :func:`run_experiment` computed them.
        report: the :class:`energy.EnergyReport` of the counted test inputs, with the
            accuracy (and, when quantized, the accuracy at the profile's precision).
        samples: test samples counted.
        weight_bits: the precision the run's model computes at (32, or its QAT bits).
        quantized_metrics: the test metrics after quantizing to the profile's weight bits
            (``quantize=True``; None otherwise or when there was nothing to quantize). The
            energy entries of ``metrics`` are then those of the quantized model.
    """

    config: ExperimentConfig
    step: int
    metrics: dict[str, float]
    report: Any
    samples: int
    weight_bits: int = 32
    quantized_metrics: dict[str, float] | None = None


def config_from_checkpoint(state: dict, path: Path) -> ExperimentConfig:
    """The experiment config that :func:`run_experiment` stored in a checkpoint that holds a
    whole model.

    Raises:
        CheckpointLayoutError: an expert-parallel checkpoint (an index or one of its shards);
            the message says how to gather it (:func:`gather_checkpoint`).
        ConfigError: no (or an invalid) experiment config.
    """
    check_single_process(state, path)
    raw = state.get("extra", {}).get("experiment")
    if raw is None:
        raise ConfigError(
            f"{path} holds no experiment config (checkpoint extra['experiment']); "
            "only checkpoints written by train_main / run_experiment can be re-counted"
        )
    try:
        return ExperimentConfig.from_dict(raw)  # the validation TOML files go through
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


#: Training batches an ANN's activation ranges are calibrated on before post-training
#: quantization (the first batches of epoch 0 in the run's shuffled order).
CALIBRATION_BATCHES = 8


def model_weight_bits(config: ExperimentConfig) -> int:
    """The weight precision a run's model computes at: ``train.quantize_bits`` (QAT) or 32."""
    return config.train.quantize_bits or 32


def quantize_trained(
    model: torch.nn.Module,
    bits: int,
    train_loader,
    *,
    activation_bits: int = 8,
) -> torch.nn.Module:
    """:func:`~spiking_moe.quantization.quantize_model` of a trained model (a copy): integer
    weights, and integer inputs (``activation_bits``, default 8 at either weight width: 4-bit
    weights with 8-bit activations, "W4A8", is the usual integer deployment, and 8 bits is the
    narrowest graded activation any bundled profile prices) to every Linear of an ANN and to
    a spiking model's Linears fed graded values (an analog input layer), their ranges
    calibrated on the first :data:`CALIBRATION_BATCHES` batches of ``train_loader`` (the
    whole training set when an ANN expert received no token there), never on test data.

    A QAT run's float weights (prepared by :func:`~spiking_moe.quantization.prepare_qat`)
    quantized to its ``train.quantize_bits`` give exactly the integer weights its training
    forward used (:func:`~spiking_moe.quantization.convert_qat` is this on the prepared
    model); an ANN's activations, which QAT leaves float, are calibrated here.
    """
    device = next(model.parameters()).device
    batches = itertools.islice(train_loader, CALIBRATION_BATCHES)
    try:
        return quantize_model(
            model,
            bits,
            activation_bits=activation_bits,
            calibration=(x.to(device) for x, _ in batches),
        )
    except CalibrationError as exc:
        # An expert that none of the first batches' tokens reached: widen to the whole
        # training set rather than guess its range.
        logger.info("%s; calibrating on the whole training set instead", exc)
    return quantize_model(
        model,
        bits,
        activation_bits=activation_bits,
        calibration=(x.to(device) for x, _ in train_loader),
    )


def _evaluate_test(
    model: torch.nn.Module,
    config: ExperimentConfig,
    train_loader,
    test_loader,
    *,
    step: int,
    profile: str | None,
    num_batches: int = 0,
) -> tuple[dict[str, float], EnergyReportCallback | None]:
    """Test metrics of ``model`` (and its energy counts under ``profile`` unless None)."""
    callbacks = []
    if profile is not None:
        callbacks.append(EnergyReportCallback(profile, num_batches=num_batches, prefixes=("test",)))
    # The Trainer's evaluation (device, AMP, batches) is the one that logged the run's test
    # accuracy, so the numbers match; it needs a train loader but never trains here. QAT is
    # off: the model given is the one evaluated (already quantized where it should be).
    train_config = dataclasses.replace(config.train, quantize_bits=0, expert_parallel=1)
    with Trainer(model, train_loader, train_config, sinks=[], callbacks=callbacks) as trainer:
        trainer.step = step  # for the log line
        metrics = trainer.evaluate(test_loader, "test")
    return metrics, (callbacks[0] if callbacks else None)


def evaluate_checkpoint(
    checkpoint: str | Path,
    profile: str,
    *,
    device: str | None = None,
    num_batches: int = 0,
    overrides: Sequence[str] = (),
    quantize: bool = False,
) -> CheckpointEvaluation:
    """Rebuild a run's data and model from its checkpoint, evaluate it on the test set and
    count its energy there under ``profile``.

    A QAT run (``train.quantize_bits``) is evaluated as it trained: fake-quantized weights
    (:func:`~spiking_moe.quantization.prepare_qat`; for a spiking model the same spikes as its
    integer model, for an ANN float activations, as in training). With ``quantize`` and a profile that prices narrower weights than the model
    has (``cmos45_int8``, ``loihi``: 8 bits, for an fp32 model), the model is also quantized
    to the profile's ``weight_bits`` (:func:`quantize_trained`; an ANN's activations to the
    profile's ``activation_bits``) and evaluated again: the report then holds both accuracies,
    and its energy is that of the quantized model, the one the profile prices. Without
    ``quantize`` such a report says the accuracy at the profile's precision was not measured.

    Args:
        checkpoint: ``runs/<name>/checkpoint.pt`` (loaded with ``weights_only=True``).
        profile: an energy profile name (:func:`energy.available_profiles`).
        device: overrides the run's ``train.device``.
        num_batches: test batches to count (0: all); accuracy is always on the whole set.
        overrides: ``section.key=value`` applied to the stored config (e.g. a moved
            ``data.root`` or another ``train.eval_batch_size``).
        quantize: also measure the accuracy at the profile's weight precision.

    The test batches are those of a single-process run; a run trained under ``torchrun`` drew
    its rate-code noise per rank, so its logged accuracy may differ slightly on rate-coded data.

    Raises:
        ValueError: unknown profile (the message lists the known ones); ``quantize`` under a
            profile whose precision :mod:`spiking_moe.quantization` does not provide (the
            message names the bits).
        FileNotFoundError: no checkpoint at ``checkpoint``.
        CheckpointError: the checkpoint is damaged (CheckpointLayoutError: it is an
            expert-parallel one; :func:`gather_checkpoint` it first).
        ConfigError: the checkpoint holds no (or an invalid) experiment config, or a bad
            override.
    """
    weight_bits, activation_bits = profile_precision(profile)  # checks the name
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    overrides = [*overrides, *([f"train.device={device}"] if device else [])]
    config = apply_overrides(config_from_checkpoint(state, checkpoint), overrides)
    bits = model_weight_bits(config)
    to_quantize = quantize and weight_bits < bits
    if to_quantize:
        _check_profile_precision(profile, config)
    config.data.check_files()
    resolve_device(config.train.device)
    data = build_datasets(config.data)
    train_loader, _, test_loader = build_loaders(config, data)
    trained = build_model_for(config, data)
    trained.load_state_dict(state["model"])
    model = prepare_qat(trained, bits) if bits < 32 else trained
    step = int(state["step"])
    metrics, counted = _evaluate_test(
        model,
        config,
        train_loader,
        test_loader,
        step=step,
        profile=None if to_quantize else profile,
        num_batches=num_batches,
    )
    quantized_metrics = None
    if to_quantize:
        quantized = quantize_trained(
            trained,
            weight_bits,
            train_loader,
            activation_bits=8 if is_spiking(trained) else activation_bits,
        )
        quantized_metrics, counted = _evaluate_test(
            quantized,
            config,
            train_loader,
            test_loader,
            step=step,
            profile=profile,
            num_batches=num_batches,
        )
        energy_keys = {k: v for k, v in quantized_metrics.items() if "/energy/" in k}
        metrics.update(energy_keys)
    elif quantize:
        logger.info(
            "--quantize: the model's %d-bit weights are within profile %r's %d bits; "
            "nothing to quantize",
            bits,
            profile,
            weight_bits,
        )
    report = counted.report_under(
        profile,
        model_weight_bits=bits,
        accuracy=metrics["test/accuracy"],
        accuracy_at_profile_precision=(
            quantized_metrics["test/accuracy"] if quantized_metrics else None
        ),
    )
    return CheckpointEvaluation(
        config, step, metrics, report, counted.samples, bits, quantized_metrics
    )


def _check_profile_precision(profile: str, config: ExperimentConfig) -> None:
    """Fail before any work when the profile's precision is one quantization cannot give."""
    weight_bits, activation_bits = profile_precision(profile)
    if weight_bits not in SUPPORTED_BITS:
        raise ValueError(
            f"--quantize: profile {profile!r} prices {weight_bits}-bit weights; "
            f"quantization provides {list(SUPPORTED_BITS)} bits"
        )
    if config.model.kind == "ann" and activation_bits not in SUPPORTED_BITS:
        raise ValueError(
            f"--quantize: profile {profile!r} prices {activation_bits}-bit "
            f"activations (spikes), which an ANN ({config.model.kind!r}) cannot run at; "
            f"quantization provides {list(SUPPORTED_BITS)}-bit activations"
        )


def write_profile_report(out: Path, evaluation: CheckpointEvaluation, profile: str) -> None:
    """``report_<profile>.json``/``.md`` and the report in TensorBoard (tags
    ``test_energy_<profile>/...`` at the checkpoint's step) in ``out``."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / f"report_{profile}.json").write_text(evaluation.report.to_json())
    (out / f"report_{profile}.md").write_text(evaluation.report.to_markdown())
    writer = SummaryWriter(log_dir=str(out))
    try:
        write_energy_report(writer, evaluation.report, evaluation.step, f"test_energy_{profile}")
    finally:
        writer.close()


def gather_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the single-process checkpoint of an expert-parallel run to ``out/checkpoint.pt``
    (:func:`~spiking_moe.training.gather_expert_checkpoint`: all experts, the optimizer state
    in the whole model's order, ``train.expert_parallel = 1``), and copy the run's
    ``config.json`` beside it. :func:`evaluate_checkpoint`, :func:`load_trained_model`, the
    export and a single-process resume read the result. Returns its path.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        FileExistsError: ``out`` holds an expert-parallel run (e.g. the source's own folder,
            whose ``checkpoint.pt`` is the index its shards need).
        CheckpointLayoutError: ``checkpoint`` is not an expert-parallel index.
        CheckpointError: a shard is missing, damaged or from another checkpoint.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    target = out / CHECKPOINT_NAME
    if any(out.glob(f"{target.stem}.expert*of*.step*{target.suffix}")):
        raise FileExistsError(
            f"{out} holds an expert-parallel run, whose {CHECKPOINT_NAME} is the index of its "
            "shards; write the gathered checkpoint to another folder"
        )
    state = gather_expert_checkpoint(checkpoint)
    save_checkpoint(state, target)
    config_json = checkpoint.parent / "config.json"
    if config_json.is_file():
        record = json.loads(config_json.read_text())
        if isinstance(record.get("train"), dict):
            record["train"]["expert_parallel"] = 1
        record["gathered_from"] = state["gathered_from"]
        (out / "config.json").write_text(json.dumps(record, indent=2))
    logger.info(
        "gathered %s (step %d, %d expert shards) into %s",
        checkpoint,
        state["step"],
        state["gathered_from"]["expert_parallel"],
        target,
    )
    return target


# --------------------------------------------------------------------------- generation


def load_trained_model(
    checkpoint: str | Path, *, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The model a run trained, rebuilt from its checkpoint on the CPU in eval mode (the
    dataset is built for its shapes; ``overrides`` apply to the stored config, e.g. a moved
    ``data.root``).

    Raises:
        FileNotFoundError: no checkpoint (or no data files) there.
        CheckpointError: the checkpoint is damaged.
        ConfigError: the checkpoint holds no (or an invalid) experiment config.
    """
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = apply_overrides(config_from_checkpoint(state, checkpoint), overrides)
    config.data.check_files()
    model = build_model_for(config, build_datasets(config.data))
    model.load_state_dict(state["model"])
    return model.eval(), config


def load_language_model(
    checkpoint: str | Path, *, device: str | None = None
) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The language model a text run trained, rebuilt from its checkpoint (no corpus read).

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: the checkpoint is damaged.
        ConfigError: the checkpoint holds no experiment config, or not a text run's.
    """
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = config_from_checkpoint(state, checkpoint)
    if config.data.name != "text":
        raise ConfigError(
            f"{checkpoint} is a {config.data.name!r} run; only data.name = 'text' runs are "
            "language models"
        )
    spec = DATASETS["text"]
    model = build_model(
        config.model,
        in_features=TEXT_VOCAB,
        num_classes=TEXT_VOCAB,
        num_steps=config.data.num_steps or spec.default_steps,
        context=config.data.context,
    )
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device or config.train.device)), config


def generate_text(
    model: torch.nn.Module,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` (encoded as UTF-8 bytes) by ``max_new_tokens`` sampled bytes.

    Bytes that do not form valid UTF-8 (a sample cut inside a character) are shown as U+FFFD.
    """
    if not prompt:
        raise ValueError("the prompt must not be empty (the model needs a byte to start from)")
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature, generator=generator)
    return bytes(out.tolist()).decode("utf-8", errors="replace")
