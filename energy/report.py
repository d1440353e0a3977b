r"""Energy reports: per-layer and per-expert energy, baselines and ratios; JSON and Markdown.

Energy of the SNN under a profile ``P`` (picojoules), per layer and in total:

.. math::

    E_{SNN} = AC \cdot P_{ac} + MAC \cdot P_{mac} + U \cdot P_{update} + S \cdot P_{spike}
              \; [+\; R \cdot P_{read} + W \cdot P_{write}]

with ``U`` neuron updates, ``S`` spikes, and the bracketed memory term (reads ``R``, writes
``W``, formula in :mod:`energy.counts`; after Lemaire et al. 2022). ``AC`` and ``MAC``
are those of every counted layer: synaptic layers, matrix products (attention's ``Q K^T`` and
``scores @ V``: ACs when an operand is spikes, MACs when both are graded) and softmax (3 MACs
per visible score); all of them make up the "synaptic" share of the totals, and each has its
row, kind ``matmul`` or ``softmax``, in the per-layer table.

**Two totals, always.** Every report prices the model and each baseline twice: *compute
only* (``compute_pj``: the terms before the bracket) and *compute + memory traffic*
(``with_memory_pj``: the whole formula), with a ratio for each (``compute_ratio``,
``with_memory_ratio``), and the verdict says who wins under both. ``include_memory`` only
chooses which of the two the historical fields follow: ``Totals.energy_pj``,
``Baseline.energy_pj``, ``Baseline.ratio``, the per-layer and per-expert energies, the
break-even rate and the first sentence of the verdict (default: compute only, as before), so
existing callers keep their meaning.

**Precision.** A profile states the weight and activation bits its prices hold for
(:class:`energy.EnergyProfile`); the report carries ``model_weight_bits`` (the precision the
model was trained and ran at, default 32), ``accuracy`` (at that precision) and
``accuracy_at_profile_precision`` (measured by the caller after quantising the weights to
``profile.weight_bits``; a caller that gives it counts the quantized model's activity, the
one the profile prices, and the Markdown says so). When the model ran at more bits than the profile prices and no
accuracy at the profile's precision is given, the verdict says so ("accuracy at 8 bits: not
measured"), so an fp32 accuracy is never quoted beside an 8-bit energy unqualified.

Baselines, each compared as ``ratio = E_baseline / E_SNN`` (above 1: the SNN saves energy):

``dense_snn`` -- *what routing saves*. The same network with every expert on every token,
    counted for real: the caller passes the dense twin (``dense_model``, e.g. a copy of a
    spiking_moe ``SpikingMoE`` with ``dense = True``), which runs on the same inputs; its counts
    are priced like the SNN's. Absent when no dense twin is given.
``ann_fp32`` / ``ann_int8`` -- *what spiking saves*. The equivalent ANN with the same routing:
    same synaptic layers and products, ReLU instead of neurons, one time step, every input
    graded. Computed from the counting pass: each synaptic layer does ``fan_in x fan_out``
    MACs per token it processed, each product its computed terms of one step (the ``ann_macs``
    of :class:`energy.counts.LayerCounts`: dense MACs over ``T``), priced at
    ``P.ann_mac_fp32_pj`` / ``P.ann_mac_int8_pj`` (Horowitz 2014 cmos45 fp32 4.6 pJ and int8
    0.23 pJ unless the profile says otherwise). ReLU costs nothing here. Softmax, that of a
    spiking product flagged ``ann_softmax`` (attention scores) and any counted ``nn.Softmax``,
    costs 3 MACs per visible score: a lower bound that favours the ANN, since an exp costs
    more than a MAC.
    Memory term: ``2 * MAC`` reads (weight and activation) and one write per output
    activation, at the profile's per-access energies (the same per access for int8: an upper
    bound).
``dense_ann_fp32`` / ``dense_ann_int8`` -- the ANN with every expert on every token: the same
    formula on the dense twin's counting pass. Absent without a dense twin.

The int8 ANN with the same routing is the honest competitor (Yan et al. 2024 find an int8 ANN
beats an SNN above roughly 6% spike rate), so every report says which one wins and, when the
SNN wins, the firing rate at which it would stop winning: assuming activity-driven energy
(ACs, spikes and their memory traffic) scales with the firing rate while the rest (MACs,
neuron updates, membrane traffic) does not,
``break_even_rate = rate * (E_ann_int8 - E_fixed) / E_activity``.

Per expert: a group of :meth:`energy.counts.OperationCounts.groups`; ``tokens`` is its
load (tokens routed to it, from its first synaptic layer) and, with a dense twin,
``dense_energy_pj`` is what the same expert costs when it sees every token.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .counting import GroupCounts, LayerCounts, NeuronAdapter, OperationCounts, count_operations
from .profiles import EnergyProfile, get_profile

__all__ = [
    "Baseline",
    "EnergyReport",
    "ExpertEnergy",
    "LayerEnergy",
    "Totals",
    "build_report",
    "estimate",
]

# The JSON format written and read. Format 1 (before profiles stated precision and reports
# carried both totals) is no longer read.
_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class LayerEnergy:
    """One module's counts and energy (pJ). ``input`` is spikes / graded / mixed / ""."""

    name: str
    kind: str
    group: str | None
    calls: int
    tokens: int
    input: str
    acs: int
    macs: int
    neuron_updates: int
    spikes: int
    firing_rate: float
    memory_reads: int
    memory_writes: int
    energy_pj: float


@dataclasses.dataclass(frozen=True)
class ExpertEnergy:
    """One expert (group): load, counts and energy (pJ), and its dense cost when known."""

    label: str
    index: int | None
    tokens: int
    acs: int
    macs: int
    neuron_updates: int
    spikes: int
    firing_rate: float
    energy_pj: float
    dense_tokens: int | None = None
    dense_energy_pj: float | None = None


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A comparison point: its energy (pJ) and ``ratio = energy / SNN energy``.

    ``energy_pj`` and ``ratio`` follow the report's ``include_memory``; ``compute_pj`` /
    ``compute_ratio`` (compute only) and ``with_memory_pj`` / ``with_memory_ratio`` (compute +
    memory traffic) are both always there, each ratio against the SNN total of the same
    accounting.
    """

    name: str
    description: str
    acs: int
    macs: int
    energy_pj: float
    ratio: float
    compute_pj: float
    compute_ratio: float
    with_memory_pj: float
    with_memory_ratio: float


@dataclasses.dataclass(frozen=True)
class Totals:
    """Whole-model sums; energies in pJ (``energy_pj`` is their sum).

    ``energy_pj`` follows the report's ``include_memory`` (and ``memory_energy_pj`` is 0 without
    it); ``compute_pj`` (synaptic + neuron) and ``with_memory_pj`` (compute + memory traffic)
    are both always there.
    """

    acs: int
    macs: int
    neuron_updates: int
    spikes: int
    firing_rate: float
    memory_reads: int
    memory_writes: int
    synaptic_energy_pj: float
    neuron_energy_pj: float
    memory_energy_pj: float
    energy_pj: float
    compute_pj: float
    with_memory_pj: float


@dataclasses.dataclass(frozen=True)
class EnergyReport:
    """Energy of counted forward passes under one profile, with baselines.

    The passes are one, or several summed by :func:`energy.merge_counts`: every field is
    derived from the summed counts, so a report of merged batches equals that of one pass
    over their concatenation except for ``LayerEnergy.calls`` (module calls: one per batch).

    Attributes:
        profile: the :class:`EnergyProfile` used (stored whole, so a report stands alone).
        time_steps: ``T`` of the counted pass.
        include_memory: whether the memory term is in every energy.
        layers: per-module rows, in call order.
        experts: per-expert rows (empty for a model without groups).
        totals: whole-model sums.
        baselines: dense SNN (if a dense twin was counted), ANN fp32/int8, dense ANN fp32/int8.
        break_even_firing_rate: firing rate at which the SNN would cost as much as the int8
            ANN with the same routing (None: no neurons or no activity-driven energy; 0: the
            int8 ANN wins at any rate).
        model_weight_bits: weight precision the model was trained and ran at (default 32).
        accuracy: the model's accuracy at ``model_weight_bits`` (None: not given).
        accuracy_at_profile_precision: accuracy after quantising the weights to
            ``profile.weight_bits`` (None: not measured); when given, the counts are those
            of the quantized model.
    """

    profile: EnergyProfile
    time_steps: int
    include_memory: bool
    layers: tuple[LayerEnergy, ...]
    experts: tuple[ExpertEnergy, ...]
    totals: Totals
    baselines: tuple[Baseline, ...]
    break_even_firing_rate: float | None
    model_weight_bits: int = 32
    accuracy: float | None = None
    accuracy_at_profile_precision: float | None = None

    def baseline(self, name: str) -> Baseline:
        """The baseline called ``name`` (KeyError lists the present ones)."""
        for b in self.baselines:
            if b.name == name:
                return b
        raise KeyError(f"no baseline {name!r}; present: {[b.name for b in self.baselines]}")

    def to_json(self) -> str:
        """JSON text; :meth:`from_json` gives back an equal report."""
        return json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> EnergyReport:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: the text is not a report in the format :meth:`to_json` writes (the
                message names the format found), a field is missing, or the profile is invalid.
            TypeError: a row (layer, expert, baseline, totals) lacks a field or has an unknown
                one (names it).
        """
        data = json.loads(text)
        version = data.pop("format", None) if isinstance(data, dict) else None
        if version != _FORMAT:
            old = (
                "; format 1 (no precision fields, no compute and with-memory totals) is no "
                f"longer read: count the model again to write format {_FORMAT}"
                if version == 1
                else ""
            )
            raise ValueError(
                f"not an energy report in format {_FORMAT}, the one this version reads: "
                f"found format {version!r}{old}"
            )
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"energy report in format {_FORMAT} without the field(s) {missing}")
        return cls(
            **{
                **data,
                "profile": EnergyProfile.from_dict(data["profile"], "report profile"),
                "layers": tuple(LayerEnergy(**row) for row in data["layers"]),
                "experts": tuple(ExpertEnergy(**row) for row in data["experts"]),
                "totals": Totals(**data["totals"]),
                "baselines": tuple(Baseline(**row) for row in data["baselines"]),
            }
        )

    @property
    def verdict(self) -> str:
        """Does the SNN beat an int8 ANN with the same routing, compute only and with memory
        traffic; and at what precision was its accuracy measured?

        The first sentence uses the report's own accounting (``include_memory``) and gives the
        break-even firing rate; the second the other accounting; the third, when relevant,
        the accuracy at the profile's weight precision.
        """
        ann = self.baseline("ann_int8")
        accounting = "with memory traffic" if self.include_memory else "compute only"
        if ann.ratio >= 1:
            rate = self.break_even_firing_rate
            tail = (
                f"; it would stop winning above a firing rate of about {rate:.1%} "
                f"(now {self.totals.firing_rate:.1%})"
                if rate is not None
                else ""
            )
            first = (
                f"The SNN uses less energy than an int8 ANN with the same routing "
                f"({ann.ratio:.2f}x less, {accounting}){tail}."
            )
        else:
            first = (
                f"An int8 ANN with the same routing would use less energy than this SNN "
                f"({_ratio(1.0, ann.ratio):.2f}x less, {accounting}) "
                f"under profile {self.profile.name!r}."
            )
        sentences = [first]
        other_ratio = ann.compute_ratio if self.include_memory else ann.with_memory_ratio
        other = "Compute only" if self.include_memory else "With memory traffic"
        if other_ratio >= 1:
            sentences.append(f"{other}: the SNN wins ({other_ratio:.2f}x less energy).")
        else:
            sentences.append(
                f"{other}: the int8 ANN wins ({_ratio(1.0, other_ratio):.2f}x less energy)."
            )
        precision = self.precision_statement
        if precision:
            sentences.append(precision)
        return " ".join(sentences)

    @property
    def precision_statement(self) -> str:
        """The accuracy at the priced precision, or that it was not measured ("" if moot)."""
        wb, mb = self.profile.weight_bits, self.model_weight_bits
        acc, acc_p = self.accuracy, self.accuracy_at_profile_precision
        if acc_p is not None:
            measured = "not given" if acc is None else f"{acc:.4g}"
            return (
                f"Accuracy at {mb}-bit weights (as run): {measured}; at {wb} bits "
                f"(the profile's precision): {acc_p:.4g}."
            )
        if mb > wb:
            given = "" if acc is None else f"; accuracy as run: {acc:.4g}"
            return (
                f"Priced at {wb}-bit weights; accuracy at {wb} bits: not measured "
                f"(the model ran at {mb}-bit weights){given}."
            )
        if acc is not None:
            return f"Accuracy {acc:.4g} at {mb}-bit weights, within the profile's {wb} bits."
        return ""

    @property
    def _model_precision(self) -> str:
        if self.accuracy_at_profile_precision is None:
            return f"the model ran at {self.model_weight_bits}-bit weights"
        return (
            f"the model was trained at {self.model_weight_bits}-bit weights and counted after "
            f"quantizing them to the profile's {self.profile.weight_bits} bits"
        )

    def to_markdown(self) -> str:
        """Readable tables: summary, baselines with ratios, per layer, per expert."""
        p, t = self.profile, self.totals
        lines = [
            f"## Energy report: profile `{p.name}`",
            "",
            f"{p.description}. Source: {p.source}.",
            "",
            f"T = {self.time_steps} time steps; memory traffic "
            f"{'included' if self.include_memory else 'not included'} in the SNN total, the "
            "per-layer and per-expert energies (the baseline table shows both totals).",
            "",
            f"Precision: the profile prices {p.weight_bits}-bit weights and "
            f"{p.activation_bits}-bit activations; {self._model_precision}.",
            "",
            f"**SNN total: {_energy(t.energy_pj)}** (synaptic {_energy(t.synaptic_energy_pj)}, "
            f"neurons {_energy(t.neuron_energy_pj)}, memory {_energy(t.memory_energy_pj)}); "
            f"{t.acs:,} ACs, {t.macs:,} MACs, {t.neuron_updates:,} neuron updates, "
            f"{t.spikes:,} spikes, firing rate {t.firing_rate:.2%}. "
            f"Compute only: {_energy(t.compute_pj)}; compute + memory traffic: "
            f"{_energy(t.with_memory_pj)}.",
            "",
            self.verdict,
            "",
            "### Baselines",
            "",
            "| model | ACs | MACs | compute | baseline / SNN | compute + memory "
            "| baseline / SNN, with memory |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| SNN (this model) | {t.acs:,} | {t.macs:,} | {_energy(t.compute_pj)} | 1.00x "
            f"| {_energy(t.with_memory_pj)} | 1.00x |",
        ]
        lines += [
            f"| {b.description} | {b.acs:,} | {b.macs:,} | {_energy(b.compute_pj)} | "
            f"{b.compute_ratio:.2f}x | {_energy(b.with_memory_pj)} | {b.with_memory_ratio:.2f}x |"
            for b in self.baselines
        ]
        lines += [
            "",
            "### Per layer",
            "",
            "| layer | kind | expert | input | tokens | ACs | MACs | neuron updates | spikes "
            "| firing rate | energy |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in self.layers:
            neuron = m.kind == "neuron"
            lines.append(
                f"| `{m.name or '(root)'}` | {m.kind} | {m.group or ''} | {m.input} | "
                f"{'' if neuron else f'{m.tokens:,}'} | {m.acs:,} | {m.macs:,} | "
                f"{m.neuron_updates:,} | {m.spikes:,} | "
                f"{f'{m.firing_rate:.2%}' if neuron else ''} | {_energy(m.energy_pj)} |"
            )
        if self.experts:
            dense = any(e.dense_energy_pj is not None for e in self.experts)
            head = (
                "| expert | tokens | ACs | MACs | neuron updates | spikes | firing rate | energy |"
            )
            rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            if dense:
                head += " dense tokens | dense energy | dense / routed |"
                rule += " ---: | ---: | ---: |"
            lines += ["", "### Per expert", "", head, rule]
            for e in self.experts:
                row = (
                    f"| `{e.label}` | {e.tokens:,} | {e.acs:,} | {e.macs:,} | "
                    f"{e.neuron_updates:,} | {e.spikes:,} | {e.firing_rate:.2%} | "
                    f"{_energy(e.energy_pj)} |"
                )
                if dense:
                    if e.dense_energy_pj is None:
                        row += " | | |"
                    else:
                        row += (
                            f" {e.dense_tokens:,} | {_energy(e.dense_energy_pj)} | "
                            f"{_ratio(e.dense_energy_pj, e.energy_pj):.2f}x |"
                        )
                lines.append(row)
        return "\n".join(lines) + "\n"


def _energy(pj: float) -> str:
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _check_bits_and_accuracy(model_weight_bits, accuracy, accuracy_at_profile_precision):
    if isinstance(model_weight_bits, bool) or not isinstance(model_weight_bits, int):
        raise TypeError(f"model_weight_bits must be an int, got {type(model_weight_bits).__name__}")
    if not 1 <= model_weight_bits <= 64:
        raise ValueError(f"model_weight_bits must be between 1 and 64, got {model_weight_bits}")
    for name, value in (
        ("accuracy", accuracy),
        ("accuracy_at_profile_precision", accuracy_at_profile_precision),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


# Counts a report's totals sum over the layers.
_TOTALLED = ("acs", "macs", "neuron_updates", "spikes", "memory_reads", "memory_writes")


def _row(cls: type, counts: LayerCounts | GroupCounts, **priced: Any):
    """A ``cls`` row: ``priced`` fields as given, the others copied from ``counts``."""
    copied = {
        f.name: getattr(counts, f.name) for f in dataclasses.fields(cls) if f.name not in priced
    }
    return cls(**copied, **priced)


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return math.inf if num > 0 else 1.0
    return num / den


def _activity_energy(c: LayerCounts | GroupCounts, p: EnergyProfile, memory: bool) -> float:
    """Energy that scales with spiking activity: ACs, spikes and their memory traffic."""
    e = c.acs * p.ac_pj + c.spikes * p.spike_pj
    if memory:
        e += (c.acs + c.input_events) * p.memory_read_pj + c.spikes * p.memory_write_pj
    return e


def _fixed_energy(c: LayerCounts | GroupCounts, p: EnergyProfile, memory: bool) -> float:
    """Energy independent of activity: MACs, neuron updates and their memory traffic."""
    e = c.macs * p.mac_pj + c.neuron_updates * p.neuron_update_pj
    if memory:
        e += (2 * c.macs + c.neuron_updates) * p.memory_read_pj
        e += c.neuron_updates * p.memory_write_pj
    return e


def _snn_energy(c: LayerCounts | GroupCounts, p: EnergyProfile, memory: bool) -> float:
    return _activity_energy(c, p, memory) + _fixed_energy(c, p, memory)


def _ann_energy(counts: OperationCounts, mac_pj: float, p: EnergyProfile, memory: bool) -> float:
    macs = counts.total("ann_macs")
    e = macs * mac_pj
    if memory:
        e += 2 * macs * p.memory_read_pj + counts.total("ann_outputs") * p.memory_write_pj
    return e


def build_report(
    counts: OperationCounts,
    profile: str | EnergyProfile = "cmos45",
    *,
    dense_counts: OperationCounts | None = None,
    include_memory: bool = False,
    model_weight_bits: int = 32,
    accuracy: float | None = None,
    accuracy_at_profile_precision: float | None = None,
) -> EnergyReport:
    """Price counted operations under a profile and compare with the baselines.

    Args:
        counts: the model's :class:`energy.counts.OperationCounts` (of one pass, or of
            several merged with :func:`energy.counts.merge_counts`).
        profile: a bundled profile name or an :class:`energy.profiles.EnergyProfile`.
        dense_counts: counts of the dense twin on the same inputs, merged over the same
            batches (adds ``dense_snn`` and ``dense_ann_*``; per-expert dense energy).
        include_memory: whether ``energy_pj``, ``ratio``, the per-layer and per-expert
            energies and the break-even rate include the memory term (formula in
            :mod:`energy.counts`); both totals are reported either way.
        model_weight_bits: weight precision the model was trained and ran at.
        accuracy: its accuracy at that precision, if known.
        accuracy_at_profile_precision: its accuracy with weights quantised to
            ``profile.weight_bits``, if measured; give it with the counts of that quantized
            model (the one the profile prices).

    Returns:
        The :class:`EnergyReport` under profile ``profile``: per-layer and per-expert rows,
        totals (energies in pJ), the baselines with their ratios (``dense_snn`` and
        ``dense_ann_*`` only with ``dense_counts``) and the break-even firing rate.

    Raises:
        TypeError: ``counts`` is not :class:`energy.counts.OperationCounts`, or
            ``model_weight_bits`` or an accuracy has the wrong type.
        ValueError: ``dense_counts`` has another ``T``, ``model_weight_bits`` outside 1..64,
            a non-finite accuracy, or an unknown profile name.
    """
    p = get_profile(profile)
    if not isinstance(counts, OperationCounts):
        raise TypeError(f"counts must be OperationCounts, got {type(counts).__name__}")
    if dense_counts is not None and dense_counts.time_steps != counts.time_steps:
        raise ValueError(
            f"dense_counts has T={dense_counts.time_steps} but counts has T={counts.time_steps}"
        )
    _check_bits_and_accuracy(model_weight_bits, accuracy, accuracy_at_profile_precision)
    mem = include_memory
    layers = tuple(
        _row(LayerEnergy, m, input=m.input_kind, energy_pj=_snn_energy(m, p, mem))
        for m in counts.layers
    )
    activity = sum(_activity_energy(m, p, mem) for m in counts.layers)
    fixed = sum(_fixed_energy(m, p, mem) for m in counts.layers)
    synaptic = sum(m.acs * p.ac_pj + m.macs * p.mac_pj for m in counts.layers)
    neurons = sum(
        m.neuron_updates * p.neuron_update_pj + m.spikes * p.spike_pj for m in counts.layers
    )
    memory = (
        sum(
            m.memory_reads * p.memory_read_pj + m.memory_writes * p.memory_write_pj
            for m in counts.layers
        )
        if include_memory
        else 0.0
    )
    total = activity + fixed
    compute = sum(_snn_energy(m, p, False) for m in counts.layers)
    with_memory = sum(_snn_energy(m, p, True) for m in counts.layers)
    totals = Totals(
        **{f: counts.total(f) for f in _TOTALLED},
        firing_rate=counts.firing_rate,
        synaptic_energy_pj=synaptic,
        neuron_energy_pj=neurons,
        memory_energy_pj=memory,
        energy_pj=total,
        compute_pj=compute,
        with_memory_pj=with_memory,
    )

    def baseline(name, description, c: OperationCounts, mac_pj=None):
        def price(memory: bool) -> float:
            if mac_pj is None:  # an SNN priced like this one
                return sum(_snn_energy(m, p, memory) for m in c.layers)
            return _ann_energy(c, mac_pj, p, memory)

        if mac_pj is None:
            acs, macs = c.total("acs"), c.total("macs")
        else:
            acs, macs = 0, c.total("ann_macs")
        b_compute, b_memory = price(False), price(True)
        energy = b_memory if mem else b_compute
        return Baseline(
            name,
            description,
            acs,
            macs,
            energy,
            _ratio(energy, total),
            compute_pj=b_compute,
            compute_ratio=_ratio(b_compute, compute),
            with_memory_pj=b_memory,
            with_memory_ratio=_ratio(b_memory, with_memory),
        )

    specs = [
        ("ann_fp32", "ANN, same routing, fp32", counts, p.ann_mac_fp32_pj),
        ("ann_int8", "ANN, same routing, int8", counts, p.ann_mac_int8_pj),
    ]
    if dense_counts is not None:
        specs = [
            ("dense_snn", "Dense MoE SNN (every expert on every token)", dense_counts),
            *specs,
            ("dense_ann_fp32", "Dense ANN (every expert), fp32", dense_counts, p.ann_mac_fp32_pj),
            ("dense_ann_int8", "Dense ANN (every expert), int8", dense_counts, p.ann_mac_int8_pj),
        ]
    baselines = [baseline(*spec) for spec in specs]

    ann_int8 = _ann_energy(counts, p.ann_mac_int8_pj, p, mem)
    if totals.neuron_updates == 0 or activity == 0:
        break_even = None
    else:
        break_even = max(0.0, totals.firing_rate * (ann_int8 - fixed) / activity)

    dense_groups = dense_counts.groups() if dense_counts is not None else {}
    experts = []
    for g in counts.groups().values():
        d = dense_groups.get(g.label)
        experts.append(
            _row(
                ExpertEnergy,
                g,
                energy_pj=_snn_energy(g, p, mem),
                dense_tokens=None if d is None else d.tokens,
                dense_energy_pj=None if d is None else _snn_energy(d, p, mem),
            )
        )
    return EnergyReport(
        profile=p,
        time_steps=counts.time_steps,
        include_memory=include_memory,
        layers=layers,
        experts=tuple(experts),
        totals=totals,
        baselines=tuple(baselines),
        break_even_firing_rate=break_even,
        model_weight_bits=model_weight_bits,
        accuracy=accuracy,
        accuracy_at_profile_precision=accuracy_at_profile_precision,
    )


def estimate(
    model: nn.Module,
    *inputs: Any,
    profile: str | EnergyProfile = "cmos45",
    groups: Mapping[str, str | Sequence[str]] | None = None,
    dense_model: nn.Module | None = None,
    time_steps: int | None = None,
    include_memory: bool = False,
    neuron_adapters: Sequence[NeuronAdapter] = (),
    model_weight_bits: int = 32,
    accuracy: float | None = None,
    accuracy_at_profile_precision: float | None = None,
) -> EnergyReport:
    """Count ``model(*inputs)`` (and its dense twin) and build the :class:`EnergyReport`.

    Args:
        model: the model to profile (call ``.eval()`` first for deterministic routing).
        *inputs: its time-major inputs.
        profile: bundled profile name or :class:`energy.profiles.EnergyProfile`.
        groups: expert attribution, as in :func:`energy.counting.count_operations`.
        dense_model: the same network with every expert on every token (for spiking_moe:
            ``dense = copy.deepcopy(model)`` then set ``dense = True`` on its ``SpikingMoE``
            modules); run on the same inputs for the dense baselines.
        time_steps: ``T``; None takes dim 0 of the first tensor input.
        include_memory: which total the historical fields follow (see :func:`build_report`).
        neuron_adapters: extra neuron adapters (:class:`energy.adapters.NeuronAdapter`),
            as in :func:`energy.counting.count_operations`.
        model_weight_bits: weight precision the model was trained and ran at (see
            :func:`build_report`).
        accuracy: its accuracy at that precision, if known.
        accuracy_at_profile_precision: its accuracy with weights quantised to
            ``profile.weight_bits``, if measured (then ``model`` should be that quantized
            model, the one the profile prices).

    Returns:
        The :class:`EnergyReport` of one forward pass of ``model`` (energies in pJ), as
        :func:`build_report` makes it from the counts of ``model`` and of ``dense_model``.

    Raises:
        ValueError: as :func:`energy.counting.count_operations` (nothing countable, NaN,
            bad ``groups`` or ``time_steps``) and :func:`build_report`.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> report = estimate(net, torch.ones(2, 1, 4))  # T=2, B=1, binary input
        >>> report.totals.acs, report.baseline("ann_fp32").macs
        (24, 12)
    """
    kwargs = dict(groups=groups, time_steps=time_steps, neuron_adapters=neuron_adapters)
    counts = count_operations(model, *inputs, **kwargs)
    dense = count_operations(dense_model, *inputs, **kwargs) if dense_model is not None else None
    return build_report(
        counts,
        profile,
        dense_counts=dense,
        include_memory=include_memory,
        model_weight_bits=model_weight_bits,
        accuracy=accuracy,
        accuracy_at_profile_precision=accuracy_at_profile_precision,
    )
