"""Synaptic layers whose cost falls with the spike rate.

:class:`EventLinear` is an ``nn.Linear`` (same parameters, same ``state_dict``, so every
checkpoint loads into it and every tool that knows ``nn.Linear`` knows it: energy counting,
quantization, NIR export) whose product is :func:`~spiking_moe.functional.event_linear`: the
weight columns of the nonzero inputs summed, instead of the dense matrix product. The package's
spiking layers use it wherever their input is spikes (experts, the classifiers' and language
models' input layers and readouts, attention projections).

When it runs event-driven: with gradients off (evaluation, inference), by default. The kernel
itself checks each call's density and hands anything denser than the measured break-even to the
dense product (:func:`~spiking_moe.functional.event.auto_dense_above`), so an analog input or a
busy layer costs one extra pass over the input at most. In training the dense product runs
(``train_events=False``): ``experiments/benchmarks/event_driven.py`` measures whether the
event-driven forward pays there too (``RESULTS.md``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .functional.event import IMPLEMENTATIONS, event_linear

__all__ = ["EventLinear"]


class EventLinear(nn.Linear):
    """``nn.Linear`` with an event-driven product for sparse (spike) inputs.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        implementation: :func:`~spiking_moe.functional.event_linear`'s ``implementation``
            ("auto": the C++ kernel on CPU, Triton on CUDA, dense above the break-even
            density or where no kernel runs).
        train_events: also take the event-driven forward when gradients are needed (its
            backward is the dense product's either way).

    The transposed weight the kernel reads (``[in, out]``, contiguous) is cached on the module,
    not in its ``state_dict``, and rebuilt whenever the weight changes (an optimizer step, a
    ``load_state_dict``, a move to another device or dtype).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = EventLinear(64, 8)
        >>> spikes = (torch.rand(5, 3, 64) < 0.05).float()
        >>> with torch.no_grad():
        ...     torch.allclose(layer(spikes), F.linear(spikes, layer.weight, layer.bias), atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        implementation: str = "auto",
        train_events: bool = False,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; valid: {list(IMPLEMENTATIONS)}"
            )
        self.implementation = implementation
        self.train_events = bool(train_events)
        self._weight_t: torch.Tensor | None = None
        self._weight_t_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> EventLinear:
        """An EventLinear sharing ``linear``'s parameters (no copy)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, implementation={self.implementation!r}"

    def weight_t(self) -> torch.Tensor:
        """``weight.T`` as a contiguous ``[in, out]`` tensor, cached until the weight changes."""
        weight = self.weight
        # _version counts in-place updates (optimizer steps, load_state_dict's copy_).
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)  # noqa: SLF001
        if self._weight_t is None or self._weight_t_key != key:
            self._weight_t = weight.detach().t().contiguous()
            self._weight_t_key = key
        return self._weight_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if needs_grad and not self.train_events:
            return F.linear(x, self.weight, self.bias)
        return event_linear(
            x,
            self.weight,
            self.bias,
            weight_t=None if needs_grad else self.weight_t(),
            implementation=self.implementation,
        )
