r"""Integer weights (8 or 4 bits) for any model of this package: post-training and QAT.

Shape letters: the package legend (:mod:`spiking_moe`); ``O`` output features (channels), ``I``
input features, ``R`` rows (any leading dimensions).

**Weights** are quantized symmetrically per output channel (row ``o`` of a Linear weight)::

    q_max   = 2^(bits-1) - 1                      (127 for 8 bits, 7 for 4 bits)
    s_o     = max_i |W_oi| / q_max                (s_o = 1 for an all-zero row)
    Q_oi    = clamp(round(W_oi / s_o), -q_max, q_max)
    W_oi   ~= s_o Q_oi

so a channel holds at most ``2^bits - 1`` distinct values (``-q_max .. q_max``; the most
negative code is left unused to keep the grid symmetric). ``Q`` is stored as ``int8`` at both
widths (a 4-bit value occupies an int8 element; packing two per byte is a storage format, not a
different arithmetic).

**Forward of** :class:`QuantizedLinear`: the integer accumulator first, then the per-channel
scale, then the float bias::

    y_Ro = s_o * sum_i x_Ri Q_oi + b_o

which is ``x @ (Q * s).T + b`` computed in the order integer hardware uses. For spikes
(``x`` in {0, 1}) the accumulator is a sum of integers, exact in float32
(``|acc| <= q_max * I < 2^24``), so the float forward reproduces an integer implementation bit for bit.

**Thresholds and biases** (a Linear feeding a LIF). With ``acc_t = sum_i Q_oi s_ti`` the LIF of
neuron ``o`` integrates ``h_t = beta v_{t-1} + s_o acc_t + b_o`` and fires when
``h_t > theta``. Dividing the membrane by ``s_o > 0``, ``u = v / s_o``::

    h'_t = beta u_{t-1} + acc_t + b_o / s_o,   spike iff h'_t > theta / s_o,
    reset: u <- h'_t - theta / s_o ("subtract") or 0 ("zero")

gives the same spikes: an integer-domain neuron is fed the raw accumulator, with threshold
``theta / s_o`` and bias ``b_o / s_o``. Because ``s_o`` differs per output channel, the
integer-domain neuron needs a **per-neuron** threshold even when the float LIF has a scalar
one (``LIF(threshold=...)`` takes a 1-D tensor). ``beta`` is unchanged. The bias stays a float
at the accumulator's scale, ``b_o / s_o`` (it is not rounded to an integer: rounding it would
change spikes); so does the membrane, which ``beta`` makes fractional (a fixed-point register
in hardware). In exact arithmetic the two neurons are identical; in floating point a spike can
differ only where ``h_t`` ties ``theta`` to the last bit, and not at all when the scales are
powers of two (division by them is exact), which is what the tests use.

**Activations.** In a spiking model (any :class:`~spiking_moe.neurons.LIF` inside) a Linear
fed spikes sees 0/1, exact at any width: its input stays as it is. Two inputs of a spiking
model are not spikes: the input layer's input is the encoder's output (spikes for the
rate/latency/event encodings; for an analog-current encoding it is the data itself), and a
:class:`~spiking_moe.router.RateRouter` and a ``"count"`` readout take firing rates
``count / T``, i.e. integer counts at the scale ``1 / T`` (exact as they are). Given calibration inputs, a spiking model's Linears
whose inputs were not all 0 or 1 (the analog input layer) get quantized inputs like an ANN's
(below); without calibration they keep float inputs (weights only). ANN models (no LIF) quantize the input of every Linear
to ``activation_bits``, per tensor, from ranges calibrated with forward pre-hooks (removed
afterwards). A Linear whose calibration inputs were all ``>= 0`` (ReLU outputs) gets an
unsigned grid ``a = max x / (2^bits - 1)``, codes ``0 .. 2^bits - 1``; others a symmetric grid
``a = max|x| / (2^(bits-1) - 1)``. At run time ``x_q = clamp(round(x / a), lo, hi)``
(out-of-range inputs saturate) and ``y_Ro = (a s_o) sum_i x_q,Ri Q_oi + b_o``.

**QAT.** :func:`prepare_qat` swaps every Linear for a :class:`FakeQuantLinear`, whose forward
computes what the integer model computes, in its order (``s_o sum_i x_Ri Q_oi + b_o``: the
same values to the bit as :class:`QuantizedLinear`, so a QAT model spikes exactly as its
integer model), and whose backward is the straight-through estimator: the gradients of
``F.linear(x, s Q, b)``, the gradient w.r.t. ``W`` being the gradient w.r.t. the dequantized
weights (:func:`fake_quantize`).
:func:`convert_qat` then gives the :func:`quantize_model` result of the trained weights.
``TrainConfig.quantize_bits = 8 | 4`` makes :class:`~spiking_moe.training.Trainer` call
:func:`prepare_qat` on its model (in place) before training.

Example:
    >>> _ = torch.manual_seed(0)
    >>> q, s = quantize_weights(torch.tensor([[0.6, -1.0, 0.25], [0.0, 0.0, 0.0]]), bits=4)
    >>> q, s
    (tensor([[ 4, -7,  2],
            [ 0,  0,  0]], dtype=torch.int8), tensor([0.1429, 1.0000]))
    >>> from spiking_moe.neurons import LIF
    >>> model = nn.Sequential(nn.Linear(3, 2), LIF(beta=0.5))
    >>> quantized = quantize_model(model, bits=8)
    >>> type(quantized[0]).__name__, quantized[0].int_weight.dtype, type(model[0]).__name__
    ('QuantizedLinear', torch.int8, 'Linear')
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .neurons import SpikingNeuron
from .router import RateRouter

__all__ = [
    "SUPPORTED_BITS",
    "CalibrationError",
    "FakeQuantLinear",
    "QuantizedLinear",
    "convert_qat",
    "fake_quantize",
    "is_spiking",
    "prepare_qat",
    "quantize_model",
    "quantize_weights",
]

logger = logging.getLogger(__name__)

#: Integer widths, in bits, of weights and quantized inputs (``bits``, ``activation_bits``) of
#: :func:`quantize_model`, :func:`prepare_qat` and the quantized layers; stored as ``int8``.
SUPPORTED_BITS = (8, 4)


def _check_bits(name: str, bits) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {list(SUPPORTED_BITS)}, got {bits!r}")


def quantize_weights(weight_OI: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization (module docstring).

    Args:
        weight_OI: ``[O, I]`` float weight (extra trailing dims, e.g. a conv kernel, are
            treated as part of ``I``).
        bits: 8 or 4.

    Returns:
        ``(int_weight, scale)``: ``int_weight`` int8 of ``weight``'s shape with values in
        ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``; ``scale`` ``[O]`` in ``weight``'s dtype
        (1 for an all-zero row).

    Raises:
        ValueError: ``bits`` not in :data:`SUPPORTED_BITS`, or ``weight`` not at least 2-D.
    """
    _check_bits("bits", bits)
    if weight_OI.dim() < 2:
        raise ValueError(f"weight must be [O, I, ...], got shape {tuple(weight_OI.shape)}")
    weight_OI = weight_OI.detach()
    q_max = 2 ** (bits - 1) - 1
    absmax_O = weight_OI.abs().flatten(1).amax(1)
    scale_O = torch.where(absmax_O > 0, absmax_O / q_max, torch.ones_like(absmax_O))
    view = (-1,) + (1,) * (weight_OI.dim() - 1)
    # The clamp only catches the row maximum landing a rounding error above q_max.
    int_OI = torch.round(weight_OI / scale_O.view(view)).clamp(-q_max, q_max).to(torch.int8)
    return int_OI, scale_O


class _StraightThrough(torch.autograd.Function):
    """Forward: the dequantized weight; backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(weight, bits):
        int_OI, scale_O = quantize_weights(weight, bits)
        return int_OI.to(weight.dtype) * scale_O.view((-1,) + (1,) * (weight.dim() - 1))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``s_o Q_oi`` (the dequantized weight) with a straight-through gradient.

    Example:
        >>> w = torch.tensor([[1.0, 0.3]], requires_grad=True)
        >>> fake_quantize(w, 4).sum().backward()
        >>> w.grad
        tensor([[1., 1.]])
    """
    _check_bits("bits", bits)
    return _StraightThrough.apply(weight, bits)


class QuantizedLinear(nn.Linear):
    """A Linear with int8-stored weights and per-channel float scales (module docstring).

    An ``nn.Linear`` subclass, so counting, hooks and ``isinstance`` checks treat it as one.
    ``weight`` is a read-only property, the dequantized ``int_weight * scale``; the state is
    ``int_weight`` (int8 buffer), ``scale`` (float buffer ``[O]``), ``bias`` (float
    parameter, at the output scale) and, with activation quantization, ``act_scale`` (0-dim
    float) and ``act_unsigned`` (0-dim bool).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits: weight width, 8 or 4.
        activation_bits: None (inputs used as they are: spikes) or 8 / 4.
        device, dtype: of the float buffers and the bias.

    Shape:
        ``forward(x)``: ``[..., I]`` -> ``[..., O]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        activation_bits: int | None = None,
        device=None,
        dtype=None,
    ):
        _check_bits("bits", bits)
        if activation_bits is not None:
            _check_bits("activation_bits", activation_bits)
        # nn.Linear.__init__ would allocate and initialise a float weight we do not keep.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.activation_bits = activation_bits
        float_kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.register_buffer(
            "int_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, **float_kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **float_kw))
        else:
            self.register_parameter("bias", None)
        if activation_bits is not None:
            self.register_buffer("act_scale", torch.ones((), **float_kw))
            self.register_buffer("act_unsigned", torch.zeros((), dtype=torch.bool, device=device))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        *,
        activation_range: tuple[float, float] | None = None,
        activation_bits: int | None = None,
    ) -> QuantizedLinear:
        """Quantize ``linear``'s weight; ``activation_range`` ``(min, max)`` of its calibrated
        inputs sets the activation grid (with ``activation_bits``)."""
        weight = linear.weight.detach()
        out = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            activation_bits=activation_bits if activation_range is not None else None,
            device=weight.device,
            dtype=weight.dtype,
        )
        int_OI, scale_O = quantize_weights(weight, bits)
        with torch.no_grad():
            out.int_weight.copy_(int_OI)
            out.scale.copy_(scale_O)
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
            if activation_range is not None:
                low, high = activation_range
                unsigned = low >= 0
                levels = 2**activation_bits - 1 if unsigned else 2 ** (activation_bits - 1) - 1
                span = high if unsigned else max(abs(low), abs(high))
                out.act_scale.fill_(span / levels if span > 0 else 1.0)
                out.act_unsigned.fill_(unsigned)
        out.train(linear.training)
        return out

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.int_weight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        act = f", activation_bits={self.activation_bits}" if self.activation_bits else ""
        return f"{super().extra_repr()}, bits={self.bits}{act}"

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(x / act_scale), lo, hi)`` (as floats) of ``x``."""
        bits = self.activation_bits
        if self.act_unsigned:
            low, high = 0, 2**bits - 1
        else:
            high = 2 ** (bits - 1) - 1
            low = -high
        return torch.round(x / self.act_scale).clamp(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale_O = self.scale.to(x.dtype)
        if self.activation_bits is not None:
            x = self.quantize_input(x)
            scale_O = scale_O * self.act_scale.to(x.dtype)
        # Accumulate with the integer weights first: exact for integer-valued inputs (spikes,
        # activation codes), the order an integer implementation computes in.
        out = F.linear(x, self.int_weight.to(x.dtype)) * scale_O
        return out if self.bias is None else out + self.bias.to(x.dtype)


class FakeQuantLinear(nn.Linear):
    """A Linear trained through :func:`fake_quantize` of its weight (quantization-aware).

    Holds the float ``weight`` and ``bias`` (same state as ``nn.Linear``, so checkpoints of the
    float model load); ``bits`` is a plain attribute.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        device=None,
        dtype=None,
    ):
        _check_bits("bits", bits)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits = bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> FakeQuantLinear:
        """A FakeQuantLinear sharing ``linear``'s parameter objects (no copy)."""
        out = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            device="meta",
        )
        out.weight = linear.weight
        out.bias = linear.bias
        out.train(linear.training)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _IntegerOrderLinear.apply(x, self.weight, self.bias, self.bits)


class _IntegerOrderLinear(torch.autograd.Function):
    """Forward: :class:`QuantizedLinear`'s order (the integer accumulator, then the scale, then
    the bias); backward: the straight-through gradients of ``F.linear(x, s Q, b)``."""

    @staticmethod
    def forward(x, weight, bias, bits):
        int_OI, scale_O = quantize_weights(weight, bits)
        out = F.linear(x, int_OI.to(x.dtype)) * scale_O.to(x.dtype)
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, bits = inputs
        ctx.save_for_backward(x, _StraightThrough.forward(weight, bits))
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, dequantized_OI = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantized_OI.to(grad_out.dtype)
        rows_RO = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows_RO.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows_RO.sum(0)
        return grad_x, grad_w, grad_b, None


def is_spiking(model: nn.Module) -> bool:
    """Whether ``model`` contains a :class:`~spiking_moe.neurons.LIF`: then
    :func:`quantize_model` quantizes its weights only (spikes are exact at any width)."""
    return any(isinstance(m, SpikingNeuron) for m in model.modules())


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear)


def _replace(model: nn.Module, make) -> int:
    """Swap every float Linear ``m`` (at every path it is registered under) for ``make(name, m)``;
    returns the number of distinct layers replaced."""
    done: dict[int, nn.Module] = {}
    targets = [
        (name, m) for name, m in model.named_modules(remove_duplicate=False) if _is_float_linear(m)
    ]
    for name, module in targets:
        if id(module) not in done:
            done[id(module)] = make(name, module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, done[id(module)])
    return len(done)


def _no_layer_error(model: nn.Module) -> ValueError:
    return ValueError(f"no quantizable layer: {type(model).__name__} contains no float nn.Linear")


class CalibrationError(ValueError):
    """Calibration never ran some Linear layers (e.g. an expert no calibration token was
    routed to), so their input ranges are unknown.

    Attributes:
        unseen: the layers' module names.
    """

    def __init__(self, unseen: list[str]):
        self.unseen = unseen
        super().__init__(
            f"calibration never ran these layers, so their input ranges are unknown: {unseen} "
            "(give calibration inputs that reach every expert)"
        )


def _calibrate(
    model: nn.Module, calibration: Iterable, *, require_all: bool = True
) -> tuple[dict[int, tuple[float, float]], set[int]]:
    """``(min, max)`` of the input of every float Linear over the calibration inputs, and the
    ids of the Linears whose inputs were all exactly 0 or 1 (spikes).

    With ``require_all`` a Linear the calibration never ran raises :class:`CalibrationError`;
    otherwise it is left out.
    """
    ranges: dict[int, list[torch.Tensor]] = {}
    graded: set[int] = set()

    def observe(module, args):
        x = args[0].detach()
        low, high = x.amin(), x.amax()
        if bool(((x != 0) & (x != 1)).any()):
            graded.add(id(module))
        seen = ranges.get(id(module))
        ranges[id(module)] = (
            [low, high]
            if seen is None
            else [torch.minimum(seen[0], low), torch.maximum(seen[1], high)]
        )

    linears = {id(m): m for m in model.modules() if _is_float_linear(m)}
    handles = [m.register_forward_pre_hook(observe) for m in linears.values()]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for x in calibration:
                model(x)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration is empty: activation ranges need at least one input batch")
    names = {id(m): n for n, m in model.named_modules() if _is_float_linear(m)}
    unseen = [names[i] for i in linears if i not in ranges]
    if unseen and require_all:
        raise CalibrationError(unseen)
    logger.info("calibrated %d layers on %d batches", len(ranges), batches)
    binary = {i for i in ranges if i not in graded}
    return {i: (float(low), float(high)) for i, (low, high) in ranges.items()}, binary


def _rate_fed(model: nn.Module) -> set[int]:
    """Linears fed spike rates ``count / T`` (integer counts at the scale ``1 / T``, exact as
    they are): a :class:`~spiking_moe.router.RateRouter`'s ``proj`` and a ``"count"`` readout."""
    rate_fed = {id(m.proj) for m in model.modules() if isinstance(m, RateRouter)}
    for module in model.modules():
        readout = getattr(module, "readout", None)
        if getattr(module, "readout_mode", None) == "count" and isinstance(readout, nn.Linear):
            rate_fed.add(id(readout))
    return rate_fed


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    activation_bits: int | None = None,
    calibration: Iterable | None = None,
) -> nn.Module:
    """Post-training quantization: a copy of ``model`` with every float ``nn.Linear``
    (experts, routers' ``proj``, attention projections, input layers, readouts) replaced by a
    :class:`QuantizedLinear`; ``model`` is left untouched.

    A model is spiking when it contains a :class:`~spiking_moe.neurons.LIF`. Its Linears fed
    spikes keep their inputs (0/1 is exact at any width). Without ``calibration`` only weights
    are quantized; with it, a Linear whose calibration inputs were not all 0 or 1 (the input
    layer of an analog-current encoding) also gets ``activation_bits`` inputs, except those fed
    spike rates ``count / T`` (integers at the scale ``1 / T``): a
    :class:`~spiking_moe.router.RateRouter`'s ``proj`` and a ``"count"`` readout. Otherwise (an ANN) the input of every Linear is quantized,
    with ranges calibrated on ``calibration``.

    Args:
        model: any module containing ``nn.Linear`` layers (a :class:`FakeQuantLinear`
            counts as one; layers already quantized are kept).
        bits: weight width, 8 or 4.
        activation_bits: width of the quantized inputs, 8 or 4; None: ``bits``.
        calibration: an iterable of model inputs, each passed as ``model(x)`` in eval mode
            under ``no_grad`` (for a loader of ``(x, y)`` pairs pass ``(x for x, _ in
            loader)``). Required for an ANN, where every Linear must run at least once;
            optional for a spiking model (Linears it never ran keep float inputs).

    Raises:
        ValueError: unsupported ``bits`` / ``activation_bits``; no float Linear in ``model``;
            an ANN without ``calibration``, an empty ``calibration``; :class:`CalibrationError`
            (a ValueError) for an ANN's Linear layers it never ran.
    """
    _check_bits("bits", bits)
    if not any(_is_float_linear(m) for m in model.modules()):
        raise _no_layer_error(model)
    quantized = copy.deepcopy(model)
    spiking = is_spiking(quantized)
    activation_bits = bits if activation_bits is None else activation_bits
    _check_bits("activation_bits", activation_bits)
    ranges: dict[int, tuple[float, float]] = {}
    if spiking:
        if calibration is not None:
            ranges, binary = _calibrate(quantized, calibration, require_all=False)
            ranges = {i: r for i, r in ranges.items() if i not in binary | _rate_fed(quantized)}
    elif calibration is None:
        raise ValueError(
            "calibration is required for an ANN (a model without LIF): it sets the "
            "activation ranges"
        )
    else:
        ranges, _ = _calibrate(quantized, calibration)
    count = _replace(
        quantized,
        lambda name, m: QuantizedLinear.from_linear(
            m,
            bits,
            activation_range=ranges.get(id(m)),
            activation_bits=activation_bits if id(m) in ranges else None,
        ),
    )
    logger.info(
        "quantized %d Linear layers to %d-bit weights (%d of them with %d-bit inputs)",
        count,
        bits,
        len(ranges),
        activation_bits,
    )
    return quantized


def prepare_qat(model: nn.Module, bits: int, *, inplace: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` for a :class:`FakeQuantLinear` sharing its parameters.

    Args:
        model: any module with ``nn.Linear`` layers.
        bits: 8 or 4.
        inplace: modify ``model`` itself (its parameter objects stay the same, so its
            ``state_dict`` keys do too) instead of a copy.

    Raises:
        ValueError: unsupported ``bits``; no Linear; already prepared with other ``bits``.
    """
    _check_bits("bits", bits)
    prepared = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    other = sorted({m.bits for m in prepared if m.bits != bits})
    if other:
        raise ValueError(f"model already prepared for QAT with bits {other}, asked for {bits}")
    if not any(_is_float_linear(m) for m in model.modules()):
        raise _no_layer_error(model)
    target = model if inplace else copy.deepcopy(model)
    count = _replace(
        target,
        lambda name, m: (
            m if isinstance(m, FakeQuantLinear) else FakeQuantLinear.from_linear(m, bits)
        ),
    )
    logger.info("prepared %d Linear layers for %d-bit QAT", count, bits)
    return target


def convert_qat(
    model: nn.Module,
    *,
    activation_bits: int | None = None,
    calibration: Iterable | None = None,
) -> nn.Module:
    """The :func:`quantize_model` result (a copy) of a model prepared by :func:`prepare_qat`.

    Its weights are exactly those the QAT forward used (:func:`fake_quantize` and
    :class:`QuantizedLinear` share :func:`quantize_weights`). Arguments as
    :func:`quantize_model`; ``bits`` comes from the :class:`FakeQuantLinear` layers.

    Raises:
        ValueError: no FakeQuantLinear, or layers prepared with different ``bits``.
    """
    widths = {m.bits for m in model.modules() if isinstance(m, FakeQuantLinear)}
    if len(widths) != 1:
        raise ValueError(
            "convert_qat needs a model prepared by prepare_qat with one width, "
            f"found FakeQuantLinear bits {sorted(widths)}"
        )
    return quantize_model(
        model, widths.pop(), activation_bits=activation_bits, calibration=calibration
    )
