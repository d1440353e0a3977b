"""The energy of a spiking_moe model: its forward passes counted by :mod:`energy` (with the
dense-MoE twin, and across processes under expert parallelism), priced under a profile, and
turned into metrics and TensorBoard entries.

Inside ``spiking_moe`` only the ``training`` package talks to :mod:`energy`; the callbacks, the
trainer and the checkpoint evaluation (:mod:`spiking_moe.evaluation`) use these helpers.

Energy per unit (a sample, or a token of a sequence model) of a report counted on ``n`` units::

    uJ_per_unit = report.totals.energy_pj / n / 1e6

and each baseline's ratio is its energy over the model's (above 1: the model uses less).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

import energy
import energy.tensorboard

from ..config import ConfigError
from ..moe import SpikingMoE, swapped_strategies
from ..parallel import is_expert_parallel
from .distributed import all_gather_objects

__all__ = [
    "check_energy_profile",
    "count_energy",
    "count_operations_parallel",
    "energy_metrics",
    "energy_profile_names",
    "expert_parallel_counts",
    "measure_energy",
    "merge_present_counts",
    "profile_precision",
    "write_energy_report",
]


def energy_profile_names() -> list[str]:
    """Names of the bundled hardware energy profiles.

    Returns:
        The names that :func:`check_energy_profile` accepts (``"cmos45"``, ``"loihi"``, ...),
        in the order of the bundled ``profiles.toml``
        (:func:`energy.profiles.available_profiles`).
    """
    return energy.available_profiles()


def _profile(name: str) -> energy.EnergyProfile:
    try:
        return energy.get_profile(name)
    except ValueError as error:  # a name the user gave: a usage error, not a bug
        raise ConfigError(str(error)) from None


def check_energy_profile(name: str) -> None:
    """Check that ``name`` is a bundled energy profile (:func:`energy_profile_names`).

    Args:
        name: the profile name a user gave (e.g. ``EnergyReportCallback(profile=...)``).

    Raises:
        ConfigError: ``name`` is not a bundled profile; the message names the known ones
            (a :class:`~spiking_moe.config.ConfigError` is a ValueError).
    """
    _profile(name)


def profile_precision(name: str) -> tuple[int, int]:
    """The precision the prices of a bundled energy profile assume.

    Args:
        name: a bundled profile's name (:func:`energy_profile_names`).

    Returns:
        ``(weight_bits, activation_bits)``.

    Raises:
        ConfigError: ``name`` is not a bundled profile (:func:`check_energy_profile`).
    """
    profile = _profile(name)
    return profile.weight_bits, profile.activation_bits


def write_energy_report(writer, report, step: int, prefix: str) -> None:
    """Log an energy report to TensorBoard: its scalars, the expert load and firing-rate
    histograms, the Markdown table and a custom-scalars layout
    (:func:`energy.tensorboard.write_report`).

    Args:
        writer: a TensorBoard ``SummaryWriter`` (not flushed here).
        report: the :class:`energy.report.EnergyReport` to log.
        step: the global step the entries are logged at.
        prefix: the tags' prefix and the custom-scalars category, e.g. ``"val_energy"``.
    """
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
    made. Both passes run one call per expert, which the counter's hooks see. Both run in the
    model's current mode without gradients; call ``model.eval()`` first for noise-free routing.

    A model whose input is not time-major (a language model's token ids ``[B, S]``) says how
    many steps it runs per token in a ``num_steps`` attribute; otherwise ``T`` is dim 0 of
    ``x_TBF``.

    Under expert parallelism (:mod:`spiking_moe.parallel`) this is collective (both passes
    exchange tokens: every process calls it, as many times), ``x_TBF`` is this process's shard
    and the counts are its share, in single-process form (:func:`expert_parallel_counts`):
    the shared modules on its tokens, its experts on every process's tokens. Merged over the
    processes (:func:`energy.merge_counts` of every process's counts, as
    :class:`~spiking_moe.training.EnergyReportCallback` does) they are the counts of one
    process running the same model on each shard in turn (:func:`count_operations_parallel`
    for one pass).

    Args:
        model: the counted model, in the mode to count it in.
        x_TBF: one batch of its input (this process's shard under expert parallelism):
            time-major ``[T, B, F]``, or token ids ``[B, S]`` for a model with ``num_steps``.

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

    Args:
        model: the measured model; it runs in eval mode for the count and is put back in its
            own mode afterwards.
        x_TBF: one batch of its input, as for :func:`count_energy` (time-major
            ``[T, B, F]``, or token ids ``[B, S]``).
        profile: the hardware profile that prices the counts: a bundled name
            (:func:`energy_profile_names`) or an :class:`energy.profiles.EnergyProfile`.

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
        counts, dense = (
            merge_present_counts([c for c, _ in shards]),
            merge_present_counts([d for _, d in shards]),
        )
    return energy.build_report(counts, profile, dense_counts=dense)


def energy_metrics(report, samples: int, prefix: str, unit: str = "sample") -> dict[str, float]:
    """Scalars of an energy report: energy per ``unit`` (uJ; ``samples`` of them, "sample" or,
    for a sequence model, "token") and the baseline ratios (firing rates come from
    :class:`~spiking_moe.training.FiringRateMonitor` and the report's own TensorBoard scalars).

    Args:
        report: an :class:`energy.report.EnergyReport` of the counted passes.
        samples: the units the report counted (samples, or a sequence model's tokens); not 0.
        prefix: the metric names' prefix ("val", "test", ...).
        unit: "sample" or "token": what ``samples`` counts, named in the energy metric.

    Returns:
        ``{f"{prefix}/energy/uJ_per_{unit}": ..., f"{prefix}/energy/ratio_{baseline}": ...}``,
        one ratio per baseline of the report (its energy over the model's, module docstring).
    """
    metrics = {f"{prefix}/energy/uJ_per_{unit}": report.totals.energy_pj / samples / 1e6}
    for baseline in report.baselines:
        metrics[f"{prefix}/energy/ratio_{baseline.name}"] = baseline.ratio
    return metrics


def merge_present_counts(
    counts: Sequence[energy.OperationCounts | None],
) -> energy.OperationCounts | None:
    """:func:`energy.merge_counts` of the counts that are not None (None when none is)."""
    present = [c for c in counts if c is not None]
    return energy.merge_counts(*present) if present else None
