"""Spiking neuron modules. The dynamics live in :mod:`spiking_moe.functional.lif`.

Mapping onto the peers (tested in ``tests/test_neurons.py`` with the peers as oracles):

snnTorch ``snntorch.Leaky``
    ``Leaky(beta=beta, threshold=threshold, spike_grad=<surrogate>,
    reset_mechanism=reset, reset_delay=False)`` with membrane passed explicitly per step.
    snnTorch's default ``reset_delay=True`` applies the subtractive reset one step late and
    undecayed, which is not this equation. With ``reset_delay=False``, snnTorch still decides
    its spike on ``h_t - theta * H(v_{t-1} - theta)``, which equals ``h_t`` whenever the carried
    membrane is below threshold. That holds at every step as long as ``h_t < 2 * theta``
    (after a spike the soft reset leaves ``h_t - theta < theta``). So: "zero" reset matches
    always; "subtract" matches while ``h_t < 2 * theta``. Gradients match too (snnTorch's reset
    term is not detached) for the same surrogate, e.g. ``fast_sigmoid`` with ``alpha`` =
    snnTorch's ``slope``.

Norse ``norse.torch.LIFBoxCell``
    Norse integrates ``v + dt * tau_mem_inv * (v_leak - v + i)``, so with ``v_leak = 0``:
    ``beta = 1 - dt * tau_mem_inv`` and ``i = x / (1 - beta)`` (the input is scaled up by
    ``1 / (1 - beta)``; ``beta = 1`` has no Norse equivalent). ``v_th = threshold``;
    "zero" is ``reset_method=reset_value`` with ``v_reset = 0``, "subtract" is
    ``reset_subtract``. Spikes and membrane equal ours up to float rounding of the rescaling.
    Norse's surrogate is SuperSpike (``method="super"``), i.e. ``fast_sigmoid``; Norse 1.1's
    SuperSpike backward ignores its ``alpha`` (slope fixed at 1), so gradients equal ours only
    for ``alpha=1``.

Multi-level spikes (:class:`MultiSpike`, ``NeuronArgs.kind = "multi"``)
    I-LIF / MultiSpike style: per step ``h_t = beta v_{t-1} + x_t`` and an integer spike
    count ``s_t = round(clamp(h_t / theta, 0, levels))``, then
    ``v_t = h_t - theta s_t`` ("subtract") or ``h_t [s_t = 0]`` ("zero"). Trained with the
    straight-through estimator (the gradient of ``clamp(h / theta, 0, levels)``), usually
    at ``T = 1``, where it is ``round(clamp(x / theta, 0, levels))``. A count ``c`` is what
    ``levels`` binary virtual steps carry in thermometer code (the first ``c`` of them spike):
    :func:`thermometer` expands counts, and a synaptic layer summing its virtual steps computes
    ``W c`` exactly, at ``c`` accumulates per synapse, so the energy counter charges a count as
    that many spikes and the neuron ``levels`` updates per step (``spike_levels = levels``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .args import NEURON_BACKENDS, ArgsField, NeuronArgs, with_options
from .functional.lif import (
    LIFOutput,
    check_lif_input,
    check_lif_parameters,
    lif_multistep,
)
from .functional.surrogate import Surrogate, resolve_surrogate

__all__ = [
    "BACKENDS",
    "LIF",
    "NEURONS",
    "MultiSpike",
    "SpikingNeuron",
    "make_neuron",
    "multi_level_spike",
    "neuron_args",
    "plain_neuron_options",
    "thermometer",
]

logger = logging.getLogger(__name__)

#: ``backend`` values of :class:`LIF` (``NeuronArgs.backend``), who computes the dynamics: this
#: package (``"native"``), ``snntorch.Leaky`` (``"snntorch"``) or Norse's ``LIFBoxCell``.
BACKENDS = NEURON_BACKENDS


def neuron_args(args: NeuronArgs | None = None, **options) -> NeuronArgs:
    """:class:`~spiking_moe.args.NeuronArgs` from ``args`` (None: the defaults) and keyword
    options, which may also give ``beta``/``threshold`` as tensors (a scalar, or one value per
    neuron) and ``surrogate`` as a :class:`~spiking_moe.functional.surrogate.Surrogate`.

    Raises:
        TypeError: a keyword that is no neuron option.
        ValueError: a bad value (a :class:`~spiking_moe.args.ConfigError` naming the field).
    """
    if args is not None and not isinstance(args, NeuronArgs):
        raise TypeError(f"args must be NeuronArgs or None, got {type(args).__name__}")
    return with_options(args or NeuronArgs(), plain_neuron_options(options), who="LIF")


def plain_neuron_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with tensors of ``beta``/``threshold`` as numbers or per-neuron tuples and a
    :class:`~spiking_moe.functional.surrogate.Surrogate` as its name and ``alpha``: the plain
    values :class:`~spiking_moe.args.NeuronArgs` holds (exact: float32 values are doubles)."""
    options = dict(options)
    for name in ("beta", "threshold"):
        value = options.get(name)
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                raise ValueError(
                    f"{name} must be a scalar or a 1-D per-neuron tensor, got shape "
                    f"{tuple(value.shape)}"
                )
            values = value.detach().cpu().double()
            options[name] = values.item() if value.dim() == 0 else tuple(values.tolist())
    surrogate = options.get("surrogate")
    if isinstance(surrogate, Surrogate):
        alpha = options.get("alpha")
        if alpha is not None and alpha != surrogate.alpha:
            raise ValueError(
                f"alpha={alpha} conflicts with the Surrogate's own alpha={surrogate.alpha}"
            )
        options["surrogate"], options["alpha"] = surrogate.name, surrogate.alpha
    return options


def _scalar_repr(value: torch.Tensor) -> str:
    """A buffer for a repr: the shortest decimal that reads back at its own precision (a
    float32 ``beta=0.9`` shows as 0.9, not 0.8999999761581421), or its size when per neuron."""
    if value.dim() != 0:
        return f"[{value.numel()} values]"
    if value.dtype in (torch.float16, torch.float32, torch.float64):
        return str(value.detach().cpu().numpy())
    return str(value.item())


class SpikingNeuron(nn.Module):
    """What every spiking neuron module of the package shares: its
    :class:`~spiking_moe.args.NeuronArgs` and the constants ``beta`` and ``threshold`` (buffers,
    or parameters when learnable). :func:`make_neuron` builds the one ``args.kind`` names.

    A subclass sets the class attribute ``kind`` and implements ``run``; ``forward(x)``
    returns ``run(x).spikes``.

    Args:
        args: the population's :class:`~spiking_moe.args.NeuronArgs`; None: the defaults of
            this class's ``kind``. Its ``kind`` must be the class's, else ValueError.
        **options: neuron options to set, by name (fields of
            :class:`~spiking_moe.args.NeuronArgs`); ``beta`` and ``threshold`` may be tensors (a
            scalar, or one value per neuron of the last dim), whose floating dtype the buffer
            keeps, and ``surrogate`` a :class:`~spiking_moe.functional.surrogate.Surrogate`.

    Attributes:
        args: the :class:`~spiking_moe.args.NeuronArgs` it was built from.
        beta: buffer (parameter when learnable) of the per-neuron or scalar membrane decay.
        threshold: buffer (parameter when learnable) of the per-neuron or scalar firing
            threshold.
    """

    kind: str
    #: The most spikes one neuron emits per step (1: binary); the energy counter reads it.
    spike_levels = 1

    reset = ArgsField()
    detach_reset = ArgsField()

    def __init__(self, args: NeuronArgs | None = None, **options):
        super().__init__()
        args = neuron_args(args or NeuronArgs(kind=self.kind), **options)
        if args.kind != self.kind:
            raise ValueError(
                f"{type(self).__name__} is neuron kind {self.kind!r}, got kind={args.kind!r} "
                "(make_neuron builds the module of a kind)"
            )
        self.args = args
        for name, learn in (("beta", args.learn_beta), ("threshold", args.learn_threshold)):
            given = options.get(name)
            # A tensor keeps its floating dtype (e.g. a float64 beta for a float64 model).
            dtype = (
                given.dtype
                if isinstance(given, torch.Tensor) and given.is_floating_point()
                else None
            )
            value = torch.tensor(getattr(args, name), dtype=dtype or torch.get_default_dtype())
            if learn:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def _constants_repr(self) -> str:
        return (
            f"beta={_scalar_repr(self.beta)}, threshold={_scalar_repr(self.threshold)}, "
            f"reset={self.reset!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).spikes

    def run(
        self, x: torch.Tensor, v0: torch.Tensor | None = None, *, return_membrane: bool = False
    ) -> LIFOutput:
        raise NotImplementedError


class LIF(SpikingNeuron):
    """Multi-step leaky integrate-and-fire layer, time-major.

    Args:
        args: the population's :class:`~spiking_moe.args.NeuronArgs`; None: the defaults.
        **options: neuron options to set, by name (the fields of
            :class:`~spiking_moe.args.NeuronArgs`: ``beta``, ``threshold``, ``reset``,
            ``surrogate``, ``alpha``, ``learn_beta``, ``learn_threshold``, ``detach_reset``,
            ``backend``, ``implementation``); ``beta`` and ``threshold`` may be tensors (a
            scalar, or one value per neuron of the last dim), ``surrogate`` a
            :class:`~spiking_moe.functional.surrogate.Surrogate`. ``backend`` "snntorch" and
            "norse" compute the same layer with ``snntorch.Leaky`` and Norse's ``LIFBoxCell``
            (the module docstring gives the exact mapping); a learnable beta is clamped to
            [0, 1] in the forward pass, like snnTorch's.

    Attributes:
        args: the :class:`~spiking_moe.args.NeuronArgs` it was built from.
        beta: buffer (parameter when learnable) of the per-neuron or scalar membrane decay.
        threshold: buffer (parameter when learnable) of the per-neuron or scalar firing
            threshold.

    Shape:
        ``forward(x)``: ``x`` is ``[T, B, ...]`` current; returns spikes of the same shape and
        dtype, values in {0, 1}. No state survives between calls; use :meth:`run` to pass an
        initial membrane and get the final one back.

    Example:
        >>> lif = LIF(beta=0.5)
        >>> lif(torch.full((4, 1, 2), 0.6))[:, 0, 0]
        tensor([0., 0., 1., 0.])
    """

    kind = "lif"
    backend = ArgsField()
    implementation = ArgsField()

    @property
    def surrogate(self) -> Surrogate:
        """The spike function of ``args.surrogate`` and ``args.alpha``."""
        return resolve_surrogate(self.args.surrogate, self.args.alpha)

    def extra_repr(self) -> str:
        return (
            f"{self._constants_repr()}, surrogate={self.surrogate.name!r}, "
            f"alpha={self.surrogate.alpha}, backend={self.backend!r}"
        )

    def run(
        self, x: torch.Tensor, v0: torch.Tensor | None = None, *, return_membrane: bool = False
    ) -> LIFOutput:
        """Run the layer and return spikes, final membrane and (optionally) the membrane trace.

        Args:
            x: ``[T, B, ...]`` input current.
            v0: ``[B, ...]`` initial membrane, zeros when None.
            return_membrane: include the ``[T, B, ...]`` post-reset membrane trace.
        """
        beta = self.beta.clamp(0.0, 1.0)
        threshold = self.threshold
        if self.backend == "native":
            return lif_multistep(
                x,
                v0,
                beta=beta,
                threshold=threshold,
                reset=self.reset,
                surrogate=self.surrogate,
                detach_reset=self.detach_reset,
                return_membrane=return_membrane,
                implementation=self.implementation,
            )
        check_lif_input(x, 2)
        check_lif_parameters(beta, threshold, self.reset)
        if v0 is None:
            v0 = torch.zeros_like(x[0])
        if self.backend == "snntorch":
            return _run_snntorch(
                x, v0, beta, threshold, self.reset, self.surrogate, return_membrane
            )
        return _run_norse(x, v0, beta, threshold, self.reset, self.surrogate, return_membrane)


class MultiSpike(SpikingNeuron):
    """Multi-level spiking neurons: integer spike counts ``0..levels`` per step (module docstring).

    Args:
        args: :class:`~spiking_moe.args.NeuronArgs` of kind "multi" (None: the defaults, with
            ``levels = 4``).
        **options: neuron options by name (``levels``, ``beta``, ``threshold``, ``reset``,
            ``learn_threshold``, ``detach_reset``, ...); the surrogate options do not apply
            (the gradient is straight-through).

    Shape:
        ``forward(x)``: ``[T, B, ...]`` current -> spike counts of the same shape, values in
        ``{0, 1, ..., levels}``.

    Example:
        >>> spikes = MultiSpike(levels=4)(torch.tensor([[[-0.3, 0.4, 0.6, 2.2, 9.0]]]))
        >>> spikes  # round(clamp(x, 0, 4)) at T = 1, threshold 1
        tensor([[[0., 0., 1., 2., 4.]]])
    """

    kind = "multi"

    @property
    def spike_levels(self) -> int:  # type: ignore[override]
        return self.args.levels

    def extra_repr(self) -> str:
        return f"levels={self.args.levels}, {self._constants_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._steps(x, None, return_membrane=False, final_state=False).spikes

    def run(
        self, x: torch.Tensor, v0: torch.Tensor | None = None, *, return_membrane: bool = False
    ) -> LIFOutput:
        """Spike counts, final membrane and (optionally) the membrane trace, as
        :meth:`LIF.run`."""
        return self._steps(x, v0, return_membrane=return_membrane, final_state=True)

    def _steps(self, x, v0, *, return_membrane: bool, final_state: bool) -> LIFOutput:
        # No NaN scan (a host sync per call): a NaN input gives NaN counts (the clamp keeps
        # it), which reach the loss, unlike a binary neuron's silent "no spike".
        check_lif_input(x, 2, nan=False)
        theta = self.threshold
        check_lif_parameters(self.beta, theta, self.reset)
        beta = self.beta.clamp(0.0, 1.0) if v0 is not None or x.shape[0] > 1 else None
        v = v0
        spikes, trace = [], []
        last = x.shape[0] - 1
        for t, x_t in enumerate(x.unbind(0)):
            h = x_t if v is None else beta * v + x_t  # no state before the first step
            s = multi_level_spike(h / theta, self.args.levels)
            spikes.append(s)
            if t == last and not (final_state or return_membrane):
                break  # forward: nothing reads the last reset (at T = 1, no reset at all)
            fired = s.detach() if self.detach_reset else s
            v = h - theta * fired if self.reset == "subtract" else h * (fired == 0)
            trace.append(v)
        membrane = torch.stack(trace) if return_membrane else None
        stacked = spikes[0].unsqueeze(0) if len(spikes) == 1 else torch.stack(spikes)
        return LIFOutput(stacked, v, membrane)


class _MultiLevelSpike(torch.autograd.Function):
    # One function instead of clamp, round and a detached correction: the same values and
    # gradient in two passes over the tensor (what multi-level training time is made of).
    @staticmethod
    def forward(ctx, u: torch.Tensor, levels: int) -> torch.Tensor:
        clamped = u.clamp(0, levels)
        ctx.save_for_backward(clamped == u)  # 0 <= u <= levels: where the clamp passes
        return clamped.round_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (passes,) = ctx.saved_tensors
        return grad * passes, None


def multi_level_spike(u: torch.Tensor, levels: int) -> torch.Tensor:
    """``round(clamp(u, 0, levels))`` with the straight-through gradient of the clamp (1 where
    ``0 <= u <= levels``, as ``torch.clamp``'s, else 0).

    Example:
        >>> u = torch.tensor([-0.5, 0.4, 2.6, 5.0], requires_grad=True)
        >>> s = multi_level_spike(u, 4)
        >>> s.sum().backward()
        >>> s.tolist(), u.grad.tolist()
        ([0.0, 0.0, 3.0, 4.0], [0.0, 1.0, 1.0, 0.0])
    """
    return _MultiLevelSpike.apply(u, levels)


def thermometer(counts_T: torch.Tensor, levels: int) -> torch.Tensor:
    """Spike counts ``[T, ...]`` (integers ``0..levels``) as ``T * levels`` binary virtual steps
    ``[T * levels, ...]``: step ``t``'s count ``c`` is the first ``c`` of its ``levels`` virtual
    steps spiking (thermometer code).

    Args:
        counts_T: ``[T, ...]`` spike counts, e.g. a :class:`MultiSpike` output; whole numbers in
            ``0..levels``.
        levels: virtual steps per step (a :class:`MultiSpike`'s ``levels``), at least 1.

    Returns:
        ``[T * levels, ...]`` spikes in {0, 1}, of ``counts_T``'s dtype and device: rows
        ``t * levels`` to ``t * levels + levels - 1`` are step ``t``, and each position's sum
        over them is its count.

    Raises:
        ValueError: ``levels < 1``, or a count that is negative, above ``levels`` or not whole.

    Example:
        >>> thermometer(torch.tensor([[2.0], [0.0]]), 3)[:, 0]
        tensor([1., 1., 0., 0., 0., 0.])
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if bool(((counts_T < 0) | (counts_T > levels) | (counts_T != counts_T.round())).any()):
        raise ValueError(f"thermometer needs integer spike counts in [0, {levels}]")
    steps = torch.arange(levels, device=counts_T.device, dtype=counts_T.dtype)
    shape = (levels,) + (1,) * (counts_T.dim() - 1)
    virtual = (counts_T.unsqueeze(1) > steps.view(1, *shape)).to(counts_T.dtype)
    return virtual.reshape(counts_T.shape[0] * levels, *counts_T.shape[1:])


#: Neuron module class by ``NeuronArgs.kind``.
NEURONS = {"lif": LIF, "multi": MultiSpike}


def make_neuron(args: NeuronArgs | None = None, **options) -> SpikingNeuron:
    """The neuron module of ``args.kind`` (:class:`LIF` or :class:`MultiSpike`).

    Args:
        args: the population's :class:`~spiking_moe.args.NeuronArgs`; None: the defaults
            (kind "lif").
        **options: neuron options to set, by name, as for :class:`LIF` (``kind`` among them
            picks the class). A tensor ``beta`` or ``threshold`` gives its values only: the
            buffers take the default dtype.

    Returns:
        A new :class:`SpikingNeuron` of that kind, built from the merged args.
    """
    args = neuron_args(args, **options)
    return NEURONS[args.kind](args)


def _run_snntorch(x, v0, beta, threshold, reset, surrogate, return_membrane) -> LIFOutput:
    import snntorch

    # A fresh Leaky per call: snnTorch keeps every instance in a class-level list and
    # hidden membrane on the module, neither of which may outlive this call.
    leaky = snntorch.Leaky(
        beta=beta,
        threshold=threshold,
        spike_grad=surrogate,
        reset_mechanism=reset,
        reset_delay=False,
    )
    try:
        v = v0
        spikes, membrane = [], []
        for x_t in x.unbind(0):
            s, v = leaky(x_t, v)
            spikes.append(s)
            membrane.append(v)
    finally:
        instances = getattr(snntorch.SpikingNeuron, "instances", None)
        if isinstance(instances, list) and leaky in instances:
            instances.remove(leaky)
    return LIFOutput(torch.stack(spikes), v, torch.stack(membrane) if return_membrane else None)


def _run_norse(x, v0, beta, threshold, reset, surrogate, return_membrane) -> LIFOutput:
    from norse.torch import LIFBoxCell, LIFBoxParameters
    from norse.torch.functional.lif_box import LIFBoxFeedForwardState
    from norse.torch.functional.reset import reset_subtract, reset_value

    dt = 1e-3
    params = LIFBoxParameters(
        tau_mem_inv=(1.0 - beta) / dt,
        v_leak=torch.zeros((), dtype=x.dtype, device=x.device),
        v_th=threshold,
        v_reset=torch.zeros((), dtype=x.dtype, device=x.device),
        method="super",
        alpha=surrogate.alpha,
        reset_method=reset_subtract if reset == "subtract" else reset_value,
    )
    cell = LIFBoxCell(params, dt=dt)
    state = LIFBoxFeedForwardState(v=v0)
    scale = 1.0 / (1.0 - beta)
    spikes, membrane = [], []
    for x_t in x.unbind(0):
        s, state = cell(x_t * scale, state)
        spikes.append(s)
        membrane.append(state.v)
    return LIFOutput(
        torch.stack(spikes), state.v, torch.stack(membrane) if return_membrane else None
    )
