"""Training callbacks: the :class:`Callback` protocol and the parts that plug into it.

- :class:`RouterBiasBalancing`: the auxiliary-loss-free balancing step of every MoE router,
  after each optimizer step, from the loads of the step's micro-batches summed over ranks.
- :class:`FiringRateMonitor`: firing rate of every neuron population, from the model's
  reported ``activity`` (:class:`~spiking_moe.activity.Activity`), per evaluation.
- :class:`RoutingMonitor`: per-expert load and utilisation, router entropy and drops of every
  MoE layer, from the model's reported ``routing``.
- :class:`EnergyReportCallback`: the energy report of every evaluation, counted batch by batch
  (counts are additive, so memory does not grow with the evaluation set).

Every callback reads only what the model returns; none registers hooks on the model.

Routing statistics of MoE layer ``l`` over an evaluation pass, where a *row* is one routed
(window, token) pair (``W N`` rows per batch; ``N`` without windows), with ``k`` experts each:

- ``load/e = n_e / sum_e' n_e'``: share of the routed assignments that expert ``e`` got
  (sums to 1; ``1 / E`` each when balanced);
- ``utilisation/e = n_e / rows``: fraction of rows that use expert ``e`` (sums to ``k``);
- ``max_load_ratio = E * max_e load/e`` (1 = perfectly balanced, ``E`` = one expert takes all);
- ``router_entropy = mean_rows(-sum_e p_e log p_e)`` in nats (``log E`` = uniform router);
- ``dropped_fraction = dropped / (routed + dropped)`` assignments, when the layer reports
  drops (capacity overflow); ``routed = sum_e n_e``.

Letters: N tokens, W windows, E experts, P neuron populations.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import energy
import energy.tensorboard

from ..moe import SpikingMoE, swapped_strategies, update_router_biases
from ..parallel import is_expert_parallel
from .distributed import all_gather_objects

if TYPE_CHECKING:
    from .trainer import Trainer, TrainResult

__all__ = [
    "Callback",
    "EnergyReportCallback",
    "FiringRateMonitor",
    "RouterBiasBalancing",
    "RoutingMonitor",
    "check_callback",
    "check_energy_profile",
    "count_energy",
    "count_operations_parallel",
    "energy_metrics",
    "energy_profile_names",
    "expert_parallel_counts",
    "measure_energy",
    "write_energy_report",
]


class Callback:
    """Extension point: subclass and override what you need; every hook is a no-op here.

    Hooks receive the :class:`~spiking_moe.training.Trainer` (``trainer.model``, ``.device``,
    ``.step``, ``.epoch``, ``.dist``, ``.log``, ``.log_text``, ``.tensorboard_writer``,
    ``.all_reduce_sum``). Metrics returned by :meth:`on_eval_end` are logged with the
    evaluation's metrics and returned by ``Trainer.evaluate``. Under DDP every rank runs
    every hook; reduce across ranks with ``trainer.all_reduce_sum`` before computing a metric
    (all ranks must call it).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has loaded its checkpoint)."""

    def on_train_step_end(
        self, trainer: Trainer, outputs: Sequence[Any], loss: torch.Tensor
    ) -> None:
        """After optimizer step ``trainer.step``.

        Args:
            outputs: the model's output for each micro-batch of the step
                (``train.grad_accum_steps`` of them, in order).
            loss: the step's loss (mean over its micro-batches), detached.
        """

    def on_eval_start(self, trainer: Trainer, prefix: str) -> None:
        """Before an evaluation pass (``prefix``: "val", "test", ...); the model is in eval mode."""

    def on_eval_batch_end(
        self, trainer: Trainer, prefix: str, batch: tuple[torch.Tensor, torch.Tensor], output: Any
    ) -> None:
        """After the forward pass of one evaluation batch (inside ``torch.no_grad``)."""

    def on_eval_end(self, trainer: Trainer, prefix: str) -> Mapping[str, float] | None:
        """After an evaluation pass; return extra metrics (named ``f"{prefix}/..."``)."""
        return None

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After training finished or was interrupted by a signal (not after an error)."""


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
        self._totals: dict[tuple[str, ...], torch.Tensor] = {}

    def on_eval_start(self, trainer: Trainer, prefix: str) -> None:
        self._totals = {}

    def on_eval_batch_end(self, trainer, prefix, batch, output) -> None:
        activity = getattr(output, "activity", None)
        if activity is None or not len(activity):
            return
        row_P2 = torch.stack([activity.spikes.detach().double(), activity.updates.double()], 1)
        # Models report the same layout every call: one running sum, no host sync.
        total = self._totals.get(activity.names)
        self._totals[activity.names] = row_P2 if total is None else total + row_P2

    def on_eval_end(self, trainer: Trainer, prefix: str) -> Mapping[str, float]:
        per_name: dict[str, torch.Tensor] = {}
        for names, total in self._totals.items():
            for name, row in zip(names, total.to(trainer.device), strict=True):
                per_name[name] = per_name[name] + row if name in per_name else row
        self._totals = {}
        # Ranks may have seen different layouts (a custom model): align them by name.
        names = sorted(set().union(*all_gather_objects(sorted(per_name))))
        if not names:
            return {}
        zero = torch.zeros(2, dtype=torch.float64, device=trainer.device)
        table = torch.stack([per_name.get(n, zero) for n in names])
        table = trainer.all_reduce_sum(table)
        metrics = {}
        for name, (spikes, updates) in zip(names, table.tolist(), strict=True):
            if updates > 0:
                metrics[f"{prefix}/firing_rate/{name}"] = spikes / updates
        total_spikes, total_updates = table.sum(0).tolist()
        if total_updates > 0:
            metrics[f"{prefix}/firing_rate/mean"] = total_spikes / total_updates
        return metrics


class RoutingMonitor(Callback):
    """Per-expert load and utilisation, router entropy and drops of every MoE layer.

    Logged as ``{prefix}/moe{l}/load/{e}``, ``.../utilisation/{e}``, ``.../max_load_ratio``,
    ``.../router_entropy`` and ``.../dropped_fraction`` (module docstring). Reads
    ``output.routing``: one ``RoutingInfo`` per MoE layer, whose ``probs`` are
    ``[W, N, E]``; does nothing for models whose output has no ``routing``.
    """

    def __init__(self):
        self._stats: list[torch.Tensor] = []

    def on_eval_start(self, trainer: Trainer, prefix: str) -> None:
        self._stats = []

    def on_eval_batch_end(self, trainer, prefix, batch, output) -> None:
        routing = getattr(output, "routing", None)
        if not routing:
            return
        for layer, info in enumerate(routing):
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
            # [n_0 .. n_{E-1}, rows, entropy sum, dropped]
            row = torch.cat([tokens_E, torch.stack([rows.to(tokens_E.device), entropy, dropped])])
            if layer < len(self._stats):
                self._stats[layer] = self._stats[layer] + row
            else:
                self._stats.append(row)

    def on_eval_end(self, trainer: Trainer, prefix: str) -> Mapping[str, float]:
        metrics: dict[str, float] = {}
        for layer, row in enumerate(self._stats):
            row = trainer.all_reduce_sum(row.to(trainer.device)).tolist()
            tokens_E, num_rows, entropy_sum, dropped = row[:-3], row[-3], row[-2], row[-1]
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
        self._stats = []
        return metrics


# --------------------------------------------------------------------------- energy


def energy_profile_names() -> list[str]:
    """Names of the bundled hardware energy profiles."""
    return energy.available_profiles()


def check_energy_profile(name: str) -> None:
    """Raise ValueError naming the known profiles when ``name`` is not one of them."""
    energy.get_profile(name)


def profile_precision(name: str) -> tuple[int, int]:
    """``(weight_bits, activation_bits)`` the profile's prices assume (ValueError if unknown)."""
    profile = energy.get_profile(name)
    return profile.weight_bits, profile.activation_bits


def write_energy_report(writer, report, step: int, prefix: str) -> None:
    """Log an :class:`energy.EnergyReport` to a TensorBoard ``SummaryWriter`` under ``prefix``."""
    energy.tensorboard.write_report(writer, report, step, prefix=prefix)


def expert_parallel_counts(
    model: nn.Module, counts: energy.OperationCounts
) -> energy.OperationCounts:
    """This process's :func:`energy.count_operations` of an expert-parallel ``model``
    (:mod:`spiking_moe.parallel`), in the form one process gives when it counts each
    process's shard on its own.

    Merging every process's result (:func:`energy.merge_counts`) then gives the counts of the
    whole job: shared modules (on every process) are summed over the shards, and each expert
    appears only on its owner (with replicas, on each of them, for its row's tokens), under
    its global name. An owner runs each local expert once per source process that sent it
    rows, where one process counting the shards one by one calls it once per shard that routed
    to it: the same calls, and every count is a sum over calls (experts' calls are time-major,
    behind a windowed router too: the layer declares their ``energy_time_steps``), so all of
    them match as they are, except one thing put right here: an owner whose local experts
    received no row from any process calls its first local
    expert on an empty batch (:func:`~spiking_moe.dispatch.run_experts_with_activity` always
    returns a ``[T, 0, O]`` tensor). That expert did nothing: it is listed as idle (no calls,
    after the modules that ran), as one process lists an expert that no token chose.

    Args:
        model: the counted model: its expert-parallel :class:`~spiking_moe.moe.SpikingMoE`
            layers say which modules are experts.
        counts: :class:`energy.OperationCounts` of one or more passes on this process.

    Returns:
        :class:`energy.OperationCounts`; ``counts`` itself for a model without expert-parallel
        layers.
    """
    experts = [  # module-name prefixes of each layer's experts
        f"{name}.experts." if name else "experts."
        for name, layer in model.named_modules()
        if isinstance(layer, SpikingMoE) and layer.expert_parallel is not None
    ]
    if not experts:
        return counts
    layers = list(counts.layers)
    members: dict[str, list[int]] = {}
    for i, m in enumerate(layers):
        if m.group is not None and m.name.startswith(tuple(experts)):
            members.setdefault(m.group, []).append(i)
    emptied = set()
    for indices in members.values():
        group = [layers[i] for i in indices]
        if any(m.calls for m in group) and not any(m.rows or m.neuron_updates for m in group):
            emptied.update(indices)
    for i in emptied:
        layers[i] = dataclasses.replace(layers[i], calls=0, binary_calls=0)
    ran = [m for m in layers if m.calls]
    idle = [m for m in layers if not m.calls]  # listed last, as count_operations lists them
    ordered = tuple(dataclasses.replace(m, order=i) for i, m in enumerate(ran + idle))
    return energy.OperationCounts(layers=ordered, time_steps=counts.time_steps)


def count_operations_parallel(model: nn.Module, *inputs, **kwargs) -> energy.OperationCounts:
    """The operations of one forward pass of the whole job: every process counts its own
    ``inputs`` (its shard of the global batch) with :func:`energy.count_operations`, puts the
    counts in single-process form (:func:`expert_parallel_counts`), and all of them are
    gathered and merged (:func:`energy.merge_counts`).

    Collective: every process of the job calls it (the forward pass exchanges tokens). For an
    expert-parallel model the result equals one process counting the same model on each shard
    in turn and merging the counts; without a capacity limit (which each process applies to
    its own tokens) that is the count of one pass over the global batch, apart from ``calls``
    and ``binary_calls`` (one call per process, and per source process for an expert, instead
    of one), on which no energy depends. A model without expert parallelism gets the sum of
    the shards' counts (data parallelism); in a single process this is
    :func:`energy.count_operations`.

    Args:
        model: the model, in the mode to count it in (``model.eval()`` first for noise-free
            routing).
        *inputs: this process's inputs of ``model``.
        **kwargs: passed to :func:`energy.count_operations` (``time_steps``, ``groups``, ...).

    Returns:
        :class:`energy.OperationCounts` of all processes, the same on every process.
    """
    counts = expert_parallel_counts(model, energy.count_operations(model, *inputs, **kwargs))
    return energy.merge_counts(*all_gather_objects(counts))


def count_energy(
    model: nn.Module, x_TBF: torch.Tensor
) -> tuple[energy.OperationCounts, energy.OperationCounts | None]:
    """Count one forward pass of ``model`` on ``x_TBF``, and of its dense twin.

    The dense twin is the same model with every :class:`~spiking_moe.moe.SpikingMoE` running
    every expert on every token: the layers' expert strategies are swapped for the second pass
    and restored (:func:`~spiking_moe.moe.swapped_strategies`), so no copy of the model is
    made. Both passes run one call per expert, which the counter's hooks see. Both run in the model's current mode
    without gradients; call ``model.eval()`` first for noise-free routing.

    A model whose input is not time-major (a language model's token ids ``[B, S]``) says how
    many steps it runs per token in a ``num_steps`` attribute; otherwise ``T`` is dim 0 of
    ``x_TBF``.

    Under expert parallelism (:mod:`spiking_moe.parallel`) this is collective (both passes
    exchange tokens: every process calls it, as many times), ``x_TBF`` is this process's shard
    and the counts are its share, in single-process form (:func:`expert_parallel_counts`):
    the shared modules on its tokens, its experts on every process's tokens. Merged over the
    processes (:func:`energy.merge_counts` of every process's counts, as
    :class:`EnergyReportCallback` does) they are the counts of one process running the same
    model on each shard in turn (:func:`count_operations_parallel` for one pass).

    Returns:
        ``(counts, dense_counts)``; ``dense_counts`` is None for a model without MoE layers.
    """
    time_steps = getattr(model, "num_steps", None)
    # The counter's hooks must see every expert module's call: one call per expert (the
    # grouped GEMM reads the experts' parameters); the dense twin runs every expert on every
    # token. Both are the layers' strategies swapped for the pass, then restored.
    with torch.no_grad(), swapped_strategies(model, grouped_gemm="never") as layers:
        counts = expert_parallel_counts(
            model, energy.count_operations(model, x_TBF, time_steps=time_steps)
        )
        if not layers:
            return counts, None
        with swapped_strategies(model, every_expert=True):
            dense = energy.count_operations(model, x_TBF, time_steps=time_steps)
    return counts, expert_parallel_counts(model, dense)


def measure_energy(model: nn.Module, x_TBF: torch.Tensor, profile: str = "cmos45"):
    """Count one forward pass of ``model`` on ``x_TBF`` (in eval mode) and price it under
    ``profile``, with the dense-MoE baselines counted for real (:func:`count_energy`).

    An expert-parallel model is counted on every process's ``x_TBF`` (collective: every
    process calls it) and the report is that of all of them, the same on every process: one
    process's share alone prices its experts on other processes' tokens.

    Returns:
        :class:`energy.EnergyReport`; energy per sample is ``report.totals.energy_pj / B``
        (``B`` summed over the processes under expert parallelism).
    """
    was_training = model.training
    model.eval()
    try:
        counts, dense = count_energy(model, x_TBF)
    finally:
        model.train(was_training)
    if is_expert_parallel(model):
        shards = all_gather_objects((counts, dense))
        counts, dense = _merge([c for c, _ in shards]), _merge([d for _, d in shards])
    return energy.build_report(counts, profile, dense_counts=dense)


def energy_metrics(report, samples: int, prefix: str, unit: str = "sample") -> dict[str, float]:
    """Scalars of an energy report: energy per ``unit`` (uJ; ``samples`` of them, "sample" or,
    for a sequence model, "token") and the baseline ratios (firing rates come from
    :class:`FiringRateMonitor` and the report's own TensorBoard scalars)."""
    metrics = {f"{prefix}/energy/uJ_per_{unit}": report.totals.energy_pj / samples / 1e6}
    for baseline in report.baselines:
        metrics[f"{prefix}/energy/ratio_{baseline.name}"] = baseline.ratio
    return metrics


def _merge(counts: Sequence[energy.OperationCounts | None]) -> energy.OperationCounts | None:
    present = [c for c in counts if c is not None]
    return energy.merge_counts(*present) if present else None


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
        counts, dense_counts: the merged :class:`energy.OperationCounts` behind ``report`` (of
            the model and its dense twin; ``dense_counts`` None without MoE layers);
            :meth:`report_under` prices them under any profile.
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
        self._counts = _merge([self._counts, counts])
        self._dense = _merge([self._dense, dense])
        self._counted += y.numel()
        self.unit = "token" if y.dim() > 1 else "sample"
        self._batches += 1

    def on_eval_end(self, trainer, prefix):
        if prefix not in self.prefixes:
            return None
        shards = all_gather_objects((self._counts, self._dense, self._counted))
        self._counts = self._dense = None
        counts = _merge([c for c, _, _ in shards])
        if counts is None:
            return None
        dense = _merge([d for _, d, _ in shards])
        self.report = energy.build_report(counts, self.profile, dense_counts=dense)
        self.counts, self.dense_counts = counts, dense
        self.samples = sum(n for _, _, n in shards)
        writer = trainer.tensorboard_writer
        if writer is not None:
            write_energy_report(writer, self.report, trainer.step, prefix=f"{prefix}_energy")
        return energy_metrics(self.report, self.samples, prefix, self.unit)
