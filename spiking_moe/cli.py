"""Command-line entry points and the experiment steps they share.

- :func:`train_main` (``spiking-moe-train``, ``experiments/train.py``): one experiment from a
  TOML config; its steps (config -> data -> model -> train -> test -> run folder) are
  :func:`run_experiment`, read top to bottom.
- :func:`energy_report_main` (``experiments/energy_report.py``): re-count a trained model on
  its test set under any energy profile (:func:`evaluate_checkpoint`).
- :func:`sweep_main` (``experiments/sweep.py``): one :func:`run_experiment` per (experts, k)
  pair and one comparison table (:func:`sweep_table`) and plot.

Exit codes of every entry point: 0 done; 2 bad arguments, config, device, profile or missing
file (an error names it); 128 + signal number when training was stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from .config import ConfigError, ExperimentConfig, config_to_dict, flatten_config, load_config
from .data import BatchLoader, DataSplits, build_datasets
from .factory import build_model
from .monitors import FiringRateMonitor, RoutingMonitor
from .plotting import plot_run, plot_sweep
from .training import (
    CHECKPOINT_NAME,
    DistInfo,
    EnergyReportCallback,
    RouterBiasBalancing,
    Trainer,
    check_energy_profile,
    energy_profile_names,
    init_distributed,
    load_checkpoint,
    resolve_device,
    seed_everything,
    write_energy_report,
)

__all__ = [
    "CheckpointEvaluation",
    "ExperimentResult",
    "check_experiment",
    "energy_report_main",
    "evaluate_checkpoint",
    "run_experiment",
    "run_sweep",
    "sweep_main",
    "sweep_table",
    "train_main",
]

logger = logging.getLogger(__name__)

#: Exceptions that mean "bad input" (exit code 2 with the message), raised before any work.
_USAGE_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, RuntimeError, ValueError)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _with_device(config: ExperimentConfig, device: str | None) -> ExperimentConfig:
    """``config`` with ``train.device`` replaced (validated) when ``device`` is given."""
    if not device:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))


def _loaders(config: ExperimentConfig, data: DataSplits, dist_info: DistInfo | None = None):
    """``(train, val or None, test)`` loaders; evaluation order and noise depend only on the
    config, so re-evaluating a checkpoint sees the very batches its run was tested on."""
    dist_info = dist_info or DistInfo()
    shard = dict(rank=dist_info.rank, world_size=dist_info.world_size)
    batch, eval_batch = config.train.batch_size, config.train.eval_batch_size
    train = BatchLoader(data.train, batch, shuffle=True, seed=config.train.seed, **shard)
    val = BatchLoader(data.val, eval_batch, **shard) if data.val else None
    return train, val, BatchLoader(data.test, eval_batch, **shard)


def _build_model(config: ExperimentConfig, data: DataSplits) -> torch.nn.Module:
    return build_model(
        config.model,
        in_features=data.num_features,
        num_classes=data.num_classes,
        num_steps=data.num_steps,
    )


# --------------------------------------------------------------------------- one experiment


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` returns.

    Attributes:
        out: the run folder.
        metrics: the test evaluation's metrics (``test/accuracy``, ``test/loss``, with the
            energy report on: ``test/energy/uJ_per_sample``, ``test/energy/ratio_<baseline>``;
            MoE models: ``test/moe<l>/max_load_ratio``, ...). Empty when interrupted.
        wall_time_s: training time (``Trainer.fit``).
        report: the test set's :class:`energy.EnergyReport` (None with ``energy.enabled =
            false`` and on ranks other than 0).
        samples: test samples the report counted.
        interrupted: stopped by a signal before the end (a checkpoint was saved).
        signal: the signal number when ``interrupted``.
    """

    out: Path
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    report: Any = None
    samples: int = 0
    interrupted: bool = False
    signal: int | None = None


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


def _write_energy_files(out: Path, report, samples: int, accuracy: float, name: str) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (accuracy vs energy, expert load)."""
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown())
    plot_run(report, accuracy, samples, out / "report.png", title=name)


def run_experiment(
    config: ExperimentConfig, out: str | Path, *, device: str | None = None, resume: bool = False
) -> ExperimentResult:
    """Train ``config`` into the run folder ``out``, evaluate on the test set, write the
    energy report files. Under ``torchrun`` every rank calls it (DDP; rank 0 writes).

    Args:
        config: the experiment.
        out: run folder (checkpoint, TensorBoard events, ``metrics.jsonl``, ``config.json``,
            ``report.json``/``.md``/``.png``).
        device: overrides ``config.train.device``.
        resume: continue from ``out/checkpoint.pt``.

    Raises:
        ConfigError, RuntimeError, ValueError, FileExistsError: from
            :func:`check_experiment`, before any work.
    """
    config, out = _with_device(config, device), Path(out)
    check_experiment(config, out, resume=resume)
    dist_info = init_distributed(config.train.device)  # single process unless under torchrun
    data = build_datasets(config.data)
    train_loader, val_loader, test_loader = _loaders(config, data, dist_info)

    seed_everything(config.train.seed)  # the model's initial weights
    model = _build_model(config, data)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d parameters", type(model).__name__, num_params)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))

    callbacks = [RouterBiasBalancing(), FiringRateMonitor(), RoutingMonitor()]
    energy_callback = None
    if config.energy.enabled:
        # Energy curves on validation during training; the final report on the test set.
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
        checkpoint_extra={"experiment": config_to_dict(config)},
    ) as trainer:
        fit = trainer.fit()
        if fit.interrupted:
            return ExperimentResult(
                out, wall_time_s=fit.wall_time_s, interrupted=True, signal=fit.signal
            )
        test = trainer.evaluate(test_loader, "test")
    report = energy_callback.report if energy_callback is not None else None
    samples = energy_callback.samples if energy_callback is not None else 0
    if dist_info.is_main and report is not None:
        _write_energy_files(out, report, samples, test["test/accuracy"], config.name)
    logger.info(
        "done in %.1f s: test accuracy %.4f; run folder %s (tensorboard --logdir %s)",
        fit.wall_time_s,
        test["test/accuracy"],
        out,
        out.parent,
    )
    return ExperimentResult(out, test, fit.wall_time_s, report, samples)


def _parse_train_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spiking-moe-train", description="Train one experiment from a TOML config."
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="experiments/configs/<name>.toml"
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--device", help="override train.device: auto, cpu, cuda, cuda:N")
    return parser.parse_args(argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on the test set, write the run folder. Returns the process exit code.

    Exit codes: 0 done; 2 bad config, unusable device or missing data; 128 + signal number
    when stopped by SIGINT/SIGTERM (a checkpoint was saved; rerun with ``--resume``).
    """
    args = _parse_train_args(argv)
    _setup_logging()
    try:
        config = _with_device(load_config(args.config), args.device)
        out = args.out or Path("runs") / config.name
        check_experiment(config, out, resume=args.resume)
    except _USAGE_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    try:
        if not init_distributed(config.train.device).is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress log
        result = run_experiment(config, out, resume=args.resume)
        return 128 + (result.signal or 0) if result.interrupted else 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- energy report


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` returns.

    Attributes:
        config: the experiment config stored in the checkpoint.
        step: the checkpoint's optimizer step.
        metrics: the test evaluation's metrics (``test/accuracy``, ``test/loss``,
            ``test/energy/...``), computed exactly as :func:`run_experiment` computed them.
        report: the :class:`energy.EnergyReport` of the counted test inputs.
        samples: test samples counted.
    """

    config: ExperimentConfig
    step: int
    metrics: dict[str, float]
    report: Any
    samples: int


def _config_from_checkpoint(state: dict, path: Path) -> ExperimentConfig:
    raw = state.get("extra", {}).get("experiment")
    if raw is None:
        raise ConfigError(
            f"{path} holds no experiment config (checkpoint extra['experiment']); "
            "only checkpoints written by train_main / run_experiment can be re-counted"
        )
    try:
        config = ExperimentConfig.from_dict(raw)  # the validation TOML files go through
        config.data.check_files()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def evaluate_checkpoint(
    checkpoint: str | Path,
    profile: str,
    *,
    device: str | None = None,
    num_batches: int = 0,
) -> CheckpointEvaluation:
    """Rebuild a run's data and model from its checkpoint, evaluate it on the test set and
    count its energy there under ``profile``.

    Args:
        checkpoint: ``runs/<name>/checkpoint.pt`` (loaded with ``weights_only=True``).
        profile: an energy profile name (:func:`energy.available_profiles`).
        device: overrides the run's ``train.device``.
        num_batches: test batches to count (0: all); accuracy is always on the whole set.

    The test batches are those of a single-process run; a run trained under ``torchrun`` drew
    its rate-code noise per rank, so its logged accuracy may differ slightly on rate-coded data.

    Raises:
        ValueError: unknown profile (the message lists the known ones).
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ConfigError: the checkpoint holds no (or an invalid) experiment config.
    """
    check_energy_profile(profile)
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = _with_device(_config_from_checkpoint(state, checkpoint), device)
    resolve_device(config.train.device)
    data = build_datasets(config.data)
    train_loader, _, test_loader = _loaders(config, data)
    model = _build_model(config, data)
    model.load_state_dict(state["model"])
    energy_callback = EnergyReportCallback(profile, num_batches=num_batches, prefixes=("test",))
    # The Trainer's evaluation (device, AMP, batches) is the one that logged the run's test
    # accuracy, so the numbers match; it needs a train loader but never trains here.
    with Trainer(model, train_loader, config.train, sinks=[], callbacks=[energy_callback]) as t:
        t.step = int(state["step"])  # for the log line
        metrics = t.evaluate(test_loader, "test")
    return CheckpointEvaluation(
        config, int(state["step"]), metrics, energy_callback.report, energy_callback.samples
    )


def _write_profile_report(out: Path, evaluation: CheckpointEvaluation, profile: str) -> None:
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


def energy_report_main(argv: Sequence[str] | None = None) -> int:
    """Re-count a trained model under a profile; print and write the report. Exit code."""
    parser = argparse.ArgumentParser(
        prog="energy_report",
        description="Re-count a trained model's test-set energy under any hardware profile.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="runs/<name>/checkpoint.pt")
    parser.add_argument("--profile", required=True, help=f"one of {energy_profile_names()}")
    parser.add_argument("--out", type=Path, help="folder for the files (default: the checkpoint's)")
    parser.add_argument("--device", help="override train.device: auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--num-batches", type=int, default=0, help="test batches to count (default 0: all)"
    )
    args = parser.parse_args(argv)
    _setup_logging()
    if args.num_batches < 0:
        logger.error("--num-batches must be >= 0, got %d", args.num_batches)
        return 2
    try:
        evaluation = evaluate_checkpoint(
            args.checkpoint, args.profile, device=args.device, num_batches=args.num_batches
        )
    except _USAGE_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    out = args.out or args.checkpoint.parent
    _write_profile_report(out, evaluation, args.profile)
    logger.info(
        "test accuracy %.4f; energy counted on %d samples; report_%s.json/.md in %s",
        evaluation.metrics["test/accuracy"],
        evaluation.samples,
        args.profile,
        out,
    )
    print(evaluation.report.to_markdown())
    return 0


# --------------------------------------------------------------------------- sweeps

#: sweep table columns: (row key, header, format)
_SWEEP_COLUMNS = (
    ("num_experts", "E", "{}"),
    ("k", "k", "{}"),
    ("accuracy", "test accuracy", "{:.2%}"),
    ("uJ_per_sample", "energy / sample (uJ)", "{:.4g}"),
    ("ratio_dense_snn", "dense MoE / SNN", "{:.2f}x"),
    ("ratio_ann_fp32", "ANN fp32 / SNN", "{:.2f}x"),
    ("ratio_ann_int8", "ANN int8 / SNN", "{:.2f}x"),
    ("max_load_ratio", "max / mean expert load", "{:.2f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
)


def _sweep_row(config: ExperimentConfig, result: ExperimentResult, wall_time_s: float) -> dict:
    m = result.metrics
    loads = [v for k, v in m.items() if k.startswith("test/moe") and k.endswith("/max_load_ratio")]
    return {
        "label": f"E={config.model.num_experts} k={config.model.k}",
        "num_experts": config.model.num_experts,
        "k": config.model.k,
        "accuracy": m["test/accuracy"],
        "uJ_per_sample": m["test/energy/uJ_per_sample"],
        "ratio_dense_snn": m.get("test/energy/ratio_dense_snn", float("nan")),
        "ratio_ann_fp32": m["test/energy/ratio_ann_fp32"],
        "ratio_ann_int8": m["test/energy/ratio_ann_int8"],
        "max_load_ratio": max(loads, default=float("nan")),  # the worst MoE layer
        "wall_time_s": wall_time_s,
        "run": str(result.out),
    }


def sweep_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_sweep` rows: one line per (E, k); ratios are baseline
    energy / this model's energy (above 1: the spiking MoE saves energy)."""
    lines = [
        "| " + " | ".join(header for _, header, _ in _SWEEP_COLUMNS) + " |",
        "| " + " | ".join("---:" for _ in _SWEEP_COLUMNS) + " |",
    ]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in _SWEEP_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sweep_configs(
    base: ExperimentConfig, experts: Sequence[int], ks: Sequence[int]
) -> list[ExperimentConfig]:
    """One config per valid (E, k) pair; invalid pairs (k > E, ...) are skipped with a note."""
    configs = []
    for num_experts in experts:
        for k in ks:
            try:
                model = dataclasses.replace(base.model, num_experts=num_experts, k=k)
            except ConfigError as exc:
                logger.warning("skipping E=%d k=%d: %s", num_experts, k, exc)
                continue
            name = f"{base.name}_E{num_experts}_k{k}"
            configs.append(dataclasses.replace(base, name=name, model=model))
    return configs


def run_sweep(
    configs: Sequence[ExperimentConfig], out: str | Path
) -> tuple[list[dict], int | None]:
    """:func:`run_experiment` for each config into ``out/E<E>_k<k>``.

    Returns:
        ``(rows, signal)``: one row per finished run (the :data:`_SWEEP_COLUMNS` keys,
        ``label`` and ``run``, the run folder) and the signal number that interrupted the
        sweep (None when every run finished).
    """
    rows = []
    for config in configs:
        run_out = Path(out) / f"E{config.model.num_experts}_k{config.model.k}"
        logger.info("sweep: %s -> %s", config.name, run_out)
        start = time.perf_counter()
        result = run_experiment(config, run_out)
        if result.interrupted:
            return rows, result.signal or 0
        rows.append(_sweep_row(config, result, time.perf_counter() - start))
    return rows, None


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} must name at least one value, got {text!r}")
    return values


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """Train one spiking MoE per (experts, k); write ``sweep.md``/``.json``/``.png``. Exit code."""
    parser = argparse.ArgumentParser(
        prog="sweep", description="Train a spiking MoE per (experts, k) and compare them."
    )
    parser.add_argument("--config", required=True, type=Path, help="base TOML config")
    parser.add_argument("--experts", required=True, help="numbers of experts, e.g. 2,4,8")
    parser.add_argument("--k", required=True, help="experts per token, e.g. 1,2")
    parser.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep_<name>)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--device", help="override train.device: auto, cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        experts, ks = _int_list(args.experts, "--experts"), _int_list(args.k, "--k")
        base = _with_device(load_config(args.config), args.device)
        if args.max_steps is not None:
            train = dataclasses.replace(base.train, max_steps=args.max_steps)
            base = dataclasses.replace(base, train=train)
        if base.model.kind != "moe":
            raise ConfigError(
                f"a sweep varies the MoE: model.kind must be 'moe', got {base.model.kind!r}"
            )
        if not base.energy.enabled:
            logger.info("sweep: enabling the energy report (energy.enabled) for the table")
            base = dataclasses.replace(base, energy=dataclasses.replace(base.energy, enabled=True))
        out = args.out or Path("runs") / f"sweep_{base.name}"
        configs = _sweep_configs(base, experts, ks)
        if not configs:
            raise ConfigError(f"no valid (experts, k) pair in experts={experts}, k={ks}")
        for config in configs:
            check_experiment(config, out / f"E{config.model.num_experts}_k{config.model.k}")
    except _USAGE_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    rows, stopped_by = run_sweep(configs, out)
    if not rows:
        logger.warning("sweep stopped before the first run finished; no table written")
        return 128 + (stopped_by or 0)
    table = sweep_table(rows)
    (out / "sweep.md").write_text(table)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    plot_sweep(rows, out / "sweep.png", profile=base.energy.profile)
    print(table)
    if stopped_by is not None:
        logger.warning("sweep interrupted after %d of %d runs", len(rows), len(configs))
        return 128 + stopped_by
    return 0
