r"""Routers: spike rates in, top-k experts, gates and balancing losses out.

Shape letters: the package legend (:mod:`spiking_moe`).

**Scores.** A token's input spikes over a routing window give the rate
:math:`r = \frac{1}{L}\sum_{t \in \text{window}} s_t \in [0, 1]^D`.

* :class:`RateRouter`: :math:`z = W r + b` (plus :math:`\sigma \epsilon`,
  :math:`\epsilon \sim \mathcal N(0, 1)`, in training only when ``noise = sigma > 0``).
* :class:`SpikingRouter`: a population of ``E`` LIF neurons driven by :math:`W s_t + b`;
  its spike counts :math:`c_e` over the window are the scores, :math:`z = g\, c / L`
  (``gain`` :math:`g`). The surrogate gradient carries the loss back to :math:`W, b`.

**Selection.** :math:`p = \mathrm{softmax}(z)`; the ids are the top-k of :math:`z + \beta`
(the top-k of :math:`p` when :math:`\beta = 0`), where :math:`\beta` is the
auxiliary-loss-free balancing bias (selection only, never in the gates; in logit space because
softmax squashes the unpreferred probabilities together, where a bias on :math:`p` would move
all tokens at once); gates :math:`g_j = p_{i_j} / \sum_{j'} p_{i_{j'}}` (``renormalize=True``) or
:math:`p_{i_j}`. Ties go to the lower expert id (``torch.topk``).

**Losses** (on the router's selection, before capacity drops), averaged over all windows:

* Switch load balancing :math:`\mathcal L_{lb} = E \sum_e f_e P_e`, :math:`f_e` = share of the
  ``N K`` assignments that went to ``e``, :math:`P_e` = mean of :math:`p_{\cdot e}`. It is 1
  for perfectly uniform routing; the gradient flows through :math:`P` only.
* Router z-loss (ST-MoE) :math:`\mathcal L_z = \mathrm{mean}_n (\log\sum_e e^{z_{ne}})^2`,
  on the noise-free logits.
* ``aux_loss`` = ``balance_weight`` :math:`\mathcal L_{lb}` + ``z_loss_weight``
  :math:`\mathcal L_z`.

**Auxiliary-loss-free balancing** (DeepSeek-V3). ``update_bias`` sets
:math:`\beta_e \mathrel{+}= \eta\, \mathrm{sign}(\bar c - c_e)`, where :math:`c_e` is the
number of assignments the router sent to ``e`` and :math:`\bar c` their mean over experts.
It runs outside autograd; call it after ``optimizer.step()`` with the :class:`RoutingInfo` of
every micro-batch since the last call (so it works with gradient accumulation).

**Capacity.** With ``capacity_factor = c`` each expert takes at most
:math:`\lceil c N K / E \rceil` assignments per window. Drop policy: among the assignments
to one expert, those with the largest gate are kept, ties broken by token order (earlier
first). With a ``priority`` (``[N]``, lower first; :class:`~spiking_moe.moe.SpikingMoE`
passes position-major order for sequences) the policy is instead *first come, first served*:
assignments are kept in that order, gates ignored, which makes capacity causal for sequence
models. A dropped assignment has gate 0, is not computed by its expert, and contributes
nothing; a token whose every assignment is dropped receives zero current from the layer.
Gates are not renormalised after drops.

**Windowed routing** (``window = L``). Steps ``[wL, (w+1)L)`` form window ``w``
(``W = ceil(T / L)``; the last window may be shorter). Window ``w`` is routed from the scores
of window ``w - 1``, so routing never looks at the future. **Window 0 has no past: its scores
are those of an all-zero rate** (``RateRouter``: the Linear bias, so every token picks the
same experts; ``SpikingRouter``: zero counts, i.e. uniform probabilities and experts
``0..K-1``, plus any balancing bias). Changing the input from window ``w + 1`` on therefore
leaves the routing of windows ``0..w+1`` unchanged.

**Layout.** Every per-token field of :class:`RoutingInfo` has a leading window dimension,
windowed or not (``W = 1`` without windows): ``expert_ids [W, N, K]``, ``probs [W, N, E]``.
Readers flatten ``W N`` when they do not care about windows; nothing is squeezed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .activity import Activity
from .args import ArgsField, NeuronArgs, RouterArgs, with_options
from .neurons import make_neuron

__all__ = ["ROUTERS", "RateRouter", "RoutingInfo", "SpikingRouter", "build_router", "route"]


@dataclass(frozen=True, eq=False)
class RoutingInfo:
    """What a router decided for one call. Frozen; nothing about a call is kept on the router.

    One layout whatever the options: the per-token fields always have the window dimension
    ``W`` first (``W = 1`` without windows); the counts and losses are over all windows
    (summed, resp. averaged).

    Attributes:
        expert_ids: ``[W, N, K]`` int64, chosen experts, best first (capacity drops included).
        gates: ``[W, N, K]`` gate of each choice; 0 where the assignment was dropped.
        probs: ``[W, N, E]`` softmax router probabilities.
        kept: ``[W, N, K]`` bool, False where capacity dropped the assignment.
        tokens_per_expert: ``[E]`` int64, rows each expert computes on (kept assignments,
            summed over windows).
        dropped: int64 scalar, number of dropped assignments.
        load_balancing_loss: scalar Switch loss (unweighted).
        z_loss: scalar router z-loss (unweighted).
        aux_loss: scalar, the weighted sum the router asks to add to the task loss.
        window: window length ``L`` or None.
        capacity: per-expert capacity per window, or None (unlimited).
        activity: spikes of the router's own neurons (:class:`SpikingRouter`: ``neuron``);
            empty for :class:`RateRouter`.
    """

    expert_ids: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor
    kept: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    window: int | None = None
    capacity: int | None = None
    activity: Activity = field(default_factory=Activity.empty)

    @property
    def num_windows(self) -> int:
        return self.probs.shape[0]

    @property
    def num_tokens(self) -> int:
        """``N``: tokens per window."""
        return self.probs.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def k(self) -> int:
        return self.expert_ids.shape[-1]

    def selected_load(self) -> torch.Tensor:
        """``[E]`` int64: assignments the router chose per expert, before capacity drops."""
        ids = self.expert_ids.reshape(-1)
        return torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
            0, ids, torch.ones_like(ids)
        )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_routing_config(num_experts, k, window, capacity_factor) -> None:
    """Raise ValueError naming the field for an invalid E, k, window or capacity factor."""
    _check_int("num_experts", num_experts, 1)
    _check_int("k", k, 1)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts, got k={k} with num_experts={num_experts}")
    if window is not None:
        _check_int("window", window, 1)
    if capacity_factor is not None:
        if (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float))
            or not (capacity_factor > 0 and math.isfinite(capacity_factor))
        ):
            raise ValueError(
                f"capacity_factor must be a finite number > 0 or None, got {capacity_factor!r}"
            )


def route(
    logits_WNE: torch.Tensor,
    k: int,
    *,
    selection_bias: torch.Tensor | None = None,
    noisy_logits_WNE: torch.Tensor | None = None,
    capacity_factor: float | None = None,
    renormalize: bool = True,
    balance_weight: float = 0.0,
    z_loss_weight: float = 0.0,
    window: int | None = None,
    priority_N: torch.Tensor | None = None,
) -> RoutingInfo:
    """Top-k selection, gates, capacity and losses from router logits (pure function).

    Args:
        logits_WNE: ``[W, N, E]`` noise-free logits, one slice per window (``W = 1`` when not
            windowed).
        k: experts per token.
        selection_bias: ``[E]`` added to the logits for selection only.
        noisy_logits_WNE: logits with training noise, used for probabilities and selection;
            the z-loss always uses ``logits_WNE``. None: no noise.
        capacity_factor: None (unlimited) or > 0; see the module docstring for the policy.
        renormalize: renormalise the gates over the chosen ``k``.
        balance_weight, z_loss_weight: weights of the two losses in ``aux_loss``.
        window: window length, recorded in the result (None: not windowed, ``W = 1``).
        priority_N: ``[N]`` capacity priority of each token (lower is served first); None
            keeps the largest gates (module docstring).

    Returns:
        :class:`RoutingInfo`.
    """
    W, N, E = logits_WNE.shape
    check_routing_config(E, k, window, capacity_factor)
    # Softmax and z-loss at least in float32 (half-precision logits overflow), float64 kept.
    wide = torch.promote_types(logits_WNE.dtype, torch.float32)
    probs = torch.softmax(
        (logits_WNE if noisy_logits_WNE is None else noisy_logits_WNE).to(wide), dim=-1
    ).to(logits_WNE.dtype)
    # Selection in logit space: softmax squashes the unpreferred experts' probabilities
    # towards 0, where an additive bias would move every token at once (herding).
    scores = (logits_WNE if noisy_logits_WNE is None else noisy_logits_WNE).detach()
    if selection_bias is not None:
        scores = scores + selection_bias.detach().to(scores.dtype)
    ids_WNK = torch.topk(scores, k, dim=-1, sorted=True).indices
    gates_WNK = probs.gather(-1, ids_WNK)
    if renormalize:
        gates_WNK = gates_WNK / gates_WNK.sum(-1, keepdim=True)

    ones = torch.ones_like(ids_WNK.reshape(-1))
    selected_E = torch.zeros(E, dtype=torch.int64, device=ids_WNK.device).scatter_add_(
        0, ids_WNK.reshape(-1), ones
    )
    if capacity_factor is None:
        capacity = None
        kept_WNK = torch.ones_like(ids_WNK, dtype=torch.bool)
        tokens_E = selected_E
    else:
        capacity = math.ceil(capacity_factor * N * k / E)
        if priority_N is None:
            key_WNK = -gates_WNK.detach()
        else:
            if priority_N.shape != (N,):
                raise ValueError(f"priority_N must have shape [{N}], got {tuple(priority_N.shape)}")
            key_WNK = priority_N.view(1, N, 1).expand(W, N, k)
        kept_WNK = _capacity_mask(ids_WNK, key_WNK, E, capacity)
        gates_WNK = gates_WNK * kept_WNK.to(gates_WNK.dtype)
        tokens_E = torch.zeros_like(selected_E).scatter_add_(
            0, ids_WNK.reshape(-1), kept_WNK.reshape(-1).long()
        )
    dropped = selected_E.sum() - tokens_E.sum()

    fraction_E = selected_E.to(probs.dtype) / (W * N * k)
    lb_loss = E * (fraction_E * probs.reshape(-1, E).mean(0)).sum()
    z_loss = torch.logsumexp(logits_WNE.to(wide), dim=-1).square().mean().to(logits_WNE.dtype)
    aux = balance_weight * lb_loss + z_loss_weight * z_loss

    return RoutingInfo(
        expert_ids=ids_WNK,
        gates=gates_WNK,
        probs=probs,
        kept=kept_WNK,
        tokens_per_expert=tokens_E,
        dropped=dropped,
        load_balancing_loss=lb_loss,
        z_loss=z_loss,
        aux_loss=aux,
        window=window,
        capacity=capacity,
    )


def _capacity_mask(ids_WNK, key_WNK, num_experts, capacity) -> torch.Tensor:
    """``[W, N, K]`` bool: keep the ``capacity`` assignments of smallest key per (window,
    expert) (key = -gate: largest gates; key = priority: first come, first served)."""
    W, N, K = ids_WNK.shape
    group_A = (
        ids_WNK + num_experts * torch.arange(W, device=ids_WNK.device).view(W, 1, 1)
    ).reshape(-1)
    # Two stable sorts give the order (group, key ascending, flat index ascending) with
    # no host sync; the flat index is token-major, so equal keys favour earlier tokens.
    by_key = torch.argsort(key_WNK.reshape(-1), stable=True)
    order = by_key[torch.argsort(group_A[by_key], stable=True)]
    counts = torch.bincount(group_A, minlength=W * num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts[group_A[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view(W, N, K)


def _window_sums(x_TNF: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window sums ``[W, N, F]`` and window lengths ``[W, 1, 1]`` (last may be short)."""
    T = x_TNF.shape[0]
    W = -(-T // window)
    padded = torch.nn.functional.pad(x_TNF, (0, 0, 0, 0, 0, W * window - T))
    sums = padded.reshape(W, window, *x_TNF.shape[1:]).sum(1)
    lengths = torch.full((W, 1, 1), float(window), dtype=x_TNF.dtype, device=x_TNF.device)
    lengths[-1] = T - (W - 1) * window
    return sums, lengths


class _Router(nn.Module):
    """Shared validation, noise, selection, balancing bias and losses of both routers."""

    kind: str

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int,
        *,
        args: RouterArgs | None = None,
        neuron: NeuronArgs | None = None,
        **options,
    ):
        super().__init__()
        neuron_names = {f.name for f in dataclasses.fields(NeuronArgs)}
        neuron_options = {n: v for n, v in options.items() if n in neuron_names}
        options = {n: v for n, v in options.items() if n not in neuron_names}
        who = type(self).__name__
        args = with_options(args or RouterArgs(kind=self.kind), options, who=who)
        _check_int("in_features", in_features, 1)
        check_routing_config(num_experts, k, args.window, args.capacity_factor)
        if args.kind != self.kind:
            raise ValueError(
                f"{who} is router kind {self.kind!r}, got args.kind={args.kind!r} "
                "(build_router picks the class by kind)"
            )
        self.args = args
        self.in_features = in_features
        self.num_experts = num_experts
        self.k = k
        self.proj = nn.Linear(in_features, num_experts)
        # Persistent by design: the one piece of router state that outlives a call.
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self._init_neurons(neuron, neuron_options)

    def _init_neurons(self, neuron: NeuronArgs | None, options) -> None:
        """The router's own neurons (none for the rate router)."""
        if neuron is not None or options:
            raise TypeError(f"{type(self).__name__} has no neurons: got neuron options {options}")

    # The routing options as attributes (router.noise = 0.1 changes args.noise).
    window = ArgsField()
    noise = ArgsField()
    capacity_factor = ArgsField()
    renormalize = ArgsField()
    balance_weight = ArgsField()
    z_loss_weight = ArgsField()
    bias_update_rate = ArgsField()
    gain = ArgsField()

    def extra_repr(self) -> str:
        a = self.args
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, k={self.k}, "
            f"window={a.window}, capacity_factor={a.capacity_factor}, noise={a.noise}"
        )

    def _scores(self, x_TND: torch.Tensor) -> tuple[torch.Tensor, Activity]:
        """Per-window logits ``[W, N, E]`` from the scores of each window itself, and the
        activity of the router's neurons."""
        raise NotImplementedError

    def forward(
        self, x_TND: torch.Tensor, *, priority_N: torch.Tensor | None = None
    ) -> RoutingInfo:
        """Route tokens.

        Args:
            x_TND: ``[T, N, D]`` input spikes (rates of any non-negative input work too; the
                MoE layer checks that its input is binary).
            priority_N: capacity priority per token (see :func:`route`).

        Returns:
            :class:`RoutingInfo` (per-token fields ``[W, N, ...]``; ``W = 1`` unwindowed).
        """
        if not isinstance(x_TND, torch.Tensor):
            raise TypeError(f"router input must be a torch.Tensor, got {type(x_TND).__name__}")
        if x_TND.dim() != 3 or x_TND.shape[-1] != self.in_features:
            raise ValueError(
                f"router input must be [T, N, {self.in_features}], got shape {tuple(x_TND.shape)}"
            )
        if not x_TND.is_floating_point():
            raise TypeError(f"router input must be floating point, got dtype {x_TND.dtype}")
        if x_TND.shape[0] == 0 or x_TND.shape[1] == 0:
            raise ValueError(f"router input has no time steps or tokens: {tuple(x_TND.shape)}")
        a = self.args
        logits, activity = self._scores(x_TND)
        if a.window is not None:
            # Window w is routed from window w-1; window 0 from an all-zero score (no past).
            logits = torch.cat([self._zero_scores(logits[:1]), logits[:-1]], 0)
        noisy = None
        if self.training and a.noise > 0:
            noisy = logits + a.noise * torch.randn_like(logits)
        routing = route(
            logits,
            self.k,
            selection_bias=self.expert_bias,
            noisy_logits_WNE=noisy,
            capacity_factor=a.capacity_factor,
            renormalize=a.renormalize,
            balance_weight=a.balance_weight,
            z_loss_weight=a.z_loss_weight,
            window=a.window,
            priority_N=priority_N,
        )
        return dataclasses.replace(routing, activity=activity)

    def _zero_scores(self, like_1NE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update_bias(self, *routings: RoutingInfo) -> torch.Tensor:
        """Auxiliary-loss-free balancing step; call after ``optimizer.step()``.

        Args:
            *routings: the :class:`RoutingInfo` of every forward call (micro-batch) since the
                last update; their loads are summed.

        Returns:
            The updated ``expert_bias`` ``[E]`` (also stored in the buffer).
        """
        if not routings:
            raise ValueError("update_bias needs at least one RoutingInfo")
        load = torch.zeros_like(self.expert_bias)
        for info in routings:
            if not isinstance(info, RoutingInfo):
                raise TypeError(f"expected RoutingInfo, got {type(info).__name__}")
            if info.num_experts != self.num_experts:
                raise ValueError(
                    f"RoutingInfo has {info.num_experts} experts, this router {self.num_experts}"
                )
            load += info.selected_load().to(load)
        return self.update_bias_from_load(load)

    @torch.no_grad()
    def update_bias_from_load(self, load_E: torch.Tensor) -> torch.Tensor:
        """The balancing step from per-expert assignment counts ``[E]`` (e.g. summed over
        micro-batches and data-parallel ranks, so every rank takes the same step)."""
        if load_E.shape != self.expert_bias.shape:
            raise ValueError(
                f"load must have shape [{self.num_experts}], got {tuple(load_E.shape)}"
            )
        load_E = load_E.to(self.expert_bias)
        self.expert_bias += self.args.bias_update_rate * torch.sign(load_E.mean() - load_E)
        return self.expert_bias


class RateRouter(_Router):
    """Rate-coded router: ``logits = W r + b`` on the input rates ``r`` of each window.

    Args:
        in_features: input size ``D``.
        num_experts: number of experts ``E`` (>= 1).
        k: experts per token, ``1 <= k <= E``.
        args: the :class:`~spiking_moe.args.RouterArgs` (None: the defaults).
        **options: router options to set, by name (the fields of
            :class:`~spiking_moe.args.RouterArgs`: ``noise`` (training only), ``window`` (None
            routes on the whole sequence; ``L`` routes causally per window, see the module
            docstring), ``capacity_factor``, ``renormalize`` (with ``k = 1`` the gate is then
            always 1 and only the aux loss trains the router; False gives Switch-style
            ``gate = p``), ``balance_weight``, ``z_loss_weight``, ``bias_update_rate``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> router = RateRouter(6, num_experts=4, k=2)
        >>> info = router(torch.bernoulli(torch.full((10, 3, 6), 0.3)))
        >>> info.expert_ids.shape, info.gates.sum(-1)  # [W=1, N=3, K=2]
        (torch.Size([1, 3, 2]), tensor([[1., 1., 1.]], grad_fn=<SumBackward1>))
    """

    kind = "rate"

    def _scores(self, x_TND):
        if self.window is None:
            return self.proj(x_TND.mean(0, keepdim=True)), Activity.empty(x_TND.device)
        sums, lengths = _window_sums(x_TND, self.window)
        return self.proj(sums / lengths), Activity.empty(x_TND.device)

    def _zero_scores(self, like_1NE):
        return self.proj.bias.expand_as(like_1NE)


class SpikingRouter(_Router):
    """Spiking gating population: ``E`` LIF neurons on ``W s_t + b``; counts are the scores.

    ``logits = gain * count / L`` per window. Same arguments as :class:`RateRouter`, plus:

    Args:
        neuron: the gating population's :class:`~spiking_moe.args.NeuronArgs`.
        **options: router options (as :class:`RateRouter`, and ``gain``: a rate of 1 vs 0 gives
            odds ``e^gain``) and neuron options (the fields of
            :class:`~spiking_moe.args.NeuronArgs`), by name.

    Equal counts are ties, broken towards the lower expert id; the balancing bias (after a
    few ``update_bias`` steps) and noise break them otherwise.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> router = SpikingRouter(6, num_experts=4, k=1, renormalize=False)
        >>> router(torch.bernoulli(torch.full((10, 3, 6), 0.3))).expert_ids.shape
        torch.Size([1, 3, 1])
    """

    kind = "spiking"

    def _init_neurons(self, neuron: NeuronArgs | None, options) -> None:
        self.neuron = make_neuron(neuron, **options)

    def _scores(self, x_TND):
        spikes_TNE = self.neuron(self.proj(x_TND))
        activity = Activity.of("neuron", spikes_TNE)
        if self.window is None:
            return self.gain * spikes_TNE.mean(0, keepdim=True), activity
        sums, lengths = _window_sums(spikes_TNE, self.window)
        return self.gain * sums / lengths, activity

    def _zero_scores(self, like_1NE):
        return torch.zeros_like(like_1NE)


#: The router class of each ``RouterArgs.kind``: ``"rate"`` -> :class:`RateRouter`,
#: ``"spiking"`` -> :class:`SpikingRouter` (what :func:`build_router` constructs).
ROUTERS = {"rate": RateRouter, "spiking": SpikingRouter}


def build_router(
    in_features: int,
    num_experts: int,
    k: int,
    args: RouterArgs | None = None,
    neuron: NeuronArgs | None = None,
) -> _Router:
    """The router ``args.kind`` names (``"rate"``: :class:`RateRouter`, ``"spiking"``:
    :class:`SpikingRouter` with a ``neuron`` gating population).

    Args:
        in_features: input size ``D`` of the tokens it routes.
        num_experts: number of experts ``E``.
        k: experts per token, ``1 <= k <= E``.
        args: the :class:`~spiking_moe.args.RouterArgs`, whose ``kind`` picks the class (None:
            the defaults, a rate router).
        neuron: the gating population's :class:`~spiking_moe.args.NeuronArgs` for a spiking
            router (None: the defaults); ignored by a rate router, which has no neurons.

    Returns:
        A new :class:`RateRouter` or :class:`SpikingRouter` mapping ``[T, N, D]`` input to
        :class:`RoutingInfo`.
    """
    args = args or RouterArgs()
    if args.kind == "spiking":
        return SpikingRouter(in_features, num_experts, k, args=args, neuron=neuron)
    return RateRouter(in_features, num_experts, k, args=args)
