"""The counting rules: what one call of a synaptic layer, a product, a softmax or a neuron costs.

:func:`energy.count_operations` applies these rules to every call it hooks and adds them up
(how calls become an ANN equivalent: :mod:`energy.counting`; what the counts mean and how passes
merge: :mod:`energy.counts`).

Letters: ``T`` time steps, ``B`` batch, ``R`` rows (tokens x steps folded), ``F`` features,
``C`` channels, ``G`` convolution groups, ``S`` spatial dims; for a product ``a @ b``, ``L``
leading indices (``[T, B, H]`` folded), ``a`` ``[..., M, K]``, ``b`` ``[..., K, N]``.

Per call of a synaptic layer on input ``x``:

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
- **Multi-level spikes.** A module may declare ``energy_spike_levels = D`` (an int attribute;
  the innermost declaration around a module applies, like ``energy_time_steps``): then an input
  whose every element is an integer in ``0..D`` is spike counts, a count ``c`` being ``c``
  events, ``c`` accumulates per reached synapse: exactly what the count's binary expansion
  (``D`` virtual steps, the first ``c`` spiking) executes. A neuron with ``spike_levels = D``
  counts ``D`` updates per element and step (one per virtual step) and ``sum`` of its counts
  as spikes.
- **LayerNorm** (``nn.LayerNorm``): ``MAC = 4 * numel(input)`` (the mean's sum, the
  variance, the normalising and the affine multiply-adds), in the model and its ANN
  equivalent alike.
- **Elementwise additions** (a residual stream): a module with ``energy_elementwise = "add"``
  costs ``AC = numel(output)`` (an add is an accumulate). Its ANN equivalent is left at zero,
  a lower bound that favours the ANN (the adds are under 1% of a block's work).
- Bias additions are not counted: they are charged with the neuron update.
- Neuron: ``updates = numel(spikes)`` (one per neuron per time step, whether the module is
  called once on ``[T, B, ...]`` or once per step) and ``spikes = nnz(spikes)``.

The **ANN equivalent** of a call is its dense MACs and one write per output element. A product
with ``ann_softmax = True`` (optional attribute, default False: spiking attention scores, which
the ANN would pass through a softmax) adds that softmax: 3 MACs per computed output (``L M N``,
``L M(M+1)/2``, ``L M N`` for the three masks) and one more write per output element.

Example:
    A product module (causal attention scores):

    >>> import torch
    >>> from energy import count_operations
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

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NORM_MACS",
    "SOFTMAX_MACS",
    "conv_dims",
    "conv_fan_in",
    "conv_synapse_events",
    "masked_synapse_events",
    "product_dims",
    "product_mask",
    "product_operands",
    "product_size",
    "softmax_macs",
    "spike_counts",
]

#: MACs per softmax input (exp, running sum, normalising multiply): :func:`softmax_macs` per
#: finite input, and per output of a product whose ANN equivalent has a softmax (``ann_softmax``).
SOFTMAX_MACS = 3
#: MACs per element of an ``nn.LayerNorm`` input: the mean's sum, the variance's multiply-add,
#: the normalising multiply-add, the affine multiply-add.
NORM_MACS = 4
_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MASKS = (None, "output", "contraction")


def conv_dims(module: nn.Module) -> int | None:
    """Spatial dims of a convolution (1, 2 or 3; subclasses included), None for other modules."""
    return next((nd for cls, nd in _CONV.items() if isinstance(module, cls)), None)


def conv_fan_in(module: nn.modules.conv._ConvNd) -> int:
    """Synapses per output element: ``C_in / G * prod(k)``."""
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def conv_synapse_events(
    module: nn.modules.conv._ConvNd, x_BCS: torch.Tensor, nd: int
) -> torch.Tensor:
    """Exact number of (input event, synapse) pairs of a convolution, an int64 0-dim tensor."""
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


def product_operands(name: str, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``: the first two tensor arguments of a product's forward call."""
    found = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if len(found) < 2:
        raise TypeError(
            f"product {name!r} must be called with two tensors (a, b), got {len(found)}"
        )
    return found[0], found[1]


def product_mask(module: nn.Module, name: str) -> str | None:
    """The module's ``matmul_mask``, checked."""
    mask = module.matmul_mask
    if mask not in _MASKS:
        raise ValueError(f"module {name!r}: matmul_mask must be one of {_MASKS}, got {mask!r}")
    return mask


def product_dims(
    name: str, mask: str | None, a: torch.Tensor, b: torch.Tensor
) -> tuple[int, int, int, int]:
    """``(L, M, K, N)`` of ``a @ b``, checked against each other and the mask."""
    if a.dim() < 2 or b.dim() != a.dim() or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"product {name!r}: operands must be [..., M, K] and [..., K, N] with "
            f"the same leading dims, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    *lead, M, K = a.shape
    N = b.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(
            f"product {name!r}: inner sizes differ, {tuple(a.shape)} @ {tuple(b.shape)}"
        )
    if (mask == "output" and M != N) or (mask == "contraction" and M != K):
        raise ValueError(
            f"product {name!r}: matmul_mask={mask!r} needs "
            f"{'M == N' if mask == 'output' else 'M == K'}, got "
            f"{tuple(a.shape)} @ {tuple(b.shape)}"
        )
    return math.prod(lead), M, K, N


def product_size(mask: str | None, M: int, K: int, N: int) -> tuple[int, int]:
    """(computed terms, outputs with at least one term) per leading index."""
    triangle = M * (M + 1) // 2
    if mask is None:
        terms, outputs = M * K * N, M * N
    elif mask == "output":
        terms, outputs = K * triangle, triangle
    else:  # every output row m has the term k = 0
        terms, outputs = N * triangle, M * N
    return terms, (outputs if K else 0)


def masked_synapse_events(
    mask: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ACs of a masked product driven by ``a``'s events, and driven by ``b``'s (int64 0-dim);
    the operands as checked by :func:`product_dims`.

    Each event is weighted by the computed terms it enters, its *reach*: ``[M, K]`` for ``a``
    (how many ``n``), ``[K, N]`` for ``b`` (how many ``m``).
    """
    L, (M, K), N = math.prod(a.shape[:-2]), a.shape[-2:], b.shape[-1]
    device = a.device
    if mask == "output":  # n <= m
        reach_a = torch.arange(1, M + 1, device=device).unsqueeze(1).expand(M, K)
        reach_b = (M - torch.arange(N, device=device)).unsqueeze(0).expand(K, N)
    else:  # "contraction": k <= m
        reach_a = torch.ones(M, K, dtype=torch.int64, device=device).tril() * N
        reach_b = (M - torch.arange(K, device=device)).unsqueeze(1).expand(K, N)
    return (_events_per_cell(a, L) * reach_a).sum(), (_events_per_cell(b, L) * reach_b).sum()


def _events_per_cell(x: torch.Tensor, leading: int) -> torch.Tensor:
    """Events at each ``[M, K]`` position, summed over the leading dims (int64): a spike is one
    event, a spike count ``c`` is ``c``."""
    # Reducing over the leading dims first keeps the weighting by reach a small [M, K] product.
    cells = x.reshape(leading, *x.shape[-2:]).sum(0, dtype=torch.float64)
    return cells.round().to(torch.int64)


def spike_counts(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x holds integer spike counts 0..levels, their sum)``, as 0-dim tensors (int64 sum,
    0 when ``x`` is not counts): the events of a multi-level spiking input."""
    is_counts = ((x >= 0) & (x <= levels) & (x == torch.round(x))).all()
    total = x.sum(dtype=torch.float64).round().to(torch.int64)
    return is_counts, torch.where(is_counts, total, torch.zeros_like(total))


def softmax_macs(x: torch.Tensor) -> torch.Tensor:
    """MACs of a softmax over ``x``: 3 per finite input (an int64 0-dim tensor)."""
    return torch.count_nonzero(torch.isfinite(x)) * SOFTMAX_MACS
