r"""Spiking transformer blocks with a token-level MoE FFN, a byte-level language model, and its twins.

Legend: ``T`` time steps, ``B`` batch, ``S`` sequence positions (tokens of a sequence),
``D`` model width, ``V`` vocabulary, ``F`` FFN width.

**Block** (:class:`SpikingTransformerBlock`), on spikes :math:`x \in \{0,1\}^{T \times B
\times S \times D}`:

.. math::

    h = \mathrm{LIF}_1\big(\mathrm{SSA}(x) + x\big), \qquad
    y = \mathrm{LIF}_2\big(\mathrm{FFN}(h) + h\big),

where SSA is :class:`~spiking_moe.attention.SpikingSelfAttention` and FFN a
:class:`~spiking_moe.moe.SpikingMoE` (routed per position: the tokens are the ``B S``
positions) or a dense :class:`~spiking_moe.experts.SpikingExpert`, both returning synaptic
current. The residual is a **spike shortcut into the membrane**: the block's input spikes
enter the next LIF population as current through identity synapses (weight 1), beside the
sub-layer's current, and that population fires. So what flows between blocks, and into every
Linear and product, stays binary spikes, while the shortcut still carries the input forward
(with the threshold at 1, an input spike alone brings the membrane to threshold; the
sub-layer's current decides whether it fires). The alternatives were rejected for that reason:
the membrane shortcut of the Spike-driven Transformer (Yao et al., NeurIPS 2023) passes the
real-valued membrane between blocks, and SEW's ADD shortcut (Fang et al., NeurIPS 2021) passes
spike counts (integers up to the depth). The shortcut costs one accumulate per input spike
(fan-out 1), which the energy report does not count: under ``1 / (3 D)`` of the block's ``Q,
K, V`` projections' accumulates. With a MoE FFN, ``LIF_2`` is the MoE layer's own output
neuron (``ffn.neuron``) and the shortcut enters it through ``SpikingMoE(..., residual=h)``.

**Language model** (:class:`SpikingMoELM`): byte ids ``[B, S]`` -> token embedding plus a
learned position embedding, as a constant current over ``T`` steps -> LIF -> blocks ->
readout ``Linear(D, V)`` on the spikes at every step -> logits ``[B, S, V]``:
``readout="count"``: the mean over ``T`` of the readout current (the spike counts times
``W``); ``"membrane"``: the mean over ``T`` of a non-firing leaky integrator of it. The
readout runs on the spikes at every step, so the energy counter charges it accumulates (a
readout on the mean would be charged as graded MACs). Embedding lookups are table reads, not
synaptic operations. Twins for every comparison: :class:`DenseSNNLM` (the same network, a
dense spiking FFN of width ``k * expert_hidden + shared``: the same active parameters but the
router) and :class:`ANNTransformerLM` (the same sizes, softmax attention, ReLU FFN, pre-norm
residual stream, one step; routed or dense).

Causality: attention is masked exactly, the router scores a position from its own spikes
only, and capacity drops go first come, first served in position order
(:mod:`spiking_moe.moe`), so no logit at position ``i`` depends on a token after ``i``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .activity import Activity
from .attention import SoftmaxAttention, SpikingSelfAttention
from .experts import MLPExpert, SpikingExpert
from .models import READOUTS, ROUTERS, _leaky_mean
from .moe import SpikingMoE
from .neurons import LIF
from .router import RateRouter, RoutingInfo, SpikingRouter
from .synapses import EventLinear

__all__ = [
    "ANNTransformerLM",
    "BlockOutput",
    "DenseSNNLM",
    "LMOutput",
    "SpikingMoELM",
    "SpikingTransformerBlock",
]


class BlockOutput(NamedTuple):
    """Result of :class:`SpikingTransformerBlock`.

    Attributes:
        spikes: ``[T, B, S, D]`` output spikes.
        aux_loss: scalar balancing loss of the MoE FFN (zero for a dense FFN).
        routing: the FFN's :class:`~spiking_moe.router.RoutingInfo`, or None (dense FFN).
        activity: ``attn.*``, ``attn_neuron`` and ``ffn.*`` (MoE) or ``ffn.*`` and
            ``ffn_neuron`` (dense) populations.
    """

    spikes: torch.Tensor
    aux_loss: torch.Tensor
    routing: RoutingInfo | None
    activity: Activity


class SpikingTransformerBlock(nn.Module):
    """Spiking self-attention then an FFN, each with a spike shortcut into the membrane.

    Args:
        d_model: ``D``.
        num_heads: attention heads (divide ``D``).
        ffn: a :class:`~spiking_moe.moe.SpikingMoE` (``D -> D``, token-level routing) or a
            dense module mapping ``[T, N, D]`` spikes to ``[T, N, D]`` current with ``run``
            (a :class:`~spiking_moe.experts.SpikingExpert`).
        causal: causal attention.
        **neuron_kwargs: passed to the attention's and the block's LIF populations.

    Shapes:
        ``forward(x)``: spikes ``[T, B, S, D]`` -> :class:`BlockOutput`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = SpikingTransformerBlock(8, 2, SpikingExpert(8, 16, 8))
        >>> block(torch.bernoulli(torch.full((3, 2, 5, 8), 0.3))).spikes.shape
        torch.Size([3, 2, 5, 8])
    """

    def __init__(
        self, d_model: int, num_heads: int, ffn: nn.Module, *, causal: bool = True, **neuron_kwargs
    ):
        super().__init__()
        self.attn = SpikingSelfAttention(d_model, num_heads, causal=causal, **neuron_kwargs)
        self.attn_neuron = LIF(**neuron_kwargs)
        for side in ("in_features", "out_features"):
            width = getattr(ffn, side, d_model)
            if width != d_model:
                raise ValueError(f"ffn.{side} must equal d_model={d_model}, got {width}")
        self.ffn = ffn
        self.ffn_neuron = None if isinstance(ffn, SpikingMoE) else LIF(**neuron_kwargs)

    def forward(self, x_TBSD: torch.Tensor) -> BlockOutput:
        attn = self.attn(x_TBSD)
        h_TBSD = self.attn_neuron(attn.current + x_TBSD)
        activity = [attn.activity.prefixed("attn"), Activity.of("attn_neuron", h_TBSD)]
        if self.ffn_neuron is None:
            moe = self.ffn(h_TBSD, residual=h_TBSD)
            activity.append(moe.activity.prefixed("ffn"))
            return BlockOutput(moe.spikes, moe.aux_loss, moe.routing, Activity.concat(activity))
        T, B, S, D = h_TBSD.shape
        ffn = self.ffn.run(h_TBSD.reshape(T, B * S, D))
        y_TBSD = self.ffn_neuron(ffn.current.reshape(T, B, S, D) + h_TBSD)
        activity += [ffn.activity.prefixed("ffn"), Activity.of("ffn_neuron", y_TBSD)]
        return BlockOutput(y_TBSD, x_TBSD.new_zeros(()), None, Activity.concat(activity))


class LMOutput(NamedTuple):
    """Result of every language model here (the fields of a classifier's output).

    Attributes:
        logits: ``[B, S, V]`` next-token logits at every position.
        aux_loss: scalar, the sum of the MoE layers' balancing losses (zero without MoE).
        routing: one :class:`~spiking_moe.router.RoutingInfo` per MoE layer, in order.
        activity: spikes of every LIF population (``input_neuron``, ``blocks.<l>.*``); empty
            for the ANN.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple[RoutingInfo, ...]
    activity: Activity


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class _LanguageModel(nn.Module):
    """Embedding, input checks and sampling shared by the three language models."""

    vocab_size: int
    context: int

    def _init_embedding(self, vocab_size: int, d_model: int, context: int) -> None:
        _check_int("vocab_size", vocab_size)
        _check_int("d_model", d_model)
        _check_int("context", context)
        self.vocab_size, self.d_model, self.context = vocab_size, d_model, context
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context, d_model)

    def _check_ids(self, ids_BS: torch.Tensor) -> None:
        """Raise naming the problem unless ``ids_BS`` is ``[B, S]`` integer ids in the
        vocabulary with ``S <= context`` (one host sync, for the value range)."""
        name = type(self).__name__
        if not isinstance(ids_BS, torch.Tensor):
            raise TypeError(
                f"{name} input must be a torch.Tensor of token ids, got {type(ids_BS).__name__}"
            )
        if ids_BS.dtype == torch.bool or ids_BS.is_floating_point() or ids_BS.is_complex():
            raise TypeError(f"{name} input must be integer token ids, got dtype {ids_BS.dtype}")
        if ids_BS.dim() != 2 or 0 in ids_BS.shape:
            raise ValueError(
                f"{name} input must be [B, S] token ids, got shape {tuple(ids_BS.shape)}"
            )
        S = ids_BS.shape[1]
        if S > self.context:
            raise ValueError(f"{name}: sequence length {S} exceeds the context {self.context}")
        low, high = torch.stack(torch.aminmax(ids_BS)).tolist()
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"{name}: token ids must lie in [0, {self.vocab_size}), got values in [{low}, {high}]"
            )

    def _embed(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` ids -> ``[B, S, D]`` token plus position embedding (after the checks)."""
        self._check_ids(ids_BS)
        positions = torch.arange(ids_BS.shape[1], device=ids_BS.device)
        return self.token_embedding(ids_BS.long()) + self.position_embedding(positions)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids``, one at a time.

        Each step feeds the last ``context`` tokens and samples from the last position's
        logits divided by ``temperature`` (``0`` takes the most likely token). Runs in eval
        mode (noise-free routing) and restores the mode.

        Args:
            prompt_ids: ``[S0]`` or ``[B, S0]`` token ids (``S0 >= 1``).
            max_new_tokens: tokens to append (>= 0).
            temperature: >= 0.
            generator: random stream for sampling (None: the global one).

        Returns:
            The prompt followed by the new tokens, ``[S0 + n]`` or ``[B, S0 + n]``.
        """
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() not in (1, 2):
            raise TypeError(
                "prompt_ids must be a torch.Tensor of token ids, [S0] or [B, S0], got "
                f"{type(prompt_ids).__name__}{tuple(getattr(prompt_ids, 'shape', ()))}"
            )
        _check_int("max_new_tokens", max_new_tokens, 0)
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        ids = prompt_ids.unsqueeze(0) if prompt_ids.dim() == 1 else prompt_ids
        self._check_ids(ids[:, -self.context :])  # a bad prompt fails even when n = 0
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits_BV = self(ids[:, -self.context :]).logits[:, -1].float()
                if temperature == 0:
                    next_B1 = logits_BV.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits_BV / temperature, dim=-1)
                    next_B1 = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, next_B1.to(ids.dtype)], dim=1)
        finally:
            self.train(was_training)
        return ids[0] if prompt_ids.dim() == 1 else ids


class _SpikingLM(_LanguageModel):
    def _init_spiking(
        self, vocab_size, d_model, num_layers, num_heads, context, num_steps, readout, neuron_kwargs
    ) -> None:
        self._init_embedding(vocab_size, d_model, context)
        _check_int("num_layers", num_layers)
        _check_int("num_heads", num_heads)
        _check_int("num_steps", num_steps)
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; valid: {list(READOUTS)}")
        self.num_steps, self.readout_mode = num_steps, readout
        self.input_neuron = LIF(**neuron_kwargs)
        self.readout = EventLinear(d_model, vocab_size)
        if readout == "membrane" and self.input_neuron.beta.dim() != 0:
            raise ValueError("readout='membrane' needs a scalar beta, got a per-neuron beta")

    def forward(self, ids_BS: torch.Tensor) -> LMOutput:
        """Next-token logits ``[B, S, V]`` for token ids ``[B, S]`` -> :class:`LMOutput`."""
        current_BSD = self._embed(ids_BS)
        current_TBSD = current_BSD.unsqueeze(0).expand(self.num_steps, *current_BSD.shape)
        h_TBSD = self.input_neuron(current_TBSD)
        activity = [Activity.of("input_neuron", h_TBSD)]
        routing: list[RoutingInfo] = []
        aux = current_BSD.new_zeros(())
        for l, block in enumerate(self.blocks):
            out = block(h_TBSD)
            h_TBSD = out.spikes
            aux = aux + out.aux_loss
            if out.routing is not None:
                routing.append(out.routing)
            activity.append(out.activity.prefixed(f"blocks.{l}"))
        current_TBSV = self.readout(h_TBSD)
        if self.readout_mode == "count":
            logits = current_TBSV.mean(0)
        else:
            T, B, S, V = current_TBSV.shape
            beta = self.input_neuron.beta.clamp(0, 1)
            logits = _leaky_mean(current_TBSV.reshape(T, B * S, V), beta).reshape(B, S, V)
        return LMOutput(logits, aux, tuple(routing), Activity.concat(activity))


def _moe_ffn(
    router, make_expert, num_experts, expert_hidden, shared_experts, shared_hidden, neuron
):
    """A :class:`~spiking_moe.moe.SpikingMoE` FFN: ``num_experts`` routed experts and
    ``shared_experts`` shared ones, built by ``make_expert(hidden)``; its input is spikes (or
    the ANN's activations) by construction, so the per-call binary check is skipped."""
    return SpikingMoE(
        router=router,
        experts=[make_expert(expert_hidden) for _ in range(num_experts)],
        shared_experts=[make_expert(shared_hidden) for _ in range(shared_experts)],
        neuron=neuron,
        check_spikes=False,
        # Under expert parallelism the spiking LM's rows travel as bits (checked as they go).
        spike_exchange="bits" if isinstance(neuron, LIF) else "float",
    )


class SpikingMoELM(_SpikingLM):
    """Byte-level (or any vocabulary) spiking language model with MoE FFNs (module docstring).

    Args:
        vocab_size: ``V``.
        d_model: ``D``.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        context: longest sequence ``S`` (size of the position embedding).
        num_experts: routed experts per block ``E``.
        k: experts per token.
        expert_hidden: hidden width of each routed expert.
        shared_experts: experts every token uses (DeepSeekMoE), each ``shared_hidden`` wide.
        shared_hidden: hidden width of each shared expert (None: ``expert_hidden``).
        num_steps: ``T``, steps of constant input current per token.
        readout: "count" or "membrane".
        router: "rate" or "spiking".
        capacity_factor, noise, balance_weight, z_loss_weight, bias_update_rate, renormalize:
            passed to every router.
        **neuron_kwargs: passed to every LIF (``beta``, ``threshold``, ``surrogate``, ...).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lm = SpikingMoELM(256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16)
        >>> out = lm(torch.randint(0, 256, (2, 8)))
        >>> out.logits.shape, out.routing[0].expert_ids.shape  # [W=1, N=B*S, K]
        (torch.Size([2, 8, 256]), torch.Size([1, 16, 1]))
        >>> lm.generate(torch.tensor([100, 101]), 3).shape
        torch.Size([5])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        context: int,
        *,
        num_experts: int,
        k: int,
        expert_hidden: int = 128,
        shared_experts: int = 0,
        shared_hidden: int | None = None,
        num_steps: int = 4,
        readout: str = "count",
        router: str = "rate",
        capacity_factor: float | None = None,
        noise: float = 0.0,
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        bias_update_rate: float = 1e-3,
        renormalize: bool = True,
        **neuron_kwargs,
    ):
        super().__init__()
        self._init_spiking(
            vocab_size, d_model, num_layers, num_heads, context, num_steps, readout, neuron_kwargs
        )
        _check_int("shared_experts", shared_experts, 0)
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; valid: {list(ROUTERS)}")
        shared_hidden = expert_hidden if shared_hidden is None else shared_hidden
        router_kwargs = dict(
            capacity_factor=capacity_factor,
            noise=noise,
            balance_weight=balance_weight,
            z_loss_weight=z_loss_weight,
            bias_update_rate=bias_update_rate,
            renormalize=renormalize,
        )

        def make_router():
            if router == "rate":
                return RateRouter(d_model, num_experts, k, **router_kwargs)
            return SpikingRouter(d_model, num_experts, k, **router_kwargs, **neuron_kwargs)

        def make_expert(hidden):
            return SpikingExpert(d_model, hidden, d_model, **neuron_kwargs)

        self.blocks = nn.ModuleList(
            SpikingTransformerBlock(
                d_model,
                num_heads,
                _moe_ffn(
                    make_router(),
                    make_expert,
                    num_experts,
                    expert_hidden,
                    shared_experts,
                    shared_hidden,
                    LIF(**neuron_kwargs),
                ),
                **neuron_kwargs,
            )
            for _ in range(num_layers)
        )


class DenseSNNLM(_SpikingLM):
    """The dense spiking twin of :class:`SpikingMoELM`: each block's FFN is one
    :class:`~spiking_moe.experts.SpikingExpert` of width ``ffn_hidden`` (pass
    ``k * expert_hidden + shared_experts * shared_hidden`` for the same active parameters).

    Other arguments as :class:`SpikingMoELM`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> DenseSNNLM(256, 16, 1, 2, 8, ffn_hidden=32)(torch.zeros(1, 8, dtype=torch.long)).logits.shape
        torch.Size([1, 8, 256])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        context: int,
        *,
        ffn_hidden: int,
        num_steps: int = 4,
        readout: str = "count",
        **neuron_kwargs,
    ):
        super().__init__()
        self._init_spiking(
            vocab_size, d_model, num_layers, num_heads, context, num_steps, readout, neuron_kwargs
        )
        self.blocks = nn.ModuleList(
            SpikingTransformerBlock(
                d_model,
                num_heads,
                SpikingExpert(d_model, ffn_hidden, d_model, **neuron_kwargs),
                **neuron_kwargs,
            )
            for _ in range(num_layers)
        )


class _ANNBlock(nn.Module):
    """Pre-norm transformer block: ``h + attn(ln1(h))``, then ``h + ffn(ln2(h))``."""

    def __init__(self, d_model: int, num_heads: int, ffn: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SoftmaxAttention(d_model, num_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(self, h_BSD: torch.Tensor):
        h_BSD = h_BSD + self.attn(self.ln1(h_BSD))
        x_1BSD = self.ln2(h_BSD).unsqueeze(0)
        if isinstance(self.ffn, SpikingMoE):
            out = self.ffn(x_1BSD)
            return h_BSD + out.spikes[0], out.aux_loss, out.routing
        B, S, D = h_BSD.shape
        y = self.ffn(x_1BSD.reshape(1, B * S, D)).reshape(B, S, D)
        return h_BSD + y, h_BSD.new_zeros(()), None


class ANNTransformerLM(_LanguageModel):
    """The ANN twin: same sizes, softmax attention, ReLU FFN (routed or dense), one step.

    Args:
        vocab_size, d_model, num_layers, num_heads, context: as :class:`SpikingMoELM`.
        ffn_hidden: dense FFN width (used when ``num_experts`` is None).
        num_experts: None for a dense FFN, else routed :class:`~spiking_moe.experts.MLPExpert`
            experts per block (``k``, ``expert_hidden``, ``shared_experts``,
            ``shared_hidden`` and the router settings as :class:`SpikingMoELM`; the router
            reads the normalised activations).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lm = ANNTransformerLM(256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16)
        >>> lm(torch.randint(0, 256, (2, 8))).logits.shape
        torch.Size([2, 8, 256])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        context: int,
        *,
        ffn_hidden: int = 128,
        num_experts: int | None = None,
        k: int = 1,
        expert_hidden: int = 128,
        shared_experts: int = 0,
        shared_hidden: int | None = None,
        capacity_factor: float | None = None,
        noise: float = 0.0,
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        bias_update_rate: float = 1e-3,
        renormalize: bool = True,
    ):
        super().__init__()
        self._init_embedding(vocab_size, d_model, context)
        _check_int("num_layers", num_layers)
        _check_int("shared_experts", shared_experts, 0)
        shared_hidden = expert_hidden if shared_hidden is None else shared_hidden

        def make_ffn():
            if num_experts is None:
                return MLPExpert(d_model, ffn_hidden, d_model)
            router = RateRouter(
                d_model,
                num_experts,
                k,
                capacity_factor=capacity_factor,
                noise=noise,
                balance_weight=balance_weight,
                z_loss_weight=z_loss_weight,
                bias_update_rate=bias_update_rate,
                renormalize=renormalize,
            )
            return _moe_ffn(
                router,
                lambda hidden: MLPExpert(d_model, hidden, d_model),
                num_experts,
                expert_hidden,
                shared_experts,
                shared_hidden,
                nn.Identity(),  # the FFN returns its current to the residual stream
            )

        self.blocks = nn.ModuleList(
            _ANNBlock(d_model, num_heads, make_ffn()) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab_size)
        self.num_steps = 1  # one step per token (an ANN); energy counting reads this

    def forward(self, ids_BS: torch.Tensor) -> LMOutput:
        """Next-token logits ``[B, S, V]`` for token ids ``[B, S]`` -> :class:`LMOutput`."""
        h_BSD = self._embed(ids_BS)
        routing: list[RoutingInfo] = []
        aux = h_BSD.new_zeros(())
        for block in self.blocks:
            h_BSD, block_aux, block_routing = block(h_BSD)
            aux = aux + block_aux
            if block_routing is not None:
                routing.append(block_routing)
        logits = self.readout(self.ln_f(h_BSD))
        return LMOutput(logits, aux, tuple(routing), Activity.empty(h_BSD.device))
