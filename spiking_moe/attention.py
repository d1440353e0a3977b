r"""Self-attention on spikes (spike-driven, no softmax) and its ANN twin (softmax attention).

Shape letters: the package legend (:mod:`spiking_moe`); ``C = D / H`` is the width of
one head.

**Spiking self-attention** (:class:`SpikingSelfAttention`) follows the *Spiking
Self-Attention* (SSA) of Spikformer (Zhou et al., "Spikformer: When Spiking Neural Network
Meets Transformer", ICLR 2023, eq. 9-11), made causal and multi-head. At each step ``t`` and
head ``h``, from input spikes :math:`x_t \in \{0,1\}^{S \times D}`:

.. math::

    Q_t = \mathrm{LIF}(x_t W_Q), \quad K_t = \mathrm{LIF}(x_t W_K), \quad
    V_t = \mathrm{LIF}(x_t W_V) \qquad (\text{binary}, [S, C] \text{ per head}),

    A_t[i, j] = Q_t[i] \cdot K_t[j] \;\; (j \le i; \; 0 \text{ for } j > i), \qquad
    Y_t[i] = \frac{\sigma}{i + 1} \sum_{j \le i} A_t[i, j]\, V_t[j],

    \text{out}_t = \mathrm{LIF}(Y_t)\, W_O \quad (\text{heads concatenated}; \text{a current}).

There is no softmax: :math:`Q K^\top` of binary matrices counts coincident spikes (integers
>= 0), so every product has a binary operand and costs accumulates only (the energy counter
sees each product as a :class:`MatMul` module: events of the binary operand times the
positions the mask lets them reach). Spikformer scales by a constant ``s``; here the
constant is :math:`\sigma = 1/\sqrt{C}` and each query row is also divided by the number of
keys it sees, ``i + 1``, so the drive of the attention neurons does not grow with the
position under the causal mask. Both are constants per row, which hardware folds into that
row's threshold, so they are not counted as operations. **The mask is exact**: the terms
with ``j > i`` contribute exactly zero (the energy counter charges only the terms a causal
kernel computes), so no position sees a later one.

**Attention kinds** (``kind``; :class:`~spiking_moe.args.AttentionArgs`), the bits-per-byte
vs energy trade-off of one layer, each priced by what its operands are (a spike operand makes
accumulates, real x real makes MACs, a softmax its MACs per visible score):

* ``"ssa"``: the above (spiking ``Q``, ``K``, ``V``; no softmax; every product accumulates).
* ``"spiking_softmax"``: spiking ``Q``, ``K``, ``V``;
  :math:`Y_t = \mathrm{softmax}(Q_t K_t^\top \sigma + \text{mask})\, V_t`: the scores
  accumulate (spike x spike), the softmax is priced, and ``P V`` accumulates (``V`` spikes).
* ``"real_softmax"``: real ``Q``, ``K``, ``V`` (the projections read spikes: accumulates; no
  neurons after them), :math:`\mathrm{softmax}(Q K^\top \sigma + \text{mask}) V`: both
  products are real x real (MACs).

In every kind ``LIF(Y)`` feeds ``W_O``, so the layer's output current comes from spikes.

**ANN twin** (:class:`SoftmaxAttention`): the usual causal multi-head attention on activations
``[B, S, D]``, :math:`\mathrm{softmax}(Q K^\top / \sqrt{C} + \text{mask})\, V\, W_O`, with the
products as :class:`MatMul` modules (graded operands: MACs) and an ``nn.Softmax`` module (priced
by the energy counter per visible score).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .args import AttentionArgs, NeuronArgs
from .neurons import make_neuron, neuron_args
from .synapses import EventLinear

__all__ = ["AttentionOutput", "MatMul", "SoftmaxAttention", "SpikingSelfAttention"]

MATMUL_MASKS = (None, "output", "contraction")


class MatMul(nn.Module):
    """``a @ b`` as a module, with an exact causal mask, so energy counters see the product.

    The energy counter (:mod:`energy.counting`) recognises any module with a ``matmul_mask``
    attribute. With ``a`` of size ``rows x inner`` and ``b`` of size ``inner x cols`` in the
    last two dimensions (indices ``m``, ``k``, ``n``):

    - ``matmul_mask=None``: every term ``a[m, k] b[k, n]``;
    - ``"output"``: only terms with ``n <= m`` (causal scores ``Q K^T``; rows == cols); the
      other outputs are exactly 0;
    - ``"contraction"``: only terms with ``k <= m`` (``A V``: row ``m`` sums values of
      positions ``k <= m``; rows == inner).

    ``ann_softmax=True`` tells the counter that the ANN equivalent of this product feeds a
    softmax (attention scores), which the equivalent-ANN baseline then prices.

    Args:
        matmul_mask: None (the full product), ``"output"`` or ``"contraction"``, as above;
            anything else is a ValueError. Kept as the attribute the counter reads.
        ann_softmax: mark the product as scores that feed a softmax in the ANN equivalent
            (:class:`SpikingSelfAttention` of kind ``"ssa"`` sets it on its score product).

    Shape:
        ``forward(a, b)``: ``a`` ``[..., rows, inner]`` and ``b`` ``[..., inner, cols]``
        (broadcast as ``torch.matmul``) -> ``[..., rows, cols]``; ``"output"`` needs
        rows == cols and ``"contraction"`` rows == inner, else ValueError.

    Example:
        >>> a = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
        >>> MatMul("output")(a, a.T)  # [[a0.a0, 0], [a1.a0, a1.a1]]
        tensor([[2., 0.],
                [1., 1.]])
    """

    def __init__(self, matmul_mask: str | None = None, *, ann_softmax: bool = False):
        super().__init__()
        if matmul_mask not in MATMUL_MASKS:
            raise ValueError(f"unknown matmul_mask {matmul_mask!r}; valid: {list(MATMUL_MASKS)}")
        self.matmul_mask = matmul_mask
        self.ann_softmax = bool(ann_softmax)

    def extra_repr(self) -> str:
        return f"matmul_mask={self.matmul_mask!r}, ann_softmax={self.ann_softmax}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.matmul_mask == "contraction":
            rows, inner = a.shape[-2:]
            if rows != inner:
                raise ValueError(
                    f"contraction mask needs a square a [.., M, M], got {tuple(a.shape)}"
                )
            # Zeroing a's masked entries removes exactly the terms k > m from every sum
            # (masked_fill, not a multiply: 0 * inf would be NaN).
            return a.masked_fill(~_causal_mask(rows, a.device), 0) @ b
        out = a @ b
        if self.matmul_mask == "output":
            rows, cols = out.shape[-2:]
            if rows != cols:
                raise ValueError(f"output mask needs square scores, got {tuple(out.shape)}")
            out = out.masked_fill(~_causal_mask(rows, out.device), 0)
        return out


def _causal_mask(S: int, device) -> torch.Tensor:
    """``[S, S]`` bool, True where column <= row (what a position may see)."""
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()


class AttentionOutput(NamedTuple):
    """Result of :class:`SpikingSelfAttention`.

    Attributes:
        current: ``[T, B, S, D]`` output current (``W_O`` applied to the attention spikes).
        activity: spikes of ``q_neuron``, ``k_neuron``, ``v_neuron`` and ``attn_neuron``.
    """

    current: torch.Tensor
    activity: Activity


def _check_heads(d_model: int, num_heads: int, causal: bool, kind: str = "ssa") -> AttentionArgs:
    """The layer's :class:`~spiking_moe.args.AttentionArgs`, checked against ``d_model``."""
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
    args = AttentionArgs(kind=kind, num_heads=num_heads, causal=causal)
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    return args


class SpikingSelfAttention(nn.Module):
    """Multi-head spike-driven self-attention (causal Spikformer SSA; module docstring).

    Args:
        d_model: ``D``.
        num_heads: ``H`` (divides ``D``).
        causal: mask later positions (exactly: their terms are never computed).
        kind: "ssa", "spiking_softmax" or "real_softmax" (module docstring; "ann" is
            :class:`SoftmaxAttention`).
        neuron: the :class:`~spiking_moe.args.NeuronArgs` of the spiking populations (four;
            one, ``attn_neuron``, for "real_softmax").
        **neuron_options: neuron options by name (``beta``, ``threshold``, ...).

    Shapes:
        ``forward(x)``: spikes ``[T, B, S, D]`` -> :class:`AttentionOutput` with a current
        ``[T, B, S, D]``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> attn = SpikingSelfAttention(8, 2)
        >>> out = attn(torch.bernoulli(torch.full((4, 2, 5, 8), 0.5)))
        >>> out.current.shape, out.activity.names
        (torch.Size([4, 2, 5, 8]), ('q_neuron', 'k_neuron', 'v_neuron', 'attn_neuron'))
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = True,
        kind: str = "ssa",
        neuron: NeuronArgs | None = None,
        **neuron_options,
    ):
        super().__init__()
        self.args = _check_heads(d_model, num_heads, causal, kind)
        if self.args.kind == "ann":
            raise ValueError(
                "SpikingSelfAttention: attention kind 'ann' is SoftmaxAttention on the residual "
                "stream (SpikingTransformerBlock builds it)"
            )
        neuron = neuron_args(neuron, **neuron_options)
        self.d_model, self.num_heads, self.causal = d_model, num_heads, self.args.causal
        self.kind = self.args.kind
        # Fed spikes: event-driven products when gradients are off.
        self.q_proj = EventLinear(d_model, d_model)
        self.k_proj = EventLinear(d_model, d_model)
        self.v_proj = EventLinear(d_model, d_model)
        if self.kind != "real_softmax":
            self.q_neuron = make_neuron(neuron)
            self.k_neuron = make_neuron(neuron)
            self.v_neuron = make_neuron(neuron)
        # SSA's ANN equivalent would put a softmax on the scores: the baseline prices it. The
        # softmax kinds run one (an nn.Softmax the counter prices for both).
        self.scores = MatMul("output" if causal else None, ann_softmax=self.kind == "ssa")
        if self.kind != "ssa":
            self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul("contraction" if causal else None)
        self.attn_neuron = make_neuron(neuron)
        self.out_proj = EventLinear(d_model, d_model)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, causal={self.causal}, "
            f"kind={self.kind!r}"
        )

    def _heads(self, x_TBSD: torch.Tensor) -> torch.Tensor:
        T, B, S, _ = x_TBSD.shape
        return x_TBSD.view(T, B, S, self.num_heads, -1).transpose(2, 3)  # [T, B, H, S, C]

    def forward(self, x_TBSD: torch.Tensor) -> AttentionOutput:
        if x_TBSD.dim() != 4 or x_TBSD.shape[-1] != self.d_model:
            raise ValueError(
                f"SpikingSelfAttention input must be [T, B, S, {self.d_model}], "
                f"got shape {tuple(x_TBSD.shape)}"
            )
        T, B, S, D = x_TBSD.shape
        C = D // self.num_heads
        q_TBSD, k_TBSD, v_TBSD = self.q_proj(x_TBSD), self.k_proj(x_TBSD), self.v_proj(x_TBSD)
        populations = []
        if self.kind != "real_softmax":
            q_TBSD = self.q_neuron(q_TBSD)
            k_TBSD = self.k_neuron(k_TBSD)
            v_TBSD = self.v_neuron(v_TBSD)
            populations = [("q_neuron", q_TBSD), ("k_neuron", k_TBSD), ("v_neuron", v_TBSD)]
        q, k, v = self._heads(q_TBSD), self._heads(k_TBSD), self._heads(v_TBSD)
        scores_TBHSS = self.scores(q, k.transpose(-2, -1))
        if self.kind == "ssa":
            mixed_TBHSC = self.mix(scores_TBHSS, v)
            seen_S = (
                torch.arange(1, S + 1, device=x_TBSD.device)
                if self.causal
                else torch.full((S,), S, device=x_TBSD.device)
            )
            scale_S1 = (1.0 / (math.sqrt(C) * seen_S.to(mixed_TBHSC.dtype))).unsqueeze(-1)
            mixed_TBHSC = mixed_TBHSC * scale_S1
        else:
            scores_TBHSS = scores_TBHSS / math.sqrt(C)
            if self.causal:
                visible = _causal_mask(S, x_TBSD.device)
                scores_TBHSS = scores_TBHSS.masked_fill(~visible, float("-inf"))
            mixed_TBHSC = self.mix(self.softmax(scores_TBHSS), v)
        y_TBSD = mixed_TBHSC.transpose(2, 3).reshape(T, B, S, D)
        attn_TBSD = self.attn_neuron(y_TBSD)
        populations.append(("attn_neuron", attn_TBSD))
        activity = Activity.concat([Activity.of(name, s) for name, s in populations])
        return AttentionOutput(self.out_proj(attn_TBSD), activity)


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention on activations ``[B, S, D]`` (the ANN twin).

    Args:
        d_model: ``D``.
        num_heads: ``H`` (divides ``D``).
        causal: mask later positions (score ``-inf`` before the softmax).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> SoftmaxAttention(8, 2)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool = True):
        super().__init__()
        self.args = _check_heads(d_model, num_heads, causal)
        self.d_model, self.num_heads, self.causal = d_model, num_heads, self.args.causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.scores = MatMul("output" if causal else None)
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul("contraction" if causal else None)
        self.out_proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, causal={self.causal}"

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.d_model:
            raise ValueError(
                f"SoftmaxAttention input must be [B, S, {self.d_model}], got {tuple(x_BSD.shape)}"
            )
        B, S, D = x_BSD.shape
        C = D // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, S, self.num_heads, C).transpose(1, 2)  # [B, H, S, C]

        q, k, v = heads(self.q_proj(x_BSD)), heads(self.k_proj(x_BSD)), heads(self.v_proj(x_BSD))
        scores_BHSS = self.scores(q, k.transpose(-2, -1)) / math.sqrt(C)
        if self.causal:
            scores_BHSS = scores_BHSS.masked_fill(~_causal_mask(S, x_BSD.device), float("-inf"))
        mixed_BHSC = self.mix(self.softmax(scores_BHSS), v)
        return self.out_proj(mixed_BHSC.transpose(1, 2).reshape(B, S, D))
