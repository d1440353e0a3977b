"""Command-line entry points: argument parsing and exit codes. What they run lives in
:mod:`spiking_moe.experiment`, :mod:`spiking_moe.evaluation` and :mod:`spiking_moe.sweep`.

- :func:`train_main` (``spiking-moe-train``, ``experiments/train.py``): one experiment from a
  TOML config, or one per seed with ``--seeds``.
- :func:`energy_report_main` (``spiking-moe-energy-report``, ``experiments/energy_report.py``):
  re-count a trained model on its test set under any energy profile.
- :func:`sweep_main` (``spiking-moe-sweep``, ``experiments/sweep.py``): one experiment per
  (experts, k) pair, one comparison table and plot.
- :func:`compare_main` (``spiking-moe-compare``, ``experiments/compare.py``): the spiking MoE,
  dense SNN and ANN twin of one config at fp32, int8 and int4 (PTQ and QAT), accuracy and
  energy compute only and with memory traffic.
- :func:`export_main` (``spiking-moe-export``, ``experiments/export.py``): a trained model as a
  NIR deployment bundle (one NIR graph per part and the routing rule).
- :func:`generate_main` (``spiking-moe-generate``, ``experiments/generate.py``): sample text
  from a trained language model (a ``data.name = "text"`` run).
- :func:`gather_main` (``spiking-moe-gather``, ``experiments/gather.py``): turn an
  expert-parallel run's sharded checkpoint (``train.expert_parallel > 1``) into a
  single-process one that the other commands read.

Training under ``torchrun --nproc_per_node=N`` is data-parallel (DDP); with
``--set train.expert_parallel=P`` (``P`` dividing ``N`` and ``model.moe.num_experts``) each MoE
layer's experts are split over groups of ``P`` processes as well.

Every command takes ``--set section.key=value`` (repeatable): TOML values checked exactly like
the config file's (``--set train.lr=3e-3 --set model.router=spiking``).

Exit codes of every entry point: 0 done; 2 bad input: arguments, config, override, device,
profile, a missing or damaged file given (:class:`~spiking_moe.config.ConfigError`,
:class:`~spiking_moe.training.CheckpointError`, ``FileNotFoundError``, ``FileExistsError``,
raised anywhere during the command: the error names the problem, no traceback); 128 + signal
number when training was stopped by SIGINT/SIGTERM. Any other error is a bug and keeps its
traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed

from .compare import KINDS, comparison_name, run_comparison
from .config import ConfigError, apply_overrides, load_config
from .evaluation import (
    evaluate_checkpoint,
    gather_checkpoint,
    generate_text,
    load_language_model,
    load_trained_model,
    write_profile_report,
)
from .experiment import check_experiment, finished_result, run_experiment, run_seeds, summary_table
from .plotting import plot_sweep
from .quantization import is_spiking
from .sweep import run_folder, run_sweep, sweep_configs, sweep_table
from .training import CheckpointError, energy_profile_names, init_distributed

__all__ = [
    "PARSERS",
    "compare_main",
    "energy_report_main",
    "export_main",
    "gather_main",
    "generate_main",
    "sweep_main",
    "train_main",
]

logger = logging.getLogger(__name__)

#: Exceptions that mean "bad input" (exit code 2 with the message, no traceback): the
#: validation errors of what the user gave. Anything else is a bug and keeps its traceback.
_USAGE_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError)


def _command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """An entry point whose bad input, found anywhere during the command, exits with code 2
    and the error's message."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except _USAGE_ERRORS as exc:
            logger.error("%s", exc)
            return 2

    return run


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax, checked like the file's), repeatable",
    )


def _add_checkpoint(
    parser: argparse.ArgumentParser, help: str = "runs/<name>/checkpoint.pt"
) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help=help)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="same as --set train.device=...: auto, cpu, cuda, cuda:N")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} must name at least one value, got {text!r}")
    return values


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, with the shorthand flags as the overrides they stand for."""
    extra = []
    if getattr(args, "device", None):
        extra.append(f"train.device={args.device}")
    if getattr(args, "max_steps", None) is not None:
        extra.append(f"train.max_steps={args.max_steps}")
    return [*args.overrides, *extra]


def _exit_code(interrupted: bool, signal: int | None) -> int:
    return 128 + (signal or 0) if interrupted else 0


# --------------------------------------------------------------------------- train


def train_parser() -> argparse.ArgumentParser:
    """The argument parser of ``train_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-train", description="Train one experiment from a TOML config."
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="experiments/configs/<name>.toml"
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument(
        "--resume-from", type=Path, help="continue from this checkpoint (e.g. checkpoint.prev.pt)"
    )
    parser.add_argument(
        "--seeds",
        help="train once per train.seed (e.g. 0,1,2) into <out>/seed<s> and summarise "
        "mean ± std in <out>/seeds.md",
    )
    _add_device(parser)
    _add_set(parser)
    return parser


@_command
def train_main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on the test set, write the run folder. Returns the process exit code.

    Exit codes: 0 done; 2 bad config, override, unusable device, missing data or a damaged
    checkpoint; 128 + signal number when stopped by SIGINT/SIGTERM (a checkpoint was saved;
    rerun with ``--resume``).
    """
    args = train_parser().parse_args(argv)
    _setup_logging()
    overrides = _overrides(args)
    resuming = args.resume or args.resume_from is not None
    config = apply_overrides(load_config(args.config), overrides)
    out = args.out or Path("runs") / config.name
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    if args.resume_from is not None and seeds:
        raise ConfigError("--resume-from names one run's checkpoint; it cannot go with --seeds")
    folders = [out / f"seed{s}" for s in seeds] if seeds else [out]
    for folder in folders:  # every folder checked before the first run trains
        check_experiment(config, folder, resume=resuming)
    try:
        if not init_distributed(config.train.device).is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress log
        base = load_config(args.config)
        if seeds:
            results, summary = run_seeds(base, out, seeds, overrides=overrides, resume=args.resume)
            if summary is not None:
                print(summary_table([{"config": config.name, **summary}], [("config", "config")]))
            return _exit_code(results[-1].interrupted, results[-1].signal)
        result = run_experiment(
            base, out, overrides=overrides, resume=args.resume, resume_from=args.resume_from
        )
        return _exit_code(result.interrupted, result.signal)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- energy report


def energy_report_parser() -> argparse.ArgumentParser:
    """The argument parser of ``energy_report_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-energy-report",
        description="Re-count a trained model's test-set energy under any hardware profile.",
    )
    _add_checkpoint(parser)
    parser.add_argument("--profile", required=True, help=f"one of {energy_profile_names()}")
    parser.add_argument("--out", type=Path, help="folder for the files (default: the checkpoint's)")
    parser.add_argument(
        "--num-batches", type=int, default=0, help="test batches to count (default 0: all)"
    )
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="also quantize the model to the profile's weight bits (e.g. 8 for cmos45_int8), "
        "evaluate it, count its energy, and report both accuracies",
    )
    _add_device(parser)
    _add_set(parser)
    return parser


@_command
def energy_report_main(argv: Sequence[str] | None = None) -> int:
    """Re-count a trained model under a profile; print and write the report. Exit code."""
    args = energy_report_parser().parse_args(argv)
    _setup_logging()
    if args.num_batches < 0:
        raise ConfigError(f"--num-batches must be >= 0, got {args.num_batches}")
    evaluation = evaluate_checkpoint(
        args.checkpoint,
        args.profile,
        num_batches=args.num_batches,
        overrides=_overrides(args),
        quantize=args.quantize,
    )
    out = args.out or args.checkpoint.parent
    write_profile_report(out, evaluation, args.profile)
    report = evaluation.report
    at_profile = report.accuracy_at_profile_precision
    logger.info(
        "test accuracy %.4f at %d-bit weights%s; energy counted on %d samples; "
        "report_%s.json/.md in %s",
        evaluation.metrics["test/accuracy"],
        evaluation.weight_bits,
        ""
        if at_profile is None
        else f", {at_profile:.4f} at {report.profile.weight_bits} bits (counted)",
        evaluation.samples,
        args.profile,
        out,
    )
    print(evaluation.report.to_markdown())
    return 0


# --------------------------------------------------------------------------- sweep


def sweep_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sweep_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-sweep",
        description="Train a spiking MoE per (experts, k) and compare them.",
    )
    parser.add_argument("--config", required=True, type=Path, help="base TOML config")
    parser.add_argument("--experts", required=True, help="numbers of experts, e.g. 2,4,8")
    parser.add_argument("--k", required=True, help="experts per token, e.g. 1,2")
    parser.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep_<name>)")
    parser.add_argument("--seeds", help="train each pair once per train.seed, e.g. 0,1")
    parser.add_argument("--max-steps", type=int, help="same as --set train.max_steps=N")
    parser.add_argument(
        "--reuse-finished",
        action="store_true",
        help="read back runs that already finished in the sweep folder instead of retraining "
        "them (an interrupted sweep; seeds trained by parallel processes)",
    )
    _add_device(parser)
    _add_set(parser)
    return parser


@_command
def sweep_main(argv: Sequence[str] | None = None) -> int:
    """Train one spiking MoE per (experts, k); write ``sweep.md``/``.json``/``.png``. Exit code."""
    args = sweep_parser().parse_args(argv)
    _setup_logging()
    experts, ks = _int_list(args.experts, "--experts"), _int_list(args.k, "--k")
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    base = apply_overrides(load_config(args.config), _overrides(args))
    if not base.energy.enabled:
        logger.info("sweep: enabling the energy report (energy.enabled) for the table")
        base = apply_overrides(base, ["energy.enabled=true"])
    out = args.out or Path("runs") / f"sweep_{base.name}"
    configs = sweep_configs(base, experts, ks)
    if not configs:
        raise ConfigError(f"no valid (experts, k) pair in experts={experts}, k={ks}")
    for config in configs:  # every run checked before the first one trains
        folder = run_folder(out, config)
        for run in [folder / f"seed{s}" for s in seeds] if seeds else [folder]:
            if not (args.reuse_finished and finished_result(run) is not None):
                check_experiment(config, run)
    rows, stopped_by = run_sweep(configs, out, seeds=seeds, reuse_finished=args.reuse_finished)
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


# --------------------------------------------------------------------------- compare


def compare_parser() -> argparse.ArgumentParser:
    """The argument parser of ``compare_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-compare",
        description="Train the spiking MoE, the dense SNN and the ANN twin of one config (or "
        "take checkpoints), quantize each to 8 and 4 bits, and compare accuracy and energy "
        "(compute only and with memory traffic) at equal precision.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the experiment's TOML config")
    source.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        help="evaluate this run instead of training (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="folder (default: runs/compare_<name>)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (default 0,1,2)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"models to train (default {','.join(KINDS)})"
    )
    parser.add_argument("--bits", default="8,4", help="post-training widths (default 8,4)")
    parser.add_argument(
        "--qat", default="4", help="widths to train with QAT, '' for none (default 4)"
    )
    parser.add_argument(
        "--profiles",
        default="cmos45,cmos45_int8",
        help=f"energy profiles, comma-separated (default cmos45,cmos45_int8; known: "
        f"{energy_profile_names()})",
    )
    parser.add_argument(
        "--reuse-finished",
        action="store_true",
        help="read back runs already finished in <out>/runs instead of training them again",
    )
    _add_device(parser)
    _add_set(parser)
    return parser


@_command
def compare_main(argv: Sequence[str] | None = None) -> int:
    """Spiking MoE vs dense SNN vs ANN twin at every precision; ``comparison.md``/``.json``/
    ``.png`` and TensorBoard. Exit code."""
    args = compare_parser().parse_args(argv)
    _setup_logging()
    config = load_config(args.config) if args.config else None
    checkpoints = args.checkpoint or ()
    missing = [str(c) for c in checkpoints if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {missing}")
    out = args.out or Path("runs") / f"compare_{comparison_name(config, checkpoints)}"
    comparison, stopped_by = run_comparison(
        config,
        out,
        seeds=_int_list(args.seeds, "--seeds") if config else (),
        kinds=[k for k in args.kinds.split(",") if k],
        bits=_int_list(args.bits, "--bits"),
        qat_bits=_int_list(args.qat, "--qat") if args.qat else (),
        profiles=[p for p in args.profiles.split(",") if p],
        checkpoints=checkpoints,
        overrides=_overrides(args),
        reuse_finished=args.reuse_finished,
    )
    if comparison is None:
        logger.warning("comparison interrupted while training; rerun with --reuse-finished")
        return 128 + (stopped_by or 0)
    print(comparison.to_markdown())
    return 0


# --------------------------------------------------------------------------- export


def export_parser() -> argparse.ArgumentParser:
    """The argument parser of ``export_main`` (the CLI reference is generated from it)."""
    from .nir import DEFAULT_DT

    parser = argparse.ArgumentParser(
        prog="spiking-moe-export",
        description="Export a trained spiking model as a NIR deployment bundle: one NIR graph "
        "per part (input, experts, router projection, output neurons, readout) and "
        "manifest.json with the routing rule.",
    )
    _add_checkpoint(parser)
    parser.add_argument("--out", required=True, type=Path, help="bundle folder, e.g. runs/x/nir")
    parser.add_argument(
        "--dt",
        type=float,
        default=DEFAULT_DT,
        help=f"time step the NIR time constants are written for (default {DEFAULT_DT}, "
        "what snnTorch's import_from_nir assumes)",
    )
    _add_set(parser)
    return parser


@_command
def export_main(argv: Sequence[str] | None = None) -> int:
    """Export a trained model as a NIR bundle; print each part's size. Exit code."""
    from .nir import export_bundle

    args = export_parser().parse_args(argv)
    _setup_logging()
    model, config = load_trained_model(args.checkpoint, overrides=_overrides(args))
    if config.data.name == "text" or not is_spiking(model):
        raise ConfigError(
            f"{args.checkpoint} holds a {type(model).__name__}: a NIR bundle holds a spiking "
            "classifier (model.kind 'moe' or 'dense_snn', trained on other data than text)"
        )
    summaries = export_bundle(model, args.out, dt=args.dt)
    lines = ["| part | neurons | synapses | largest fan-in |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| {s.name} | {s.neurons:,} | {s.synapses:,} | {s.max_fan_in:,} |" for s in summaries
    ]
    print("\n".join(lines))
    logger.info("bundle written to %s (manifest.json and %d NIR files)", args.out, len(summaries))
    return 0


# --------------------------------------------------------------------------- generate


def generate_parser() -> argparse.ArgumentParser:
    """The argument parser of ``generate_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-generate",
        description="Continue a prompt with a trained spiking (or ANN) language model.",
    )
    _add_checkpoint(parser)
    parser.add_argument("--prompt", default="def ", help='text to continue (default "def ")')
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature (0: most likely byte)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling stream")
    _add_device(parser)
    return parser


@_command
def generate_main(argv: Sequence[str] | None = None) -> int:
    """Sample bytes after a prompt from a trained language model and print them. Exit code."""
    args = generate_parser().parse_args(argv)
    _setup_logging()
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    model, _ = load_language_model(args.checkpoint, device=args.device)
    text = generate_text(
        model, args.prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    print(text)
    return 0


# --------------------------------------------------------------------------- gather


def gather_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gather_main`` (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="spiking-moe-gather",
        description="Turn the sharded checkpoint of an expert-parallel run (train.expert_parallel "
        "> 1: an index checkpoint.pt and one checkpoint.expert<i>of<P>.step<s>.pt per expert "
        "shard) into one single-process checkpoint: every expert, the optimizer state in the "
        "whole model's order, train.expert_parallel = 1. Evaluation, energy reports, export and "
        "single-process resume read it.",
    )
    _add_checkpoint(parser, "the run's index, runs/<name>/checkpoint.pt")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder for the gathered checkpoint.pt (and config.json), e.g. runs/<name>/gathered",
    )
    return parser


@_command
def gather_main(argv: Sequence[str] | None = None) -> int:
    """Gather an expert-parallel checkpoint into a single-process one. Exit code."""
    args = gather_parser().parse_args(argv)
    _setup_logging()
    print(gather_checkpoint(args.checkpoint, args.out))
    return 0


#: Each console script (``pyproject.toml``'s ``[project.scripts]``) and its argument parser:
#: the docs' CLI reference is generated from these, so it cannot drift from the commands.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "spiking-moe-train": train_parser,
    "spiking-moe-energy-report": energy_report_parser,
    "spiking-moe-sweep": sweep_parser,
    "spiking-moe-generate": generate_parser,
    "spiking-moe-compare": compare_parser,
    "spiking-moe-export": export_parser,
    "spiking-moe-gather": gather_parser,
}
