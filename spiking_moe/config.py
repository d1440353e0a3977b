"""Experiment configuration: small dataclasses read from TOML (stdlib ``tomllib``).

A config file has an optional top-level ``name`` and the tables ``[data]``, ``[model]``
(with the nested tables of the model's parts: ``[model.neuron]``, ``[model.router]``,
``[model.expert]``, ``[model.moe]``, ``[model.attention]``; :mod:`spiking_moe.args`),
``[train]`` and ``[energy]``; every key is optional and defaults to the field's default::

    name = "digits_moe"
    [data]
    name = "digits"
    encoding = "rate"
    [model]
    kind = "moe"
    [model.moe]
    num_experts = 4
    k = 1
    [train]
    epochs = 20
    lr = 3e-3

Validation is strict and early (the rules of :mod:`spiking_moe.args`): an unknown table or
key, a value of the wrong type, out of range or not among the allowed choices raises
:class:`ConfigError` naming the field (``train.lr must be > 0.0, got -1.0``) and, where there is
a fixed set, the allowed values. Every field's meaning, default and allowed values are in its
declaration (``Options.describe()`` lists them).

**Old flat model keys.** Before the nested tables, the model's options were flat keys of
``[model]`` (``num_experts``, ``router_noise``, ``beta``, ...). They keep working, in files,
checkpoints and ``--set``, each read as its nested field
(:data:`spiking_moe.args.FLAT_NAMES`) with a warning naming the new key; a file that gives a
flat key and its nested field both is an error naming both.

Overrides (``--set section.key=value`` on the command line, :func:`apply_overrides`) are TOML
values too (``train.lr=3e-3``, ``model.router.kind="spiking"``; a bare word is a string:
``data.encoding=latency``) and go through exactly the same validation.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .args import FLAT_NAMES, READOUTS, ConfigError, ModelArgs, Options, documented, option
from .args import ROUTER_KINDS as ROUTERS
from .data import DATASETS, EVENT_READERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "READOUTS",
    "ROUTERS",
    "MODEL_KINDS",
    "SCHEDULES",
    "ConfigError",
    "DataConfig",
    "EnergyConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "parse_override",
]

logger = logging.getLogger(__name__)

#: ``model.kind`` values: the spiking MoE (``"moe"``), the dense spiking network with its active
#: parameters (``"dense_snn"``), the same layers with ReLU for one step (``"ann"``).
MODEL_KINDS = ("moe", "dense_snn", "ann")
#: ``train.schedule`` values: after warmup the learning rate decays as a cosine to
#: ``train.min_lr_ratio`` times ``train.lr`` (``"cosine"``) or stays (``"constant"``).
SCHEDULES = ("cosine", "constant")


@documented
@dataclass(frozen=True)
class DataConfig(Options):
    """``[data]``: which dataset and how it is presented over time. What is allowed per
    dataset comes from its :class:`~spiking_moe.data.DatasetSpec`
    (:data:`spiking_moe.data.DATASETS <spiking_moe.data.registry.DATASETS>`)."""

    section: ClassVar[str] = "data"
    name: str = option("digits", choices=tuple(DATASETS), doc="The dataset.")
    encoding: str = option(
        "default",
        doc="How samples become inputs over time; default: the dataset's first encoding "
        "(digits rate, mnist1d sequence, shd/nmnist events, text tokens).",
    )
    num_steps: int = option(0, ge=0, doc="Time steps T; 0: the dataset's default.")
    root: str = option(
        "",
        doc="Folder of the local files of shd (shd_train.h5, shd_test.h5) or nmnist "
        "(Train/, Test/).",
    )
    val_fraction: float = option(
        0.1, ge=0.0, lt=1.0, doc="Share of the training set held out for validation."
    )
    test_fraction: float = option(
        0.2, gt=0.0, lt=1.0, doc="Share held out for testing (digits; the others ship a test set)."
    )
    seed: int = option(0, doc="Seed of the splits (fixed across train.seed).")
    max_time_s: float = option(
        0.0, ge=0.0, doc="Event data: binned over [0, max_time_s); 0: the dataset's default."
    )
    event_reader: str = option(
        "native",
        choices=EVENT_READERS,
        doc='shd, nmnist: our readers, or tonic (pip install "spiking-moe[events]"), '
        "which bins into the same frames.",
    )
    mnist1d_num_samples: int = option(5000, ge=100, doc="MNIST-1D: samples generated.")
    mnist1d_seed: int = option(42, doc="MNIST-1D: seed of the generator.")
    # A tuple, not a list: the config is frozen and hashable; TOML arrays are accepted.
    text_paths: tuple[str, ...] = option(
        (),
        doc="Text: files or folders read recursively as bytes; empty: the Python standard "
        "library's source.",
    )
    context: int = option(64, ge=1, doc="Text: window length S in bytes.")
    eval_windows: int = option(
        512, ge=0, doc="Text: windows of val and test, evenly spaced; 0: all."
    )

    def _check(self) -> None:
        spec = DATASETS[self.name]
        allowed = ("default", *spec.encodings)
        if self.encoding not in allowed:
            raise ConfigError(
                f"data.encoding must be one of {list(allowed)} for dataset {self.name!r}, "
                f"got {self.encoding!r}"
            )
        encoding = spec.encodings[0] if self.encoding == "default" else self.encoding
        fixed = spec.fixed_steps.get(encoding)
        if fixed is not None and self.num_steps not in (0, fixed):
            raise ConfigError(
                f"data.num_steps must be {fixed} (or 0) for {self.name!r} encoding "
                f"{encoding!r}, got {self.num_steps}"
            )
        if self.event_reader not in spec.event_readers:
            raise ConfigError(
                f"data.event_reader must be one of {list(spec.event_readers)} for dataset "
                f"{self.name!r} (the readers apply to event files), got {self.event_reader!r}"
            )
        if spec.files and not self.root:
            raise ConfigError(f"data.root must name the folder with the local {self.name} files")
        if not spec.ships_test_set and self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "data.val_fraction + data.test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        for i, path in enumerate(self.text_paths):
            if not path.strip():
                raise ConfigError(f"data.text_paths[{i}] must name a file or folder, got {path!r}")

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming the field (``data.root``, ``data.text_paths[i]``)
        and the path if the dataset's files are missing."""
        spec = DATASETS[self.name]
        missing = [p for p in spec.expected_files(self.root) if not p.exists()]
        if missing:
            raise ConfigError(
                f"data.root: dataset {self.name!r} needs "
                f"{', '.join(str(p) for p in missing)}, which do not exist"
            )
        absent = spec.missing_paths(self)
        if absent:
            raise ConfigError(", ".join(f"{where}: {p} does not exist" for where, p in absent))


@documented
@dataclass(frozen=True)
class ModelConfig(ModelArgs):
    """``[model]``: which model, and its :class:`~spiking_moe.args.ModelArgs` (the nested
    tables). Input and class counts come from the data; with ``data.name = "text"`` the same
    kinds build language models (:mod:`spiking_moe.transformer`), ``hidden_features`` being
    ``d_model`` and ``num_layers`` the transformer blocks."""

    kind: str = option(
        "moe",
        choices=MODEL_KINDS,
        doc="moe: the spiking MoE; dense_snn: the dense spiking network with its active "
        "parameters; ann: the same layers with ReLU, one step (routed when moe.num_experts > 1, "
        "else dense).",
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """As :meth:`Options.from_dict`, also reading the old flat keys (module docstring)."""
        if not isinstance(raw, Mapping):
            return super().from_dict(raw)
        # A flat key is one that is no field here, or names a nested table but holds a plain
        # value (the old ``router = "rate"`` is now ``router.kind``).
        tables = {f.name for f in fields(cls) if isinstance(getattr(cls(), f.name), Options)}
        own = {f.name for f in fields(cls)}
        nested = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
        flat = [
            k
            for k, v in raw.items()
            if k in FLAT_NAMES and (k not in own or (k in tables and not isinstance(v, Mapping)))
        ]
        for key in sorted(flat, key=lambda k: k not in tables):  # a table's own key first
            path, convert = FLAT_NAMES[key]
            *parents, name = path.split(".")
            value = nested.pop(key)
            table = nested
            for part in parents:
                table = table.setdefault(part, {})
            if not isinstance(table, dict):
                nested[key] = value  # reported as "must be a table" by the validation below
                continue
            if name in table:
                raise ConfigError(
                    f"model.{key} and model.{path} are the same option given twice; "
                    f"keep model.{path}"
                )
            table[name] = convert(value) if convert is not None else value
            logger.warning("config key model.%s is now model.%s (read as such)", key, path)
        return super().from_dict(nested)


def _device_error(device: str) -> str | None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        return f"train.device must be one of ['auto', 'cpu', 'cuda', 'cuda:N'], got {device!r}"
    return None


@documented
@dataclass(frozen=True)
class TrainConfig(Options):
    """``[train]``: optimisation, devices, checkpoints and logging. Steps are optimizer steps
    (:mod:`spiking_moe.training.trainer` has the objective and the schedule)."""

    section: ClassVar[str] = "train"
    epochs: int = option(10, ge=1, doc="Full epochs to train when max_steps is 0.")
    max_steps: int = option(
        0, ge=0, doc="Stop after this many optimizer steps (the schedule spans them); 0: epochs."
    )
    batch_size: int = option(64, ge=1, doc="Samples per micro-batch (per process).")
    grad_accum_steps: int = option(1, ge=1, doc="Micro-batches per optimizer step.")
    eval_batch_size: int = option(256, ge=1, doc="Samples per evaluation batch.")
    lr: float = option(1e-3, gt=0.0, doc="Peak learning rate of AdamW.")
    weight_decay: float = option(0.01, ge=0.0, doc="AdamW weight decay.")
    schedule: str = option(
        "cosine", choices=SCHEDULES, doc="Learning rate after warmup: cosine decay or constant."
    )
    warmup_steps: int = option(0, ge=0, doc="Linear warmup steps.")
    min_lr_ratio: float = option(
        0.0, ge=0.0, le=1.0, doc="Floor of the cosine decay, as a fraction of lr."
    )
    grad_clip: float = option(1.0, ge=0.0, doc="Clip the gradient norm to this; 0: no clipping.")
    spike_rate_penalty: float = option(
        0.0,
        ge=0.0,
        doc="Weight of mean over populations of max(0, firing rate - spike_rate_target) in the "
        "loss (fewer spikes, less energy); 0: off.",
    )
    spike_rate_target: float = option(
        0.0, ge=0.0, le=1.0, doc="Firing rate above which the penalty acts."
    )
    seed: int = option(0, doc="Seed of the model's initialisation, data order and noise.")
    device: str = option("auto", doc="auto (CUDA when present), cpu, cuda or cuda:N.")
    amp: bool = option(False, doc="bf16 autocast on CUDA (ignored with a warning on CPU).")
    compile: bool = option(False, doc="torch.compile the model.")
    eval_every: int = option(
        0, ge=0, doc="Evaluate (and checkpoint) every this many steps; 0: at each epoch end."
    )
    checkpoint_every: int = option(0, ge=0, doc="Also checkpoint every this many steps.")
    log_every: int = option(10, ge=1, doc="Log training metrics every this many steps.")
    progress: bool = option(True, doc="Show a progress bar (on a terminal).")
    find_unused_parameters: bool = option(
        True, doc="DDP: expect parameters without gradient (idle experts)."
    )
    quantize_bits: int = option(
        0,
        choices=(0, 8, 4),
        doc="0 trains in float; 8 or 4 trains with fake-quantized weights of that width (QAT).",
    )
    expert_parallel: int = option(
        1,
        ge=1,
        doc="Processes that split each MoE layer's experts (spiking_moe.parallel); must divide "
        "the world size and every layer's expert count; 1: every process holds every expert.",
    )
    distill_from: str = option(
        "",
        doc="A trained run's checkpoint.pt whose logits teach this model (logit distillation: "
        "the loss mixes the cross-entropy with the teacher's; same classes or vocabulary); "
        "empty: off.",
    )
    distill_weight: float = option(
        0.5,
        ge=0.0,
        le=1.0,
        doc="alpha of loss = (1 - alpha) cross-entropy + alpha tau^2 KL(teacher || model).",
    )
    distill_temperature: float = option(
        1.0, gt=0.0, doc="tau: both logits are divided by it before the KL."
    )

    def _check(self) -> None:
        if self.device != "auto":
            error = _device_error(self.device)
            if error:
                raise ConfigError(error)


@documented
@dataclass(frozen=True)
class EnergyConfig(Options):
    """``[energy]``: the energy report written after training."""

    section: ClassVar[str] = "energy"
    enabled: bool = option(True, doc="Count the test set's energy and write the report.")
    profile: str = option(
        "cmos45", doc="Hardware profile of energy.profiles (checked when the report is built)."
    )
    num_batches: int = option(0, ge=0, doc="Test batches to count; 0: the whole test set.")

    def _check(self) -> None:
        if not self.profile:
            raise ConfigError("energy.profile must name a profile, got ''")


_SECTIONS: dict[str, type[Options]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "energy": EnergyConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one TOML file (:func:`load_config`, :meth:`from_dict`).

    Attributes:
        name: the run's name (a file's ``name``, else its stem); the command line's default
            run folder is ``runs/<name>``.
        data: the ``[data]`` table: dataset and encoding (:class:`DataConfig`).
        model: the ``[model]`` table: model kind and its nested parts (:class:`ModelConfig`).
        train: the ``[train]`` table: optimisation, devices, checkpoints (:class:`TrainConfig`).
        energy: the ``[energy]`` table: the energy report (:class:`EnergyConfig`).
    """

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, default_name: str = "experiment"
    ) -> ExperimentConfig:
        """Build from a parsed TOML document; raises :class:`ConfigError` naming the field.

        Example:
            >>> ExperimentConfig.from_dict({"model": {"moe": {"num_experts": 4, "k": 2}}}).model.moe.k
            2
            >>> ExperimentConfig.from_dict({"train": {"lr": -1}})
            Traceback (most recent call last):
            ...
            spiking_moe.args.ConfigError: train.lr must be > 0.0, got -1.0
        """
        allowed_top = ["name", *_SECTIONS]
        unknown = sorted(set(raw) - set(allowed_top))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} at top level; allowed: {allowed_top}")
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        built = {key: section.from_dict(raw.get(key, {})) for key, section in _SECTIONS.items()}
        return cls(name=name, **built)


def load_config(path: str | Path, *, check_files: bool = True) -> ExperimentConfig:
    """Read and validate a TOML experiment config.

    Args:
        path: the ``.toml`` file; its stem is the default ``name``.
        check_files: also check that the dataset's local files exist (``data.root``).

    Returns:
        The validated :class:`ExperimentConfig`; keys the file omits take their defaults.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: TOML syntax error, unknown key, wrong type or bad value (names the field).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        config = ExperimentConfig.from_dict(raw, default_name=path.stem)
        if check_files:
            config.data.check_files()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict (TOML-shaped; ``None`` fields dropped), safe for JSON and checkpoints."""
    return {"name": config.name, **{k: getattr(config, k).to_dict() for k in _SECTIONS}}


def flatten_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"train.lr": 0.001, "model.router.noise": 0.0, ...}``: one level, for TensorBoard
    hparams (lists as strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value) if isinstance(value, list) else value

    walk("", config_to_dict(config))
    return flat


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"train.lr=3e-3"`` -> ``(("train", "lr"), 0.003)``.

    The value is read as a TOML value (numbers, booleans, quoted strings, arrays); anything
    that is not valid TOML is taken as a plain string, so ``data.encoding=latency`` works.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set needs section.key=value (e.g. train.lr=3e-3), got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return tuple(key.split(".")), value


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``config`` with ``section.key=value`` overrides (``model.router.noise=0.1``: nested
    tables too; an old flat model key is read as its nested field) applied and validated like
    TOML values.

    Example:
        >>> apply_overrides(ExperimentConfig(), ["train.lr=3e-3", "model.moe.k=1"]).train.lr
        0.003
        >>> apply_overrides(ExperimentConfig(), ["train.lr=fast"])
        Traceback (most recent call last):
        ...
        spiking_moe.args.ConfigError: train.lr must be a number, got 'fast' (with --set train.lr=fast)

    Raises:
        ConfigError: malformed override, unknown section or key, or a bad value (the message
            names the override and the field).
    """
    raw = config_to_dict(config)
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            if path[0] != "name":
                raise ConfigError(
                    f"--set {text}: top-level key must be 'name' or section.key, got {path[0]!r}"
                )
            raw["name"] = value
            continue
        section, *keys = path
        if section not in _SECTIONS:
            raise ConfigError(
                f"--set {text}: unknown section {section!r}; valid: {list(_SECTIONS)}"
            )
        if section == "model" and len(keys) == 1 and keys[0] in FLAT_NAMES:
            if keys[0] not in {f.name for f in fields(ModelConfig)}:
                nested, convert = FLAT_NAMES[keys[0]]
                keys = nested.split(".")
                value = convert(value) if convert is not None else value
        if len(keys) > 1 and section != "model":
            raise ConfigError(f"--set {text}: key must be section.key, got {'.'.join(path)!r}")
        table = raw[section]
        for key in keys[:-1]:
            inner = table.setdefault(key, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"--set {text}: {section}.{key} is not a table")
            table = inner
        table[keys[-1]] = value
    # Validated once all are applied, so that e.g. num_experts and k can change together.
    try:
        return ExperimentConfig.from_dict(raw, default_name=config.name)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with --set {' '.join(overrides)})") from None
