"""The training loop: one flat loop over optimizer steps, with gradient accumulation and DDP.

The objective (cross-entropy, auxiliary losses and the activity penalty), the step statistics
and the learning-rate schedule are :mod:`~spiking_moe.training.objective`.

One optimizer step takes ``train.grad_accum_steps`` consecutive batches of the loader and
backpropagates each micro-batch's loss divided by their number, so the step's gradient is
that of the mean loss over them (with a mean loss, the gradient of one batch of the combined
size). Under DDP, gradients are all-reduced on the last micro-batch only.

Evaluation is :func:`~spiking_moe.training.evaluate` (no Trainer needed); ``Trainer.evaluate``
runs it with the trainer's callbacks and logs the result.

Checkpoints (``<out_dir>/checkpoint.pt``, :mod:`~spiking_moe.training.checkpoint`) hold the
model, optimizer, scheduler, step, epoch, position in the epoch, every RNG stream (per rank)
and the configs. Since the data order and encoding noise are functions of
``(seed, epoch, batch)`` (:class:`~spiking_moe.data.BatchLoader`), resuming replays exactly
what an uninterrupted run would have done.

Expert parallelism (``train.expert_parallel = P > 1`` under ``torchrun``,
:mod:`spiking_moe.parallel`): each MoE layer's experts are split over groups of ``P``
processes before DDP is built, and DDP ignores them; after the backward of a step's last
micro-batch the expert gradients are reduced to the same data-parallel mean DDP gives the
dense ones, and clipping takes the norm of the whole model. Every forward then exchanges
tokens between the processes of a group, so all processes make the same number of forward
calls: training batches are equal in number on every rank (checked), and evaluation splits
batches of the ranks that have fewer so that every rank makes as many calls as the rank with
the most, each sample still evaluated once (:mod:`~spiking_moe.training.evaluate`).
Checkpoints are one shard per expert group plus an index
(:mod:`~spiking_moe.training.checkpoint`); resuming needs the same ``P`` and world size.

Steps are counted from 1: "step 7" is the 7th optimizer step, and ``trainer.step`` is the number
of steps completed. An epoch is ``len(train_loader) // grad_accum_steps`` steps.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..parallel import clip_grad_norm_, reduce_expert_gradients
from ..quantization import prepare_qat
from .callbacks import Callback, check_callback
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    model_and_optimizer_state,
    resume_source,
    rng_state,
    save_checkpoint,
    save_expert_parallel_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import (
    add_fields,
    all_gather_objects,
    all_reduce_sum,
    check_equal_lengths,
    check_loader_sharding,
    init_distributed,
    lay_out_model,
    reduce_fields,
    resolve_device,
)
from .evaluate import evaluate, unpack_output
from .objective import MicroBatchStats, StepStats, activity_penalty, lr_factor, micro_batch_loss
from .sinks import JSONLinesSink, MetricSink, TensorBoardSink, as_scalar
from .stopping import NonFiniteLossError, StopControl, first_non_finite, no_bad_step

# NonFiniteLossError, activity_penalty and unpack_output are importable from here as before.
__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "activity_penalty", "unpack_output"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        step: optimizer steps completed, counting those before a resume.
        epoch: the trainer's 0-based epoch counter when :meth:`Trainer.fit` returned (epochs
            whose end was counted).
        metrics: the latest value of every metric logged (training, evaluation, callbacks'),
            including those restored from a resumed checkpoint.
        interrupted: whether a signal or :meth:`Trainer.request_stop` stopped the run early.
        signal: the number of the signal that stopped it (SIGINT, SIGTERM), or None.
        wall_time_s: seconds this :meth:`Trainer.fit` call took, its final evaluation and
            checkpoint included.
        checkpoint: ``<out_dir>/checkpoint.pt`` (the index under expert parallelism); None
            without ``out_dir``, or when no checkpoint was written or resumed from.
    """

    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    signal: int | None = None
    wall_time_s: float = 0.0
    checkpoint: Path | None = None


@dataclass
class _FitRun:
    """What one :meth:`Trainer.fit` call keeps between steps."""

    start_time: float
    start_step: int
    progress: Any
    first_bad: torch.Tensor  # [step, loss] of the first non-finite loss ([-1, 0]: none yet)
    window: StepStats  # summed since the last log
    window_steps: int = 0

    def record(self, stats: StepStats, step: int) -> None:
        self.first_bad = first_non_finite(self.first_bad, stats.loss, step)
        self.window = add_fields(self.window, stats)
        self.window_steps += 1


class Trainer:
    """Trains a classifier on time-major batches; the objective is
    :mod:`~spiking_moe.training.objective`'s.

    What it changes on the model it is given (the caller's object, in place):

    - moves it to ``train.device`` (``model.to``);
    - with ``train.quantize_bits``, prepares it for quantization-aware training
      (:func:`~spiking_moe.quantization.prepare_qat` in place: its Linears become fake-quantized
      ones, ``state_dict`` keys unchanged);
    - with ``train.expert_parallel = P > 1``, keeps only this process's experts in each MoE
      layer (:func:`~spiking_moe.parallel.shard_experts` in place);
    - under DDP, takes rank 0's parameters and buffers (DDP broadcasts them on construction);
    - on a resume, loads the checkpoint's weights;
    - :meth:`fit` puts it in train mode and leaves it there, updating its parameters (and,
      with :class:`~spiking_moe.training.RouterBiasBalancing`, its routers' biases);
      :meth:`evaluate` runs it in eval mode and restores its mode.

    Random streams: training draws from torch's global generator (dropout, router noise) but
    the Trainer never seeds it on a fresh start: seed before (``run_experiment`` seeds
    ``train.seed + rank``). A resume restores every stream of this rank from the checkpoint
    (python, numpy, torch CPU and CUDA; a checkpoint of another world size restarts them from
    ``train.seed + rank + step``). :meth:`fit` installs SIGINT/SIGTERM handlers while it runs.

    Args:
        model: any ``nn.Module`` with ``forward(x_TBF)`` returning logits ``[B, V]`` or an
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
        loss_fn: ``(logits_BV, y_B) -> scalar``, mean over the batch; cross-entropy if None.
        hparams: flat ``{name: value}`` written with the final metrics by :meth:`close`.
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists (a warning and a fresh
            start if not). A damaged checkpoint raises
            :class:`~spiking_moe.training.CheckpointError` naming the intact previous one.
        resume_from: continue from this checkpoint file instead (e.g. ``checkpoint.prev.pt``);
            later checkpoints are still written to ``out_dir``.
        checkpoint_extra: plain-typed data stored in every checkpoint under ``"extra"``
            (e.g. the experiment config).
        teacher: a trained model whose logits on each micro-batch teach this one (logit
            distillation, ``config.distill_weight`` and ``distill_temperature``:
            :mod:`~spiking_moe.training.objective`); run in eval mode without gradients,
            never trained, not checkpointed (a resume is given it again).

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
        ...         return self.fc(x_TBF).mean(0)  # logits [B, V]
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
        teacher: nn.Module | None = None,
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
        check_loader_sharding(train_loader, "train_loader", self.dist)
        if val_loader is not None:
            check_loader_sharding(val_loader, "val_loader", self.dist)

        self.use_amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.use_amp:
            logger.warning(
                "train.amp is bf16 autocast on CUDA only; training in fp32 on %s", self.device
            )

        if config.quantize_bits:
            # In place, so the caller's model is the one trained and its state_dict keys stay.
            model = prepare_qat(model, config.quantize_bits, inplace=True)
        self.model = model.to(self.device)
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.expert_parallel, self._ddp = lay_out_model(
            self.model,
            self.dist,
            self.device,
            expert_parallel=config.expert_parallel,
            find_unused_parameters=config.find_unused_parameters,
        )
        forward_module: nn.Module = self.model if self._ddp is None else self._ddp
        self._eval_forward: Callable = self.model
        self._train_forward: Callable = forward_module
        if config.compile:
            self._train_forward = torch.compile(forward_module)
            self._eval_forward = torch.compile(self.model)

        batches = len(train_loader)  # type: ignore[arg-type]
        if self.expert_parallel is not None:
            check_equal_lengths(batches)
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
            self.optimizer, lr_factor(config, self.total_steps)
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # loader batches consumed in the current epoch
        self.metrics: dict[str, float] = {}
        self._stop = StopControl()
        self._last_checkpoint_step: int | None = None

        source = resume_source(resume, resume_from, self.checkpoint_path)
        if source is not None:
            self._load(load_checkpoint(source), source)

        if sinks is None:
            sinks = []
            if self.out_dir is not None and self.dist.is_main:
                sinks = [
                    TensorBoardSink(self.out_dir, purge_step=self.step + 1 if source else None),
                    JSONLinesSink(
                        self.out_dir / "metrics.jsonl",
                        purge_step=self.step + 1 if source else None,
                    ),
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
        self._stop.request()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (collective under DDP: every rank must call it).

        Under expert parallelism ``model`` and ``optimizer`` are this process's (the dense
        parameters and its experts); :meth:`save_checkpoint` writes them as its shard.
        """
        return {
            "format": CHECKPOINT_FORMAT,
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
        """Write ``<out_dir>/checkpoint.pt`` (rank 0; all ranks must call under DDP).

        Under expert parallelism the first process of each expert group's replicas writes
        its shard, then rank 0 writes the index (:mod:`~spiking_moe.training.checkpoint`).
        Returns the index (or single) checkpoint's path.
        """
        if self.checkpoint_path is None:
            return None
        state = self.state_dict()
        if self.expert_parallel is not None:
            save_expert_parallel_checkpoint(
                state, self.checkpoint_path, self.model, self.expert_parallel
            )
        elif self.dist.is_main:
            save_checkpoint(state, self.checkpoint_path)
            logger.info("step %d: checkpoint written to %s", self.step, self.checkpoint_path)
        if self.dist.world_size > 1:
            dist.barrier()
        self._last_checkpoint_step = self.step
        return self.checkpoint_path

    def _load(self, state: Mapping[str, Any], source: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            message = f"{source}: unknown checkpoint format {state.get('format')!r}"
            raise CheckpointError(message, source)
        model_state, optimizer_state = model_and_optimizer_state(
            state, source, self.model, self.expert_parallel, self.dist.world_size
        )
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
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
        run = _FitRun(
            start_time=time.perf_counter(),
            start_step=self.step,
            progress=self._progress_bar(),
            first_bad=no_bad_step(self.device),
            window=StepStats.zeros(self.device),
        )
        previous_handlers = self._stop.install()
        result: TrainResult | None = None
        try:
            self.model.train()
            for callback in self.callbacks:
                callback.on_fit_start(self)
            batches: Iterator | None = None
            while self.step < self.total_steps:
                if batches is None:
                    batches = self._open_epoch()
                self._train_step(batches, run)
                if self._sync_due() and self._agree_and_log(run):
                    result = self._interrupted(run.start_time)
                    return result
                epoch_ended = self._close_epoch_if_done()
                if epoch_ended:
                    batches = None
                self._evaluate_or_checkpoint_if_due(epoch_ended)
            result = self._finish(run)
            return result
        finally:
            run.progress.close()
            self._stop.restore(previous_handlers)
            if result is not None:
                for callback in self.callbacks:
                    callback.on_fit_end(self, result)

    @property
    def _batches_per_epoch(self) -> int:
        """Loader batches that the steps of one epoch consume."""
        return self.steps_per_epoch * self.config.grad_accum_steps

    def _open_epoch(self) -> Iterator:
        """The current epoch's remaining batches."""
        if self.batch_in_epoch >= self._batches_per_epoch:
            # Stopped (and checkpointed) on an epoch's last step, before the epoch's end was
            # counted: the next step opens the next epoch.
            self.epoch += 1
            self.batch_in_epoch = 0
        return self._epoch_batches(self.epoch, self.batch_in_epoch)

    def _train_step(self, batches: Iterator, run: _FitRun) -> None:
        """One optimizer step over ``train.grad_accum_steps`` micro-batches of ``batches``."""
        accum = self.config.grad_accum_steps
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
        stats = StepStats.of_step(micro_stats, grad_norm)
        run.record(stats, self.step)
        for callback in self.callbacks:
            callback.on_train_step_end(self, outputs, stats.loss)
        run.progress.update(1)

    def _sync_due(self) -> bool:
        """Whether the ranks compare notes after this step. A host sync every step costs
        nothing on CPU; on CUDA it would stall the launch queue, so non-finite checks and
        stop votes happen every ``log_every`` steps there."""
        every = 1 if self.device.type == "cpu" else self.config.log_every
        return self.step % every == 0 or self.step == self.total_steps

    def _agree_and_log(self, run: _FitRun) -> bool:
        """Raise if any rank's loss went non-finite; log the window on a log step; return
        whether any rank must stop."""
        stop = self._agree(run.first_bad)
        if self.step % self.config.log_every == 0:
            self._log_window(run)
        return stop

    def _close_epoch_if_done(self) -> bool:
        """Count the epoch's end when this step consumed its last batches."""
        if self.batch_in_epoch < self._batches_per_epoch:
            return False
        self.epoch += 1
        self.batch_in_epoch = 0
        return True

    def _evaluate_or_checkpoint_if_due(self, epoch_ended: bool) -> None:
        cfg = self.config
        if (cfg.eval_every and self.step % cfg.eval_every == 0) or (
            not cfg.eval_every and epoch_ended
        ):
            self._evaluate_and_checkpoint()
        elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _finish(self, run: _FitRun) -> TrainResult:
        """After the last step: the final checks, log, evaluation and checkpoint."""
        self._agree(run.first_bad)
        if run.window_steps:
            self._log_window(run)
        if self._last_checkpoint_step != self.step:
            self._evaluate_and_checkpoint()
        return TrainResult(
            step=self.step,
            epoch=self.epoch,
            metrics=dict(self.metrics),
            wall_time_s=time.perf_counter() - run.start_time,
            checkpoint=self.checkpoint_path if self._last_checkpoint_step is not None else None,
        )

    def _forward_loss(self, batch) -> tuple[Any, torch.Tensor, MicroBatchStats]:
        """``(model output, loss, detached statistics)`` of one micro-batch."""
        x, y = (t.to(self.device, non_blocking=self.device.type == "cuda") for t in batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            output = self._train_forward(x)
            teacher_output = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_output = self.teacher(x)
            loss, stats = micro_batch_loss(output, y, self.loss_fn, self.config, teacher_output)
        return output, loss, stats

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, schedule, clear; returns the gradient norm (0 without clipping)."""
        if self.expert_parallel is not None:
            # The step's gradients are complete (DDP reduced the dense ones on this backward).
            reduce_expert_gradients(self.model, self.expert_parallel)
        if self.config.grad_clip > 0 and self.expert_parallel is not None:
            grad_norm = clip_grad_norm_(self.model, self.config.grad_clip, self.expert_parallel)
        elif self.config.grad_clip > 0:
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
        bad_step, bad_loss, stop = self._stop.agree(first_bad)
        if bad_step >= 0:
            kept = self.checkpoint_path, self._last_checkpoint_step
            raise NonFiniteLossError.at(bad_step, bad_loss, *kept)
        return stop

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

    def _interrupted(self, start_time: float) -> TrainResult:
        self.save_checkpoint()
        logger.warning(
            "stopped at step %d (%s); checkpoint %s; continue with resume",
            self.step,
            f"signal {self._stop.signal}" if self._stop.signal is not None else "stop requested",
            self.checkpoint_path,
        )
        return TrainResult(
            step=self.step,
            epoch=self.epoch,
            metrics=dict(self.metrics),
            interrupted=True,
            signal=self._stop.signal,
            wall_time_s=time.perf_counter() - start_time,
            checkpoint=self.checkpoint_path,
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

    def _log_window(self, run: _FitRun) -> None:
        """Log the means over the steps since the last log, then start a new window."""
        # Sums over ranks (all ranks reach the same log steps): means over the global batch.
        window = reduce_fields(run.window, self.all_reduce_sum)
        steps = run.window_steps * self.dist.world_size
        elapsed = time.perf_counter() - run.start_time
        metrics = {
            "train/loss": window.loss / steps,
            "train/cross_entropy": window.cross_entropy / steps,
            "train/aux_loss": window.aux_loss / steps,
            "train/grad_norm": window.grad_norm / steps,
            "train/accuracy": window.correct / max(window.samples, 1.0),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/epoch": self.epoch + self.batch_in_epoch / self._batches_per_epoch,
            "time/steps_per_second": (self.step - run.start_step) / max(elapsed, 1e-9),
        }
        self.log(metrics)
        run.progress.set_postfix(
            loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.3f}"
        )
        run.window, run.window_steps = StepStats.zeros(self.device), 0

    def _evaluate_and_checkpoint(self) -> None:
        if self.val_loader is not None:
            self.evaluate(self.val_loader, "val")
        self.save_checkpoint()

    def evaluate(self, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """:func:`~spiking_moe.training.evaluate` of the model on ``loader`` with this
        trainer's device, loss, AMP setting and callbacks; the metrics are logged at the
        current step and returned.

        Under DDP give each rank its shard (``BatchLoader(..., rank, world_size, pad=False)``);
        every rank must call it. Under expert parallelism every rank makes as many forward
        calls as the rank with the most batches (:mod:`~spiking_moe.training.evaluate`).
        """
        metrics = evaluate(
            self.model,
            loader,
            device=self.device,
            prefix=prefix,
            loss_fn=self.loss_fn,
            callbacks=self.callbacks,
            amp=self.use_amp,
            forward=self._eval_forward,
            context=self,
        )
        self.log(metrics)
        logger.info(
            "step %d epoch %d: %s",
            self.step,
            self.epoch,
            ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.count("/") == 1),
        )
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
