r"""Count synaptic operations, MACs, neuron updates and spikes of any torch spiking model.

:func:`count_operations` runs one forward pass with hooks on the synaptic layers
(``nn.Linear``, ``nn.Conv1d/2d/3d`` and their subclasses, e.g. SpikingJelly's ``layer.Linear``),
on matrix-product modules (any module with a ``matmul_mask`` attribute, below), on
``nn.Softmax`` and on the neurons that a :class:`NeuronAdapter` recognises (spiking_moe's
``LIF``, snnTorch's ``SpikingNeuron`` subclasses, Norse's ``SNN``/``SNNCell`` modules,
SpikingJelly's ``BaseNode``; matched by class name and module path, so none of those libraries
is imported here).

Letters: ``T`` time steps, ``B`` batch, ``R`` rows (tokens x steps folded), ``F`` features,
``C`` channels, ``G`` convolution groups, ``S`` spatial dims; for a product ``a @ b``, ``L``
leading indices (``[T, B, H]`` folded), ``a`` ``[..., M, K]``, ``b`` ``[..., K, N]``.

Counting rules, per call of a synaptic layer on input ``x``:

- ``x`` is **binary** when every element is exactly 0 or 1. It is checked on the device as
  ``nnz(x) == #(x == 1)`` (a 0-dim bool), and both counts below are folded in with
  ``torch.where``, so there is no host synchronisation per call or per time step. A two-valued
  tensor such as {0, 0.37} is graded, not spikes.
- ``nn.Linear(F_in, F_out)``, ``x`` ``[..., F_in]`` with ``R = x.numel() / F_in``:
  binary: ``AC = nnz(x) * F_out`` (each event reaches ``F_out`` synapses);
  graded: ``MAC = R * F_in * F_out``.
- ``nn.ConvNd(C_in, C_out, k, stride, padding, dilation, groups=G)``, ``x`` ``[B, C_in, *S]``
  (or ``[T, B, C_in, *S]``, folded): binary: ``AC = (C_out / G) * sum(conv(x_G, 1_k))``
  where ``x_G`` sums the events of each group's input channels and ``1_k`` is a ones kernel
  with the layer's stride, padding (mode included) and dilation. That sum is, exactly, the
  number of (event, output position) pairs, so borders, stride, padding and groups need no
  approximation. Graded: ``MAC = numel(output) * (C_in / G) * prod(k)``.
- **Matrix product** (attention's ``Q K^T`` and ``scores @ V``; a plain function cannot be
  hooked, so models do products in small modules). Protocol, duck-typed because ``energy``
  imports no model code: a module with an attribute ``matmul_mask`` (class or instance) whose
  ``forward(a, b)``, ``a`` ``[..., M, K]``, ``b`` ``[..., K, N]`` with the same leading dims
  (time first when time-major), returns ``a @ b`` ``[..., M, N]`` computing only the terms
  ``(m, k, n)`` the mask allows:
  ``None``: all; ``"output"``: ``n <= m`` (causal scores ``Q K^T``: query ``m`` sees keys
  ``n <= m``; ``M == N``; masked outputs exactly 0); ``"contraction"``: ``k <= m``
  (``scores @ V``: output row ``m`` sums the values of positions ``k <= m``; ``M == K``).
  The computed terms, ``L M K N``, ``L K M(M+1)/2`` and ``L N M(M+1)/2`` respectively, are the
  product's ``dense MACs``. ``a`` binary: each event ``a[m, k]`` is one AC per computed ``n``,
  ``AC = nnz(a) N``, ``sum_m nnz(a[m, :]) (m + 1)``, ``N #{events with k <= m}``; else ``b``
  binary: each event ``b[k, n]`` is one AC per computed ``m``, ``AC = nnz(b) M``,
  ``sum_n nnz(b[:, n]) (M - n)``, ``sum_k nnz(b[k, :]) (M - k)``; else (both graded)
  ``MAC = dense MACs``. When both are binary ``a``'s events are counted (the queries, or the
  scores, drive the product; driving it with ``b``'s would be an equally valid schedule).
  ``input_events`` are the events of the counted operand; the other operand plays the weights.
- **Softmax** (``nn.Softmax``, e.g. in an ANN twin): ``MAC = 3 * #finite inputs`` (exp, the
  running sum, the normalising multiply; masked ``-inf`` scores cost nothing). Pricing an exp
  as one MAC makes this a lower bound that favours the ANN.
- Bias additions are not counted: they are charged with the neuron update.
- Neuron: ``updates = numel(spikes)`` (one per neuron per time step, whether the module is
  called once on ``[T, B, ...]`` or once per step) and ``spikes = nnz(spikes)``.

Every count is exact. Counts of CPU tensors are Python ints (reading a CPU scalar costs no
synchronisation); those of accelerator tensors are int64 accumulated on the device, which the host
reads once, at the end (with the NaN screen of the outputs; inputs are screened for NaN/Inf
before the pass). Each tensor is scanned once, in one pass (``energy/value_counts.cpp`` on the
CPU, built on first use; PyTorch on other devices or without a compiler): a synaptic layer fed
a neuron's output reuses the neuron's scan unless the tensor was modified in place in between.

**ANN equivalent** (for the baselines in :mod:`energy.report`): the same layers run once per
token instead of once per time step, every input graded. A product with ``ann_softmax = True``
(optional attribute, default False: spiking attention scores, which the ANN would pass through
a softmax) adds that softmax, 3 MACs per computed output (``L M N``, ``L M(M+1)/2``, ``L M N``
for the three masks) and one output write per output element. A call is *time-major* when its
input shows a leading time dimension (Linear: ``[T, N, ..., F]``; ConvNd: ``[T, B, C, *S]``;
product and softmax: ``a``/input ``[T, ...]`` with at least 3 dims) or
carries time folded into its rows (``[T*B, ...]``): a view of a time-major tensor (the model's
``[T, B, ...]`` inputs, a time-major neuron or synaptic output) or the output of an uncounted
module (pooling, normalisation, reshaping) fed one. Time-major calls contribute
``dense MACs / T``. Other calls are one step of a step-by-step loop (snnTorch style, called
``T`` times) or a layer that runs once per forward (a router on rates); both come out right
when such calls contribute their mean per call, ``sum(dense MACs) / #calls``. ``tokens`` (the
per-step rows a layer saw: the ANN's rows) follows the same rule. Time folded by a plain
function between modules into a new tensor (e.g. ``F.max_pool2d`` called in a ``forward``)
cannot be traced: wrap it in a module. A module may declare its own step count, an int attribute
``energy_time_steps = L``: the calls of the countable modules inside it (itself included) whose
input shows ``L`` in dim 0 are time-major with ``L`` steps and contribute ``dense MACs / L``
(e.g. experts that run on routing windows of ``L`` steps with fresh state: the ANN runs one
step per (window, token) row).

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

Example:
    >>> fc = torch.nn.Linear(3, 2)
    >>> counts = count_operations(fc, torch.tensor([[[1.0, 0.0, 1.0]]]))  # [T=1, B=1, 3]
    >>> counts.layer("").acs, counts.layer("").macs
    (4, 0)
    >>> more = count_operations(fc, torch.tensor([[[0.0, 1.0, 0.0]]]))
    >>> merge_counts(counts, more).layer("").acs
    6

    A product module (causal attention scores):

    >>> class Scores(torch.nn.Module):
    ...     matmul_mask = "output"
    ...     def forward(self, a, b):
    ...         return (a @ b).tril()
    >>> q = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # [T=1, M=2, K=2]: 1 event, then 2
    >>> scores = count_operations(Scores(), q, torch.ones(1, 2, 2)).layer("")
    >>> scores.kind, scores.acs  # row 0 sees 1 key, row 1 sees 2: 1 * 1 + 2 * 2
    ('matmul', 5)
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _native

__all__ = [
    "BUILTIN_ADAPTERS",
    "GroupCounts",
    "LayerCounts",
    "NeuronAdapter",
    "OperationCounts",
    "count_operations",
    "merge_counts",
]

logger = logging.getLogger(__name__)

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_EXPERT_RE = re.compile(r"^((?:.*?\.)?(?:shared_)?experts\.\d+)(?:\.|$)")
_MASKS = (None, "output", "contraction")
# exp, running sum, normalising multiply: see the module docstring.
_SOFTMAX_MACS = 3
# Device accumulators of a _Tally. Softmax MACs depend on values (finite inputs), so their
# dense and ANN counts live on the device too, split by the ANN rule (time-major or not).
_SLOTS = ("acs", "macs", "input_events", "binary_calls", "spikes", "tm_macs", "flat_macs")
_SLOT_INDEX = {slot: i for i, slot in enumerate(_SLOTS)}


def _host_or_device(count: torch.Tensor) -> int | torch.Tensor:
    """A CPU count as an int (free to read), an accelerator's as a tensor (read at the end)."""
    return int(count) if count.device.type == "cpu" else count


def _where(condition: bool | torch.Tensor, a, b):
    """``a if condition else b`` for ints and bools, ``torch.where`` on the device otherwise."""
    if isinstance(condition, torch.Tensor):
        zero = torch.zeros((), dtype=torch.int64, device=condition.device)
        return torch.where(condition, zero + a, zero + b)
    return a if condition else b


# --------------------------------------------------------------------------- neuron adapters


def _first_tensor(output: Any) -> torch.Tensor:
    """Spikes from a neuron's output: the tensor itself, or the first element of a tuple.

    snnTorch returns ``spk`` or ``(spk, mem, ...)``, Norse ``(spikes, state)``, SpikingJelly and
    spiking_moe ``spikes``.
    """
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"neuron output must be a tensor or a tuple starting with one, got {type(output).__name__}"
        )
    return output


def _has_base(module: nn.Module, names: Iterable[str], module_prefix: str) -> bool:
    names = set(names)
    return any(
        cls.__name__ in names and cls.__module__.startswith(module_prefix)
        for cls in type(module).__mro__
    )


@dataclasses.dataclass(frozen=True)
class NeuronAdapter:
    """How to recognise one family of neuron modules and read spikes from their output.

    Attributes:
        name: label used in logs.
        matches: ``module -> bool``. Must not import the framework it recognises: built-ins
            compare class names and module paths along the MRO, so a model that was built
            with the framework is recognised and ``import energy`` stays light.
        spikes: ``forward output -> spike tensor`` (same leading dims as the input).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    spikes: Callable[[Any], torch.Tensor] = _first_tensor


BUILTIN_ADAPTERS: tuple[NeuronAdapter, ...] = (
    NeuronAdapter("spiking_moe", lambda m: _has_base(m, ["LIF"], "spiking_moe.")),
    NeuronAdapter("snntorch", lambda m: _has_base(m, ["SpikingNeuron"], "snntorch.")),
    NeuronAdapter(
        "norse",
        lambda m: _has_base(
            m, ["SNN", "SNNCell", "SNNRecurrent", "SNNRecurrentCell"], "norse.torch.module."
        ),
    ),
    NeuronAdapter(
        "spikingjelly", lambda m: _has_base(m, ["BaseNode"], "spikingjelly.activation_based.")
    ),
)


# --------------------------------------------------------------------------- results


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
        tokens: rows of the ANN equivalent (one step; see the module docstring).
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

    Attributes:
        label: group label, e.g. ``"moe.experts.3"``.
        layers: names of its modules, in call order.
        tokens: tokens routed to it: rows per step seen by its first synaptic layer.
        acs, macs, dense_macs, ann_macs, ann_outputs, input_events, neuron_updates, spikes,
        memory_reads, memory_writes: sums over ``layers``.
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
    """Result of :func:`count_operations`: exact per-module counts of one forward pass.

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


# --------------------------------------------------------------------------- hooks


class _Tally:
    """Per-module accumulators: device int64 tensors plus shape-derived Python ints."""

    def __init__(self, name: str, kind: str, group: str | None, fan_in: int, fan_out: int):
        self.name, self.kind, self.group = name, kind, group
        self.fan_in, self.fan_out = fan_in, fan_out
        self.order = -1
        # Steps in dim 0 of this module's time-major calls: the counter's T unless a module
        # around it declares its own (``energy_time_steps``, see count_operations).
        self.time_steps = 0
        self.calls = 0
        self.rows = 0
        self.dense_macs = 0
        self.neuron_updates = 0
        # ANN equivalent: time-major calls are divided by T, the others averaged per call.
        self.tm_ann_macs = self.tm_rows = self.tm_outputs = 0
        self.flat_calls = self.flat_ann_macs = self.flat_rows = self.flat_outputs = 0
        # One accumulator per _SLOTS entry: Python ints for counts read on the CPU (reading
        # them there costs nothing), int64 device tensors for counts that live on an
        # accelerator (created on the first such call, read once at the end).
        self.host_counts = [0] * len(_SLOTS)
        self.device_counts: torch.Tensor | None = None

    def add(self, **values: int | torch.Tensor) -> None:
        """Add counts by slot name (:data:`_SLOTS`): ints, or int64 device scalars."""
        on_device = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        for slot, value in values.items():
            if not isinstance(value, torch.Tensor):
                self.host_counts[_SLOT_INDEX[slot]] += value
        if not on_device:
            return
        device = next(iter(on_device.values())).device
        zero = torch.zeros((), dtype=torch.int64, device=device)
        stacked = torch.stack([on_device.get(slot, zero) for slot in _SLOTS])
        if self.device_counts is None:
            self.device_counts = torch.zeros(len(_SLOTS), dtype=torch.int64, device=device)
        self.device_counts += stacked.to(self.device_counts.device)


class _Counter:
    def __init__(self, time_steps: int):
        self.time_steps = time_steps
        self.tallies: list[_Tally] = []
        self.next_order = 0
        # Tensors known to carry time in dim 0 (possibly folded with the batch), by identity.
        # Weak, so the pass keeps no activation alive; identity is re-checked on lookup.
        self.time_major: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )
        self.scanned: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.scan_results: dict[int, tuple[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def mark(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            root = t if t._base is None else t._base
            self.time_major[id(root)] = root

    def is_time_major(self, x: torch.Tensor, explicit: bool) -> bool:
        """``explicit``: the shape shows ``[T, B, ...]``; else a view of a marked tensor."""
        if explicit:
            return True
        root = x if x._base is None else x._base
        return self.time_major.get(id(root)) is root and x.shape[0] % self.time_steps == 0

    def value_counts(self, x: torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """``(nnz(x), #(x == 1))`` (ints on the CPU, int64 device scalars elsewhere); ``x`` is
        binary iff they are equal.

        Cached by identity: a synaptic layer fed a neuron's output (or a reshape of all of
        it) reuses the counts the neuron hook already took, so spikes are scanned once.
        """
        root = x if x._base is None else x._base
        key = id(root)
        if self.scanned.get(key) is root and root.numel() == x.numel():
            version, result = self.scan_results[key]
            if version == root._version:  # not modified in place since the scan
                return result
        result = tuple(_host_or_device(count) for count in _native.value_counts(x))
        self.scanned[key] = root
        self.scan_results[key] = (root._version, result)
        return result

    def propagate_hook(self, module, args, kwargs, output):
        """Non-counted modules (pooling, norms, reshapes): time-major in, time-major out."""
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() == 0 or not isinstance(output, torch.Tensor) or output.dim() == 0:
            return
        explicit = x.dim() >= 3 and x.shape[0] == self.time_steps
        if self.is_time_major(x, explicit) and output.shape[0] % self.time_steps == 0:
            self.mark(output)

    def _start(self, tally: _Tally) -> None:
        if tally.order < 0:
            tally.order = self.next_order
            self.next_order += 1
        tally.calls += 1

    def _record_synaptic(
        self,
        tally: _Tally,
        x: torch.Tensor,
        time_major: bool,
        rows: int,
        dense_macs: int,
        output: torch.Tensor,
        synapse_events: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        nnz, ones = self.value_counts(x)
        is_binary = nnz == ones
        # On an accelerator both branches are computed and one is selected on the device: no
        # host sync.
        tally.add(
            acs=_where(is_binary, synapse_events(nnz), 0),
            macs=_where(is_binary, 0, dense_macs),
            input_events=_where(is_binary, nnz, 0),
            binary_calls=_where(is_binary, 1, 0),
        )
        self._account(tally, time_major, rows, dense_macs, output)

    def _account(
        self,
        tally: _Tally,
        time_major: bool,
        rows: int,
        dense_macs: int,
        output: torch.Tensor,
        ann_macs: int | None = None,
        ann_outputs: int | None = None,
    ) -> None:
        """Shape-derived counts of one call; ANN ones (default: dense) by the time-major rule."""
        ann_macs = dense_macs if ann_macs is None else ann_macs
        ann_outputs = output.numel() if ann_outputs is None else ann_outputs
        tally.rows += rows
        tally.dense_macs += dense_macs
        if time_major:
            self.mark(output)
            tally.tm_ann_macs += ann_macs
            tally.tm_rows += rows
            tally.tm_outputs += ann_outputs
        else:
            tally.flat_calls += 1
            tally.flat_ann_macs += ann_macs
            tally.flat_rows += rows
            tally.flat_outputs += ann_outputs

    def linear_hook(self, tally: _Tally):
        def hook(module: nn.Linear, args, kwargs, output):
            self._start(tally)
            x = args[0] if args else kwargs["input"]
            rows = x.numel() // module.in_features
            time_major = self.is_time_major(x, x.dim() >= 3 and x.shape[0] == tally.time_steps)
            self._record_synaptic(
                tally,
                x,
                time_major,
                rows,
                dense_macs=rows * module.in_features * module.out_features,
                output=output,
                synapse_events=lambda nnz: nnz * module.out_features,
            )

        return hook

    def conv_hook(self, tally: _Tally, nd: int):
        def hook(module: nn.modules.conv._ConvNd, args, kwargs, output):
            self._start(tally)
            x = args[0] if args else kwargs["input"]
            time_major = self.is_time_major(x, x.dim() == nd + 3 and x.shape[0] == tally.time_steps)
            if x.dim() == nd + 3:  # [T, B, C, *S] (SpikingJelly multi-step): fold T into B
                x = x.flatten(0, 1)
            elif x.dim() == nd + 1:  # unbatched [C, *S]
                x = x.unsqueeze(0)
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            self._record_synaptic(
                tally,
                x,
                time_major,
                rows=x.shape[0],
                dense_macs=output.numel() * per_output,
                output=output,
                synapse_events=lambda nnz: _host_or_device(_conv_synapse_events(module, x, nd)),
            )

        return hook

    def product_hook(self, tally: _Tally):
        def hook(module: nn.Module, args, kwargs, output):
            self._start(tally)
            a, b = _operands(tally.name, args, kwargs)
            mask = _product_mask(module, tally.name)
            if a.dim() < 2 or b.dim() != a.dim() or a.shape[:-2] != b.shape[:-2]:
                raise ValueError(
                    f"product {tally.name!r}: operands must be [..., M, K] and [..., K, N] with "
                    f"the same leading dims, got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            *lead, M, K = a.shape
            N = b.shape[-1]
            if b.shape[-2] != K:
                raise ValueError(
                    f"product {tally.name!r}: inner sizes differ, {tuple(a.shape)} @ {tuple(b.shape)}"
                )
            if (mask == "output" and M != N) or (mask == "contraction" and M != K):
                raise ValueError(
                    f"product {tally.name!r}: matmul_mask={mask!r} needs "
                    f"{'M == N' if mask == 'output' else 'M == K'}, got "
                    f"{tuple(a.shape)} @ {tuple(b.shape)}"
                )
            L = math.prod(lead)
            time_major = self.is_time_major(a, a.dim() >= 3 and a.shape[0] == tally.time_steps)
            nnz_a, ones_a = self.value_counts(a)
            nnz_b, ones_b = self.value_counts(b)
            a_binary = nnz_a == ones_a
            if isinstance(a_binary, torch.Tensor):
                b_binary = (nnz_b == ones_b) & ~a_binary
            else:
                b_binary = nnz_b == ones_b and not a_binary
            if mask is None:
                acs_a, acs_b = nnz_a * N, nnz_b * M
            else:
                reach_a, reach_b = _product_reach(mask, M, K, N, a.device)
                acs_a = _host_or_device((_events_per_cell(a, L) * reach_a).sum())
                acs_b = _host_or_device((_events_per_cell(b, L) * reach_b).sum())
            terms, outputs = _product_size(mask, M, K, N)
            dense_macs = L * terms
            ann_macs, ann_outputs = dense_macs, output.numel()
            if getattr(module, "ann_softmax", False):
                ann_macs += _SOFTMAX_MACS * L * outputs
                ann_outputs += output.numel()
            counted = a_binary | b_binary
            tally.add(
                acs=_where(a_binary, acs_a, _where(b_binary, acs_b, 0)),
                macs=_where(counted, 0, dense_macs),
                input_events=_where(a_binary, nnz_a, _where(b_binary, nnz_b, 0)),
                binary_calls=_where(counted, 1, 0),
            )
            self._account(tally, time_major, L * M, dense_macs, output, ann_macs, ann_outputs)

        return hook

    def softmax_hook(self, tally: _Tally):
        def hook(module: nn.Softmax, args, kwargs, output):
            self._start(tally)
            x = args[0] if args else kwargs["input"]
            time_major = self.is_time_major(x, x.dim() >= 3 and x.shape[0] == tally.time_steps)
            macs = _host_or_device(torch.count_nonzero(torch.isfinite(x)) * _SOFTMAX_MACS)
            # Known only on the device: its dense and ANN shares go to device slots as well.
            tally.add(macs=macs, **{"tm_macs" if time_major else "flat_macs": macs})
            dim = -1 if module.dim is None else module.dim
            rows = x.numel() // max(x.shape[dim], 1) if x.dim() else 1
            self._account(tally, time_major, rows, 0, output)

        return hook

    def neuron_hook(self, tally: _Tally, adapter: NeuronAdapter):
        def hook(module, args, kwargs, output):
            self._start(tally)
            spikes = adapter.spikes(output)
            x = args[0] if args else next(iter(kwargs.values()), None)
            explicit = spikes.dim() >= 3 and spikes.shape[0] == tally.time_steps
            if explicit or (
                isinstance(x, torch.Tensor) and x.dim() > 0 and self.is_time_major(x, False)
            ):
                self.mark(spikes)
            tally.neuron_updates += spikes.numel()
            tally.add(spikes=self.value_counts(spikes)[0])

        return hook


def _declared_time_steps(name: str, modules: Mapping[str, nn.Module]) -> int | None:
    """``energy_time_steps`` of the innermost module around ``name`` (itself included) that
    declares one, else None."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        declared = getattr(modules.get(prefix), "energy_time_steps", None)
        if declared is None:
            continue
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
            raise ValueError(
                f"module {prefix!r}: energy_time_steps must be a positive int, got {declared!r}"
            )
        return declared
    return None


def _conv_synapse_events(module: nn.modules.conv._ConvNd, x_BCS: torch.Tensor, nd: int):
    """Exact number of (input event, synapse) pairs of a convolution: see module docstring."""
    groups = module.groups
    # Sum each group's input channels first: the kernel is all ones, so only the per-group
    # event count at each position matters, and the convolution below stays cheap.
    x_BGS = x_BCS.reshape(x_BCS.shape[0], groups, -1, *x_BCS.shape[2:]).sum(2, dtype=torch.float32)
    padding = module.padding
    if module.padding_mode != "zeros":
        x_BGS = F.pad(x_BGS, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    ones = x_BGS.new_ones((groups, 1, *module.kernel_size))
    reach = _CONV_FN[nd](x_BGS, ones, None, module.stride, padding, module.dilation, groups)
    pairs = reach.sum(dtype=torch.float64).round().to(torch.int64)
    return pairs * (module.out_channels // groups)


def _operands(name: str, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``: the first two tensor arguments of a product's forward call."""
    found = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if len(found) < 2:
        raise TypeError(
            f"product {name!r} must be called with two tensors (a, b), got {len(found)}"
        )
    return found[0], found[1]


def _product_mask(module: nn.Module, name: str) -> str | None:
    mask = module.matmul_mask
    if mask not in _MASKS:
        raise ValueError(f"module {name!r}: matmul_mask must be one of {_MASKS}, got {mask!r}")
    return mask


def _product_size(mask: str | None, M: int, K: int, N: int) -> tuple[int, int]:
    """(computed terms, outputs with at least one term) per leading index: module docstring."""
    triangle = M * (M + 1) // 2
    if mask is None:
        terms, outputs = M * K * N, M * N
    elif mask == "output":
        terms, outputs = K * triangle, triangle
    else:  # every output row m has the term k = 0
        terms, outputs = N * triangle, M * N
    return terms, (outputs if K else 0)


def _product_reach(mask: str, M: int, K: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Computed terms each operand element enters: ``[M, K]`` for ``a`` (how many ``n``),
    ``[K, N]`` for ``b`` (how many ``m``), int64 on ``device``."""
    if mask == "output":  # n <= m
        reach_a = torch.arange(1, M + 1, device=device).unsqueeze(1).expand(M, K)
        reach_b = (M - torch.arange(N, device=device)).unsqueeze(0).expand(K, N)
    else:  # "contraction": k <= m
        reach_a = torch.ones(M, K, dtype=torch.int64, device=device).tril() * N
        reach_b = (M - torch.arange(K, device=device)).unsqueeze(1).expand(K, N)
    return reach_a, reach_b


def _events_per_cell(x: torch.Tensor, leading: int) -> torch.Tensor:
    """Events at each ``[M, K]`` position, summed over the leading dims (int64)."""
    # Reducing over the leading dims first keeps the weighting by reach a small [M, K] product.
    return x.bool().reshape(leading, *x.shape[-2:]).sum(0, dtype=torch.int64)


# --------------------------------------------------------------------------- entry point


def _group_of(name: str, groups: Mapping[str, Sequence[str]] | None) -> str | None:
    if groups is None:
        match = _EXPERT_RE.match(name)
        return match.group(1) if match else None
    found = [
        label
        for label, prefixes in groups.items()
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    if len(found) > 1:
        raise ValueError(f"module {name!r} matches several groups: {found}")
    return found[0] if found else None


def _normalise_groups(groups) -> dict[str, tuple[str, ...]] | None:
    if groups is None:
        return None
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups must map a label to a module-name prefix or a list of prefixes, "
            f"got {type(groups).__name__}"
        )
    out = {}
    for label, prefixes in groups.items():
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        if not all(isinstance(p, str) for p in prefixes):
            raise TypeError(f"groups[{label!r}] must be a string or a list of strings")
        out[str(label)] = tuple(prefixes)
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _non_finite(x: torch.Tensor) -> str | None:
    """ "NaN", "Inf" or None; a cheap sum screens first (a finite sum rules both out)."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return None
    if bool(torch.isnan(x).any()):
        return "NaN"
    return "Inf" if bool(torch.isinf(x).any()) else None


def count_operations(
    model: nn.Module,
    *inputs: Any,
    groups: Mapping[str, str | Sequence[str]] | None = None,
    time_steps: int | None = None,
    neuron_adapters: Sequence[NeuronAdapter] = (),
) -> OperationCounts:
    """Run ``model(*inputs)`` once under ``torch.no_grad`` and count its operations exactly.

    The model runs in its current mode: call ``model.eval()`` first if its routing is noisy
    in training mode. Rules and formulas: module docstring.

    Args:
        model: any ``nn.Module`` containing Linear/ConvNd layers, product modules
            (``matmul_mask``), ``nn.Softmax`` and/or recognised neurons.
        *inputs: positional inputs of ``model``; time-major (``[T, B, ...]``).
        groups: ``label -> module-name prefix(es)`` to attribute modules to experts. None
            groups by name: every module under ``...experts.<i>`` belongs to group
            ``"...experts.<i>"``, and under ``...shared_experts.<i>`` to
            ``"...shared_experts.<i>"``.
        time_steps: ``T`` for the ANN equivalent; None takes dim 0 of the first tensor input.
        neuron_adapters: extra :class:`NeuronAdapter` s, tried before :data:`BUILTIN_ADAPTERS`.

    Returns:
        :class:`OperationCounts` with one :class:`LayerCounts` per module that ran.

    Raises:
        ValueError: no countable module, none ran, NaN in an input or output, bad ``groups``
            or ``time_steps``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_tensors = _tensors(inputs)
    for i, x in enumerate(input_tensors):
        problem = _non_finite(x) if x.is_floating_point() else None
        if problem:
            raise ValueError(f"input tensor {i} (shape {tuple(x.shape)}) contains {problem}")
    if time_steps is None:
        if not input_tensors or input_tensors[0].dim() == 0:
            raise ValueError("cannot infer time_steps: pass time_steps= or a [T, B, ...] input")
        time_steps = int(input_tensors[0].shape[0])
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be a positive int, got {time_steps!r}")
    group_map = _normalise_groups(groups)
    adapters = (*neuron_adapters, *BUILTIN_ADAPTERS)

    counter = _Counter(time_steps)
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, module in model.named_modules():
            nd = next((n for cls, n in _CONV.items() if isinstance(module, cls)), None)
            adapter = None
            # The product protocol is an explicit opt-in, so it wins over the type checks.
            if hasattr(module, "matmul_mask"):
                _product_mask(module, name)
                tally = _Tally(name, "matmul", None, 0, 0)
                hook = counter.product_hook(tally)
            elif isinstance(module, nn.Softmax):
                tally = _Tally(name, "softmax", None, 0, 0)
                hook = counter.softmax_hook(tally)
            elif isinstance(module, nn.Linear):
                tally = _Tally(name, "linear", None, module.in_features, module.out_features)
                hook = counter.linear_hook(tally)
            elif nd is not None:
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                tally = _Tally(name, f"conv{nd}d", None, fan_in, module.out_channels)
                hook = counter.conv_hook(tally, nd)
            else:
                adapter = next((a for a in adapters if a.matches(module)), None)
                if adapter is None:
                    handles.append(
                        module.register_forward_hook(counter.propagate_hook, with_kwargs=True)
                    )
                    continue
                tally = _Tally(name, "neuron", None, 0, 0)
                hook = counter.neuron_hook(tally, adapter)
            tally.group = _group_of(name, group_map)
            tally.time_steps = _declared_time_steps(name, modules) or time_steps
            counter.tallies.append(tally)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        if not counter.tallies:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"{type(model).__name__} has no countable layers: count_operations counts "
                "nn.Linear, nn.Conv1d/2d/3d, product modules (with a matmul_mask attribute), "
                "nn.Softmax and neurons recognised by a NeuronAdapter "
                f"({[a.name for a in adapters]}); module types found: {kinds}"
            )
        if group_map is not None:
            for label, prefixes in group_map.items():
                for p in prefixes:
                    if not any(t.name == p or t.name.startswith(p + ".") for t in counter.tallies):
                        raise ValueError(
                            f"groups[{label!r}]: prefix {p!r} matches no countable module; "
                            f"countable modules: {[t.name for t in counter.tallies]}"
                        )
        for x in input_tensors:
            if x.dim() >= 3 and x.shape[0] == time_steps:
                counter.mark(x)
        with torch.no_grad():
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    ran = sorted((t for t in counter.tallies if t.calls), key=lambda t: t.order)
    if not ran:
        raise ValueError(
            f"none of the countable modules of {type(model).__name__} ran during the forward pass"
        )
    # Experts that received no token stay in the result (zero load is worth reporting).
    idle = [t for t in counter.tallies if not t.calls and t.group is not None]
    for t in idle:
        t.order = counter.next_order
        counter.next_order += 1
    on_device = [t.device_counts for t in ran if t.device_counts is not None]
    device = on_device[0].device if on_device else torch.device("cpu")
    zeros = torch.zeros(len(_SLOTS), dtype=torch.int64, device=device)
    out_tensors = [t for t in _tensors(output) if t.is_floating_point() and t.numel()]
    # A sum is NaN whenever an element is: a cheap screen, read with the counts below.
    screen = torch.zeros((), dtype=torch.bool, device=device)
    for t in out_tensors:
        screen = screen | torch.isnan(t.sum()).to(device)
    # The one host synchronisation of the pass: every device count and the NaN screen together.
    rows = [zeros if t.device_counts is None else t.device_counts.to(device) for t in ran]
    rows.append(screen.to(torch.int64).expand(len(_SLOTS)))
    *device_values, (nan_seen, *_) = torch.stack(rows).tolist()
    if nan_seen and any(bool(torch.isnan(t).any()) for t in out_tensors):
        raise ValueError("the model's output contains NaN: the counts would not be meaningful")
    stacked = [
        [host + dev for host, dev in zip(t.host_counts, values, strict=True)]
        for t, values in zip(ran, device_values, strict=True)
    ]
    stacked += [[0] * len(_SLOTS) for _ in idle]
    layers = tuple(
        _finish(t, values, time_steps) for t, values in zip(ran + idle, stacked, strict=True)
    )
    logger.debug("counted %d modules over T=%d", len(layers), time_steps)
    return OperationCounts(layers=layers, time_steps=time_steps)


def _finish(tally: _Tally, values: list[int], time_steps: int) -> LayerCounts:
    acs, macs, events, binary_calls, spikes, tm_macs, flat_macs = values
    time_steps = tally.time_steps or time_steps
    flat = max(tally.flat_calls, 1)
    ann_macs = (tally.tm_ann_macs + tm_macs) // time_steps + (
        tally.flat_ann_macs + flat_macs
    ) // flat
    return LayerCounts(
        name=tally.name,
        kind=tally.kind,
        group=tally.group,
        order=tally.order,
        calls=tally.calls,
        fan_in=tally.fan_in,
        fan_out=tally.fan_out,
        rows=tally.rows,
        tokens=tally.tm_rows // time_steps + tally.flat_rows // flat,
        binary_calls=binary_calls,
        input_events=events,
        acs=acs,
        macs=macs,
        dense_macs=tally.dense_macs + tm_macs + flat_macs,
        ann_macs=ann_macs,
        ann_outputs=tally.tm_outputs // time_steps + tally.flat_outputs // flat,
        neuron_updates=tally.neuron_updates,
        spikes=spikes,
    )


# --------------------------------------------------------------------------- several passes

# What identifies a module across passes, and what adds up. ``name`` is the key; ``order`` is
# recomputed from the call orders of the passes.
_IDENTITY = ("kind", "group", "fan_in", "fan_out")
_COUNTS = (
    "calls",
    "rows",
    "tokens",
    "binary_calls",
    "input_events",
    "acs",
    "macs",
    "dense_macs",
    "ann_macs",
    "ann_outputs",
    "neuron_updates",
    "spikes",
)


def merge_counts(*counts: OperationCounts) -> OperationCounts:
    """Sum the counts of several forward passes of one model, e.g. the batches of a data set.

    The one way to add counts up. A function rather than ``+``: merging validates its inputs
    and merges call orders, so it is not element-wise addition, and ``merge_counts(*passes)``
    needs no ``sum`` start value. Accumulate batch by batch with
    ``total = merge_counts(total, counts)``: the result holds Python ints only.

    Modules are matched by name and every count is summed (``calls`` and ``binary_calls`` too:
    they count the calls of all passes). A module present in only some passes keeps its
    counts. Layers come in merged call order: whenever a pass called ``a`` before ``b``, so
    does the result; modules that no pass ran together (experts that never shared a batch)
    come in name order, numbers compared as numbers (``experts.2`` before ``experts.10``),
    which is the order a ModuleList of experts runs in. When every pass is consistent with one call
    order (the same model, different experts skipped), ``order`` and the layer order are
    therefore those of one pass over the concatenated inputs. Group members that ran in no
    pass (idle experts) are listed last with zero counts, as :func:`count_operations` lists
    them.

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
                total, **{f: getattr(total, f) + getattr(layer, f) for f in _COUNTS}
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
