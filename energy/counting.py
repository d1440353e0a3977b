"""Count synaptic operations, MACs, neuron updates and spikes of any torch spiking model.

:func:`count_operations` runs one forward pass with hooks on the synaptic layers
(``nn.Linear``, ``nn.Conv1d/2d/3d`` and their subclasses, e.g. SpikingJelly's ``layer.Linear``),
on matrix-product modules (any module with a ``matmul_mask`` attribute), on ``nn.Softmax`` and
on the neurons that a :class:`~energy.adapters.NeuronAdapter` recognises, and applies the
counting rules of :mod:`energy.rules` to every call. It returns the counts of
:mod:`energy.counts` (which also sums passes: :func:`merge_counts`); the names of both, and
those of :mod:`energy.adapters`, are importable from here.

``T`` is the number of time steps; other letters as in :mod:`energy.rules`.

Every count is exact. Counts of CPU tensors are Python ints (reading a CPU scalar costs no
synchronisation); those of accelerator tensors are int64 accumulated on the device, which the host
reads once, at the end (with the NaN screen of the outputs; inputs are screened for NaN/Inf
before the pass). Each tensor is scanned once, in one pass (``energy/value_counts.cpp`` on the
CPU, built on first use; PyTorch on other devices or without a compiler): a synaptic layer fed
a neuron's output reuses the neuron's scan unless the tensor was modified in place in between.

**ANN equivalent** (for the baselines in :mod:`energy.report`): the same layers run once per
token instead of once per time step, every input graded; each call's ANN counts are those of
:mod:`energy.rules`. A call is *time-major* when its
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

Example:
    >>> fc = torch.nn.Linear(3, 2)
    >>> counts = count_operations(fc, torch.tensor([[[1.0, 0.0, 1.0]]]))  # [T=1, B=1, 3]
    >>> counts.layer("").acs, counts.layer("").macs
    (4, 0)
    >>> more = count_operations(fc, torch.tensor([[[0.0, 1.0, 0.0]]]))
    >>> merge_counts(counts, more).layer("").acs
    6
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _native, rules
from .adapters import BUILTIN_ADAPTERS, NeuronAdapter
from .counts import GroupCounts, LayerCounts, OperationCounts, merge_counts

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

_EXPERT_RE = re.compile(r"^((?:.*?\.)?(?:shared_)?experts\.\d+)(?:\.|$)")
# Device accumulators of a _Tally. Softmax MACs depend on values (finite inputs), so their
# dense and ANN counts live on the device too, split by the ANN rule (time-major or not).
_SLOTS = ("acs", "macs", "input_events", "binary_calls", "spikes", "tm_macs", "flat_macs")
_SLOT_INDEX = {slot: i for i, slot in enumerate(_SLOTS)}
# LayerCounts fields that a _Tally holds as they are.
_AS_TALLIED = (
    "name",
    "kind",
    "group",
    "order",
    "calls",
    "fan_in",
    "fan_out",
    "rows",
    "neuron_updates",
)


def _host_or_device(count: torch.Tensor) -> int | torch.Tensor:
    """A CPU count as an int (free to read), an accelerator's as a tensor (read at the end)."""
    return int(count) if count.device.type == "cpu" else count


def _where(condition: bool | torch.Tensor, a, b):
    """``a if condition else b`` for ints and bools, ``torch.where`` on the device otherwise."""
    if isinstance(condition, torch.Tensor):
        zero = torch.zeros((), dtype=torch.int64, device=condition.device)
        return torch.where(condition, zero + a, zero + b)
    return a if condition else b


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
        # The most spikes an input element may carry (``energy_spike_levels`` declared around
        # the module; 1: binary spikes only).
        self.spike_levels = 1
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
        is_spikes, events = self.spike_events(x, tally.spike_levels)
        # On an accelerator both branches are computed and one is selected on the device: no
        # host sync.
        tally.add(
            acs=_where(is_spikes, synapse_events(events), 0),
            macs=_where(is_spikes, 0, dense_macs),
            input_events=_where(is_spikes, events, 0),
            binary_calls=_where(is_spikes, 1, 0),
        )
        self._account(tally, time_major, rows, dense_macs, output)

    def spike_events(self, x: torch.Tensor, levels: int):
        """``(x is spikes, its events)``: binary (``levels`` 1) with ``nnz`` events, or, under
        a declared ``energy_spike_levels = D``, integer spike counts ``0..D`` with ``sum(x)``
        events (a count ``c`` is ``c`` spikes: what its binary expansion executes)."""
        if levels == 1:
            nnz, ones = self.value_counts(x)
            return nnz == ones, nnz
        is_counts, total = rules.spike_counts(x, levels)
        return _host_or_device(is_counts), _host_or_device(total)

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
            self._record_synaptic(
                tally,
                x,
                time_major,
                rows=x.shape[0],
                dense_macs=output.numel() * rules.conv_fan_in(module),
                output=output,
                synapse_events=lambda nnz: _host_or_device(
                    rules.conv_synapse_events(module, x, nd)
                ),
            )

        return hook

    def product_hook(self, tally: _Tally):
        def hook(module: nn.Module, args, kwargs, output):
            self._start(tally)
            a, b = rules.product_operands(tally.name, args, kwargs)
            mask = rules.product_mask(module, tally.name)
            L, M, K, N = rules.product_dims(tally.name, mask, a, b)
            time_major = self.is_time_major(a, a.dim() >= 3 and a.shape[0] == tally.time_steps)
            a_binary, nnz_a = self.spike_events(a, tally.spike_levels)
            b_spikes, nnz_b = self.spike_events(b, tally.spike_levels)
            if isinstance(a_binary, torch.Tensor) or isinstance(b_spikes, torch.Tensor):
                b_binary = torch.as_tensor(b_spikes) & ~torch.as_tensor(a_binary)
            else:
                b_binary = b_spikes and not a_binary
            if mask is None:
                acs_a, acs_b = nnz_a * N, nnz_b * M
            else:
                acs_a, acs_b = map(_host_or_device, rules.masked_synapse_events(mask, a, b))
            terms, outputs = rules.product_size(mask, M, K, N)
            dense_macs = L * terms
            ann_macs, ann_outputs = dense_macs, output.numel()
            if getattr(module, "ann_softmax", False):
                ann_macs += rules.SOFTMAX_MACS * L * outputs
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
            macs = _host_or_device(rules.softmax_macs(x))
            # Known only on the device: its dense and ANN shares go to device slots as well.
            tally.add(macs=macs, **{"tm_macs" if time_major else "flat_macs": macs})
            dim = -1 if module.dim is None else module.dim
            rows = x.numel() // max(x.shape[dim], 1) if x.dim() else 1
            self._account(tally, time_major, rows, 0, output)

        return hook

    def norm_hook(self, tally: _Tally):
        def hook(module: nn.LayerNorm, args, kwargs, output):
            self._start(tally)
            x = args[0] if args else kwargs["input"]
            time_major = self.is_time_major(x, x.dim() >= 3 and x.shape[0] == tally.time_steps)
            macs = rules.NORM_MACS * x.numel()
            tally.add(macs=macs, **{"tm_macs" if time_major else "flat_macs": macs})
            self._account(tally, time_major, x.numel() // max(x.shape[-1], 1), 0, output)

        return hook

    def add_hook(self, tally: _Tally):
        def hook(module: nn.Module, args, kwargs, output):
            self._start(tally)
            x = args[0] if args else next(iter(kwargs.values()))
            time_major = self.is_time_major(x, x.dim() >= 3 and x.shape[0] == tally.time_steps)
            tally.add(acs=output.numel())
            rows = output.numel() // max(output.shape[-1], 1)
            self._account(tally, time_major, rows, 0, output, ann_macs=0, ann_outputs=0)

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
            # A neuron emitting up to D spikes per step is D binary virtual steps: D updates.
            levels = getattr(module, "spike_levels", 1)
            tally.neuron_updates += spikes.numel() * levels
            tally.add(spikes=self.spike_events(spikes, levels)[1])

        return hook


def _declared(name: str, modules: Mapping[str, nn.Module], attribute: str) -> int | None:
    """The int ``attribute`` (``energy_time_steps``, ``energy_spike_levels``) of the innermost
    module around ``name`` (itself included) that declares one, else None."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        declared = getattr(modules.get(prefix), attribute, None)
        if declared is None:
            continue
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
            raise ValueError(
                f"module {prefix!r}: {attribute} must be a positive int, got {declared!r}"
            )
        return declared
    return None


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
    in training mode. Rules and formulas: :mod:`energy.rules`; the ANN equivalent: module
    docstring.

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
            nd = rules.conv_dims(module)
            adapter = None
            # The product protocol is an explicit opt-in, so it wins over the type checks.
            if hasattr(module, "matmul_mask"):
                rules.product_mask(module, name)
                tally = _Tally(name, "matmul", None, 0, 0)
                hook = counter.product_hook(tally)
            elif getattr(module, "energy_elementwise", None) == "add":
                tally = _Tally(name, "add", None, 0, 0)
                hook = counter.add_hook(tally)
            elif isinstance(module, nn.Softmax):
                tally = _Tally(name, "softmax", None, 0, 0)
                hook = counter.softmax_hook(tally)
            elif isinstance(module, nn.LayerNorm):
                tally = _Tally(name, "norm", None, 0, 0)
                hook = counter.norm_hook(tally)
            elif isinstance(module, nn.Linear):
                tally = _Tally(name, "linear", None, module.in_features, module.out_features)
                hook = counter.linear_hook(tally)
            elif nd is not None:
                fan_in = rules.conv_fan_in(module)
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
            tally.time_steps = _declared(name, modules, "energy_time_steps") or time_steps
            tally.spike_levels = _declared(name, modules, "energy_spike_levels") or 1
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
        **{field: getattr(tally, field) for field in _AS_TALLIED},
        tokens=tally.tm_rows // time_steps + tally.flat_rows // flat,
        binary_calls=binary_calls,
        input_events=events,
        acs=acs,
        macs=macs,
        dense_macs=tally.dense_macs + tm_macs + flat_macs,
        ann_macs=ann_macs,
        ann_outputs=tally.tm_outputs // time_steps + tally.flat_outputs // flat,
        spikes=spikes,
    )
