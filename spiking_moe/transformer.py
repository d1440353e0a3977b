r"""Spiking transformer blocks with a token-level MoE FFN, a byte-level language model, and its twins.

Shape letters: the package legend (:mod:`spiking_moe`); ``D`` is ``d_model``, ``V`` the
vocabulary.

**Block** (:class:`SpikingTransformerBlock`): self-attention then an FFN, each with a residual.
The FFN is a :class:`~spiking_moe.moe.SpikingMoE` (routed per position: the tokens are the
``B S`` positions) or its dense twin (:class:`~spiking_moe.moe.DenseFFN`). Two residual designs
(``block.residual``, :class:`~spiking_moe.args.BlockArgs`):

``"membrane"`` (the design that learns; issue 22): a real-valued residual stream
:math:`h \in \mathbb{R}^{T \times B \times S \times D}`, read by every synaptic layer through a
normalisation and a spiking population,

.. math::

    h \leftarrow h + \mathrm{Attn}\big(\mathrm{SN}(\mathrm{LN}_1(h))\big), \qquad
    h \leftarrow h + \mathrm{FFN}\big(\mathrm{SN}(\mathrm{LN}_2(h))\big),

where SN is the block's spiking population (binary LIF, or multi-level spikes:
:class:`~spiking_moe.neurons.MultiSpike`) and the sub-layers return currents (the FFN has no
output neuron). This is the membrane shortcut of the Spike-driven Transformer V2/V3 (Yao et al.,
ICLR 2024; 2024) with pre-normalisation: every Linear and product still reads spikes, while
what flows between blocks is real-valued. What each choice buys on the stdlib corpus is the
design table in docs/results.md: with binary LIF at ``T = 4`` the membrane stream alone gives
no gain (3.46 against 3.41 bits/byte for the spike residual); multi-level spikes give the most. The additions are :class:`Add` modules (one
accumulate per element and step in the energy report) and the normalisation ``nn.LayerNorm``
(4 MACs per element, ``energy.rules``; ``block.norm="none"`` drops it). LayerNorm is kept at
inference and counted, not folded: unlike BatchNorm its statistics are per token, so it has no
fixed affine map to fold into the next Linear. With ``attention.kind="ann"`` the attention is
:class:`~spiking_moe.attention.SoftmaxAttention` on ``LN_1(h)`` (all MACs: the hybrid end).

``"spike"`` (issue 11's design): binary spikes between blocks,

.. math::

    h = \mathrm{LIF}_1\big(\mathrm{Attn}(x) + x\big), \qquad
    y = \mathrm{LIF}_2\big(\mathrm{FFN}(h) + h\big),

a spike shortcut into the membrane: the block's input spikes enter the next LIF population as
current through identity synapses (weight 1), beside the sub-layer's current, and that
population fires. ``LIF_2`` is the FFN's own output neuron (``ffn.neuron``) and the shortcut
enters it through ``ffn(h, residual=h)``. The shortcut costs one accumulate per input spike
(fan-out 1), which the energy report does not count: under ``1 / (3 D)`` of the block's ``Q,
K, V`` projections' accumulates. No normalisation.

The attention (``attention.kind``) is SSA, softmax over spiking ``Q K^T`` with spiking ``V``,
or softmax over real ``Q``, ``K``, ``V`` projected from spikes
(:class:`~spiking_moe.attention.SpikingSelfAttention`), or ANN attention (membrane residual
only).

**Language model** (:class:`SpikingMoELM`): byte ids ``[B, S]`` -> token embedding plus a
learned position embedding, as a constant current over ``T`` steps -> (spike residual: a LIF;
membrane residual: the stream itself) -> blocks -> (membrane: a final LayerNorm and population)
-> readout ``Linear(D, V)`` on the spikes at every step -> logits ``[B, S, V]``:
``readout="count"``: the mean over ``T`` of the readout current (the spike counts times
``W``); ``"membrane"``: the mean over ``T`` of a non-firing leaky integrator of it. The
readout runs on the spikes at every step, so the energy counter charges it accumulates (a
readout on the mean would be charged as graded MACs). Embedding lookups are table reads, not
synaptic operations. A model of multi-level neurons declares ``energy_spike_levels`` (its
neurons' ``levels``), so the counter charges a count ``c`` as ``c`` spikes (its binary
expansion). Twins for every comparison: :class:`DenseSNNLM` (the same network, a dense
spiking FFN of width ``k * expert_hidden + shared``: the same active parameters but the
router) and
:class:`ANNTransformerLM` (the same sizes, softmax attention, ReLU FFN, pre-norm residual
stream, one step; routed or dense). Models whose stream is read through LayerNorm (the ANN, the
membrane residual) draw their embeddings from ``N(0, 0.02)`` (GPT-2's); where neurons read it
directly (the spike residual, ``norm="none"``) from ``N(0, 1)``, to drive them.

Causality: attention is masked exactly, the router scores a position from its own spikes
only, and capacity drops go first come, first served in position order
(:mod:`spiking_moe.moe`), so no logit at position ``i`` depends on a token after ``i``.
"""

from __future__ import annotations

import torch
from torch import nn

from .activity import Activity
from .args import BlockArgs, ModelArgs
from .attention import SoftmaxAttention, SpikingSelfAttention
from .models import ModelOutput, dense_ffn, leaky_mean, model_args, moe_ffn, run_layers
from .moe import DenseFFN, MoEOutput, SpikingMoE
from .neurons import make_neuron, neuron_args
from .synapses import EventLinear

__all__ = [
    "ANNTransformerLM",
    "Add",
    "BlockOutput",
    "DenseSNNLM",
    "LMOutput",
    "SpikingMoELM",
    "SpikingTransformerBlock",
]

#: What a block returns: the FFN contract (:class:`~spiking_moe.moe.MoEOutput`: ``spikes``
#: ``[T, B, S, D]``, the FFN's ``routing`` or None, its ``aux_loss``, and the ``attn.*``,
#: ``attn_neuron`` and ``ffn.*`` populations' ``activity``).
BlockOutput = MoEOutput

#: The language models' name for :class:`~spiking_moe.models.ModelOutput` (logits ``[B, S, V]``).
LMOutput = ModelOutput


class Add(nn.Module):
    """``a + b`` as a module, so the energy counter sees the residual stream's additions (one
    accumulate per output element and step: ``energy_elementwise = "add"``).

    Built with no arguments (``Add()``); the parameters below are those of ``forward(a, b)``.

    Args:
        a: the residual stream, e.g. ``[T, B, S, D]`` (``[B, S, D]`` in the ANN).
        b: what a sub-layer adds to it: a tensor that broadcasts against ``a`` (in the
            models, of ``a``'s shape).

    Shape:
        ``forward(a, b)`` -> ``a + b``, of the broadcast shape.
    """

    energy_elementwise = "add"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def _norm(kind: str, d_model: int) -> nn.Module:
    return nn.LayerNorm(d_model) if kind == "layer" else nn.Identity()


class SpikingTransformerBlock(nn.Module):
    """Spiking self-attention then an FFN, on a spike or a membrane residual (module docstring).

    Args:
        d_model: ``D``.
        num_heads: attention heads (divide ``D``).
        ffn: the FFN, ``D -> D``: a :class:`~spiking_moe.moe.SpikingMoE` (token-level routing)
            or :class:`~spiking_moe.moe.DenseFFN`, or a dense expert mapping ``[T, N, D]``
            spikes to ``[T, N, D]`` current with ``run`` (a
            :class:`~spiking_moe.experts.SpikingExpert`), which gets a neuron of its own
            (``residual="spike"``) or none (``"membrane"``: its current joins the stream; a
            MoE or DenseFFN passed in must then have ``nn.Identity`` as its neuron).
        causal: causal attention.
        attention: the attention kind (:class:`~spiking_moe.args.AttentionArgs`: "ssa",
            "spiking_softmax", "real_softmax", or "ann" with the membrane residual).
        residual: "spike" or "membrane" (:class:`~spiking_moe.args.BlockArgs`).
        norm: "layer" or "none": what reads the membrane residual before each spiking
            population (the spike residual has no normalisation).
        neuron: the :class:`~spiking_moe.args.NeuronArgs` of the block's spiking populations.
        **neuron_options: neuron options by name (``beta``, ``threshold``, ...).

    Shapes:
        ``forward(x)``: ``[T, B, S, D]`` (spikes for ``residual="spike"``, the real-valued
        stream for ``"membrane"``) -> :class:`BlockOutput` whose ``spikes`` is the block's
        output of the same kind.

    Example:
        >>> from spiking_moe.experts import SpikingExpert
        >>> _ = torch.manual_seed(0)
        >>> block = SpikingTransformerBlock(8, 2, SpikingExpert(8, 16, 8))
        >>> block(torch.bernoulli(torch.full((3, 2, 5, 8), 0.3))).spikes.shape
        torch.Size([3, 2, 5, 8])
        >>> block = SpikingTransformerBlock(
        ...     8, 2, SpikingExpert(8, 16, 8), residual="membrane", attention="spiking_softmax"
        ... )
        >>> block(torch.randn(1, 2, 5, 8)).spikes.shape  # the real-valued stream
        torch.Size([1, 2, 5, 8])
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn: nn.Module,
        *,
        causal: bool = True,
        attention: str = "ssa",
        residual: str = "spike",
        norm: str = "layer",
        neuron=None,
        **neuron_options,
    ):
        super().__init__()
        neuron = neuron_args(neuron, **neuron_options)
        design = BlockArgs(residual=residual, norm=norm)
        self.residual = design.residual
        if attention == "ann" and self.residual != "membrane":
            raise ValueError(
                "attention kind 'ann' (softmax attention on the normalised stream) needs "
                f"residual 'membrane', got residual {self.residual!r}"
            )
        for side in ("in_features", "out_features"):
            width = getattr(ffn, side, d_model)
            if width not in (d_model, None):
                raise ValueError(f"ffn.{side} must equal d_model={d_model}, got {width}")
        if self.residual == "spike":
            self.attn = SpikingSelfAttention(
                d_model, num_heads, causal=causal, kind=attention, neuron=neuron
            )
            self.attn_neuron = make_neuron(neuron)
            if not isinstance(ffn, (SpikingMoE, DenseFFN)):
                ffn = DenseFFN(ffn, make_neuron(neuron))
            self.ffn = ffn
            return
        # Membrane residual: every synaptic layer reads spikes made from the stream.
        self.attn_norm = _norm(design.norm, d_model)
        if attention == "ann":
            self.attn = SoftmaxAttention(d_model, num_heads, causal=causal)
        else:
            self.attn_input = make_neuron(neuron)
            self.attn = SpikingSelfAttention(
                d_model, num_heads, causal=causal, kind=attention, neuron=neuron
            )
        self.attn_add = Add()
        self.ffn_norm = _norm(design.norm, d_model)
        self.ffn_input = make_neuron(neuron)
        if not isinstance(ffn, (SpikingMoE, DenseFFN)):
            ffn = DenseFFN(ffn, nn.Identity())
        if not isinstance(ffn.neuron, nn.Identity):
            raise ValueError(
                "residual 'membrane' adds the FFN's current to the stream: build the FFN with "
                f"neuron=nn.Identity(), got {type(ffn.neuron).__name__}"
            )
        self.ffn = ffn
        self.ffn_add = Add()

    def forward(self, x_TBSD: torch.Tensor) -> BlockOutput:
        if self.residual == "spike":
            attn = self.attn(x_TBSD)
            h_TBSD = self.attn_neuron(attn.current + x_TBSD)
            ffn = self.ffn(h_TBSD, residual=h_TBSD)
            activity = [
                attn.activity.prefixed("attn"),
                Activity.of("attn_neuron", h_TBSD),
                ffn.activity.prefixed("ffn"),
            ]
            return BlockOutput(ffn.spikes, ffn.routing, ffn.aux_loss, Activity.concat(activity))
        activity = []
        normed_TBSD = self.attn_norm(x_TBSD)
        if isinstance(self.attn, SoftmaxAttention):
            T, B, S, D = normed_TBSD.shape
            attn_TBSD = self.attn(normed_TBSD.reshape(T * B, S, D)).reshape(T, B, S, D)
        else:
            spikes_TBSD = self.attn_input(normed_TBSD)
            attn = self.attn(spikes_TBSD)
            attn_TBSD = attn.current
            activity += [Activity.of("attn_input", spikes_TBSD), attn.activity.prefixed("attn")]
        h_TBSD = self.attn_add(x_TBSD, attn_TBSD)
        spikes_TBSD = self.ffn_input(self.ffn_norm(h_TBSD))
        ffn = self.ffn(spikes_TBSD)
        h_TBSD = self.ffn_add(h_TBSD, ffn.spikes)
        activity += [Activity.of("ffn_input", spikes_TBSD), ffn.activity.prefixed("ffn")]
        return BlockOutput(h_TBSD, ffn.routing, ffn.aux_loss, Activity.concat(activity))


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class _LanguageModel(nn.Module):
    """What the three language models share: one constructor (sizes, args, options),
    embedding, input checks and sampling. Each builds its blocks in :meth:`_build`."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        context: int,
        *,
        args: ModelArgs | None = None,
        num_steps: int = 4,
        ffn_hidden: int | None = None,
        **options,
    ):
        super().__init__()
        who = type(self).__name__
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("context", context),
            ("num_steps", num_steps),
        ):
            _check_int(name, value)
        # num_experts=None asks for the dense FFN (the ANN twin; the dense SNN is dense).
        without_experts = options.get("num_experts", 0) is None
        if without_experts:
            del options["num_experts"]
        sizes = dict(hidden_features=d_model, num_layers=num_layers, num_heads=num_heads)
        args = model_args(args, {**options, **sizes}, who=who)
        if args.router.window is not None:
            raise ValueError(
                f"{who}: router.window must be unset for language models (routing is per "
                f"position), got {args.router.window}"
            )
        self.args = args
        self.vocab_size, self.d_model, self.context = vocab_size, d_model, context
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        routed = not without_experts and args.moe.num_experts > 1 and ffn_hidden is None
        self._build(args, num_steps=num_steps, ffn_hidden=ffn_hidden, routed=routed)
        if self.normalised_stream:
            # The stream starts as the embeddings and grows by what its normalised sub-layers
            # add; at nn.Embedding's N(0, 1) the embeddings drown those additions. GPT-2's
            # N(0, 0.02) (measured on the stdlib corpus, 1,500 steps: 2.62 -> 2.37 bits/byte
            # for the ANN, 2.84 -> 2.59 for a membrane-residual spiking LM). Where neurons read
            # the stream unnormalised (a spike residual, norm "none") the embeddings are their
            # current and must reach threshold: N(0, 1).
            for table in (self.token_embedding, self.position_embedding):
                nn.init.normal_(table.weight, std=0.02)

    def _build(self, args: ModelArgs, *, num_steps: int, ffn_hidden, routed: bool) -> None:
        raise NotImplementedError

    @property
    def normalised_stream(self) -> bool:
        """Whether the residual stream between blocks is real-valued and read through a
        normalisation only (the ANN; the membrane residual with LayerNorm)."""
        return True

    @property
    def readout_mode(self) -> str:
        return self.args.readout

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
    @property
    def normalised_stream(self) -> bool:
        return self.args.block.residual == "membrane" and self.args.block.norm == "layer"

    def _init_io(self, args: ModelArgs, num_steps: int) -> None:
        self.num_steps = num_steps
        if args.block.residual == "spike":
            self.input_neuron = make_neuron(args.neuron)
        else:
            # The stream is real: the embeddings enter it as they are, and a last population
            # turns it into the spikes the readout reads.
            self.final_norm = _norm(args.block.norm, args.hidden_features)
            self.final_neuron = make_neuron(args.neuron)
        self.readout = EventLinear(args.hidden_features, self.vocab_size)
        if args.neuron.kind == "multi":
            # Spikes are counts up to levels: the energy counter charges each unit of count.
            self.energy_spike_levels = args.neuron.levels
        if args.readout == "membrane" and self._edge_neuron.beta.dim() != 0:
            raise ValueError("readout='membrane' needs a scalar beta, got a per-neuron beta")

    @property
    def _edge_neuron(self) -> nn.Module:
        """The population at the stream's edge (its beta leaks the membrane readout)."""
        return self.input_neuron if self.args.block.residual == "spike" else self.final_neuron

    def _ffn_neuron(self) -> nn.Module:
        """The FFN's output neuron: a LIF population (spike residual), or none (membrane: the
        current joins the stream)."""
        return (
            make_neuron(self.args.neuron) if self.args.block.residual == "spike" else nn.Identity()
        )

    def _block(self, ffn: nn.Module) -> SpikingTransformerBlock:
        a = self.args
        return SpikingTransformerBlock(
            a.hidden_features,
            a.attention.num_heads,
            ffn,
            causal=a.attention.causal,
            attention=a.attention.kind,
            residual=a.block.residual,
            norm=a.block.norm,
            neuron=a.neuron,
        )

    def forward(self, ids_BS: torch.Tensor) -> LMOutput:
        """Next-token logits ``[B, S, V]`` for token ids ``[B, S]`` -> :class:`LMOutput`."""
        current_BSD = self._embed(ids_BS)
        current_TBSD = current_BSD.unsqueeze(0).expand(self.num_steps, *current_BSD.shape)
        activity: list[Activity] = []
        if self.args.block.residual == "spike":
            h_TBSD = self.input_neuron(current_TBSD)
            activity.append(Activity.of("input_neuron", h_TBSD))
        else:
            h_TBSD = current_TBSD
        h_TBSD, aux, routing = run_layers(self.blocks, h_TBSD, activity, "blocks")
        if self.args.block.residual == "membrane":
            h_TBSD = self.final_neuron(self.final_norm(h_TBSD))
            activity.append(Activity.of("final_neuron", h_TBSD))
        current_TBSV = self.readout(h_TBSD)
        if self.args.readout == "count":
            logits = current_TBSV.mean(0)
        else:
            T, B, S, V = current_TBSV.shape
            beta = self._edge_neuron.beta.clamp(0, 1)
            logits = leaky_mean(current_TBSV.reshape(T, B * S, V), beta).reshape(B, S, V)
        return LMOutput(logits, aux, routing, Activity.concat(activity))


class SpikingMoELM(_SpikingLM):
    """Byte-level (or any vocabulary) spiking language model with MoE FFNs (module docstring).

    Args:
        vocab_size: ``V``.
        d_model: ``D`` (``args.hidden_features``).
        num_layers: transformer blocks (``args.num_layers``).
        num_heads: attention heads per block (``args.attention.num_heads``).
        context: longest sequence ``S`` (size of the position embedding).
        args: the model's :class:`~spiking_moe.args.ModelArgs` (None: the defaults); the
            positional sizes override its.
        num_steps: ``T``, steps of constant input current per token.
        ffn_hidden: the dense twins' FFN width (:class:`DenseSNNLM`, :class:`ANNTransformerLM`).
        **options: model options by name, flat (``num_experts``, ``k``, ``expert_hidden``,
            ``shared_experts``, ``shared_hidden`` (None: ``expert_hidden``), ``readout``
            ("count" or "membrane"), ``router`` ("rate" or "spiking"), ``capacity_factor``,
            ``noise``, ``balance_weight``, ``z_loss_weight``, ``bias_update_rate``,
            ``renormalize``, and the neuron options ``beta``, ``threshold``, ``surrogate``,
            ...) or nested (``moe=MoEArgs(...)``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lm = SpikingMoELM(256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16)
        >>> out = lm(torch.randint(0, 256, (2, 8)))
        >>> out.logits.shape, out.routing[0].expert_ids.shape  # [W=1, N=B*S, K]
        (torch.Size([2, 8, 256]), torch.Size([1, 16, 1]))
        >>> lm.generate(torch.tensor([100, 101]), 3).shape
        torch.Size([5])
    """

    def _build(self, args: ModelArgs, *, num_steps: int, ffn_hidden, routed: bool) -> None:
        if ffn_hidden is not None:
            raise TypeError("ffn_hidden is the dense twins' FFN width; SpikingMoELM has experts")
        self._init_io(args, num_steps)
        self.blocks = nn.ModuleList(
            self._block(moe_ffn(args, spiking=True, neuron=self._ffn_neuron()))
            for _ in range(args.num_layers)
        )


class DenseSNNLM(_SpikingLM):
    """The dense spiking twin of :class:`SpikingMoELM`: each block's FFN is one
    :class:`~spiking_moe.experts.SpikingExpert` of width ``ffn_hidden`` (default
    ``args.active_ffn_hidden``, ``k * expert_hidden + shared_experts * shared_hidden``: the same
    active parameters but the router) and, with the spike residual, a LIF (with the membrane
    residual the FFN's current joins the stream: no output neuron).

    Args:
        vocab_size, d_model, num_layers, num_heads, context, args, num_steps: as
            :class:`SpikingMoELM`.
        ffn_hidden: the FFN width; None: ``args.active_ffn_hidden``.
        **options: model options by name, as :class:`SpikingMoELM` (so the twins take the
            same arguments). ``k``, ``expert_hidden``, ``shared_experts`` and
            ``shared_hidden`` set the default width; ``num_experts`` and the router options
            are validated and build nothing.

    Shape:
        ``forward(ids)``: ``[B, S]`` token ids -> :class:`LMOutput` (logits ``[B, S, V]``, no
        routing, zero ``aux_loss``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> DenseSNNLM(256, 16, 1, 2, 8, ffn_hidden=32)(torch.zeros(1, 8, dtype=torch.long)).logits.shape
        torch.Size([1, 8, 256])
    """

    def _build(self, args: ModelArgs, *, num_steps: int, ffn_hidden, routed: bool) -> None:
        self._init_io(args, num_steps)
        self.blocks = nn.ModuleList(
            self._block(dense_ffn(args, spiking=True, neuron=self._ffn_neuron(), width=ffn_hidden))
            for _ in range(args.num_layers)
        )


class _ANNBlock(nn.Module):
    """Pre-norm transformer block: ``h + attn(ln1(h))``, then ``h + ffn(ln2(h))``."""

    def __init__(self, d_model: int, num_heads: int, ffn: nn.Module, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SoftmaxAttention(d_model, num_heads, causal=causal)
        self.attn_add = Add()
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.ffn_add = Add()

    def forward(self, h_BSD: torch.Tensor) -> BlockOutput:
        h_BSD = self.attn_add(h_BSD, self.attn(self.ln1(h_BSD)))
        ffn = self.ffn(self.ln2(h_BSD).unsqueeze(0))
        h_BSD = self.ffn_add(h_BSD, ffn.spikes[0])
        return BlockOutput(h_BSD, ffn.routing, ffn.aux_loss, ffn.activity)


class ANNTransformerLM(_LanguageModel):
    """The ANN twin: same sizes, softmax attention, ReLU FFN (routed or dense), one step.

    With ``moe.num_experts > 1`` each FFN is routed (a rate router on the normalised
    activations, :class:`~spiking_moe.experts.MLPExpert` experts, the shared ones beside);
    ``num_experts=None`` or 1 gives a dense FFN.

    Args:
        vocab_size, d_model, num_layers, num_heads, context, args: as :class:`SpikingMoELM`.
        **options: as :class:`SpikingMoELM` (the neuron options and ``num_steps`` are
            accepted, so the twins take the same arguments, and unused: an ANN runs one step).
        ffn_hidden: the dense FFN's width (default ``args.active_ffn_hidden``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lm = ANNTransformerLM(256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16)
        >>> lm(torch.randint(0, 256, (2, 8))).logits.shape
        torch.Size([2, 8, 256])
    """

    def _build(self, args: ModelArgs, *, num_steps: int, ffn_hidden, routed: bool) -> None:
        def make_ffn() -> nn.Module:
            # The FFN returns its current to the residual stream: no neuron.
            if routed:
                return moe_ffn(args, spiking=False, neuron=nn.Identity())
            return dense_ffn(args, spiking=False, neuron=nn.Identity(), width=ffn_hidden)

        heads, causal = args.attention.num_heads, args.attention.causal
        self.blocks = nn.ModuleList(
            _ANNBlock(args.hidden_features, heads, make_ffn(), causal)
            for _ in range(args.num_layers)
        )
        self.ln_f = nn.LayerNorm(args.hidden_features)
        self.readout = nn.Linear(args.hidden_features, self.vocab_size)
        self.num_steps = 1  # one step per token (an ANN; energy counting reads this)

    def forward(self, ids_BS: torch.Tensor) -> LMOutput:
        """Next-token logits ``[B, S, V]`` for token ids ``[B, S]`` -> :class:`LMOutput`."""
        h_BSD = self._embed(ids_BS)
        h_BSD, aux, routing = run_layers(self.blocks, h_BSD, [], "blocks")
        logits = self.readout(self.ln_f(h_BSD))
        return LMOutput(logits, aux, routing, Activity.empty(h_BSD.device))
