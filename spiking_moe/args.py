"""Options of every model part, each declared once.

Every part of a model has one small frozen dataclass of options, in the style of torchtitan's
``MoEArgs``: :class:`NeuronArgs`, :class:`RouterArgs`, :class:`ExpertArgs`, :class:`MoEArgs`,
:class:`AttentionArgs`, and :class:`ModelArgs`, which nests them. An option's name, default,
allowed values, validation and description live in its declaration
(``option(default, doc=..., choices=..., ge=...)``) and nowhere else:

- the constructors (:class:`~spiking_moe.neurons.LIF`, the routers, experts, MoE layers and
  models) take the same names as keyword arguments and build these dataclasses, so an option
  added here is an option of every model that uses the part;
- the TOML config nests the same dataclasses as tables (``[model.neuron]``,
  ``[model.router]``, ...: :class:`spiking_moe.config.ModelConfig`);
- a model keeps the args it was built from (``model.args``), and the NIR bundle manifest
  writes them as they are (:mod:`spiking_moe.nir`).

Validation is strict and early: an unknown key, a value of the wrong type, out of range or not
among the allowed choices raises :class:`ConfigError` naming the field (``router.noise must be
>= 0.0, got -1.0``; from a config file ``model.router.noise ...``) and, where there is a fixed
set, the allowed values. TOML has no null, so an optional field (``None`` by default) is set by
giving a value and unset by leaving it out. Integers are accepted for float fields; booleans
are not numbers. A per-neuron ``beta`` or ``threshold`` is a list (a tuple here).

**Flat names.** The model constructors take flat keyword arguments (``num_experts=8``,
``noise=0.1``, ``beta=0.9``), and the config files before the nested tables used flat keys
(``model.num_experts``, ``model.router_noise``). :data:`FLAT_NAMES` maps each flat name to its
nested field, once; :func:`with_options` applies flat names to args.

Example:
    >>> args = ModelArgs().with_options(num_experts=4, k=1, noise=0.1, beta=0.8)
    >>> args.moe.num_experts, args.router.noise, args.neuron.beta
    (4, 0.1, 0.8)
    >>> RouterArgs(noise=-1.0)
    Traceback (most recent call last):
    ...
    spiking_moe.args.ConfigError: router.noise must be >= 0.0, got -1.0
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .functional.lif import IMPLEMENTATIONS, RESETS
from .functional.surrogate import SURROGATES

__all__ = [
    "FLAT_NAMES",
    "ArgsField",
    "AttentionArgs",
    "BlockArgs",
    "ConfigError",
    "ExpertArgs",
    "MoEArgs",
    "ModelArgs",
    "NeuronArgs",
    "Options",
    "RouterArgs",
    "documented",
    "option",
    "with_options",
]

NEURON_KINDS = ("lif", "multi")
NEURON_BACKENDS = ("native", "snntorch", "norse")
ATTENTION_KINDS = ("ssa", "spiking_softmax", "real_softmax", "ann")
RESIDUALS = ("spike", "membrane")
NORMS = ("none", "layer")
#: ``RouterArgs.kind`` values: ``"rate"`` (a Linear on the input's spike rates) or ``"spiking"``
#: (a LIF gating population); :data:`spiking_moe.router.ROUTERS` maps them to router classes.
ROUTER_KINDS = ("rate", "spiking")
#: ``ModelArgs.readout`` values: logits from the mean spike counts (``"count"``) or the mean
#: membrane of a non-firing leaky integrator on the readout current (``"membrane"``).
READOUTS = ("count", "membrane")
#: ``MoEArgs.grouped_gemm`` values: one grouped GEMM per layer for the experts ``"always"``,
#: ``"never"`` (one call per expert) or ``"auto"`` (on CUDA, and on CPU from 32 busy experts).
GROUPED_GEMM = ("auto", "never", "always")
#: ``MoEArgs.spike_exchange`` values: expert parallelism sends rows of spikes as ``"bits"`` (8 per
#: byte) or ``"float"``; ``"auto"``: bits when the input is spikes (by construction or checked).
SPIKE_EXCHANGE = ("auto", "bits", "float")


class ConfigError(ValueError):
    """An option or configuration value is unknown, of the wrong type or out of range."""


# The path of the table being built inside its parent's (``"model."`` while ``[model.router]``
# is read), so that errors name the whole path: ``model.router.noise``.
_PARENT: contextvars.ContextVar[str] = contextvars.ContextVar("options_parent", default="")


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: tuple | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field of an :class:`Options` class: its default, description and checks."""
    meta = {"doc": doc, "choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le}
    return field(
        default=default,
        default_factory=default_factory,
        metadata={k: v for k, v in meta.items() if v is not None},
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float, lists
    to tuples, tables to :class:`Options`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:
            return _coerce(where, options[0], value)
        # float | tuple[float, ...] (a per-neuron constant): a list takes the tuple form.
        sequence = isinstance(value, (list, tuple))
        chosen = next((o for o in options if (typing.get_origin(o) is tuple) == sequence), None)
        if chosen is None:
            raise ConfigError(f"{where} must be one of {[_type_name(o) for o in options]}")
        return _coerce(where, chosen, value)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of {_type_name(inner)}, got {value!r}")
        return tuple(_coerce(f"{where}[{i}]", inner, v) for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, Options):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            token = _PARENT.set(where.rsplit(".", 1)[0] + ".")
            try:
                return tp.from_dict(value)
            finally:
                _PARENT.reset(token)
        raise ConfigError(f"{where} must be a table ([{where}]), got {value!r}")
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
    raise TypeError(f"unsupported option annotation {tp!r} for {where}")  # pragma: no cover


_BOUNDS = (
    ("gt", lambda v, b: v > b, ">"),
    ("ge", lambda v, b: v >= b, ">="),
    ("lt", lambda v, b: v < b, "<"),
    ("le", lambda v, b: v <= b, "<="),
)


def _check_value(where: str, meta: Mapping[str, Any], value: Any) -> None:
    """Choices and bounds; a tuple is checked element by element."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_value(f"{where}[{i}]", meta, item)
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    for key, ok, word in _BOUNDS:
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{where} must be {word} {meta[key]}, got {value!r}")


class Options:
    """Base of the options dataclasses: type, choice and range checks of every field on
    construction; :meth:`from_dict` / :meth:`to_dict` for TOML and JSON.

    Subclasses are frozen dataclasses whose fields are :func:`option` s and set ``section``, the
    name errors start with (and the TOML table's name under its parent).
    """

    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            where = f"{self.path()}.{f.name}"
            value = _coerce(where, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if value is not None and not isinstance(value, Options):
                _check_value(where, f.metadata, value)
        self._check()

    def _check(self) -> None:
        """Cross-field checks (their errors name fields with :meth:`path`)."""

    @classmethod
    def path(cls) -> str:
        """The table's path in errors: ``router``, or ``model.router`` inside a model's."""
        return _PARENT.get() + cls.section

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Options:
        """Build from a TOML table (or JSON object); unknown keys are errors naming the
        allowed ones."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{cls.path()} must be a table ([{cls.path()}]), got {raw!r}")
        allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'{cls.path()}.{u}' for u in unknown]}; "
                f"allowed in [{cls.path()}]: {allowed}"
            )
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML-shaped: ``None`` fields dropped, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Options):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[f.name] = value
        return out

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def check(cls, name: str, value: Any) -> Any:
        """Validate one option's value (for constructors that take a single option); returns
        it coerced."""
        (f,) = [f for f in fields(cls) if f.name == name]  # type: ignore[arg-type]
        where = f"{cls.path()}.{name}"
        value = _coerce(where, typing.get_type_hints(cls)[name], value)
        if value is not None:
            _check_value(where, f.metadata, value)
        return value

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """``(name, type, default, description)`` of every option, in declaration order
        (what the configuration reference is generated from)."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if "choices" in f.metadata:
                doc += f" One of {list(f.metadata['choices'])}."
            rows.append((f.name, _type_name(hints[f.name]), default, doc))
        return rows


class ArgsField:
    """A module attribute that is a field of the module's ``args``: reading it reads the field,
    assigning it replaces ``args`` by a copy with the field changed (validated), so that the
    args a module reports (and a bundle writes) are always the ones it computes with.

    Example:
        >>> from spiking_moe.router import RateRouter
        >>> router = RateRouter(4, 2, 1)
        >>> router.noise = 0.5
        >>> router.args.noise
        0.5
    """

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, module, owner=None):
        return self if module is None else getattr(module.args, self.name)

    def __set__(self, module, value) -> None:
        module.args = module.args.replace(**{self.name: value})


def documented(cls):
    """Class decorator: append the options' descriptions to the class docstring (written once, in the fields)."""
    lines = [(cls.__doc__ or "").rstrip(), "", "Attributes:"]
    for name, tp, default, doc in cls.describe():
        shown = default.section if isinstance(default, Options) else repr(default)
        lines.append(f"    {name} ({tp}): {doc} Default: ``{shown}``.")
    cls.__doc__ = "\n".join(lines) + "\n"
    return cls


@documented
@dataclass(frozen=True)
class NeuronArgs(Options):
    """A leaky integrate-and-fire population (:class:`~spiking_moe.neurons.LIF`; the dynamics
    are in :mod:`spiking_moe.functional.lif`)."""

    section: ClassVar[str] = "neuron"
    kind: str = option(
        "lif",
        choices=NEURON_KINDS,
        doc="lif: binary spikes; multi: integer spike counts 0..levels per step (multi-level "
        "spikes, trained with a straight-through estimator; each count expands to `levels` "
        "binary virtual steps at inference).",
    )
    levels: int = option(
        4, ge=1, doc="multi: the most spikes per step (D); each step is D binary virtual steps."
    )
    beta: float | tuple[float, ...] = option(
        0.9, ge=0.0, le=1.0, doc="Membrane decay in [0, 1]; a list gives one per neuron."
    )
    threshold: float | tuple[float, ...] = option(
        1.0, gt=0.0, doc="Firing threshold > 0; a list gives one per neuron."
    )
    reset: str = option(
        "subtract", choices=RESETS, doc="After a spike: subtract the threshold, or reset to zero."
    )
    surrogate: str = option(
        "fast_sigmoid",
        choices=tuple(sorted(SURROGATES)),
        doc="Surrogate gradient of the spike (spiking_moe.functional.surrogate).",
    )
    alpha: float | None = option(
        None, gt=0.0, doc="Surrogate sharpness; unset: the surrogate's default."
    )
    learn_beta: bool = option(False, doc="Train beta (a parameter) instead of a fixed buffer.")
    learn_threshold: bool = option(False, doc="Train the threshold instead of a fixed buffer.")
    detach_reset: bool = option(False, doc="No gradient through the reset (native backend).")
    backend: str = option(
        "native",
        choices=NEURON_BACKENDS,
        doc="Who computes the dynamics: this package, snntorch.Leaky or Norse's LIFBoxCell.",
    )
    implementation: str = option(
        "auto",
        choices=IMPLEMENTATIONS,
        doc="Native backend: auto (Triton on CUDA, fused C++ on CPU), fused, triton or the "
        "reference loop.",
    )

    def _check(self) -> None:
        betas = self.beta if isinstance(self.beta, tuple) else (self.beta,)
        where = self.path()
        if self.kind == "multi" and self.backend != "native":
            raise ConfigError(f"{where}.kind 'multi' needs backend 'native', got {self.backend!r}")
        for name in ("beta", "threshold"):
            if getattr(self, name) == ():
                raise ConfigError(f"{where}.{name} must be a number or a non-empty list, got []")
        if self.backend != "native" and self.detach_reset:
            raise ConfigError(f"{where}.detach_reset is supported by backend 'native' only")
        if self.backend == "norse":
            if self.surrogate != "fast_sigmoid":
                raise ConfigError(
                    f"{where}.backend 'norse' supports surrogate 'fast_sigmoid' (Norse's "
                    f"SuperSpike) only, got {self.surrogate!r}"
                )
            if any(b == 1 for b in betas):
                raise ConfigError(
                    f"{where}.backend 'norse' needs beta < 1 (Norse has no non-leaky LIFBox)"
                )


@documented
@dataclass(frozen=True)
class RouterArgs(Options):
    """How a MoE layer routes tokens (:mod:`spiking_moe.router`); the number of experts and
    ``k`` are :class:`MoEArgs`."""

    section: ClassVar[str] = "router"
    kind: str = option(
        "rate",
        choices=ROUTER_KINDS,
        doc="rate: a Linear on the input's spike rates; spiking: a LIF gating population "
        "whose spike counts are the scores.",
    )
    noise: float = option(0.0, ge=0.0, doc="Std of Gaussian noise on the logits in training.")
    window: int | None = option(
        None, ge=1, doc="Route causally per window of this many steps; unset: the whole input."
    )
    capacity_factor: float | None = option(
        None, gt=0.0, doc="Each expert takes at most factor * N * k / E tokens; unset: no limit."
    )
    renormalize: bool = option(
        True, doc="Gates renormalised over the chosen k (false: Switch-style gate = p)."
    )
    balance_weight: float = option(
        1e-2, ge=0.0, doc="Weight of the Switch load-balancing loss in aux_loss."
    )
    z_loss_weight: float = option(1e-3, ge=0.0, doc="Weight of the router z-loss in aux_loss.")
    bias_update_rate: float = option(
        1e-3, ge=0.0, doc="Step of the auxiliary-loss-free balancing bias (0: off)."
    )
    gain: float = option(
        5.0, ge=0.0, doc="Spiking router: logits = gain * spike count / window length."
    )


@documented
@dataclass(frozen=True)
class ExpertArgs(Options):
    """A feed-forward expert: ``layers`` hidden ``Linear -> LIF`` layers of ``hidden`` neurons,
    then a ``Linear`` to the output (:mod:`spiking_moe.experts`)."""

    section: ClassVar[str] = "expert"
    hidden: int = option(64, ge=1, doc="Hidden width of each routed expert.")
    layers: int = option(1, ge=1, doc="Hidden layers of each expert.")


@documented
@dataclass(frozen=True)
class MoEArgs(Options):
    """A mixture-of-experts layer (:class:`~spiking_moe.moe.SpikingMoE`)."""

    section: ClassVar[str] = "moe"
    num_experts: int = option(8, ge=1, doc="Routed experts per layer (E).")
    k: int = option(2, ge=1, doc="Experts each token is routed to.")
    shared_experts: int = option(
        0, ge=0, doc="Experts every token uses besides its k routed ones (DeepSeekMoE)."
    )
    shared_hidden: int | None = option(
        None, ge=1, doc="Hidden width of each shared expert; unset: expert.hidden."
    )
    grouped_gemm: str = option(
        "auto",
        choices=GROUPED_GEMM,
        doc="Compute the experts with one grouped GEMM per layer: auto (on CUDA, and on CPU "
        "from 32 busy experts), never (one call per expert) or always.",
    )
    spike_exchange: str = option(
        "auto",
        choices=SPIKE_EXCHANGE,
        doc="Under expert parallelism, send rows of spikes as bits (8 per byte) or floats; "
        "auto: bits when the layer's input is spikes by construction or checked.",
    )

    def _check(self) -> None:
        if self.k > self.num_experts:
            raise ConfigError(
                f"{self.path()}.k must be <= {self.path()}.num_experts ({self.num_experts}), "
                f"got {self.k}"
            )


@documented
@dataclass(frozen=True)
class AttentionArgs(Options):
    """Self-attention of a transformer block (:mod:`spiking_moe.attention`)."""

    section: ClassVar[str] = "attention"
    kind: str = option(
        "ssa",
        choices=ATTENTION_KINDS,
        doc="ssa: spiking Q, K, V and Q K^T V without softmax (Spikformer); spiking_softmax: "
        "softmax over the spiking Q K^T, spiking V; real_softmax: real Q, K, V from "
        "projections that read spikes, softmax; ann: softmax attention on the normalised "
        "residual stream (all MACs; membrane residual only).",
    )
    num_heads: int = option(4, ge=1, doc="Attention heads (must divide the model width).")
    causal: bool = option(True, doc="Mask later positions (exactly: their terms are not computed).")


@documented
@dataclass(frozen=True)
class BlockArgs(Options):
    """A transformer block's residual stream (:mod:`spiking_moe.transformer`)."""

    section: ClassVar[str] = "block"
    residual: str = option(
        "spike",
        choices=RESIDUALS,
        doc="spike: binary spikes between blocks, each sub-layer's input spikes a shortcut into "
        "the next LIF's membrane; membrane: a real-valued residual stream, read through a "
        "spiking population before every synaptic layer (Spike-driven Transformer V2).",
    )
    norm: str = option(
        "layer",
        choices=NORMS,
        doc="membrane residual: LayerNorm before each spiking population that reads the stream "
        "(layer), or none.",
    )


@documented
@dataclass(frozen=True)
class ModelArgs(Options):
    """A whole model: its width, depth and readout, and the options of each part. The spiking
    MoE, its dense spiking twin and its ANN twin are built from the same args
    (:mod:`spiking_moe.models`, :mod:`spiking_moe.transformer`)."""

    section: ClassVar[str] = "model"
    hidden_features: int = option(
        128,
        ge=1,
        doc="Width between layers: a classifier's hidden layer (the routers' input), a language "
        "model's d_model.",
    )
    num_layers: int = option(
        1, ge=1, doc="MoE layers of a classifier; transformer blocks of a language model."
    )
    readout: str = option(
        "count",
        choices=READOUTS,
        doc="count: logits from the mean spike counts; membrane: the mean membrane of a "
        "non-firing leaky integrator on the readout current.",
    )
    neuron: NeuronArgs = option(default_factory=NeuronArgs, doc="Every LIF population.")
    router: RouterArgs = option(default_factory=RouterArgs, doc="Every MoE layer's router.")
    expert: ExpertArgs = option(default_factory=ExpertArgs, doc="Every routed expert.")
    moe: MoEArgs = option(default_factory=MoEArgs, doc="Every MoE layer.")
    attention: AttentionArgs = option(
        default_factory=AttentionArgs, doc="Every attention layer (language models)."
    )
    block: BlockArgs = option(
        default_factory=BlockArgs, doc="Every transformer block (language models)."
    )

    def _check(self) -> None:
        where = self.path()
        if self.attention.kind == "ann" and self.block.residual != "membrane":
            raise ConfigError(
                f"{where}.attention.kind 'ann' (softmax attention on the normalised stream) needs "
                f"{where}.block.residual 'membrane', got {self.block.residual!r}"
            )
        if self.neuron.kind == "multi" and self.moe.spike_exchange == "bits":
            raise ConfigError(
                f"{where}.moe.spike_exchange 'bits' packs binary spikes; {where}.neuron.kind "
                f"'multi' emits counts up to {self.neuron.levels}: use 'auto' or 'float'"
            )

    @property
    def shared_hidden(self) -> int:
        """Width of each shared expert (``moe.shared_hidden``, or ``expert.hidden``)."""
        return self.moe.shared_hidden or self.expert.hidden

    @property
    def active_ffn_hidden(self) -> int:
        """The hidden width one token uses in a MoE layer, ``k * expert.hidden + shared_experts
        * shared_hidden``: the width of the dense twins' FFN (the same active parameters)."""
        return self.moe.k * self.expert.hidden + self.moe.shared_experts * self.shared_hidden

    def with_options(self, **options: Any) -> ModelArgs:
        """These args with flat or nested options applied (:func:`with_options`)."""
        return with_options(self, options, who="ModelArgs")


def _none_for_zero(value: Any) -> Any:
    # The flat config keys used 0 for "unset" (TOML has no null).
    return None if value == 0 else value


#: Flat name (a constructor keyword, or a config key from before the nested tables) -> the
#: nested field it sets, and how its value maps (None: as it is).
FLAT_NAMES: Mapping[str, tuple[str, Callable[[Any], Any] | None]] = {
    # A model's own "kind" is its class; the neurons' kind goes by neuron_kind.
    **{f.name: (f"neuron.{f.name}", None) for f in fields(NeuronArgs) if f.name != "kind"},
    "neuron_kind": ("neuron.kind", None),
    **{
        name: (f"router.{name}", None)
        for name in ("noise", "window", "capacity_factor", "renormalize", "gain")
        + ("balance_weight", "z_loss_weight", "bias_update_rate")
    },
    "router": ("router.kind", None),
    "router_noise": ("router.noise", None),
    "router_window": ("router.window", _none_for_zero),
    "router_renormalize": ("router.renormalize", None),
    "load_balancing_weight": ("router.balance_weight", None),
    "bias_balancing": ("router.bias_update_rate", None),
    "expert_hidden": ("expert.hidden", None),
    "expert_layers": ("expert.layers", None),
    **{name: (f"moe.{name}", None) for name in ("num_experts", "k", "shared_experts")},
    **{name: (f"moe.{name}", None) for name in ("grouped_gemm", "spike_exchange")},
    "shared_hidden": ("moe.shared_hidden", _none_for_zero),
    "num_heads": ("attention.num_heads", None),
    "attention": ("attention.kind", None),
    "residual": ("block.residual", None),
    "norm": ("block.norm", None),
    "causal": ("attention.causal", None),
    "num_moe_layers": ("num_layers", None),
}


def with_options(args: Options, options: Mapping[str, Any], *, who: str) -> Options:
    """``args`` with ``options`` applied: flat names (:data:`FLAT_NAMES`), the args' own field
    names, or a nested part given whole (``router=RouterArgs(...)``).

    Raises:
        TypeError: a name that is no option of ``args`` (like an unexpected keyword argument
            of ``who``).
        ConfigError: a bad value (names the field).
    """
    raw = args.to_dict()
    own = {f.name for f in fields(args)}  # type: ignore[arg-type]
    tables = {name for name in own if isinstance(getattr(args, name), Options)}
    for name, value in options.items():
        if isinstance(value, Options) and name in tables:
            raw[name] = value.to_dict()
            continue
        if name in own - tables:
            path, convert = name, None
        elif name in FLAT_NAMES:
            path, convert = FLAT_NAMES[name]
        else:
            path, convert = "", None
        *parents, key = path.split(".")
        if not path or (parents and parents[0] not in tables):
            valid = (own - tables) | {
                n for n, (p, _) in FLAT_NAMES.items() if p.split(".")[0] in tables
            }
            raise TypeError(
                f"{who} got an unexpected keyword argument {name!r}; its options: {sorted(valid)}"
            )
        table = raw
        for part in parents:
            table = table.setdefault(part, {})
        value = convert(value) if convert is not None else value
        table[key] = list(value) if isinstance(value, tuple) else value
    return type(args).from_dict(raw)
