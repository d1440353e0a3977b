"""Command-line entry points. ``spiking-moe-train`` and ``experiments/train.py`` run :func:`train_main`.

Read top to bottom, :func:`train_main` is the whole experiment: config -> data -> model ->
train -> test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed

from .config import ConfigError, config_to_dict, flatten_config, load_config
from .data import BatchLoader, build_datasets
from .factory import build_model
from .monitors import FiringRateMonitor, RoutingMonitor
from .plotting import plot_run
from .training import (
    CHECKPOINT_NAME,
    EnergyReportCallback,
    RouterBiasBalancing,
    Trainer,
    check_energy_profile,
    init_distributed,
    resolve_device,
    seed_everything,
)

__all__ = ["train_main"]

logger = logging.getLogger(__name__)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spiking-moe-train", description="Train one experiment from a TOML config."
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="experiments/configs/<name>.toml"
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--device", help="override train.device: auto, cpu, cuda, cuda:N")
    return parser.parse_args(argv)


def _write_energy_files(out: Path, report, samples: int, accuracy: float, name: str) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (accuracy vs energy, expert load)."""
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown())
    plot_run(report, accuracy, samples, out / "report.png", title=name)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on the test set, write the run folder. Returns the process exit code.

    Exit codes: 0 done; 2 bad config, unusable device or missing data; 128 + signal number
    when stopped by SIGINT/SIGTERM (a checkpoint was saved; rerun with ``--resume``).
    """
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        if args.device:
            train_config = dataclasses.replace(config.train, device=args.device)
            config = dataclasses.replace(config, train=train_config)
        resolve_device(config.train.device)
        if config.energy.enabled:
            check_energy_profile(config.energy.profile)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    out = args.out or Path("runs") / config.name
    if (out / CHECKPOINT_NAME).exists() and not args.resume:
        logger.error(
            "%s already holds a run; pass --resume to continue it or pick another --out", out
        )
        return 2

    dist_info = init_distributed(config.train.device)  # single process unless under torchrun
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress log
    try:
        data = build_datasets(config.data)
        shard = dict(rank=dist_info.rank, world_size=dist_info.world_size)
        batch, eval_batch, seed = (
            config.train.batch_size,
            config.train.eval_batch_size,
            config.train.seed,
        )
        train_loader = BatchLoader(data.train, batch, shuffle=True, seed=seed, **shard)
        val_loader = BatchLoader(data.val, eval_batch, **shard) if data.val else None
        test_loader = BatchLoader(data.test, eval_batch, **shard)

        seed_everything(seed)  # the model's initial weights
        model = build_model(
            config.model,
            in_features=data.num_features,
            num_classes=data.num_classes,
            num_steps=data.num_steps,
        )
        num_params = sum(p.numel() for p in model.parameters())
        logger.info("%s: %d parameters", type(model).__name__, num_params)
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))

        callbacks = [RouterBiasBalancing(), FiringRateMonitor(), RoutingMonitor()]
        energy_callback = None
        if config.energy.enabled:
            # Energy curves on validation during training; the final report on the test set.
            energy_callback = EnergyReportCallback(
                config.energy.profile, num_batches=config.energy.num_batches
            )
            callbacks.append(energy_callback)
        with Trainer(
            model,
            train_loader,
            config.train,
            out_dir=out,
            val_loader=val_loader,
            callbacks=callbacks,
            hparams=flatten_config(config),
            resume=args.resume,
            checkpoint_extra={"experiment": config_to_dict(config)},
        ) as trainer:
            result = trainer.fit()
            if result.interrupted:
                return 128 + (result.signal or 0)
            test = trainer.evaluate(test_loader, "test")
        if dist_info.is_main and energy_callback is not None and energy_callback.report:
            _write_energy_files(
                out,
                energy_callback.report,
                energy_callback.samples,
                test["test/accuracy"],
                config.name,
            )
        logger.info(
            "done in %.1f s: test accuracy %.4f; run folder %s (tensorboard --logdir %s)",
            result.wall_time_s,
            test["test/accuracy"],
            out,
            out.parent,
        )
        return 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
