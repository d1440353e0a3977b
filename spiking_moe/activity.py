r"""Spiking activity that models report in their output.

A model returns, beside its result, the spikes that each of its neuron populations emitted
in the call: an :class:`Activity`. Training reads it for the activity penalty and the
firing-rate metrics, so nothing has to hook the model's neurons (hooks would also switch off
the grouped expert GEMM, which cannot call the hooked modules).

A *population* is one neuron module's output over one call: its name is the module's path
relative to the module that reports it (``"input_neuron"``, ``"layers.0.experts.2.net.1"``),
so a model's names are its module names. For population :math:`p` with spikes
:math:`s \in \{0, 1\}` over its neuron updates (neurons x steps x rows):

.. math::

    \text{spikes}_p = \sum s, \qquad \text{updates}_p = \#\text{elements of } s, \qquad
    \text{rate}_p = \text{spikes}_p / \text{updates}_p .

A population that did not run in the call (an expert that got no tokens) is reported with
zero spikes and zero updates, so a model's layout (names and order) is the same in every
call; its rate is reported as 0.

Shape letters: the package legend (:mod:`spiking_moe`): ``G`` populations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Activity"]


@dataclass(frozen=True, eq=False)
class Activity:
    """Spikes and neuron updates of named neuron populations in one forward call.

    Attributes:
        names: ``G`` population names (module paths, see the module docstring).
        spikes: ``[G]`` float32, spikes each population emitted; differentiable, so a penalty
            on the rates trains through the surrogate gradient.
        updates: ``[G]`` int64, neuron updates of each population (0: it did not run).

    Example:
        >>> import torch
        >>> a = Activity.of("lif", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> b = Activity.concat([a, a.prefixed("block")])
        >>> b.names, b.rates().tolist()
        (('lif', 'block.lif'), [0.75, 0.75])
    """

    names: tuple[str, ...]
    spikes: torch.Tensor
    updates: torch.Tensor

    def __post_init__(self) -> None:
        G = len(self.names)
        if self.spikes.shape != (G,) or self.updates.shape != (G,):
            raise ValueError(
                f"Activity of {G} populations needs spikes and updates of shape [{G}], got "
                f"{tuple(self.spikes.shape)} and {tuple(self.updates.shape)}"
            )

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def of(cls, name: str, spikes: torch.Tensor) -> Activity:
        """One population: every element of ``spikes`` is one neuron update."""
        return cls(
            (name,),
            spikes.sum(dtype=torch.float32).reshape(1),
            torch.full((1,), spikes.numel(), dtype=torch.int64, device=spikes.device),
        )

    @classmethod
    def idle(cls, names: Sequence[str], device: torch.device | str | None = None) -> Activity:
        """Populations that did not run in this call: zero spikes, zero updates."""
        G = len(names)
        return cls(
            tuple(names),
            torch.zeros(G, dtype=torch.float32, device=device),
            torch.zeros(G, dtype=torch.int64, device=device),
        )

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> Activity:
        """No populations (a model without spiking neurons, e.g. an ANN)."""
        return cls.idle((), device)

    @classmethod
    def concat(cls, parts: Sequence[Activity]) -> Activity:
        """The populations of ``parts``, in order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        names = tuple(n for p in parts for n in p.names)
        if len(set(names)) != len(names):
            raise ValueError(f"Activity populations must have distinct names, got {names}")
        return cls(
            names,
            torch.cat([p.spikes for p in parts]),
            torch.cat([p.updates for p in parts]),
        )

    def prefixed(self, prefix: str) -> Activity:
        """The same populations named ``f"{prefix}.{name}"`` (as seen from a parent module)."""
        return Activity(tuple(f"{prefix}.{n}" for n in self.names), self.spikes, self.updates)

    def rates(self) -> torch.Tensor:
        """``[G]`` firing rate of each population (spikes per update; 0 where idle)."""
        return self.spikes / self.updates.clamp_min(1).to(self.spikes.dtype)
