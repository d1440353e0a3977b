"""Sweeps: one experiment per (number of experts, k), each over one or more seeds, and one
table and plot comparing them.

Run folders: ``<out>/E<E>_k<k>`` (one seed) or ``<out>/E<E>_k<k>/seed<s>`` (several). The
table (:func:`sweep_table`) has one row per pair: mean ± std over the seeds of the test
accuracy, energy per sample, the baseline ratios (above 1: the spiking MoE uses less), the
firing rate, the worst layer's max/mean expert load and the wall time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig
from .experiment import (
    ExperimentResult,
    finished_result,
    run_experiment,
    run_seeds,
    summarize,
    summary_table,
)

__all__ = ["run_sweep", "sweep_configs", "sweep_table"]

logger = logging.getLogger(__name__)


def sweep_configs(
    base: ExperimentConfig, experts: Sequence[int], ks: Sequence[int]
) -> list[ExperimentConfig]:
    """One config per valid (E, k) pair; invalid pairs (k > E, ...) are skipped with a note."""
    if base.model.kind != "moe":
        raise ConfigError(
            f"a sweep varies the MoE: model.kind must be 'moe', got {base.model.kind!r}"
        )
    configs = []
    for num_experts in experts:
        for k in ks:
            try:
                moe = base.model.moe.replace(num_experts=num_experts, k=k)
            except ConfigError as exc:
                logger.warning("skipping E=%d k=%d: %s", num_experts, k, exc)
                continue
            name = f"{base.name}_E{num_experts}_k{k}"
            model = base.model.replace(moe=moe)
            configs.append(dataclasses.replace(base, name=name, model=model))
    return configs


def run_folder(out: str | Path, config: ExperimentConfig) -> Path:
    """Where the sweep runs ``config``."""
    return Path(out) / f"E{config.model.moe.num_experts}_k{config.model.moe.k}"


def run_sweep(
    configs: Sequence[ExperimentConfig],
    out: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    reuse_finished: bool = False,
) -> tuple[list[dict[str, Any]], int | None]:
    """:func:`~spiking_moe.experiment.run_experiment` for each config (and each seed).

    Args:
        configs: from :func:`sweep_configs`.
        out: the sweep folder.
        seeds: ``train.seed`` values; None runs each config once with its own seed.
        reuse_finished: read back runs that already finished in their folders instead of
            training them again (an interrupted sweep, or seeds trained in parallel processes).

    Returns:
        ``(rows, signal)``: one row per finished pair (``num_experts``, ``k``, ``label``,
        ``run`` (its folder) and the :func:`~spiking_moe.experiment.summarize` keys) and the
        signal number that interrupted the sweep (None when every run finished).
    """
    rows = []
    for config in configs:
        folder = run_folder(out, config)
        logger.info("sweep: %s -> %s", config.name, folder)
        results: list[ExperimentResult]
        if seeds is None:
            done = finished_result(folder) if reuse_finished else None
            results = [done or run_experiment(config, folder)]
        else:
            results, _ = run_seeds(config, folder, seeds, reuse_finished=reuse_finished)
        if results[-1].interrupted:
            return rows, results[-1].signal or 0
        rows.append(
            {
                "label": f"E={config.model.moe.num_experts} k={config.model.moe.k}",
                "num_experts": config.model.moe.num_experts,
                "k": config.model.moe.k,
                "run": str(folder),
                **summarize(results),
            }
        )
    return rows, None


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_sweep` rows: one line per (E, k); ratios are baseline
    energy / this model's energy (above 1: the spiking MoE saves energy)."""
    return summary_table(rows, leading=(("num_experts", "E"), ("k", "k")))
