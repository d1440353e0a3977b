"""Training loop: devices, seeds, AdamW with warmup + cosine, checkpoints that survive faults, DDP.

Objective per batch (``x`` ``[T, B, F]``, labels ``y`` ``[B]``)::

    loss = loss_fn(logits_BC, y_B) + aux_loss        (loss_fn: mean cross-entropy by default)

where the model returns logits ``[B, C]`` either directly or as the ``.logits`` field of an
output object whose optional ``.aux_loss`` (a scalar tensor: balancing and z-losses, already
weighted) is added (the ``ClassifierOutput`` contract of :mod:`spiking_moe.models`).

Learning rate at optimizer step ``s`` (0-based) of ``S`` with ``W`` warmup steps::

    lr(s) = lr * (s + 1) / W                                            s < W
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - W) / (S - W))) / 2)  otherwise ("cosine")

with ``m = min_lr_ratio``; ``"constant"`` keeps ``lr`` after warmup.

Checkpoints (``<out_dir>/checkpoint.pt``) hold the model, optimizer, scheduler, step, epoch,
position in the epoch, every RNG stream (torch CPU and CUDA, numpy, python; per rank) and the
configs, all as tensors and plain types so that ``torch.load(weights_only=True)`` reads them.
They are written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash while writing leaves the previous checkpoint intact. Since the data
order and encoding noise are functions of ``(seed, epoch, batch)`` (:class:`~spiking_moe.data.
BatchLoader`), resuming replays exactly what an uninterrupted run would have done.

Steps are counted from 1: "step 7" is the 7th optimizer step, and ``trainer.step`` is the number
of steps completed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "EnergyReportCallback",
    "RouterBiasBalancing",
    "DistInfo",
    "JSONLinesSink",
    "MetricSink",
    "NonFiniteLossError",
    "TensorBoardSink",
    "TrainResult",
    "Trainer",
    "check_energy_profile",
    "energy_profile_names",
    "write_energy_report",
    "energy_metrics",
    "measure_energy",
    "init_distributed",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "unpack_output",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. ``step`` is the 1-based optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------- devices, seeds


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...).

    Uses nccl when this process trains on CUDA, gloo otherwise. Returns the single-process
    :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1. Idempotent.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_cuda = resolve_device(device, local_rank).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": ``cuda:<local_rank>`` when CUDA is available, else CPU; "cuda" -> ``cuda:<local_rank>``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [version, list(mt), gauss_next],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    A failure at any point (including a kill between writing and replacing) leaves the file
    previously at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- metric sinks


@runtime_checkable
class MetricSink(Protocol):
    """Where metrics go. ``log_text`` and ``log_hparams`` are optional."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


class TensorBoardSink:
    """Scalars, text and hparams into a TensorBoard event file.

    Args:
        log_dir: the run folder.
        purge_step: on resume, hide events logged at or after this step by the interrupted run.

    Attributes:
        writer: the ``SummaryWriter``, for anything richer (histograms, custom layouts).
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, _scalar(name, value), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        def plain(v):
            return v if isinstance(v, (bool, int, float, str)) else str(v)

        experiment, start, end = hparams_summary(
            {k: plain(v) for k, v in hparams.items()},
            {k: _scalar(k, v) for k, v in metrics.items()},
        )
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JSONLinesSink:
    """One JSON object per line (``{"step": 10, "train/loss": 0.3, ...}``), appended, flushed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"step": step, **{k: _scalar(k, v) for k, v in metrics.items()}})

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._write({"step": step, "tag": tag, "text": text})

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self._write(
            {"hparams": dict(hparams), "metrics": {k: _scalar(k, v) for k, v in metrics.items()}}
        )

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- callbacks


class Callback:
    """Extension point: subclass and override what you need; every hook is a no-op here.

    Hooks receive the :class:`Trainer` (``trainer.model``, ``.device``, ``.step``, ``.epoch``,
    ``.dist``, ``.log``, ``.log_text``, ``.tensorboard_writer``, ``.all_reduce_sum``). Metrics
    returned by :meth:`on_eval_end` are logged with the evaluation's metrics and returned by
    :meth:`Trainer.evaluate`. Under DDP every rank runs every hook; reduce across ranks with
    ``trainer.all_reduce_sum`` before computing a metric (all ranks must call it).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has loaded its checkpoint)."""

    def on_train_batch_end(
        self,
        trainer: Trainer,
        batch: tuple[torch.Tensor, torch.Tensor],
        output: Any,
        loss: torch.Tensor,
    ) -> None:
        """After optimizer step ``trainer.step``; ``loss`` is detached; ``output`` is the model's."""

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


class RouterBiasBalancing(Callback):
    """Auxiliary-loss-free balancing: after every optimizer step, nudge each MoE router's
    selection bias from the load of the step's routing (``output.routing``), outside autograd.

    Under DDP each rank updates from its own shard's load and DDP broadcasts rank 0's buffers
    at the next forward, so rank 0's shard decides the bias.
    """

    def on_train_batch_end(self, trainer, batch, output, loss) -> None:
        routing = getattr(output, "routing", ())
        if routing:
            from .moe import update_router_biases

            with torch.no_grad():
                update_router_biases(trainer.model, routing)


def energy_profile_names() -> list[str]:
    """Names of the bundled hardware energy profiles."""
    import energy

    return energy.available_profiles()


def write_energy_report(writer, report, step: int, prefix: str) -> None:
    """Log an :class:`energy.EnergyReport` to a TensorBoard ``SummaryWriter`` under ``prefix``."""
    import energy.tensorboard

    energy.tensorboard.write_report(writer, report, step, prefix=prefix)


def check_energy_profile(name: str) -> None:
    """Raise ValueError naming the known profiles when ``name`` is not one of them."""
    import energy

    energy.get_profile(name)


def measure_energy(model: nn.Module, x_TBF: torch.Tensor, profile: str = "cmos45"):
    """Count one forward pass of ``model`` on ``x_TBF`` and price it under ``profile``.

    The dense-MoE baselines are counted for real: a copy of the model with every
    :class:`~spiking_moe.moe.SpikingMoE` in dense mode (every expert on every token) runs on
    the same input. Both run in eval mode (no router noise) without gradients.

    Returns:
        :class:`energy.EnergyReport`; energy per sample is ``report.totals.energy_pj / B``.
    """
    import copy

    import energy

    from .moe import set_dense

    dense_model = copy.deepcopy(model)
    if set_dense(dense_model, True) == 0:
        dense_model = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return energy.estimate(model, x_TBF, profile=profile, dense_model=dense_model)
    finally:
        model.train(was_training)


def energy_metrics(report, batch_size: int, prefix: str) -> dict[str, float]:
    """Scalars of an energy report: energy per sample (uJ) and the baseline ratios (firing
    rates come from :class:`~spiking_moe.monitors.FiringRateMonitor` and the report's own
    TensorBoard scalars)."""
    metrics = {f"{prefix}/energy/uJ_per_sample": report.totals.energy_pj / batch_size / 1e6}
    for baseline in report.baselines:
        metrics[f"{prefix}/energy/ratio_{baseline.name}"] = baseline.ratio
    return metrics


class EnergyReportCallback(Callback):
    """After each evaluation whose prefix is in ``prefixes``: count the energy of the model on
    (up to ``num_batches`` of) the evaluated inputs, write the report to TensorBoard (scalars,
    histograms, Markdown table, custom layout) and return energy per sample and ratios as
    metrics. The last report (and the number of samples it counted) is kept in ``self.report``
    (``self.samples``) for the run folder.

    Counting runs on rank 0 only (other ranks return no energy metrics).

    Args:
        profile: hardware profile name of :mod:`energy.profiles`.
        num_batches: evaluation batches to count (0 = all).
        prefixes: evaluation prefixes to report on (e.g. ``("test",)`` or ``("val", "test")``).
    """

    def __init__(self, profile: str = "cmos45", num_batches: int = 0, prefixes=("val", "test")):
        check_energy_profile(profile)
        self.profile = profile
        self.num_batches = num_batches
        self.prefixes = tuple(prefixes)
        self.report = None
        self.samples = 0  # batch size of the last counted pass
        self._inputs: list[torch.Tensor] = []

    def on_eval_start(self, trainer, prefix):
        self._inputs = []

    def on_eval_batch_end(self, trainer, prefix, batch, output):
        if prefix in self.prefixes and trainer.dist.is_main:
            if self.num_batches == 0 or len(self._inputs) < self.num_batches:
                self._inputs.append(batch[0].detach())

    def on_eval_end(self, trainer, prefix):
        if prefix not in self.prefixes or not trainer.dist.is_main or not self._inputs:
            return None
        x_TBF = torch.cat(self._inputs, dim=1)
        self._inputs = []
        self.report = measure_energy(trainer.model, x_TBF, self.profile)
        self.samples = x_TBF.shape[1]
        writer = trainer.tensorboard_writer
        if writer is not None:
            write_energy_report(writer, self.report, trainer.step, prefix=f"{prefix}_energy")
        return energy_metrics(self.report, x_TBF.shape[1], prefix)


# --------------------------------------------------------------------------- trainer


def unpack_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits [B, C], aux_loss or None)`` from a Tensor or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output, None
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "model must return logits [B, C] or an object with a .logits tensor "
            f"(and optional .aux_loss), got {type(output).__name__}"
        )
    return logits, getattr(output, "aux_loss", None)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    signal: int | None = None
    wall_time_s: float = 0.0
    checkpoint: Path | None = None


def _make_lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains a classifier on time-major batches; see the module docstring for the objective.

    Args:
        model: any ``nn.Module`` with ``forward(x_TBF)`` returning logits ``[B, C]`` or an
            object with ``.logits`` and optional ``.aux_loss`` (scalar tensor, added to the
            loss). MoE routers' auxiliary-loss-free bias updates run in the
            :class:`RouterBiasBalancing` callback.
        train_loader: a :class:`~spiking_moe.data.BatchLoader` (exact resume, sharding checked)
            or any re-iterable of ``(x_TBF, y_B)`` with ``len`` (resume then skips batches).
        config: :class:`~spiking_moe.config.TrainConfig`.
        out_dir: run folder for the checkpoint and, on rank 0, the default sinks
            (TensorBoard events and ``metrics.jsonl``). None: no checkpoints, no default sinks.
        val_loader: evaluated every ``config.eval_every`` steps or at each epoch end.
        sinks: metric sinks; None gives the defaults above. Only rank 0 logs.
        callbacks: :class:`Callback` instances (energy reports, routing statistics, ...).
        loss_fn: ``(logits_BC, y_B) -> scalar``, mean over the batch; cross-entropy if None.
        hparams: flat ``{name: value}`` written with the final metrics by :meth:`close`.
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists (a warning and a fresh
            start if not).
        checkpoint_extra: plain-typed data stored in every checkpoint under ``"extra"``
            (e.g. the experiment config).

    Example:
        >>> from spiking_moe.config import TrainConfig
        >>> from spiking_moe.data import BatchLoader, InMemoryDataset
        >>> data = InMemoryDataset(torch.rand(32, 5), torch.arange(32) % 2, encoding="rate",
        ...                        num_steps=4, num_classes=2)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(5, 2)
        ...     def forward(self, x_TBF):
        ...         return self.fc(x_TBF).mean(0)  # logits [B, C]
        >>> config = TrainConfig(max_steps=3, batch_size=8, device="cpu", progress=False)
        >>> result = Trainer(Net(), BatchLoader(data, 8, shuffle=True), config).fit()
        >>> result.step, result.interrupted
        (3, False)
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        config: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        val_loader: Iterable | None = None,
        sinks: Sequence[MetricSink] | None = None,
        callbacks: Sequence[Callback] = (),
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        hparams: Mapping[str, Any] | None = None,
        resume: bool = False,
        checkpoint_extra: Mapping[str, Any] | None = None,
    ):
        self.config = config
        self.dist = init_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME if self.out_dir else None
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.callbacks = list(callbacks)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.hparams = dict(hparams or {})
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self._check_sharding(train_loader, "train_loader")
        if val_loader is not None:
            self._check_sharding(val_loader, "val_loader")

        self.use_amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.use_amp:
            logger.warning(
                "train.amp is bf16 autocast on CUDA only; training in fp32 on %s", self.device
            )

        self.model = model.to(self.device)
        # Activity regularisation: how far each spiking neuron module's mean firing rate in the
        # training forward pass exceeds a target, weighted into the loss (fewer spikes, less
        # energy). A hinge, because pushing rates to zero silences the network and, with it,
        # the surrogate gradients it learns from.
        self._spike_rates: list[torch.Tensor] = []
        self._activity_hooks = []
        if config.spike_rate_penalty > 0:
            from .neurons import LIF

            def record_rate(module, args, output):
                if module.training:
                    self._spike_rates.append(output.float().mean())

            self._activity_hooks = [
                m.register_forward_hook(record_rate)
                for m in self.model.modules()
                if isinstance(m, LIF)
            ]
            if not self._activity_hooks:
                raise ValueError("train.spike_rate_penalty > 0 but the model has no LIF module")
        forward_module: nn.Module = self.model
        if self.dist.world_size > 1:
            forward_module = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        self._eval_forward: Callable = self.model
        self._train_forward: Callable = forward_module
        if config.compile:
            self._train_forward = torch.compile(forward_module)
            self._eval_forward = torch.compile(self.model)

        self.steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ValueError("train_loader yields no batches (dataset smaller than one batch?)")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _make_lr_lambda(config, self.total_steps)
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._stop_requested = False
        self._last_checkpoint_step: int | None = None

        resumed = False
        if resume:
            if self.checkpoint_path is None:
                raise ValueError("resume=True needs out_dir (where the checkpoint lives)")
            if self.checkpoint_path.is_file():
                self._load(load_checkpoint(self.checkpoint_path))
                resumed = True
            else:
                logger.warning(
                    "resume: no checkpoint at %s; starting from step 0", self.checkpoint_path
                )
        if not resumed:
            seed_everything(config.seed + self.dist.rank)

        if sinks is None:
            sinks = []
            if self.out_dir is not None and self.dist.is_main:
                sinks = [
                    TensorBoardSink(self.out_dir, purge_step=self.step + 1 if resumed else None),
                    JSONLinesSink(self.out_dir / "metrics.jsonl"),
                ]
        self.sinks = list(sinks) if self.dist.is_main else []

    # ------------------------------------------------------------------ public helpers

    @property
    def tensorboard_writer(self):
        """The ``SummaryWriter`` of the first :class:`TensorBoardSink` (None if there is none)."""
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                return sink.writer
        return None

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Send scalar metrics to every sink (rank 0 only) and remember their latest values."""
        metrics = {k: _scalar(k, v) for k, v in metrics.items()}
        self.metrics.update(metrics)
        for sink in self.sinks:
            sink.log(metrics, self.step if step is None else step)

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """Send text (e.g. a Markdown report) to every sink that takes text."""
        for sink in self.sinks:
            if hasattr(sink, "log_text"):
                sink.log_text(tag, text, self.step if step is None else step)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (identity in a single process). All ranks must call it."""
        if self.dist.world_size > 1:
            tensor = tensor.to(self.device).clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (as on SIGINT/SIGTERM)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        rng = _rng_state()
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
        else:
            rng_per_rank = [rng]
        return {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_per_rank,
            "train_config": asdict(self.config),
            "metrics": dict(self.metrics),
            "extra": self.checkpoint_extra,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``<out_dir>/checkpoint.pt`` (rank 0; all ranks must call under DDP)."""
        if self.checkpoint_path is None:
            return None
        state = self.state_dict()  # collective under DDP: every rank takes part
        if self.dist.is_main:
            save_checkpoint(state, self.checkpoint_path)
            logger.info("step %d: checkpoint written to %s", self.step, self.checkpoint_path)
        if self.dist.world_size > 1:
            dist.barrier()
        self._last_checkpoint_step = self.step
        return self.checkpoint_path

    def _load(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(
                f"{self.checkpoint_path}: unknown checkpoint format {state.get('format')!r}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.metrics = dict(state.get("metrics", {}))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            _set_rng_state(rng[self.dist.rank])
        else:
            logger.warning(
                "checkpoint was written by %d processes, resuming with %d: RNG streams restart",
                len(rng),
                self.dist.world_size,
            )
            seed_everything(self.config.seed + self.dist.rank + self.step)
        self._last_checkpoint_step = self.step
        saved_config = state.get("train_config", {})
        changed = {
            k: (saved_config[k], v)
            for k, v in asdict(self.config).items()
            if saved_config.get(k) != v
        }
        if changed:
            logger.warning("resuming with changed train config fields (saved, now): %s", changed)
        logger.info(
            "resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, self.epoch
        )

    # ------------------------------------------------------------------ loop

    def _check_sharding(self, loader, name: str) -> None:
        world = getattr(loader, "world_size", None)
        if world is not None and self.dist.world_size > 1 and world != self.dist.world_size:
            raise ValueError(
                f"{name} is sharded for world_size={world} but the job has "
                f"{self.dist.world_size} processes; build it with rank and world_size"
            )

    def _epoch_batches(self, epoch: int, start: int):
        loader = self.train_loader
        if hasattr(loader, "iter_epoch"):
            return loader.iter_epoch(epoch, start)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        iterator = iter(loader)
        for _ in range(start):
            next(iterator, None)
        return iterator

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(
            self.device, non_blocking=non_blocking
        )

    def _signal_handler(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt(f"second signal {signum}: stopping without a checkpoint")
        self._stop_signal = signum
        logger.warning("signal %d: will save a checkpoint and stop after this step", signum)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._signal_handler)
        return previous

    def _train_step(self, batch) -> tuple[Any, torch.Tensor, torch.Tensor]:
        x, y = self._to_device(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            output = self._train_forward(x)
            logits, aux = unpack_output(output)
            if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
                raise ValueError(
                    f"model logits must be [B, C] with B = {y.shape[0]}, got {tuple(logits.shape)}"
                )
            ce = self.loss_fn(logits.float(), y)
            loss = ce if aux is None else ce + aux.float()
            if self._spike_rates:
                excess = torch.stack(self._spike_rates) - self.config.spike_rate_target
                self._spike_rates.clear()
                penalty = self.config.spike_rate_penalty * torch.relu(excess).mean()
                loss = loss + penalty
                aux = penalty if aux is None else aux + penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.scheduler.step()
        correct = (logits.detach().argmax(-1) == y).sum()
        return (
            output,
            loss.detach(),
            torch.stack(
                [
                    loss.detach().float(),
                    ce.detach().float(),
                    (
                        aux.detach().float()
                        if aux is not None
                        else torch.zeros((), device=self.device)
                    ),
                    grad_norm.detach().float().reshape(()),
                    correct.float(),
                    torch.full((), float(y.shape[0]), device=self.device),
                ]
            ),
        )

    def _sync(self, bad: torch.Tensor) -> tuple[int, float, bool]:
        """Agree across ranks on (first non-finite step or -1, its loss, stop?)."""
        stop = self._stop_signal is not None or self._stop_requested
        if self.dist.world_size == 1:
            return int(bad[0].item()), float(bad[1].item()), stop
        # MAX over (-first bad step, stop) gives the earliest bad step on any rank.
        neg_first = torch.where(bad[0] < 0, torch.full_like(bad[0], -math.inf), -bad[0])
        votes = torch.stack([neg_first, torch.full_like(bad[0], float(stop))])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        first, stop_any = votes.tolist()
        return (-1 if math.isinf(first) else int(-first)), float(bad[1].item()), bool(stop_any)

    def fit(self) -> TrainResult:
        """Train until ``total_steps`` (or a signal / :meth:`request_stop`); evaluate; checkpoint.

        Returns:
            :class:`TrainResult`; ``interrupted`` with ``signal`` set when stopped early.

        Raises:
            NonFiniteLossError: the loss was NaN/Inf at some step; no checkpoint is written
                after that step, so the last good one stays on disk.
        """
        cfg = self.config
        start_time = time.perf_counter()
        start_step = self.step
        # Syncing with the host every step costs nothing on CPU; on CUDA it would stall the
        # launch queue, so non-finite checks and stop votes happen every log_every steps there.
        sync_every = 1 if self.device.type == "cpu" else cfg.log_every
        bad = torch.tensor([-1.0, 0.0], device=self.device, dtype=torch.float64)
        window = torch.zeros(6, device=self.device)
        window_steps = 0
        previous_handlers = self._install_signal_handlers()
        progress = self._progress_bar()
        result: TrainResult | None = None
        try:
            self.model.train()
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while self.step < self.total_steps:
                for batch in self._epoch_batches(self.epoch, self.batch_in_epoch):
                    output, loss, stats = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    with torch.no_grad():
                        first_bad = ~torch.isfinite(loss) & (bad[0] < 0)
                        here = torch.stack([torch.full_like(bad[0], self.step), loss.double()])
                        bad = torch.where(first_bad, here, bad)
                    window += stats
                    window_steps += 1
                    for callback in self.callbacks:
                        callback.on_train_batch_end(self, batch, output, loss)
                    progress.update(1)
                    if self.step % sync_every == 0 or self.step == self.total_steps:
                        bad_step, bad_loss, stop = self._sync(bad)
                        if bad_step >= 0:
                            raise self._non_finite(bad_step, bad_loss)
                        if self.step % cfg.log_every == 0:
                            self._log_window(window, window_steps, progress, start_step, start_time)
                            window.zero_()
                            window_steps = 0
                        if stop:
                            result = self._interrupted(start_time)
                            return result
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._evaluate_and_checkpoint()
                    elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                else:  # the loader is exhausted: end of epoch
                    self._end_epoch()
                    continue
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch()
            bad_step, bad_loss, _ = self._sync(bad)
            if bad_step >= 0:
                raise self._non_finite(bad_step, bad_loss)
            if window_steps:
                self._log_window(window, window_steps, progress, start_step, start_time)
            if self._last_checkpoint_step != self.step:
                if self.val_loader is not None:
                    self.evaluate(self.val_loader, "val")
                self.save_checkpoint()
            result = TrainResult(
                step=self.step,
                epoch=self.epoch,
                metrics=dict(self.metrics),
                wall_time_s=time.perf_counter() - start_time,
                checkpoint=self.checkpoint_path if self._last_checkpoint_step is not None else None,
            )
            return result
        finally:
            progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if result is not None:
                for callback in self.callbacks:
                    callback.on_fit_end(self, result)

    def _interrupted(self, start_time: float) -> TrainResult:
        self.save_checkpoint()
        logger.warning(
            "stopped at step %d (%s); checkpoint %s; continue with resume",
            self.step,
            f"signal {self._stop_signal}" if self._stop_signal is not None else "stop requested",
            self.checkpoint_path,
        )
        return TrainResult(
            step=self.step,
            epoch=self.epoch,
            metrics=dict(self.metrics),
            interrupted=True,
            signal=self._stop_signal,
            wall_time_s=time.perf_counter() - start_time,
            checkpoint=self.checkpoint_path,
        )

    def _non_finite(self, bad_step: int, bad_loss: float) -> NonFiniteLossError:
        if self._last_checkpoint_step is None:
            kept = "no checkpoint had been written"
        else:
            kept = f"the last good checkpoint {self.checkpoint_path} (step {self._last_checkpoint_step}) is kept"
        return NonFiniteLossError(
            f"non-finite training loss ({bad_loss}) at step {bad_step}; training stopped and {kept}. "
            "Lower train.lr, enable train.grad_clip or check the data.",
            step=bad_step,
        )

    def _progress_bar(self):
        from tqdm.auto import tqdm

        enabled = self.config.progress and self.dist.is_main and sys.stderr.isatty()
        return tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
        )

    def _log_window(self, window, steps, progress, start_step, start_time) -> None:
        # Sums over ranks (all ranks reach the same log steps): means over the global batch.
        loss, ce, aux, grad_norm, correct, count = self.all_reduce_sum(window).tolist()
        steps *= self.dist.world_size
        elapsed = time.perf_counter() - start_time
        metrics = {
            "train/loss": loss / steps,
            "train/cross_entropy": ce / steps,
            "train/aux_loss": aux / steps,
            "train/grad_norm": grad_norm / steps,
            "train/accuracy": correct / max(count, 1.0),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "time/steps_per_second": (self.step - start_step) / max(elapsed, 1e-9),
        }
        self.log(metrics)
        progress.set_postfix(
            loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.3f}"
        )

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        if not self.config.eval_every:
            self._evaluate_and_checkpoint()

    def _evaluate_and_checkpoint(self) -> None:
        if self.val_loader is not None:
            self.evaluate(self.val_loader, "val")
        self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """Loss and accuracy on ``loader`` (summed over ranks), plus callbacks' metrics; logged.

        Under DDP give each rank its shard (``BatchLoader(..., rank, world_size, pad=False)``).
        """
        was_training = self.model.training
        self.model.eval()
        for callback in self.callbacks:
            callback.on_eval_start(self, prefix)
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for batch in loader:
            x, y = self._to_device(batch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                output = self._eval_forward(x)
            logits, _ = unpack_output(output)
            logits = logits.float()
            totals += torch.stack(
                [
                    self.loss_fn(logits, y).double() * y.shape[0],
                    (logits.argmax(-1) == y).sum().double(),
                    torch.full((), float(y.shape[0]), device=self.device, dtype=torch.float64),
                ]
            )
            for callback in self.callbacks:
                callback.on_eval_batch_end(self, prefix, (x, y), output)
        totals = self.all_reduce_sum(totals)
        loss_sum, correct, count = totals.tolist()
        if count == 0:
            raise ValueError(f"evaluation loader for {prefix!r} yielded no samples")
        metrics = {f"{prefix}/loss": loss_sum / count, f"{prefix}/accuracy": correct / count}
        for callback in self.callbacks:
            extra = callback.on_eval_end(self, prefix)
            if extra:
                metrics.update({k: _scalar(k, v) for k, v in extra.items()})
        self.log(metrics)
        logger.info(
            "step %d epoch %d: %s",
            self.step,
            self.epoch,
            ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.count("/") == 1),
        )
        self.model.train(was_training)
        return metrics

    def close(self) -> None:
        """Write hparams with the latest metrics, close the sinks and take the trainer's
        hooks off the model (it stays usable, and hook-free, after training)."""
        for handle in self._activity_hooks:
            handle.remove()
        self._activity_hooks = []
        for sink in self.sinks:
            if self.hparams and hasattr(sink, "log_hparams"):
                final = {k: v for k, v in self.metrics.items() if k.startswith(("val/", "test/"))}
                sink.log_hparams(self.hparams, final)
            sink.close()
        self.sinks = []

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
