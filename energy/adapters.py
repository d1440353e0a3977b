"""Neuron adapters: how :func:`energy.count_operations` recognises a neuron and reads its spikes.

A neuron module is counted as ``updates = numel(spikes)`` and ``spikes = nnz(spikes)`` (rule in
:mod:`energy.rules`); an adapter says which modules are neurons and where their spikes are in
the module's output. The built-in adapters, :data:`BUILTIN_ADAPTERS`, recognise spiking_moe's
``SpikingNeuron`` (``LIF``, ``MultiSpike``), snnTorch's ``SpikingNeuron`` subclasses, Norse's ``SNN``/``SNNCell`` modules and
SpikingJelly's ``BaseNode`` by class name and module path along the MRO, so none of those
libraries is imported here. A model's own neurons need an adapter of their own, passed as
``count_operations(..., neuron_adapters=[...])``.

Example:
    A neuron whose forward returns a dict, read by the adapter's ``spikes``:

    >>> import torch
    >>> from energy import count_operations
    >>> class Fire(torch.nn.Module):
    ...     def forward(self, x):
    ...         return {"spikes": (x > 0.5).float(), "membrane": x}
    >>> fire = NeuronAdapter("fire", lambda m: isinstance(m, Fire), lambda out: out["spikes"])
    >>> x = torch.tensor([[[0.9, 0.1, 0.7]]])  # [T=1, B=1, 3]
    >>> counts = count_operations(Fire(), x, neuron_adapters=[fire]).layer("")
    >>> counts.neuron_updates, counts.spikes
    (3, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["BUILTIN_ADAPTERS", "NeuronAdapter"]


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


#: The neuron families :func:`~energy.counting.count_operations` recognises by itself (this
#: package's, snnTorch's, Norse's and SpikingJelly's), tried after its ``neuron_adapters``.
BUILTIN_ADAPTERS: tuple[NeuronAdapter, ...] = (
    NeuronAdapter("spiking_moe", lambda m: _has_base(m, ["SpikingNeuron"], "spiking_moe.")),
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
