"""A trained run, read back: rebuilt from its checkpoint, evaluated, re-counted, gathered.

:func:`load_run` rebuilds a run from its checkpoint (the stored config with overrides, the
data, the model and its weights) without building an optimizer or reseeding anything; every
command that reads a checkpoint goes through it (the energy re-count, the precision
comparison, the NIR export, text generation, and the gather's check). What it rebuilds is
what :func:`~spiking_moe.experiment.run_experiment` built: :func:`build_loaders` and
:func:`build_model_for` are shared, and the test set is evaluated by the same
:func:`~spiking_moe.training.evaluate`, so a re-evaluation gives the run's logged numbers.

:func:`evaluate_checkpoint` re-counts a run's test-set energy under any profile (optionally at
the profile's precision, :func:`quantize_trained`); :func:`gather_checkpoint` turns an
expert-parallel run's sharded checkpoint into the single-process one the readers take;
:func:`generate_text` samples from a language model.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, apply_overrides
from .data import DATASETS, TEXT_VOCAB, BatchLoader, DataSplits, build_datasets
from .factory import build_model
from .quantization import SUPPORTED_BITS, CalibrationError, is_spiking, prepare_qat, quantize_model
from .training import (
    CHECKPOINT_NAME,
    DistInfo,
    EnergyReportCallback,
    EvaluationContext,
    check_single_process,
    evaluate,
    gather_expert_checkpoint,
    load_checkpoint,
    profile_precision,
    resolve_device,
    save_checkpoint,
    write_energy_report,
)

__all__ = [
    "CALIBRATION_BATCHES",
    "CheckpointEvaluation",
    "LoadedRun",
    "build_loaders",
    "build_model_for",
    "config_from_checkpoint",
    "evaluate_checkpoint",
    "evaluate_test_set",
    "gather_checkpoint",
    "generate_text",
    "load_language_model",
    "load_run",
    "load_trained_model",
    "model_weight_bits",
    "quantize_trained",
    "write_profile_report",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- a run's parts


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


def config_from_checkpoint(state: dict, path: Path) -> ExperimentConfig:
    """The experiment config that :func:`~spiking_moe.experiment.run_experiment` stored in a
    checkpoint that holds a whole model.

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


# --------------------------------------------------------------------------- loading a run


@dataclass(frozen=True)
class LoadedRun:
    """A run rebuilt from its checkpoint by :func:`load_run`.

    Attributes:
        config: the stored experiment config, overrides applied.
        model: the trained model: its weights loaded, on ``config.train.device``, in eval mode.
        data: the run's datasets (None when loaded with ``data=False``).
        step: the checkpoint's optimizer step.
        checkpoint: the file read.
    """

    config: ExperimentConfig
    model: torch.nn.Module
    data: DataSplits | None
    step: int
    checkpoint: Path


def load_run(
    checkpoint: str | Path,
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
    data: bool = True,
    check: Callable[[ExperimentConfig], None] | None = None,
) -> LoadedRun:
    """Rebuild a run from its checkpoint: the config it stored (with ``overrides``), its data,
    its model and the model's weights. Builds no optimizer and draws from no random
    generator (the model's initial weights, overwritten by the checkpoint's, are drawn from a
    forked generator), so loading a run changes nothing in the caller's process.

    Args:
        checkpoint: ``runs/<name>/checkpoint.pt`` (read with ``weights_only=True``).
        overrides: ``section.key=value`` applied to the stored config (e.g. a moved
            ``data.root`` or another ``train.eval_batch_size``).
        device: overrides ``train.device``, where the model goes.
        data: build the datasets (their shapes size the model) and return them; with False
            none are returned, and a text run's model, whose shapes are fixed (a byte
            vocabulary), is built without reading its corpus.
        check: called with the config before any data is read (validation that must come
            before work, e.g. of a command's other flags).

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint`` (or no data files).
        CheckpointError: the checkpoint is damaged (CheckpointLayoutError: it is an
            expert-parallel one; :func:`gather_checkpoint` it first).
        ConfigError: the checkpoint holds no (or an invalid) experiment config, a bad
            override, an unusable device; or what ``check`` raises.
    """
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    overrides = [*overrides, *([f"train.device={device}"] if device else [])]
    config = apply_overrides(config_from_checkpoint(state, checkpoint), overrides)
    target = resolve_device(config.train.device)
    if check is not None:
        check(config)
    splits = None
    if data or config.data.name != "text":
        config.data.check_files()
        splits = build_datasets(config.data)
    # The initial weights are replaced by the checkpoint's: draw them from a forked generator.
    with torch.random.fork_rng(devices=[]):
        model = build_model_for(config, splits) if splits is not None else _language_model(config)
    model.load_state_dict(state["model"])
    return LoadedRun(
        config, model.to(target).eval(), splits if data else None, int(state["step"]), checkpoint
    )


def _language_model(config: ExperimentConfig) -> torch.nn.Module:
    """A text run's model, whose shapes (a byte vocabulary) need no corpus."""
    return build_model(
        config.model,
        in_features=TEXT_VOCAB,
        num_classes=TEXT_VOCAB,
        num_steps=config.data.num_steps or DATASETS["text"].default_steps,
        context=config.data.context,
    )


def load_trained_model(
    checkpoint: str | Path, *, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The model a run trained, rebuilt from its checkpoint on the CPU in eval mode
    (:func:`load_run` with ``device="cpu"``), and the config (``overrides`` applied).

    Raises:
        as :func:`load_run`.
    """
    run = load_run(checkpoint, overrides=overrides, device="cpu", data=False)
    return run.model, run.config


def load_language_model(
    checkpoint: str | Path, *, device: str | None = None
) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The language model a text run trained, rebuilt from its checkpoint without reading
    its corpus (:func:`load_run`), in eval mode on ``device`` (default the run's).

    Raises:
        ConfigError: the checkpoint is not a text run's; and as :func:`load_run`.
    """

    def is_text(config: ExperimentConfig) -> None:
        if config.data.name != "text":
            raise ConfigError(
                f"{checkpoint} is a {config.data.name!r} run; only data.name = 'text' runs are "
                "language models"
            )

    run = load_run(checkpoint, device=device, data=False, check=is_text)
    return run.model, run.config


# --------------------------------------------------------------------------- evaluation


def evaluate_test_set(
    model: torch.nn.Module,
    config: ExperimentConfig,
    test_loader,
    *,
    step: int = 0,
    profile: str | None = None,
    num_batches: int = 0,
) -> tuple[dict[str, float], EnergyReportCallback | None]:
    """Test metrics of ``model`` as :func:`~spiking_moe.experiment.run_experiment` computed
    them (:func:`~spiking_moe.training.evaluate` on ``train.device``, with its AMP and compile
    settings), and its energy counts under ``profile`` (None: not counted; ``num_batches``
    caps the batches counted, 0 all).

    Returns:
        ``(metrics, callback)``: the ``test/...`` metrics and the
        :class:`~spiking_moe.training.EnergyReportCallback` that counted (None without a
        profile).
    """
    callbacks = []
    if profile is not None:
        callbacks.append(EnergyReportCallback(profile, num_batches=num_batches, prefixes=("test",)))
    device = resolve_device(config.train.device)
    model = model.to(device)
    metrics = evaluate(
        model,
        test_loader,
        device=device,
        prefix="test",
        callbacks=callbacks,
        amp=config.train.amp,
        forward=torch.compile(model) if config.train.compile else None,
        context=EvaluationContext(model, device, step=step),
    )
    logger.info(
        "step %d: %s",
        step,
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.count("/") == 1),
    )
    return metrics, (callbacks[0] if callbacks else None)


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` returns.

    Attributes:
        config: the experiment config stored in the checkpoint (overrides applied).
        step: the checkpoint's optimizer step.
        metrics: the test evaluation's metrics (``test/accuracy``, ``test/loss``,
            ``test/energy/...``), computed exactly as
            :func:`~spiking_moe.experiment.run_experiment` computed them.
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    profile: str,
    *,
    device: str | None = None,
    num_batches: int = 0,
    overrides: Sequence[str] = (),
    quantize: bool = False,
) -> CheckpointEvaluation:
    """Rebuild a run from its checkpoint (:func:`load_run`), evaluate it on the test set and
    count its energy there under ``profile``.

    A QAT run (``train.quantize_bits``) is evaluated as it trained: fake-quantized weights
    (:func:`~spiking_moe.quantization.prepare_qat`; for a spiking model the same spikes as its
    integer model, for an ANN float activations, as in training). With ``quantize`` and a
    profile that prices narrower weights than the model has (``cmos45_int8``, ``loihi``: 8
    bits, for an fp32 model), the model is also quantized to the profile's ``weight_bits``
    (:func:`quantize_trained`; an ANN's activations to the profile's ``activation_bits``) and
    evaluated again: the report then holds both accuracies, and its energy is that of the
    quantized model, the one the profile prices. Without ``quantize`` such a report says the
    accuracy at the profile's precision was not measured.

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
        ConfigError: unknown profile (the message lists the known ones); ``quantize`` under a
            profile whose precision :mod:`spiking_moe.quantization` does not provide (the
            message names the bits); see also :func:`load_run`.
        FileNotFoundError: no checkpoint at ``checkpoint``.
        CheckpointError: the checkpoint is damaged (CheckpointLayoutError: it is an
            expert-parallel one; :func:`gather_checkpoint` it first).
    """
    weight_bits, activation_bits = profile_precision(profile)  # checks the name

    def check_precision(config: ExperimentConfig) -> None:
        if quantize and weight_bits < model_weight_bits(config):
            _check_profile_precision(profile, config)

    run = load_run(checkpoint, overrides=overrides, device=device, check=check_precision)
    config, trained = run.config, run.model
    bits = model_weight_bits(config)
    to_quantize = quantize and weight_bits < bits
    train_loader, _, test_loader = build_loaders(config, run.data)
    model = prepare_qat(trained, bits) if bits < 32 else trained
    metrics, counted = evaluate_test_set(
        model,
        config,
        test_loader,
        step=run.step,
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
        quantized_metrics, counted = evaluate_test_set(
            quantized, config, test_loader, step=run.step, profile=profile, num_batches=num_batches
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
        config, run.step, metrics, report, counted.samples, bits, quantized_metrics
    )


def _check_profile_precision(profile: str, config: ExperimentConfig) -> None:
    """Fail before any work when the profile's precision is one quantization cannot give."""
    weight_bits, activation_bits = profile_precision(profile)
    if weight_bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"--quantize: profile {profile!r} prices {weight_bits}-bit weights; "
            f"quantization provides {list(SUPPORTED_BITS)} bits"
        )
    if config.model.kind == "ann" and activation_bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"--quantize: profile {profile!r} prices {activation_bits}-bit "
            f"activations (spikes), which an ANN ({config.model.kind!r}) cannot run at; "
            f"quantization provides {list(SUPPORTED_BITS)}-bit activations"
        )


def write_profile_report(out: Path, evaluation: CheckpointEvaluation, profile: str) -> None:
    """``report_<profile>.json``/``.md``, ``metrics_<profile>.json`` (the test metrics as run
    and, when quantized, at the profile's precision: a language model's bits per byte live
    there) and the report in TensorBoard (tags ``test_energy_<profile>/...`` at the
    checkpoint's step) in ``out``."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / f"report_{profile}.json").write_text(evaluation.report.to_json())
    (out / f"report_{profile}.md").write_text(evaluation.report.to_markdown())
    metrics = {"metrics": evaluation.metrics, "quantized_metrics": evaluation.quantized_metrics}
    (out / f"metrics_{profile}.json").write_text(json.dumps(metrics, indent=2) + "\n")
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
    export and a single-process resume read the result; it is checked by reading it back
    through :func:`load_run` (its weights into the model its config describes, sized by the
    run's data, which must be readable here unless it is a text run). Returns its path.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint`` (or no data files to size the model).
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
    load_run(target, device="cpu", data=False)  # every single-process reader takes it
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
        raise ConfigError("the prompt must not be empty (the model needs a byte to start from)")
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature, generator=generator)
    return bytes(out.tolist()).decode("utf-8", errors="replace")
