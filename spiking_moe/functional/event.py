r"""Event-driven synaptic product: a linear layer that reads only the weights of active inputs.

Shape letters: the package legend (:mod:`spiking_moe`): ``R`` rows (all leading
dimensions of the input folded together, e.g. ``T B``), ``I`` input features, ``O`` output
features, ``Z`` nonzero input entries.

For inputs :math:`x \in \mathbb{R}^{R \times I}`, weight :math:`W \in \mathbb{R}^{O \times I}`
(``nn.Linear``'s layout) and bias :math:`b`,

.. math::

    y_r = b + W x_r = b + \sum_{i:\, x_{r,i} \neq 0} x_{r,i}\, W_{:,i}
        \;\overset{x \in \{0,1\}}{=}\; b + \sum_{i:\, x_{r,i} = 1} W_{:,i}.

For spikes the product is a sum of the weight columns of the active inputs: no multiplies, and
at spike rate :math:`p` a fraction :math:`p` of the dense product's work. The kernels keep
:math:`W^\top` (``weight_t``, ``[I, O]``, contiguous) so that the column of one input is one
contiguous row in memory: per row of ``x`` they list the active inputs, then add up their rows of
``weight_t``, starting from the bias.

**Inputs that are not binary.** Binary input is the fast case, not a requirement: an active
input whose value is not exactly 1 is multiplied in (:math:`x_{r,i} W_{:,i}`), so the result is
``F.linear(x, weight, bias)`` up to float rounding for *any* input, and its cost is set by the
number of nonzeros. (The C++ kernel checks per row whether every nonzero is 1 and only then takes
the multiply-free loop.) One difference from the dense product: zeros are skipped, so a zero
input times an infinite or NaN weight contributes nothing instead of NaN. NaN or infinite inputs
propagate as in ``F.linear``.

**Implementations** (``implementation=``):

* ``"cpp"``: a C++ kernel with OpenMP (:mod:`.kernels.event_cpu`), CPU, float32/float64; built
  on first use like the fused LIF kernel (``SPIKING_MOE_NO_CPP=1`` disables it);
* ``"triton"``: a Triton kernel (:mod:`.kernels.triton_event`), CUDA (or CPU tensors through
  Triton's interpreter, ``TRITON_INTERPRET=1``), float32/float64;
* ``"torch"``: an event-driven reference in plain PyTorch (``index_select`` of the active rows
  of ``weight_t``, ``index_add_`` into the output), any device and dtype; slow, for tests;
* ``"dense"``: ``F.linear``, the reference and the fallback;
* ``"auto"`` (default): ``"cpp"`` on CPU and ``"triton"`` on CUDA when they can run and the
  input is sparse enough (at most :func:`auto_dense_above` of its entries nonzero), else
  ``"dense"``; each fallback is logged at debug level. Above the break-even rate the dense
  product is faster, so ``"auto"`` is never much slower than it (the density test costs one
  pass over ``x``). An explicitly named implementation that cannot run raises.

**Where the break-even lies** depends on the machine far more than on the layer: the dense
product runs at the CPU's GEMM throughput, the event-driven one at its memory bandwidth for rows
of ``weight_t``, and the ratio of the two is the break-even density (to first order the shape
cancels). Measured with ``experiments/benchmarks/event_driven.py``: 45-57% on a 2-core AMD EPYC
(Zen 4, AVX-512), 11.7% on a 2-core Intel Xeon with AMX whose oneDNN GEMM is 3x faster; and
a weight that no longer fits in the cache moves it lower. So on the CPU the threshold comes
from a measurement (a few ms): the first use of a layer shape on a machine times both products
and saves the break-even in a small JSON file next to the C++ builds (the torch extensions
folder, ``TORCH_EXTENSIONS_DIR``), keyed by CPU model, instruction set, torch version, thread
count and shape; every later process reads it back, so a layer takes the same path (dense or
event-driven, which round differently) in every run on that machine
(:func:`auto_dense_above`, :mod:`.kernels.calibration`). ``SPIKING_MOE_EVENT_DENSITY=<fraction>``
sets the threshold instead. Each layer shape's threshold and its source (measured now, read
from the file, the environment override) are logged once at INFO by the logger
``spiking_moe.functional.event``.

Every output is summed over its active inputs in increasing index order, starting from the bias,
so the C++ kernel's results are bitwise identical for any thread count and instruction set (the
PyTorch reference adds in the same order); they differ from ``F.linear``'s in rounding only.

All paths are differentiable: backward is the dense product's (``grad_x = grad_y W``,
``grad_W = grad_y^T x``, ``grad_b = sum grad_y``), and gradients flow to ``weight``, never to
``weight_t``.

Example:

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from spiking_moe.functional import event_linear
    >>> x = torch.tensor([[0.0, 1.0, 0.0, 1.0]])   # spikes of inputs 1 and 3
    >>> w = torch.arange(8.0).view(2, 4)           # [O=2, I=4]
    >>> event_linear(x, w, implementation="torch")  # columns 1 + 3 of w
    tensor([[ 4., 12.]])
    >>> torch.equal(event_linear(x, w), F.linear(x, w))
    True
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .kernels.protocol import EventKernel, EventLinearArgs

__all__ = ["AUTO_DENSE_ABOVE", "IMPLEMENTATIONS", "auto_dense_above", "event_linear"]

logger = logging.getLogger(__name__)

#: ``implementation=`` values of :func:`event_linear` and :class:`~spiking_moe.synapses.EventLinear`
#: (module docstring): ``"auto"``, ``"cpp"``, ``"triton"``, ``"torch"``, ``"dense"``.
IMPLEMENTATIONS = ("auto", "cpp", "triton", "torch", "dense")

#: Device type -> fraction of nonzero inputs above which ``implementation="auto"`` runs the dense
#: product, when nothing was calibrated (:func:`auto_dense_above`). CPU: the ceiling of the
#: calibration, below the break-even rate that ``experiments/benchmarks/event_driven.py``
#: measured at 45-55% on a 2-core AMD EPYC Zen 4 (float32, 1 and 2 threads, torch 2.13 CPU,
#: 2026-12-02) for in x out = 1024 x 1024, 256 x 256, 512 x 128, 128 x 512 and 4096 x 1024.
#: CUDA: unmeasured (no GPU when this was written): a guess that cuBLAS wins above a few
#: percent; measure with ``event_driven.py --device cuda`` and set it.
AUTO_DENSE_ABOVE = MappingProxyType({"cpu": 0.4, "cuda": 0.05})

#: The calibrated CPU threshold is this fraction of the measured break-even (timing noise and
#: layers whose break-even lies a little lower than the calibration shape's).
_CALIBRATION_MARGIN = 0.75
# Rows of the calibration product (both paths' time is linear in them), and the density the
# event-driven kernel is timed at.
_CALIBRATION_ROWS = 128
_CALIBRATION_DENSITY = 0.05
# This process's thresholds, (threads, in, out) -> threshold, so the file is read once per shape.
_calibrated: dict[tuple[int, int, int], float] = {}
# (device, threads, in, out, threshold, source) already logged.
_logged: set[tuple] = set()

# The reference materialises at most this many weight elements at a time (64 MiB in float32).
_TORCH_CHUNK_ELEMENTS = 1 << 24


def event_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_t: torch.Tensor | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed from the nonzero entries of ``x`` only.

    Args:
        x: ``[..., I]`` floating point, usually binary spikes (0.0/1.0): the fast case. Any other
            value is multiplied in, so the result equals ``F.linear`` for any input (up to float
            rounding, and zeros times inf/NaN weights give 0, not NaN; see the module docstring).
            A non-contiguous ``x`` is copied to a contiguous one.
        weight: ``[O, I]``, like ``nn.Linear.weight``, same dtype and device as ``x``.
        bias: ``[O]`` or None.
        weight_t: optionally ``weight.T`` as a contiguous ``[I, O]`` tensor, cached by the
            caller so that it is not transposed again on every call (an ``I x O`` copy). The
            caller must refresh it whenever ``weight`` changes (after every optimiser step): it
            is trusted, not compared with ``weight``. It receives no gradient.
        implementation: one of :data:`IMPLEMENTATIONS` (see the module docstring).

    Returns:
        ``[..., O]`` in ``x``'s dtype.

    Raises:
        TypeError: ``x`` or ``weight`` not a floating-point tensor, or dtypes that differ.
        ValueError: mismatched shapes or devices, or an unknown ``implementation``.
        RuntimeError: an explicitly named implementation that cannot run these arguments here.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid: {list(IMPLEMENTATIONS)}"
        )
    _check_arguments(x, weight, bias, weight_t)
    kernel, max_density = _choose_kernel(x, implementation, weight.shape[0])
    n_in, n_out = weight.shape[1], weight.shape[0]
    if kernel is None or x.numel() == 0 or n_out == 0:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x_RI = x.reshape(-1, n_in).contiguous()
    if weight_t is None:
        weight_t_IO = weight.detach().t().contiguous()
    else:
        weight_t_IO = weight_t.detach()
        if not weight_t_IO.is_contiguous():
            logger.debug("weight_t is not contiguous: copying it (cache a contiguous one)")
            weight_t_IO = weight_t_IO.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        out_RO = _EventLinearFunction.apply(x_RI, weight, bias, weight_t_IO, kernel, max_density)
    else:
        out_RO = _forward(kernel, x_RI, weight, bias, weight_t_IO, max_density)
    return out_RO.view(*lead, n_out)


def _check_arguments(x, weight, bias, weight_t) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (spikes as 0.0/1.0), got dtype {t.dtype}"
            )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in], got a scalar")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"x has {x.shape[-1]} input features (its last dimension, shape {tuple(x.shape)}) "
            f"but weight {tuple(weight.shape)} expects {n_in}"
        )
    for name, t, shape in (("bias", bias, (n_out,)), ("weight_t", weight_t, (n_in, n_out))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}, expected {x.dtype} on {x.device} like x"
            )


def _choose_kernel(
    x: torch.Tensor, implementation: str, n_out: int
) -> tuple[EventKernel | None, float]:
    """(kernel provider or None for the dense product, the density above which it gives up)."""
    if implementation == "dense":
        return None, 1.0
    if implementation == "torch":
        return TORCH, 1.0
    if implementation == "auto":
        if x.device.type not in ("cpu", "cuda"):
            logger.debug("event_linear: no event-driven kernel for %s: dense product", x.device)
            return None, 1.0
        kernel = _triton_provider() if x.is_cuda else _cpp_provider()
        reason = kernel.unavailable_reason(x)
        if reason is not None:
            logger.debug("event_linear: %s kernel unavailable (%s): dense", kernel.name, reason)
            return None, 1.0
        return kernel, auto_dense_above(x.device.type, x.shape[-1], n_out)
    kernel = _cpp_provider() if implementation == "cpp" else _triton_provider()
    reason = kernel.unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(
            f'implementation="{implementation}" cannot run here: {reason}. '
            'Use implementation="auto" to fall back to a path that can.'
        )
    return kernel, 1.0


def auto_dense_above(device_type: str, in_features: int, out_features: int) -> float:
    """The density above which ``implementation="auto"`` runs the dense product for a layer
    ``in_features -> out_features`` on ``device_type`` ("cpu", "cuda").

    ``SPIKING_MOE_EVENT_DENSITY`` (a fraction in [0, 1]) wins when set. On the CPU the threshold
    is ``0.75 x`` the layer's break-even density, at most :data:`AUTO_DENSE_ABOVE` ``["cpu"]``.
    The break-even is read from this machine's calibration file (:mod:`.kernels.calibration`:
    per CPU model, instruction set, torch version, thread count and layer shape), or, the first
    time anywhere on this machine, measured (the dense product and the C++ kernel side by side
    on 128 float32 rows at 5% density; the kernel's time grows linearly with the density, the
    dense product's not at all) and saved there, so every later process takes the same path.
    Without the C++ kernel the ceiling applies. Other devices: :data:`AUTO_DENSE_ABOVE`. The
    threshold of each layer shape and where it came from are logged once, at INFO.

    Raises:
        ValueError: ``SPIKING_MOE_EVENT_DENSITY`` is not a number in [0, 1].
    """
    override = os.environ.get("SPIKING_MOE_EVENT_DENSITY", "")
    if override:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"SPIKING_MOE_EVENT_DENSITY must be a fraction in [0, 1], got {override!r}"
            )
        _log_threshold(device_type, in_features, out_features, value, "environment override")
        return value
    if device_type != "cpu":
        value = AUTO_DENSE_ABOVE.get(device_type, 1.0)
        _log_threshold(device_type, in_features, out_features, value, "unmeasured default")
        return value
    key = (torch.get_num_threads(), in_features, out_features)
    if key not in _calibrated:
        _calibrated[key] = _cpu_threshold(in_features, out_features)
    return _calibrated[key]


def _log_threshold(device_type, n_in, n_out, threshold, source) -> None:
    record = (device_type, torch.get_num_threads(), n_in, n_out, threshold, source)
    if record not in _logged:
        _logged.add(record)
        logger.info(
            "event_linear %d -> %d on %s (%d threads): the dense product runs above %.1f%% "
            "nonzero inputs (%s)",
            n_in,
            n_out,
            device_type,
            torch.get_num_threads(),
            100 * threshold,
            source,
        )


def _cpu_threshold(n_in: int, n_out: int) -> float:
    ceiling = AUTO_DENSE_ABOVE["cpu"]
    kernel = _cpp_provider()
    reason = kernel.unavailable_reason(torch.zeros(0))
    if reason is not None:
        _log_threshold("cpu", n_in, n_out, ceiling, f"default: {reason}")
        return ceiling
    from .kernels import calibration, event_cpu

    key = calibration.entry_key(
        event_cpu.available_isas()[-1], torch.get_num_threads(), n_in, n_out
    )
    break_even = calibration.read_break_even(key)
    if break_even is not None:
        source = f"read from {calibration.cache_path()}"
    else:
        measured = _measure_break_even(kernel, n_in, n_out)
        if measured is None:
            _log_threshold("cpu", n_in, n_out, ceiling, "default: too few inputs to time")
            return ceiling
        break_even = calibration.store_break_even(key, measured)
        if break_even is None:
            break_even, source = measured, "measured now; not saved"
        elif break_even == measured:
            source = f"measured now; saved to {calibration.cache_path()}"
        else:
            source = f"read from {calibration.cache_path()}, where another process saved it first"
    threshold = min(ceiling, _CALIBRATION_MARGIN * break_even)
    _log_threshold("cpu", n_in, n_out, threshold, f"break-even {100 * break_even:.1f}%, {source}")
    return threshold


def _measure_break_even(kernel: EventKernel, n_in: int, n_out: int) -> float | None:
    """The density at which the C++ kernel is as fast as the dense product, for this layer shape
    here and now; None if the calibration input has no active entry to time."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(_CALIBRATION_ROWS, n_in, generator=generator) < _CALIBRATION_DENSITY).float()
    density = float(x.count_nonzero()) / max(x.numel(), 1)
    if density == 0.0:
        return None
    weight = torch.randn(n_out, n_in, generator=generator)
    bias = torch.zeros(n_out)
    args = EventLinearArgs(x, weight.t().contiguous(), bias)
    dense_s, event_s = [], []
    with torch.no_grad():
        for repeat in range(6):  # alternating; the first of each is a warm-up
            start = time.perf_counter()
            F.linear(x, weight, bias)
            middle = time.perf_counter()
            kernel.forward(args)
            end = time.perf_counter()
            if repeat:
                dense_s.append(middle - start)
                event_s.append(end - middle)
    # A timer too coarse to see the kernel would divide by zero; such a layer is tiny.
    event_time = max(statistics.median(event_s), 1e-9)
    return max(statistics.median(dense_s), 1e-9) / event_time * density


def _cpp_provider() -> EventKernel:
    from .kernels import event_cpu

    return event_cpu.CPP


def _triton_provider() -> EventKernel:
    from .kernels import triton_event

    return triton_event.TRITON


def _forward(
    kernel: EventKernel, x_RI, weight_OI, bias_O, weight_t_IO, max_density
) -> torch.Tensor:
    bias_O = None if bias_O is None else bias_O.detach().contiguous()
    out_RO = kernel.forward(EventLinearArgs(x_RI.detach(), weight_t_IO, bias_O, max_density))
    if out_RO is None:  # denser than max_density: the kernel computed nothing
        out_RO = F.linear(x_RI.detach(), weight_OI.detach(), bias_O)
    return out_RO


class _EventLinearFunction(torch.autograd.Function):
    """Event-driven forward, the dense product's backward."""

    @staticmethod
    def forward(x_RI, weight_OI, bias_O, weight_t_IO, kernel, max_density):
        return _forward(kernel, x_RI, weight_OI, bias_O, weight_t_IO, max_density)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_RI, weight_OI = inputs[:2]
        ctx.save_for_backward(
            x_RI if ctx.needs_input_grad[1] else None,
            weight_OI if ctx.needs_input_grad[0] else None,
        )

    @staticmethod
    def backward(ctx, grad_RO):
        x_RI, weight_OI = ctx.saved_tensors
        grad_x = grad_RO @ weight_OI if ctx.needs_input_grad[0] else None
        grad_w = grad_RO.t() @ x_RI if ctx.needs_input_grad[1] else None
        grad_b = grad_RO.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class _TorchProvider:
    """The event-driven sum in plain PyTorch: any device and dtype; the kernels' reference."""

    name = "torch"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return None

    def forward(self, args: EventLinearArgs) -> torch.Tensor | None:
        x_RI, weight_t_IO, bias_O = args.x_RI, args.weight_t_IO, args.bias_O
        rows_Z, cols_Z = x_RI.nonzero(as_tuple=True)  # row-major: each row's inputs in order
        if rows_Z.numel() > args.max_density * x_RI.numel():
            return None
        n_rows, n_out = x_RI.shape[0], weight_t_IO.shape[1]
        if bias_O is None:
            out_RO = x_RI.new_zeros(n_rows, n_out)
        else:
            out_RO = bias_O.expand(n_rows, n_out).clone()
        values_Z = x_RI[rows_Z, cols_Z]
        step = max(1, _TORCH_CHUNK_ELEMENTS // max(n_out, 1))
        for start in range(0, rows_Z.numel(), step):
            part = slice(start, start + step)
            rows_O = weight_t_IO.index_select(0, cols_Z[part]) * values_Z[part, None]
            out_RO.index_add_(0, rows_Z[part], rows_O)
        return out_RO


TORCH = _TorchProvider()
