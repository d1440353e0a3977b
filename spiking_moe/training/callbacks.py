"""Training callbacks: the :class:`Callback` protocol and the parts that plug into it.

- :class:`RouterBiasBalancing`: the auxiliary-loss-free balancing step of every MoE router,
  after each optimizer step, from the loads of the step's micro-batches summed over ranks.
- :class:`FiringRateMonitor`: firing rate of every neuron population, from the model's
  reported ``activity`` (:class:`~spiking_moe.activity.Activity`), per evaluation.
- :class:`RoutingMonitor`: per-expert load and utilisation, router entropy and drops of every
  MoE layer, from the model's reported ``routing``.
- :class:`EnergyReportCallback`: the energy report of every evaluation, counted batch by batch
  (counts are additive, so memory does not grow with the evaluation set).

Every callback reads only what the model returns; none registers hooks on the model. Hooks
receive a :class:`CallbackContext`: the :class:`~spiking_moe.training.Trainer`, or, for a
standalone :func:`~spiking_moe.training.evaluate`, an
:class:`~spiking_moe.training.EvaluationContext`. The energy helpers the energy callback uses
are in :mod:`~spiking_moe.training.model_energy`.

Routing statistics of MoE layer ``l`` over an evaluation pass, where a *row* is one routed
(window, token) pair (``W N`` rows per batch; ``N`` without windows), with ``k`` experts each:

- ``load/e = n_e / sum_e' n_e'``: share of the routed assignments that expert ``e`` got
  (sums to 1; ``1 / E`` each when balanced);
- ``utilisation/e = n_e / rows``: fraction of rows that use expert ``e`` (sums to ``k``);
- ``max_load_ratio = E * max_e load/e`` (1 = perfectly balanced, ``E`` = one expert takes all);
- ``router_entropy = mean_rows(-sum_e p_e log p_e)`` in nats (``log E`` = uniform router);
- ``dropped_fraction = dropped / (routed + dropped)`` assignments, when the layer reports
  drops (capacity overflow); ``routed = sum_e n_e``.

Shape letters: the package legend (:mod:`spiking_moe`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

import energy

from ..moe import update_router_biases
from .distributed import DistInfo, add_fields, all_gather_objects, reduce_fields
from .model_energy import (
    check_energy_profile,
    count_energy,
    energy_metrics,
    merge_present_counts,
    write_energy_report,
)

__all__ = [
    "Callback",
    "CallbackContext",
    "EnergyReportCallback",
    "FiringRateMonitor",
    "RouterBiasBalancing",
    "RoutingMonitor",
    "check_callback",
]


class CallbackContext(Protocol):
    """What a hook receives: where the evaluation or training runs and how to report.

    The :class:`~spiking_moe.training.Trainer` is one (its fit hooks get the Trainer itself,
    with ``request_stop``); a standalone :func:`~spiking_moe.training.evaluate` passes an
    :class:`~spiking_moe.training.EvaluationContext`.

    A protocol, never constructed itself: the parameters below are those of its methods.

    Args:
        metrics: of :meth:`log`: ``{name: value}`` scalars (numbers or one-element tensors),
            named like ``f"{prefix}/..."``.
        step: of :meth:`log` and :meth:`log_text`: the step to log at; None: ``self.step``.
        tag: of :meth:`log_text`: the text's name.
        text: of :meth:`log_text`: the text.
        tensor: of :meth:`all_reduce_sum`: the same shape and dtype on every rank.

    Attributes:
        model: the evaluated (or trained) model, unwrapped (no DDP, no ``torch.compile``).
        device: where batches and reductions go.
        step: optimizer steps completed (the step logged values belong to).
        epoch: the current epoch.
        dist: this process's place in the job.
    """

    model: nn.Module
    device: torch.device
    step: int
    epoch: int
    dist: DistInfo

    @property
    def tensorboard_writer(self) -> Any:
        """A TensorBoard ``SummaryWriter`` to write to, or None."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Send scalar metrics to the sinks (at ``step``, default ``self.step``)."""

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """Send text (e.g. a Markdown table) to the sinks that take text."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks (collective: every rank calls it)."""


class Callback:
    """Extension point: subclass and override what you need; every hook is a no-op here.

    Hooks receive a :class:`CallbackContext` (``trainer.model``, ``.device``, ``.step``,
    ``.epoch``, ``.dist``, ``.log``, ``.log_text``, ``.tensorboard_writer``,
    ``.all_reduce_sum``): the Trainer during training, and whatever runs a standalone
    evaluation. Metrics returned by :meth:`on_eval_end` join the evaluation's metrics
    (returned by :func:`~spiking_moe.training.evaluate` and logged by ``Trainer.evaluate``).
    Under DDP every rank runs every hook; reduce across ranks with ``trainer.all_reduce_sum``
    before computing a metric (all ranks must call it).
    """

    def on_fit_start(self, trainer: CallbackContext) -> None:
        """Before the first step (after a resume has loaded its checkpoint)."""

    def on_train_step_end(
        self, trainer: CallbackContext, outputs: Sequence[Any], loss: torch.Tensor
    ) -> None:
        """After optimizer step ``trainer.step``.

        Args:
            outputs: the model's output for each micro-batch of the step
                (``train.grad_accum_steps`` of them, in order).
            loss: the step's loss (mean over its micro-batches), detached.
        """

    def on_eval_start(self, trainer: CallbackContext, prefix: str) -> None:
        """Before an evaluation pass (``prefix``: "val", "test", ...); the model is in eval mode."""

    def on_eval_batch_end(
        self,
        trainer: CallbackContext,
        prefix: str,
        batch: tuple[torch.Tensor, torch.Tensor],
        output: Any,
    ) -> None:
        """After the forward pass of one evaluation batch (inside ``torch.no_grad``)."""

    def on_eval_end(self, trainer: CallbackContext, prefix: str) -> Mapping[str, float] | None:
        """After an evaluation pass; return extra metrics (named ``f"{prefix}/..."``)."""
        return None

    def on_fit_end(self, trainer: CallbackContext, result: Any) -> None:
        """After training finished or was interrupted by a signal (not after an error);
        ``result`` is :meth:`~spiking_moe.training.Trainer.fit`'s
        :class:`~spiking_moe.training.TrainResult`."""


#: Hooks that no longer exist, and what replaced them (a subclass overriding one would
#: otherwise be silently ignored).
_REMOVED_HOOKS = {
    "on_train_batch_end": "on_train_step_end(trainer, outputs, loss), called once per "
    "optimizer step with the outputs of all its micro-batches",
}


def check_callback(callback: Callback) -> None:
    """Raise TypeError if ``callback`` is not a :class:`Callback` or overrides a removed hook."""
    if not isinstance(callback, Callback):
        raise TypeError(f"callbacks must be Callback instances, got {type(callback).__name__}")
    for name, replacement in _REMOVED_HOOKS.items():
        if inspect.getattr_static(callback, name, None) is not None:
            raise TypeError(
                f"{type(callback).__name__}.{name} is no longer called; override {replacement}"
            )


class RouterBiasBalancing(Callback):
    """Auxiliary-loss-free balancing: after every optimizer step, nudge each MoE router's
    selection bias from the load of the step (``output.routing`` of every micro-batch),
    outside autograd.

    Under DDP the per-expert loads are summed over ranks first, so every rank takes the same
    step, the one a single process would take on the global batch.
    """

    def on_train_step_end(self, trainer, outputs, loss) -> None:
        routings = [tuple(o.routing) for o in outputs if getattr(o, "routing", ())]
        if routings:
            update_router_biases(trainer.model, routings, reduce=trainer.all_reduce_sum)


class FiringRateMonitor(Callback):
    """Firing rate (spikes per neuron update) of every neuron population, per evaluation.

    Reads ``output.activity`` (:class:`~spiking_moe.activity.Activity`); logs
    ``{prefix}/firing_rate/{population}`` (populations are named like the modules, e.g.
    ``layers.0.experts.2.net.1``) and ``{prefix}/firing_rate/mean`` (over all spikes). A
    population inside a routed expert counts only the tokens routed to it; one that never
    ran in the pass is not logged. Does nothing for models that report no activity.
    """

    def __init__(self):
        self._totals: dict[tuple[str, ...], PopulationTotals] = {}

    def on_eval_start(self, trainer: CallbackContext, prefix: str) -> None:
        self._totals = {}

    def on_eval_batch_end(self, trainer, prefix, batch, output) -> None:
        activity = getattr(output, "activity", None)
        if activity is None or not len(activity):
            return
        totals = PopulationTotals(activity.spikes.detach().double(), activity.updates.double())
        # Models report the same layout every call: one running sum, no host sync.
        previous = self._totals.get(activity.names)
        self._totals[activity.names] = totals if previous is None else add_fields(previous, totals)

    def on_eval_end(self, trainer: CallbackContext, prefix: str) -> Mapping[str, float]:
        per_name: dict[str, PopulationTotals] = {}
        for names, totals in self._totals.items():
            for name, spikes, updates in zip(names, *totals, strict=True):
                one = PopulationTotals(spikes, updates)
                per_name[name] = add_fields(per_name[name], one) if name in per_name else one
        self._totals = {}
        # Ranks may have seen different layouts (a custom model): align them by name.
        names = sorted(set().union(*all_gather_objects(sorted(per_name))))
        if not names:
            return {}
        zero = torch.zeros((), dtype=torch.float64)
        aligned = PopulationTotals(
            *(
                torch.stack(
                    [getattr(per_name[n], f).cpu() if n in per_name else zero for n in names]
                )
                for f in PopulationTotals._fields
            )
        )
        totals = reduce_fields(aligned, trainer.all_reduce_sum, trainer.device)
        metrics = {}
        for name, spikes, updates in zip(names, *totals, strict=True):
            if updates > 0:
                metrics[f"{prefix}/firing_rate/{name}"] = spikes / updates
        if sum(totals.updates) > 0:
            metrics[f"{prefix}/firing_rate/mean"] = sum(totals.spikes) / sum(totals.updates)
        return metrics


class PopulationTotals(NamedTuple):
    """Sums over the calls of an evaluation for neuron populations (float64 tensors).

    Attributes:
        spikes: ``[G]`` spikes of each population (or a 0-d sum for one).
        updates: ``[G]`` its neuron updates.
    """

    spikes: torch.Tensor
    updates: torch.Tensor


class RoutingMonitor(Callback):
    """Per-expert load and utilisation, router entropy and drops of every MoE layer.

    Logged as ``{prefix}/moe{l}/load/{e}``, ``.../utilisation/{e}``, ``.../max_load_ratio``,
    ``.../router_entropy`` and ``.../dropped_fraction`` (module docstring). Reads
    ``output.routing``: one ``RoutingInfo`` per MoE layer, whose ``probs`` are
    ``[W, N, E]``; does nothing for models whose output has no ``routing``.
    """

    def __init__(self):
        self._totals: list[RoutingTotals] = []

    def on_eval_start(self, trainer: CallbackContext, prefix: str) -> None:
        self._totals = []

    def on_eval_batch_end(self, trainer, prefix, batch, output) -> None:
        routing = getattr(output, "routing", None)
        if not routing:
            return
        for layer, info in enumerate(routing):
            totals = RoutingTotals.of(info)
            if layer < len(self._totals):
                self._totals[layer] = add_fields(self._totals[layer], totals)
            else:
                self._totals.append(totals)

    def on_eval_end(self, trainer: CallbackContext, prefix: str) -> Mapping[str, float]:
        metrics: dict[str, float] = {}
        for layer, totals in enumerate(self._totals):
            summed = reduce_fields(totals, trainer.all_reduce_sum, trainer.device)
            tokens_E, num_rows, entropy_sum, dropped = summed
            assignments = sum(tokens_E)
            num_experts = len(tokens_E)
            base = f"{prefix}/moe{layer}"
            for e, n in enumerate(tokens_E):
                metrics[f"{base}/load/{e}"] = n / assignments if assignments else 0.0
                metrics[f"{base}/utilisation/{e}"] = n / num_rows if num_rows else 0.0
            if assignments:
                metrics[f"{base}/max_load_ratio"] = num_experts * max(tokens_E) / assignments
            if num_rows:
                metrics[f"{base}/router_entropy"] = entropy_sum / num_rows
            if assignments + dropped:
                metrics[f"{base}/dropped_fraction"] = dropped / (assignments + dropped)
        self._totals = []
        return metrics


class RoutingTotals(NamedTuple):
    """Sums over the routed rows of one MoE layer (float64 tensors, on the routing's device).

    Attributes:
        tokens_E: ``[E]`` assignments each expert computed on.
        rows: routed (window, token) rows.
        entropy: summed router entropy of the rows, in nats.
        dropped: assignments dropped by a capacity limit.
    """

    tokens_E: torch.Tensor
    rows: torch.Tensor
    entropy: torch.Tensor
    dropped: torch.Tensor

    @classmethod
    def of(cls, info: Any) -> RoutingTotals:
        """The totals of one call's ``RoutingInfo`` (``probs`` ``[W, N, E]``)."""
        tokens_E = info.tokens_per_expert.detach().double()
        probs_XE = info.probs.detach().float().reshape(-1, tokens_E.shape[0])
        entropy = -(probs_XE * probs_XE.clamp_min(1e-12).log()).sum(-1).sum().double()
        dropped = getattr(info, "dropped", None)
        dropped = (
            torch.zeros((), device=tokens_E.device, dtype=torch.float64)
            if dropped is None
            else dropped.detach().double().sum()
        )
        rows = torch.full((), float(probs_XE.shape[0]), dtype=torch.float64)
        return cls(tokens_E, rows.to(tokens_E.device), entropy, dropped)


class EnergyReportCallback(Callback):
    """Energy of every evaluation whose prefix is in ``prefixes``, counted batch by batch.

    Each evaluated batch is counted (and its dense twin, :func:`count_energy`) and the
    counts are summed (:func:`energy.merge_counts`): they are exact integers and additive
    over batches, so the report of a whole set equals that of one pass over it, and only the
    running sums are kept. (The binary-input check is per call: a layer whose input happens
    to be exactly 0/1 in one batch but not another is charged ACs for that batch only; and a
    capacity limit, which depends on the batch size, routes a batch as that batch.) Under
    DDP every rank counts its shard and the sums are gathered. Under expert parallelism too
    (each process's counts are its share: :func:`count_energy`), and the report, the same on
    every rank, equals that of one process counting the same model on every process's
    batches in turn; every process must evaluate as many batches as the others, since the
    forward passes exchange tokens (``num_batches`` caps each alike). After the pass the
    report goes
    to TensorBoard (scalars, histograms, Markdown table, custom layout, tag
    ``{prefix}_energy/...``) and energy per sample and the ratios are returned as metrics, so
    energy is logged at every validation beside the accuracy.

    Args:
        profile: hardware profile name of :mod:`energy.profiles`.
        num_batches: evaluation batches to count (0 = all).
        prefixes: evaluation prefixes to report on (e.g. ``("test",)`` or ``("val", "test")``).

    Attributes:
        report: the last evaluation's :class:`energy.EnergyReport` (None before the first).
        counts: the merged :class:`energy.OperationCounts` of the model behind ``report``;
            :meth:`report_under` prices it, with ``dense_counts``, under any profile.
        dense_counts: the same for the model's dense twin (None without MoE layers).
        samples: the number of predictions that report counted: samples, or, for a sequence
            model (targets ``[B, S]``), tokens.
        unit: "sample" or "token", what ``samples`` counts (energy is logged per unit).
    """

    def __init__(self, profile: str = "cmos45", num_batches: int = 0, prefixes=("val", "test")):
        check_energy_profile(profile)
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise ValueError(f"num_batches must be an int >= 0, got {num_batches!r}")
        self.profile = profile
        self.num_batches = num_batches
        self.prefixes = tuple(prefixes)
        self.report = None
        self.counts = self.dense_counts = None
        self.samples = 0
        self.unit = "sample"
        self._counts = self._dense = None
        self._counted = self._batches = 0

    def report_under(self, profile: str, **kwargs):
        """The last evaluation's activity priced under ``profile``: an
        :class:`energy.EnergyReport`; ``kwargs`` go to :func:`energy.build_report`
        (``model_weight_bits``, ``accuracy``, ``accuracy_at_profile_precision``, ...)."""
        if self.counts is None:
            raise RuntimeError("no evaluation counted yet: nothing to price")
        return energy.build_report(self.counts, profile, dense_counts=self.dense_counts, **kwargs)

    def on_eval_start(self, trainer, prefix):
        self._counts = self._dense = None
        self._counted = self._batches = 0

    def on_eval_batch_end(self, trainer, prefix, batch, output):
        if prefix not in self.prefixes:
            return
        if self.num_batches and self._batches >= self.num_batches:
            return
        x_TBF, y = batch
        counts, dense = count_energy(trainer.model, x_TBF)
        self._counts = merge_present_counts([self._counts, counts])
        self._dense = merge_present_counts([self._dense, dense])
        self._counted += y.numel()
        self.unit = "token" if y.dim() > 1 else "sample"
        self._batches += 1

    def on_eval_end(self, trainer, prefix):
        if prefix not in self.prefixes:
            return None
        shards = all_gather_objects((self._counts, self._dense, self._counted))
        self._counts = self._dense = None
        counts = merge_present_counts([c for c, _, _ in shards])
        if counts is None:
            return None
        dense = merge_present_counts([d for _, d, _ in shards])
        self.report = energy.build_report(counts, self.profile, dense_counts=dense)
        self.counts, self.dense_counts = counts, dense
        self.samples = sum(n for _, _, n in shards)
        writer = trainer.tensorboard_writer
        if writer is not None:
            write_energy_report(writer, self.report, trainer.step, prefix=f"{prefix}_energy")
        return energy_metrics(self.report, self.samples, prefix, self.unit)
