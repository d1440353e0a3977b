r"""The counts of a counting pass, and how the counts of several passes add up.

:func:`energy.count_operations` returns an :class:`OperationCounts`: one :class:`LayerCounts`
per module (the counting rules that fill them: :mod:`energy.rules`), summed per group (an
expert) by :meth:`OperationCounts.groups`. Letters as in :mod:`energy.rules`.

**Memory traffic** (opt-in in reports; after Lemaire et al., "An Analytical Estimation of
Spiking Neural Networks Energy Efficiency", ICONIP 2022), per layer:

.. math::

    \text{reads}  &= \underbrace{AC + MAC}_{\text{weights}}
                    + \underbrace{\text{events} + MAC}_{\text{inputs}}
                    + \underbrace{\text{updates}}_{\text{membrane}} \\
    \text{writes} &= \underbrace{\text{updates}}_{\text{membrane}}
                    + \underbrace{\text{spikes}}_{\text{spikes out}}

i.e. one weight read per synaptic operation, one read per input event (its address) or per
graded operand, one membrane read and write per neuron update, one write per emitted spike,
with no reuse from caches (an upper bound for a von Neumann machine). A product reads its
operands the same way, the non-counted operand standing for the weights; a softmax is priced
as its 3-per-element MACs in this term too.

**Several passes** (the batches of an evaluation set) add up: :func:`merge_counts` sums the
counts of each module, matched by name. Every count is a sum over calls, or (``tokens``,
``ann_macs``, ``ann_outputs``) one forward's worth, so for a model that treats each sample on
its own (eval mode, no capacity limit, no batch statistics) the merged counts of the batches
equal those of one pass over their concatenation, call order included. Two things depend on
how the set is cut: ``calls``/``binary_calls`` count module calls (three batches call a layer
three times, their concatenation once), and the binary check is made per call, so a layer whose
input is exactly 0/1 in one batch and graded in another is charged ACs for the first and MACs
for the second (in one pass, MACs for all). Merged counts are plain ints, so accumulating
``N`` batches keeps ``O(#modules)`` memory, not ``O(N)``.

Example:
    >>> import torch
    >>> from energy import count_operations
    >>> fc = torch.nn.Linear(3, 2)
    >>> counts = count_operations(fc, torch.tensor([[[1.0, 0.0, 1.0]]]))  # [T=1, B=1, 3]
    >>> more = count_operations(fc, torch.tensor([[[0.0, 1.0, 0.0]]]))
    >>> merged = merge_counts(counts, more).layer("")
    >>> merged.acs, merged.memory_reads  # 6 weight reads and 3 event reads
    (6, 9)
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import re
from collections.abc import Sequence

__all__ = ["GroupCounts", "LayerCounts", "OperationCounts", "merge_counts"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerCounts:
    """Exact counts of one module over one counting pass.

    Attributes:
        name: qualified module name (``""`` for the root).
        kind: ``"linear"``, ``"conv1d"``/``"conv2d"``/``"conv3d"``, ``"matmul"`` (a product
            module), ``"softmax"`` or ``"neuron"``.
        group: expert/group label, or None.
        order: position of the module's first call in the forward pass (in the merged call
            order for :func:`merge_counts`).
        calls: number of calls.
        fan_in: synapses per output neuron (``F_in`` or ``C_in / G * prod(k)``); 0 for
            neurons, products and softmax (a product's sizes follow the sequence length,
            which may change between the passes that :func:`merge_counts` matches).
        fan_out: ``F_out`` or ``C_out``; 0 for neurons, products and softmax.
        rows: input rows over all calls (Linear: tokens x steps; ConvNd: images x steps;
            product: output rows ``L M``; softmax: vectors normalised).
        tokens: rows of the ANN equivalent (one step; the rule is in :mod:`energy.counting`).
        binary_calls: calls whose input (for a product, either operand) was binary.
        input_events: nonzero inputs of the binary calls (for a product, of the counted
            operand).
        acs: accumulates (binary inputs).
        macs: multiply-accumulates (graded inputs; softmax: 3 per finite input).
        dense_macs: MACs had every input been graded (a product: its computed terms).
        ann_macs: MACs of the ANN equivalent (one step).
        ann_outputs: output elements of the ANN equivalent (activation writes).
        neuron_updates: neuron updates (neurons only).
        spikes: emitted spikes (neurons only).
    """

    name: str
    kind: str
    group: str | None
    order: int
    calls: int
    fan_in: int = 0
    fan_out: int = 0
    rows: int = 0
    tokens: int = 0
    binary_calls: int = 0
    input_events: int = 0
    acs: int = 0
    macs: int = 0
    dense_macs: int = 0
    ann_macs: int = 0
    ann_outputs: int = 0
    neuron_updates: int = 0
    spikes: int = 0

    @property
    def is_neuron(self) -> bool:
        return self.kind == "neuron"

    @property
    def firing_rate(self) -> float:
        """Spikes per neuron update (0 when there were none)."""
        return self.spikes / self.neuron_updates if self.neuron_updates else 0.0

    @property
    def input_kind(self) -> str:
        """``"spikes"``, ``"graded"``, ``"mixed"`` (per call) or ``""`` for neurons."""
        if self.is_neuron or self.calls == 0:
            return ""
        if self.binary_calls == self.calls:
            return "spikes"
        return "graded" if self.binary_calls == 0 else "mixed"

    @property
    def memory_reads(self) -> int:
        """Weight, input and membrane reads (formula in the module docstring)."""
        return self.acs + self.macs + self.input_events + self.macs + self.neuron_updates

    @property
    def memory_writes(self) -> int:
        """Membrane and spike writes (formula in the module docstring)."""
        return self.neuron_updates + self.spikes


_SUMMED = (
    "acs",
    "macs",
    "dense_macs",
    "ann_macs",
    "ann_outputs",
    "input_events",
    "neuron_updates",
    "spikes",
    "memory_reads",
    "memory_writes",
)


@dataclasses.dataclass(frozen=True)
class GroupCounts:
    """Counts summed over the layers of one group (an expert).

    Each count (``acs`` to ``memory_writes``) is the :class:`LayerCounts` count of that name,
    summed over ``layers``.

    Attributes:
        label: group label, e.g. ``"moe.experts.3"``.
        layers: names of its modules, in call order.
        tokens: tokens routed to it: rows per step seen by its first synaptic layer.
        acs: sum over ``layers``.
        macs: sum over ``layers``.
        dense_macs: sum over ``layers``.
        ann_macs: sum over ``layers``.
        ann_outputs: sum over ``layers``.
        input_events: sum over ``layers``.
        neuron_updates: sum over ``layers``.
        spikes: sum over ``layers``.
        memory_reads: sum over ``layers``.
        memory_writes: sum over ``layers``.
    """

    label: str
    layers: tuple[str, ...]
    tokens: int
    acs: int
    macs: int
    dense_macs: int
    ann_macs: int
    ann_outputs: int
    input_events: int
    neuron_updates: int
    spikes: int
    memory_reads: int
    memory_writes: int

    @property
    def firing_rate(self) -> float:
        return self.spikes / self.neuron_updates if self.neuron_updates else 0.0

    @property
    def index(self) -> int | None:
        """Trailing integer of the label (``experts.3`` -> 3), or None."""
        match = re.search(r"(\d+)$", self.label)
        return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class OperationCounts:
    """Result of :func:`energy.count_operations`: exact per-module counts of one forward pass.

    :func:`merge_counts` sums those of several passes into one of these.

    Attributes:
        layers: per-module counts, in order of first call; modules that never ran are absent,
            except those of a group (an idle expert), listed last with zero counts.
        time_steps: ``T`` used for the ANN equivalent.
    """

    layers: tuple[LayerCounts, ...]
    time_steps: int

    def layer(self, name: str) -> LayerCounts:
        """Counts of the module called ``name`` (KeyError lists the counted names)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no counted module {name!r}; counted: {[m.name for m in self.layers]}")

    def total(self, field: str) -> int:
        """Sum of one count (e.g. ``"acs"``, ``"memory_reads"``) over all layers."""
        if field not in _SUMMED:
            raise ValueError(f"unknown count {field!r}; valid: {list(_SUMMED)}")
        return sum(getattr(layer, field) for layer in self.layers)

    @property
    def firing_rate(self) -> float:
        updates = self.total("neuron_updates")
        return self.total("spikes") / updates if updates else 0.0

    def groups(self) -> dict[str, GroupCounts]:
        """Per-group (per-expert) sums, in order of each group's first call."""
        members: dict[str, list[LayerCounts]] = {}
        for layer in self.layers:
            if layer.group is not None:
                members.setdefault(layer.group, []).append(layer)
        out = {}
        for label, layers in members.items():
            synaptic = [m for m in layers if not m.is_neuron]
            out[label] = GroupCounts(
                label=label,
                layers=tuple(m.name for m in layers),
                tokens=synaptic[0].tokens if synaptic else 0,
                **{f: sum(getattr(m, f) for m in layers) for f in _SUMMED},
            )
        return out


# What identifies a module across passes; every other count adds up (``order`` is recomputed
# from the call orders of the passes).
_IDENTITY = ("kind", "group", "fan_in", "fan_out")
_ADDITIVE = tuple(
    f.name for f in dataclasses.fields(LayerCounts) if f.name not in ("name", "order", *_IDENTITY)
)


def merge_counts(*counts: OperationCounts) -> OperationCounts:
    """Sum the counts of several forward passes of one model, e.g. the batches of a data set.

    The one way to add counts up. A function rather than ``+``: merging validates its inputs
    and merges call orders, so it is not element-wise addition, and ``merge_counts(*passes)``
    needs no ``sum`` start value. Accumulate batch by batch with
    ``total = merge_counts(total, counts)``: the result holds Python ints only.

    Modules are matched by name and every count is summed (``calls`` and ``binary_calls`` too:
    they count the calls of all passes). A module present in only some passes keeps its counts.
    Layers come in merged call order: whenever a pass called ``a`` before ``b``, so does the
    result; modules that no pass ran together (experts that never shared a batch) come in name
    order, numbers compared as numbers (``experts.2`` before ``experts.10``), which is the order
    a ModuleList of experts runs in. When every pass is consistent with one call order (the same
    model, different experts skipped), ``order`` and the layer order are therefore those of one
    pass over the concatenated inputs. Group members that ran in no pass (idle experts) are
    listed last with zero counts, as :func:`energy.count_operations` lists them.

    Args:
        *counts: one or more :class:`OperationCounts`, all with the same ``time_steps``.

    Returns:
        :class:`OperationCounts` whose counts are the sums; for one argument, equal to it.

    Raises:
        TypeError: an argument is not an :class:`OperationCounts`.
        ValueError: no argument; ``time_steps`` differ; a module's kind, group, fan-in or
            fan-out differs between passes (the passes are of different models); a module
            name appears twice in one pass.

    Example:
        >>> import torch
        >>> from energy import count_operations
        >>> fc = torch.nn.Linear(2, 5)
        >>> passes = [count_operations(fc, torch.ones(3, b, 2)) for b in (1, 4)]
        >>> total = merge_counts(*passes).layer("")
        >>> total.acs, total.tokens, total.calls
        (150, 5, 2)
    """
    if not counts:
        raise ValueError("merge_counts needs at least one OperationCounts")
    for i, c in enumerate(counts):
        if not isinstance(c, OperationCounts):
            raise TypeError(
                f"merge_counts argument {i} must be OperationCounts, got {type(c).__name__}"
            )
    time_steps = counts[0].time_steps
    for i, c in enumerate(counts[1:], 1):
        if c.time_steps != time_steps:
            raise ValueError(
                f"cannot merge counts over different time steps: argument 0 has "
                f"time_steps={time_steps}, argument {i} has time_steps={c.time_steps}"
            )
    merged: dict[str, LayerCounts] = {}
    for i, c in enumerate(counts):
        seen: set[str] = set()
        for layer in c.layers:
            if layer.name in seen:
                raise ValueError(f"argument {i} counts module {layer.name!r} twice")
            seen.add(layer.name)
            total = merged.get(layer.name)
            if total is None:
                merged[layer.name] = layer
                continue
            for field in _IDENTITY:
                a, b = getattr(total, field), getattr(layer, field)
                if a != b:
                    raise ValueError(
                        f"module {layer.name!r} has {field}={a!r} in an earlier pass but "
                        f"{field}={b!r} in argument {i}: counts of different models cannot "
                        "be merged"
                    )
            merged[layer.name] = dataclasses.replace(
                total, **{f: getattr(total, f) + getattr(layer, f) for f in _ADDITIVE}
            )
    in_call_order = [sorted(c.layers, key=lambda m: m.order) for c in counts]
    ran = _merge_orders([[m.name for m in layers if m.calls] for layers in in_call_order])
    idle = _merge_orders(
        [[m.name for m in layers if not merged[m.name].calls] for layers in in_call_order]
    )
    return OperationCounts(
        layers=tuple(
            dataclasses.replace(merged[name], order=i) for i, name in enumerate(ran + idle)
        ),
        time_steps=time_steps,
    )


def _name_key(name: str) -> tuple[str | int, ...]:
    # re.split with a group alternates text and digits, so positions compare like with like.
    return tuple(int(s) if i % 2 else s for i, s in enumerate(re.split(r"(\d+)", name)))


def _merge_orders(sequences: Sequence[Sequence[str]]) -> list[str]:
    """One order of the names that keeps every sequence's order (a topological sort).

    Names no sequence orders come by :func:`_name_key`. Sequences that contradict each other
    (``a`` before ``b`` in one, after it in another) cannot all be kept: the cycle is broken
    at the name that sorts first, so merging never fails on order alone.
    """
    successors: dict[str, set[str]] = {}
    pending: dict[str, int] = {}  # name -> predecessors not placed yet
    for seq in sequences:
        for name in seq:
            successors.setdefault(name, set())
            pending.setdefault(name, 0)
        for a, b in itertools.pairwise(seq):
            if b not in successors[a]:
                successors[a].add(b)
                pending[b] += 1
    ready = [(_name_key(n), n) for n, before in pending.items() if before == 0]
    heapq.heapify(ready)
    out = []
    while pending:
        if ready:
            name = heapq.heappop(ready)[1]
        else:
            name = min(pending, key=_name_key)
            logger.debug("passes called modules in conflicting orders; %r placed first", name)
        del pending[name]
        out.append(name)
        for after in successors[name]:
            if after in pending:
                pending[after] -= 1
                if pending[after] == 0:
                    heapq.heappush(ready, (_name_key(after), after))
    return out
