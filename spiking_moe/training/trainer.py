"""The training loop: one flat loop over optimizer steps, with gradient accumulation and DDP.

Objective per micro-batch (``x`` ``[T, B, F]``, labels ``y`` ``[B]``)::

    loss = loss_fn(logits_BC, y_B) + aux_loss + spike_rate_penalty * activity_penalty

where the model returns logits ``[B, C]`` (a sequence model: ``[B, S, C]`` with targets
``[B, S]``, every position one prediction: the loss is the mean over positions, accuracy
counts positions, and evaluation also logs ``<prefix>/bpb``, the cross-entropy in bits per
position, ``loss / ln 2``: bits per byte for the byte-level text data) either directly or as the ``.logits`` field of an
output object whose optional ``.aux_loss`` (a scalar tensor: balancing and z-losses, already
weighted) is added (the ``ClassifierOutput`` contract of :mod:`spiking_moe.models`). With
``train.spike_rate_penalty > 0`` the model must also report its ``.activity``
(:class:`~spiking_moe.activity.Activity`), and::

    activity_penalty = mean over populations p that ran of max(0, rate_p - spike_rate_target)

A hinge, because pushing rates to zero silences the network and, with it, the surrogate
gradients it learns from (:func:`activity_penalty`).

One optimizer step takes ``train.grad_accum_steps`` consecutive batches of the loader and
backpropagates each micro-batch's loss divided by their number, so the step's gradient is
that of the mean loss over them (with a mean loss, the gradient of one batch of the combined
size). Under DDP, gradients are all-reduced on the last micro-batch only.

Learning rate at optimizer step ``s`` (0-based) of ``S`` with ``W`` warmup steps::

    lr(s) = lr * (s + 1) / W                                            s < W
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - W) / (S - W))) / 2)  otherwise ("cosine")

with ``m = min_lr_ratio``; ``"constant"`` keeps ``lr`` after warmup.

Checkpoints (``<out_dir>/checkpoint.pt``, :mod:`~spiking_moe.training.checkpoint`) hold the
model, optimizer, scheduler, step, epoch, position in the epoch, every RNG stream (per rank)
and the configs. Since the data order and encoding noise are functions of
``(seed, epoch, batch)`` (:class:`~spiking_moe.data.BatchLoader`), resuming replays exactly
what an uninterrupted run would have done.

Steps are counted from 1: "step 7" is the 7th optimizer step, and ``trainer.step`` is the number
of steps completed. An epoch is ``len(train_loader) // grad_accum_steps`` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..activity import Activity
from ..config import TrainConfig
from ..quantization import prepare_qat
from .callbacks import Callback, check_callback
from .checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import all_gather_objects, all_reduce_sum, init_distributed, resolve_device
from .sinks import JSONLinesSink, MetricSink, TensorBoardSink, as_scalar

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "activity_penalty",
    "unpack_output",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. ``step`` is the 1-based optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


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


def activity_penalty(activity: Activity, target: float) -> torch.Tensor:
    """``mean over populations that ran of max(0, rate - target)`` (a differentiable scalar).

    Populations with no updates in the call (an expert that got no tokens) are left out, so
    idle experts neither dilute the penalty nor count as silent.
    """
    ran = activity.updates > 0
    excess = torch.relu(activity.rates() - target) * ran
    return excess.sum() / ran.sum().clamp_min(1)


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
            object with ``.logits``, optional ``.aux_loss`` (scalar tensor, added to the
            loss), ``.routing`` (read by the routing callbacks) and ``.activity`` (read by
            the activity penalty and :class:`~spiking_moe.training.FiringRateMonitor`).
            The trainer never hooks into the model.
        train_loader: a :class:`~spiking_moe.data.BatchLoader` (exact resume, sharding checked)
            or any re-iterable of ``(x_TBF, y_B)`` with ``len`` (resume then skips batches).
        config: :class:`~spiking_moe.config.TrainConfig`.
        out_dir: run folder for the checkpoint and, on rank 0, the default sinks
            (TensorBoard events and ``metrics.jsonl``). None: no checkpoints, no default sinks.
        val_loader: evaluated every ``config.eval_every`` steps or at each epoch end.
        sinks: metric sinks; None gives the defaults above. Only rank 0 logs.
        callbacks: :class:`~spiking_moe.training.Callback` instances (router balancing,
            monitors, energy reports, ...).
        loss_fn: ``(logits_BC, y_B) -> scalar``, mean over the batch; cross-entropy if None.
        hparams: flat ``{name: value}`` written with the final metrics by :meth:`close`.
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists (a warning and a fresh
            start if not). A damaged checkpoint raises
            :class:`~spiking_moe.training.CheckpointError` naming the intact previous one.
        resume_from: continue from this checkpoint file instead (e.g. ``checkpoint.prev.pt``);
            later checkpoints are still written to ``out_dir``.
        checkpoint_extra: plain-typed data stored in every checkpoint under ``"extra"``
            (e.g. the experiment config).

    Example:
        >>> import torch
        >>> from torch import nn
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
        resume_from: str | Path | None = None,
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
        for callback in self.callbacks:
            check_callback(callback)
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

        if config.quantize_bits:
            # In place, so the caller's model is the one trained and its state_dict keys stay.
            model = prepare_qat(model, config.quantize_bits, inplace=True)
        self.model = model.to(self.device)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        forward_module: nn.Module = self.model
        if self.dist.world_size > 1:
            self._ddp = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
            forward_module = self._ddp
        self._eval_forward: Callable = self.model
        self._train_forward: Callable = forward_module
        if config.compile:
            self._train_forward = torch.compile(forward_module)
            self._eval_forward = torch.compile(self.model)

        batches = len(train_loader)  # type: ignore[arg-type]
        accum = config.grad_accum_steps
        self.steps_per_epoch = batches // accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train_loader yields {batches} batches per epoch, fewer than "
                f"train.grad_accum_steps = {accum} (dataset smaller than one step?)"
            )
        if batches % accum:
            logger.warning(
                "train_loader has %d batches per epoch, not a multiple of grad_accum_steps=%d: "
                "the last %d of each epoch are skipped",
                batches,
                accum,
                batches % accum,
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _make_lr_lambda(config, self.total_steps)
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # loader batches consumed in the current epoch
        self.metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._stop_requested = False
        self._last_checkpoint_step: int | None = None

        source = self._resume_source(resume, resume_from)
        if source is not None:
            self._load(load_checkpoint(source), source)
        else:
            seed_everything(config.seed + self.dist.rank)

        if sinks is None:
            sinks = []
            if self.out_dir is not None and self.dist.is_main:
                sinks = [
                    TensorBoardSink(self.out_dir, purge_step=self.step + 1 if source else None),
                    JSONLinesSink(self.out_dir / "metrics.jsonl"),
                ]
        self.sinks = list(sinks) if self.dist.is_main else []

    def _resume_source(self, resume: bool, resume_from: str | Path | None) -> Path | None:
        """The checkpoint to continue from, or None for a fresh start."""
        if resume_from is not None:
            path = Path(resume_from)
            if not path.is_file():
                raise FileNotFoundError(f"resume_from: no checkpoint at {path}")
            return path
        if not resume:
            return None
        if self.checkpoint_path is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint lives)")
        if self.checkpoint_path.is_file():
            return self.checkpoint_path
        logger.warning("resume: no checkpoint at %s; starting from step 0", self.checkpoint_path)
        return None

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
        metrics = {k: as_scalar(k, v) for k, v in metrics.items()}
        self.metrics.update(metrics)
        for sink in self.sinks:
            sink.log(metrics, self.step if step is None else step)

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """Send text (e.g. a Markdown report) to every sink that takes text."""
        for sink in self.sinks:
            if hasattr(sink, "log_text"):
                sink.log_text(tag, text, self.step if step is None else step)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, on this trainer's device (identity in a single process).
        All ranks must call it."""
        return all_reduce_sum(tensor, self.device)

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (as on SIGINT/SIGTERM)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (collective under DDP: every rank must call it)."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": all_gather_objects(rng_state()),
            "train_config": asdict(self.config),
            "metrics": dict(self.metrics),
            "extra": self.checkpoint_extra,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``<out_dir>/checkpoint.pt`` (rank 0; all ranks must call under DDP)."""
        if self.checkpoint_path is None:
            return None
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(state, self.checkpoint_path)
            logger.info("step %d: checkpoint written to %s", self.step, self.checkpoint_path)
        if self.dist.world_size > 1:
            dist.barrier()
        self._last_checkpoint_step = self.step
        return self.checkpoint_path

    def _load(self, state: Mapping[str, Any], source: Path) -> None:
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: unknown checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.metrics = dict(state.get("metrics", {}))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
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
            if k in saved_config and saved_config[k] != v
        }
        if changed:
            logger.warning("resuming with changed train config fields (saved, now): %s", changed)
        logger.info("resumed from %s at step %d (epoch %d)", source, self.step, self.epoch)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Train until ``total_steps`` (or a signal / :meth:`request_stop`); evaluate; checkpoint.

        Returns:
            :class:`TrainResult`; ``interrupted`` with ``signal`` set when stopped early.

        Raises:
            NonFiniteLossError: the loss was NaN/Inf at some step; no checkpoint is written
                after that step, so the last good one stays on disk.
        """
        cfg = self.config
        accum = cfg.grad_accum_steps
        start_time, start_step = time.perf_counter(), self.step
        # A host sync every step costs nothing on CPU; on CUDA it would stall the launch
        # queue, so non-finite checks and stop votes happen every log_every steps there.
        sync_every = 1 if self.device.type == "cpu" else cfg.log_every
        first_bad = torch.tensor([-1.0, 0.0], device=self.device, dtype=torch.float64)
        window = torch.zeros(6, device=self.device)  # running sums of _step_stats
        window_steps = 0
        batches: Iterator | None = None
        result: TrainResult | None = None
        previous_handlers = self._install_signal_handlers()
        progress = self._progress_bar()
        try:
            self.model.train()
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while self.step < self.total_steps:
                if batches is None:
                    batches = self._epoch_batches(self.epoch, self.batch_in_epoch)
                outputs, micro_stats = [], []
                for i, batch in enumerate(self._take(batches, accum)):
                    with self._gradient_sync(last=i == accum - 1):
                        output, loss, stats = self._forward_loss(batch)
                        (loss / accum).backward()
                    outputs.append(output)
                    micro_stats.append(stats)
                grad_norm = self._optimizer_step()
                self.step += 1
                self.batch_in_epoch += accum
                stats = _step_stats(micro_stats, grad_norm)
                step_loss = stats[0]
                first_bad = _first_non_finite(first_bad, step_loss, self.step)
                window += stats
                window_steps += 1
                for callback in self.callbacks:
                    callback.on_train_step_end(self, outputs, step_loss)
                progress.update(1)
                if self.step % sync_every == 0 or self.step == self.total_steps:
                    stop = self._agree(first_bad)
                    if self.step % cfg.log_every == 0:
                        self._log_window(window, window_steps, progress, start_step, start_time)
                        window.zero_()
                        window_steps = 0
                    if stop:
                        result = self._interrupted(start_time)
                        return result
                epoch_ended = self.batch_in_epoch >= self.steps_per_epoch * accum
                if epoch_ended:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    batches = None
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or (
                    not cfg.eval_every and epoch_ended
                ):
                    self._evaluate_and_checkpoint()
                elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self._agree(first_bad)
            if window_steps:
                self._log_window(window, window_steps, progress, start_step, start_time)
            if self._last_checkpoint_step != self.step:
                self._evaluate_and_checkpoint()
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

    def _forward_loss(self, batch) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """``(model output, loss, stats)`` of one micro-batch; stats are
        ``[loss, cross-entropy, aux, correct, samples]`` (detached)."""
        cfg = self.config
        x, y = self._to_device(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            output = self._train_forward(x)
            logits, aux = unpack_output(output)
            logits, y = _predictions(logits, y)
            ce = self.loss_fn(logits.float(), y)
            aux = torch.zeros((), device=self.device) if aux is None else aux.float()
            if cfg.spike_rate_penalty > 0:
                activity = getattr(output, "activity", None)
                if not isinstance(activity, Activity) or not len(activity):
                    raise ValueError(
                        "train.spike_rate_penalty > 0 but the model reports no spiking activity: "
                        "its output needs an .activity (spiking_moe.Activity) with at least one "
                        f"neuron population; got {type(output).__name__}"
                    )
                penalty = activity_penalty(activity, cfg.spike_rate_target)
                aux = aux + cfg.spike_rate_penalty * penalty
            loss = ce + aux
        correct = (logits.detach().argmax(-1) == y).sum().float()
        samples = torch.full((), float(y.shape[0]), device=self.device)
        return (
            output,
            loss,
            torch.stack([loss.detach(), ce.detach(), aux.detach(), correct, samples]),
        )

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, schedule, clear; returns the gradient norm (0 without clipping)."""
        if self.config.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach().float().reshape(())

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only."""
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _take(self, batches: Iterator, count: int) -> list:
        taken = []
        for _ in range(count):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"train_loader ran out of batches in epoch {self.epoch}: it yielded fewer "
                    f"than len() = {len(self.train_loader)}"  # type: ignore[arg-type]
                )
            taken.append(batch)
        return taken

    def _agree(self, first_bad: torch.Tensor) -> bool:
        """Raise if any rank saw a non-finite loss; return whether any rank must stop."""
        bad_step, bad_loss, stop = self._sync(first_bad)
        if bad_step >= 0:
            raise self._non_finite(bad_step, bad_loss)
        return stop

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

    def _check_sharding(self, loader, name: str) -> None:
        world = getattr(loader, "world_size", None)
        if world is not None and self.dist.world_size > 1 and world != self.dist.world_size:
            raise ValueError(
                f"{name} is sharded for world_size={world} but the job has "
                f"{self.dist.world_size} processes; build it with rank and world_size"
            )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator:
        loader = self.train_loader
        if hasattr(loader, "iter_epoch"):
            return iter(loader.iter_epoch(epoch, start))
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
            "train/epoch": self.epoch
            + self.batch_in_epoch / (self.steps_per_epoch * self.config.grad_accum_steps),
            "time/steps_per_second": (self.step - start_step) / max(elapsed, 1e-9),
        }
        self.log(metrics)
        progress.set_postfix(
            loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.3f}"
        )

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
            logits, y_flat = _predictions(logits.float(), y)
            totals += torch.stack(
                [
                    self.loss_fn(logits, y_flat).double() * y_flat.shape[0],
                    (logits.argmax(-1) == y_flat).sum().double(),
                    torch.full((), float(y_flat.shape[0]), device=self.device, dtype=torch.float64),
                ]
            )
            for callback in self.callbacks:
                callback.on_eval_batch_end(self, prefix, (x, y), output)
        loss_sum, correct, count = self.all_reduce_sum(totals).tolist()
        if count == 0:
            raise ValueError(f"evaluation loader for {prefix!r} yielded no samples")
        metrics = {f"{prefix}/loss": loss_sum / count, f"{prefix}/accuracy": correct / count}
        if y.dim() > 1:  # one prediction per position: the loss in bits per position too
            metrics[f"{prefix}/bpb"] = loss_sum / count / math.log(2)
        for callback in self.callbacks:
            extra = callback.on_eval_end(self, prefix)
            if extra:
                metrics.update({k: as_scalar(k, v) for k, v in extra.items()})
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
        """Write hparams with the latest metrics and close the sinks."""
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


def _predictions(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P, C]`` logits and ``[P]`` targets, one row per prediction: ``[B, C]`` with ``[B]``,
    or ``[B, S, C]`` with ``[B, S]`` flattened over positions."""
    if logits.dim() < 2 or logits.shape[:-1] != y.shape:
        raise ValueError(
            f"model logits must be [B, C] for targets [B] (or [B, S, C] for targets [B, S]); "
            f"targets have shape {tuple(y.shape)}, logits {tuple(logits.shape)}"
        )
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


def _step_stats(micro_stats: list[torch.Tensor], grad_norm: torch.Tensor) -> torch.Tensor:
    """``[loss, cross-entropy, aux, grad norm, correct, samples]`` of one optimizer step: the
    loss terms averaged over its micro-batches, the counts summed."""
    summed = torch.stack(micro_stats).sum(0)
    return torch.cat([summed[:3] / len(micro_stats), grad_norm.reshape(1), summed[3:]])


def _first_non_finite(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``[step, loss]`` of the first non-finite loss so far (``[-1, 0]`` if none), on device."""
    with torch.no_grad():
        is_first = ~torch.isfinite(loss) & (first_bad[0] < 0)
        here = torch.stack([torch.full_like(first_bad[0], step), loss.double()])
        return torch.where(is_first, here, first_bad)
