"""Experiment configuration: small dataclasses read from TOML (stdlib ``tomllib``).

A config file has an optional top-level ``name`` and the tables ``[data]``, ``[model]``,
``[train]`` and ``[energy]``; every key is optional and defaults to the field's default::

    name = "digits_moe"
    [data]
    name = "digits"
    encoding = "rate"
    [model]
    kind = "moe"
    num_experts = 4
    k = 1
    [train]
    epochs = 20
    lr = 3e-3

Validation is strict and early: an unknown table or key, a value of the wrong type, a value
out of range or not among the allowed choices raises :class:`ConfigError` naming the field
(``train.lr must be > 0, got -1``) and, where there is a fixed set, the allowed values. TOML has
no null, so optional fields (``None`` by default) are set by giving a value and unset by
leaving the key out. Integers are accepted for float fields; booleans are not numbers.

Overrides (``--set section.key=value`` on the command line, :func:`apply_overrides`) are TOML
values too (``train.lr=3e-3``, ``model.router="spiking"``; a bare word is a string:
``data.encoding=latency``) and go through exactly the same validation.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .data import DATASETS, EVENT_READERS
from .functional.lif import RESETS
from .functional.surrogate import SURROGATES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "MODEL_KINDS",
    "READOUTS",
    "ROUTERS",
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

MODEL_KINDS = ("moe", "dense_snn", "ann")
ROUTERS = ("rate", "spiking")
READOUTS = ("count", "membrane")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _field(
    default: Any = dataclasses.MISSING,
    *,
    choices: tuple | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    meta = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le}
    return field(
        default=default,
        default_factory=default_factory,
        metadata={k: v for k, v in meta.items() if v is not None},
    )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(where, inner, value)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of {_type_name(inner)}, got {value!r}")
        return tuple(_coerce(f"{where}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {where}")  # pragma: no cover


class _Section:
    """Mixin: type and range checks of every field on construction."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            where = f"{self.section}.{f.name}"
            value = _coerce(where, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            meta = f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
            for key, ok, word in (
                ("gt", lambda v, b: v > b, ">"),
                ("ge", lambda v, b: v >= b, ">="),
                ("lt", lambda v, b: v < b, "<"),
                ("le", lambda v, b: v <= b, "<="),
            ):
                if key in meta and not ok(value, meta[key]):
                    raise ConfigError(f"{where} must be {word} {meta[key]}, got {value!r}")
        self._check()

    def _check(self) -> None:
        """Cross-field checks of one section."""


@dataclass(frozen=True)
class DataConfig(_Section):
    """``[data]``: which dataset and how it is presented over time.

    ``encoding = "default"`` takes the dataset's first encoding (digits "rate", mnist1d
    "sequence", shd/nmnist "events", text "tokens"); ``num_steps = 0`` and ``max_time_s = 0``
    take the dataset's default. What is allowed per dataset comes from its
    :class:`~spiking_moe.data.DatasetSpec` (:data:`spiking_moe.data.DATASETS`). ``root`` is the folder with the local
    files of shd (``shd_train.h5``, ``shd_test.h5``) or nmnist (``Train/``, ``Test/``).
    ``test_fraction`` applies to digits only (the others ship a test set).
    ``event_reader`` (shd, nmnist): "native" (default) or "tonic", which bins with the optional
    tonic package (``pip install "spiking-moe[events]"``) into the same frames; see
    :mod:`spiking_moe.data`.

    Text only (``name = "text"``, see :func:`spiking_moe.data.load_text_corpus`):
    ``text_paths`` lists text files or folders (read recursively; empty: the Python standard
    library's source), ``context`` is the window length S in bytes, ``eval_windows`` caps the
    windows of val and test (evenly spaced; 0 = all).
    """

    section: ClassVar[str] = "data"
    name: str = _field("digits", choices=tuple(DATASETS))
    encoding: str = "default"
    num_steps: int = _field(0, ge=0)
    root: str = ""
    val_fraction: float = _field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = _field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    max_time_s: float = _field(0.0, ge=0.0)
    event_reader: str = _field("native", choices=EVENT_READERS)
    mnist1d_num_samples: int = _field(5000, ge=100)
    mnist1d_seed: int = 42
    # A tuple, not a list: the config is frozen and hashable; TOML arrays are accepted.
    text_paths: tuple[str, ...] = ()
    context: int = _field(64, ge=1)
    eval_windows: int = _field(512, ge=0)

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


@dataclass(frozen=True)
class ModelConfig(_Section):
    """``[model]``: the classifier. Input and class counts come from the data.

    ``kind``: "moe" (spiking MoE), "dense_snn" (the dense spiking network with the same active
    parameters) or "ann" (same layers, ReLU, one step). ``hidden_features`` is the width of
    the spiking layer that feeds the MoE layers (the router's input); each expert is
    ``expert_layers`` hidden layers of ``expert_hidden`` LIF neurons. Balancing:
    ``load_balancing_weight`` (Switch loss), ``z_loss_weight`` (router z-loss),
    ``bias_balancing`` (update rate of the auxiliary-loss-free bias, 0 = off),
    ``capacity_factor`` (tokens per expert = factor * N * k / E; unset = no capacity limit).
    ``router_renormalize``: gates renormalised over the chosen ``k`` (with ``k = 1`` every gate
    is then 1 and the router learns from the balancing losses only); false gives Switch-style
    gates ``p`` (the router learns from the task loss too).

    With ``data.name = "text"`` the same kinds build language models
    (:mod:`spiking_moe.transformer`): ``hidden_features`` is ``d_model``, ``num_moe_layers``
    the number of transformer blocks, ``num_heads`` their attention heads (dividing
    ``d_model``), and each FFN has ``num_experts`` routed experts plus ``shared_experts``
    shared ones of width ``shared_hidden`` (0: ``expert_hidden``). The dense twin's FFN is
    ``k * expert_hidden + shared_experts * shared_hidden`` wide (the same active parameters).
    """

    section: ClassVar[str] = "model"
    kind: str = _field("moe", choices=MODEL_KINDS)
    hidden_features: int = _field(128, ge=1)
    num_experts: int = _field(4, ge=1)
    k: int = _field(1, ge=1)
    num_moe_layers: int = _field(1, ge=1)
    expert_hidden: int = _field(64, ge=1)
    expert_layers: int = _field(1, ge=1)
    readout: str = _field("count", choices=READOUTS)
    router: str = _field("rate", choices=ROUTERS)
    router_noise: float = _field(0.0, ge=0.0)
    router_window: int = _field(0, ge=0)
    router_renormalize: bool = True
    beta: float = _field(0.9, ge=0.0, le=1.0)
    threshold: float = _field(1.0, gt=0.0)
    reset: str = _field("subtract", choices=RESETS)
    surrogate: str = _field("fast_sigmoid", choices=tuple(sorted(SURROGATES)))
    alpha: float | None = _field(None, gt=0.0)
    load_balancing_weight: float = _field(0.01, ge=0.0)
    z_loss_weight: float = _field(0.001, ge=0.0)
    bias_balancing: float = _field(0.0, ge=0.0)
    capacity_factor: float | None = _field(None, gt=0.0)
    num_heads: int = _field(4, ge=1)
    shared_experts: int = _field(0, ge=0)
    shared_hidden: int = _field(0, ge=0)

    def _check(self) -> None:
        if self.k > self.num_experts:
            raise ConfigError(
                f"model.k must be <= model.num_experts ({self.num_experts}), got {self.k}"
            )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """``[train]``: optimisation, devices, checkpoints and logging.

    Steps are optimizer steps. ``max_steps = 0`` trains ``epochs`` full epochs; a positive
    value stops after that many steps (the schedule spans them). ``eval_every = 0`` evaluates
    (and checkpoints) at the end of each epoch, a positive value every that many steps;
    ``checkpoint_every`` adds checkpoints every that many steps. ``grad_clip = 0`` disables
    clipping. ``device``: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
    ``amp``: bf16 autocast on CUDA (ignored with a warning on CPU). ``compile``:
    ``torch.compile`` the model. ``spike_rate_penalty``: weight in the loss of
    ``mean over LIF modules of max(0, firing rate - spike_rate_target)`` (activity
    regularisation: fewer spikes, less energy; 0 = off; logged inside ``train/aux_loss``).
    ``quantize_bits``: 0 trains in float; 8 or 4 trains with quantization-aware (fake-quantized)
    weights of that width (:func:`spiking_moe.quantization.prepare_qat`).
    ``expert_parallel``: 1 keeps every expert in every process (plain DDP under ``torchrun``);
    ``P > 1`` splits each MoE layer's experts over groups of ``P`` processes
    (:mod:`spiking_moe.parallel`): ``P`` must divide the world size and every layer's expert
    count, and checkpoints are written as one file per expert shard plus an index.
    """

    section: ClassVar[str] = "train"
    epochs: int = _field(10, ge=1)
    max_steps: int = _field(0, ge=0)
    batch_size: int = _field(64, ge=1)
    grad_accum_steps: int = _field(1, ge=1)
    eval_batch_size: int = _field(256, ge=1)
    lr: float = _field(1e-3, gt=0.0)
    weight_decay: float = _field(0.01, ge=0.0)
    schedule: str = _field("cosine", choices=SCHEDULES)
    warmup_steps: int = _field(0, ge=0)
    min_lr_ratio: float = _field(0.0, ge=0.0, le=1.0)
    grad_clip: float = _field(1.0, ge=0.0)
    spike_rate_penalty: float = _field(0.0, ge=0.0)
    spike_rate_target: float = _field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    eval_every: int = _field(0, ge=0)
    checkpoint_every: int = _field(0, ge=0)
    log_every: int = _field(10, ge=1)
    progress: bool = True
    find_unused_parameters: bool = True
    quantize_bits: int = _field(0, choices=(0, 8, 4))
    expert_parallel: int = _field(1, ge=1)

    def _check(self) -> None:
        import torch

        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError):
                device = None
            if device is None or device.type not in ("cpu", "cuda"):
                raise ConfigError(
                    "train.device must be one of ['auto', 'cpu', 'cuda', 'cuda:N'], "
                    f"got {self.device!r}"
                )


@dataclass(frozen=True)
class EnergyConfig(_Section):
    """``[energy]``: the energy report written after training.

    ``profile`` names a hardware profile of :mod:`energy.profiles` (checked when the report
    is built); ``num_batches`` limits the test batches counted (0 = the whole test set).
    """

    section: ClassVar[str] = "energy"
    enabled: bool = True
    profile: str = "cmos45"
    num_batches: int = _field(0, ge=0)

    def _check(self) -> None:
        if not self.profile:
            raise ConfigError("energy.profile must name a profile, got ''")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one TOML file."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], *, default_name: str = "experiment"
    ) -> ExperimentConfig:
        """Build from a parsed TOML document; raises :class:`ConfigError` naming the field.

        Example:
            >>> ExperimentConfig.from_dict({"model": {"num_experts": 4, "k": 2}}).model.k
            2
            >>> ExperimentConfig.from_dict({"train": {"lr": -1}})
            Traceback (most recent call last):
            ...
            spiking_moe.config.ConfigError: train.lr must be > 0.0, got -1.0
        """
        sections = {
            "data": DataConfig,
            "model": ModelConfig,
            "train": TrainConfig,
            "energy": EnergyConfig,
        }
        allowed_top = ["name", *sections]
        unknown = sorted(set(raw) - set(allowed_top))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} at top level; allowed: {allowed_top}")
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        built = {}
        for key, section_cls in sections.items():
            table = raw.get(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{key} must be a table ([{key}]), got {table!r}")
            allowed = [f.name for f in fields(section_cls)]
            unknown = sorted(set(table) - set(allowed))
            if unknown:
                raise ConfigError(
                    f"unknown key(s) {[f'{key}.{u}' for u in unknown]}; allowed in [{key}]: {allowed}"
                )
            built[key] = section_cls(**table)
        return cls(name=name, **built)


def load_config(path: str | Path, *, check_files: bool = True) -> ExperimentConfig:
    """Read and validate a TOML experiment config.

    Args:
        path: the ``.toml`` file; its stem is the default ``name``.
        check_files: also check that the dataset's local files exist (``data.root``).

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

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, tuple):
            return list(obj)
        return obj

    return clean(asdict(config))


def flatten_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: one level, for TensorBoard hparams."""
    flat: dict[str, Any] = {}
    for key, value in config_to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
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
    """``config`` with ``section.key=value`` overrides applied and validated like TOML values.

    Example:
        >>> apply_overrides(ExperimentConfig(), ["train.lr=3e-3", "model.k=2"]).train.lr
        0.003
        >>> apply_overrides(ExperimentConfig(), ["train.lr=fast"])
        Traceback (most recent call last):
        ...
        spiking_moe.config.ConfigError: train.lr must be a number, got 'fast' (with --set train.lr=fast)

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
        if len(path) != 2:
            raise ConfigError(f"--set {text}: key must be section.key, got {'.'.join(path)!r}")
        section, key = path
        if not isinstance(raw.get(section), dict):
            sections = [k for k, v in raw.items() if isinstance(v, dict)]
            raise ConfigError(f"--set {text}: unknown section {section!r}; valid: {sections}")
        raw[section][key] = value
    # Validated once all are applied, so that e.g. num_experts and k can change together.
    try:
        return ExperimentConfig.from_dict(raw, default_name=config.name)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with --set {' '.join(overrides)})") from None
