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

Expert parallelism (``train.expert_parallel = P > 1`` under ``torchrun``,
:mod:`spiking_moe.parallel`): each MoE layer's experts are split over groups of ``P``
processes before DDP is built, and DDP ignores them; after the backward of a step's last
micro-batch the expert gradients are reduced to the same data-parallel mean DDP gives the
dense ones, and clipping takes the norm of the whole model. Every forward then exchanges
tokens between the processes of a group, so all processes make the same number of forward
calls: training batches are equal in number on every rank (checked), and evaluation splits
batches of the ranks that have fewer so that every rank makes as many calls as the rank with
the most, each sample still evaluated once (:meth:`Trainer.evaluate`). Checkpoints are one
shard per expert group plus an index (:mod:`~spiking_moe.training.checkpoint`); resuming
needs the same ``P`` and world size.

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
from ..parallel import (
    ExpertParallel,
    ExpertShard,
    clip_grad_norm_,
    expert_parameter_names,
    init_expert_parallel,
    is_expert_parallel,
    reduce_expert_gradients,
    shard_experts,
)
from ..quantization import prepare_qat
from .callbacks import Callback, check_callback
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointLayoutError,
    expert_shard_name,
    load_checkpoint,
    load_expert_shard,
    remove_stale_expert_shards,
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
        # Before DDP: it must see only the parameters that every process holds.
        self.expert_parallel = self._init_expert_parallel(config.expert_parallel)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        forward_module: nn.Module = self.model
        if self.dist.world_size > 1:
            if self.expert_parallel is not None:
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, expert_parameter_names(self.model, buffers=True)
                )
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
        if self.expert_parallel is not None:
            self._check_equal_lengths(batches)
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

    def _init_expert_parallel(self, size: int) -> ExpertParallel | None:
        """Split the model's experts over groups of ``size`` processes (None for 1)."""
        if is_expert_parallel(self.model):
            # DDP would average experts that differ between processes.
            raise ValueError(
                "the model is already expert-parallel (its experts were sharded): give the "
                "Trainer the whole model and set train.expert_parallel instead"
            )
        if size == 1:
            return None
        world = self.dist.world_size
        if world == 1:
            raise ValueError(
                f"train.expert_parallel = {size} needs a multi-process job of a multiple of "
                f"{size} processes, but this is a single process: launch with "
                f"torchrun --nproc_per_node={size}"
            )
        if world % size:
            raise ValueError(
                f"train.expert_parallel = {size} does not divide the world size {world}: the "
                f"processes must form whole groups of {size}"
            )
        ep = init_expert_parallel(size)
        shard_experts(self.model, ep)  # ValueError naming a layer whose experts P does not divide
        return ep

    def _check_equal_lengths(self, batches: int) -> None:
        """Every rank must take as many training steps (each forward exchanges tokens)."""
        lengths = all_gather_objects(batches)
        if len(set(lengths)) > 1:
            raise ValueError(
                f"train_loader yields {lengths} batches per epoch on ranks 0..{len(lengths) - 1}; "
                "under expert parallelism every rank must take the same number of steps "
                "(shard it with pad=True, as BatchLoader(shuffle=True) does)"
            )

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
        """Everything a resume needs (collective under DDP: every rank must call it).

        Under expert parallelism ``model`` and ``optimizer`` are this process's (the dense
        parameters and its experts); :meth:`save_checkpoint` writes them as its shard.
        """
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
        """Write ``<out_dir>/checkpoint.pt`` (rank 0; all ranks must call under DDP).

        Under expert parallelism the first process of each expert group's replicas writes
        its shard, then rank 0 writes the index (:mod:`~spiking_moe.training.checkpoint`).
        Returns the index (or single) checkpoint's path.
        """
        if self.checkpoint_path is None:
            return None
        state = self.state_dict()
        if self.expert_parallel is not None:
            self._save_sharded(state)
        elif self.dist.is_main:
            save_checkpoint(state, self.checkpoint_path)
            logger.info("step %d: checkpoint written to %s", self.step, self.checkpoint_path)
        if self.dist.world_size > 1:
            dist.barrier()
        self._last_checkpoint_step = self.step
        return self.checkpoint_path

    def _save_sharded(self, state: dict[str, Any]) -> None:
        """Shards first, then the index that commits them; every rank learns of any failure
        (a rank left waiting in a collective would hang the job)."""
        ep, path = self.expert_parallel, self.checkpoint_path
        names = [expert_shard_name(path, i, ep.size, self.step) for i in range(ep.size)]
        shard = {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "expert_shard": {"index": ep.rank, "size": ep.size, "world_size": ep.world_size},
            "model": state.pop("model"),
            "optimizer": state.pop("optimizer"),
            "parameter_names": [name for name, _ in self.model.named_parameters()],
            "experts": _expert_layout(self.model),
        }
        writes_shard = ep.replica_rank == 0
        self._all_or_none(
            lambda: save_checkpoint(shard, path.parent / names[ep.rank]) if writes_shard else None,
            f"writing the expert shards of step {self.step}",
            "; the last committed checkpoint is unchanged",
        )
        state["expert_parallel"] = {
            "size": ep.size,
            "world_size": ep.world_size,
            "shards": names,
        }

        def commit() -> None:
            if self.dist.is_main:
                save_checkpoint(state, path)
                removed = remove_stale_expert_shards(path)
                logger.info(
                    "step %d: checkpoint written to %s (index of %d expert shards; %d stale "
                    "shard files removed)",
                    self.step,
                    path,
                    ep.size,
                    len(removed),
                )

        self._all_or_none(
            commit,
            f"writing the index {path} of step {self.step}",
            "; the last committed checkpoint is unchanged",
        )

    def _all_or_none(self, action: Callable[[], Any], what: str, consequence: str = "") -> None:
        """Run ``action`` here, then raise on every rank if it failed on any."""
        error: BaseException | None = None
        try:
            action()
        except Exception as exc:  # reported to the other ranks, then re-raised
            error = exc
        failed = [
            (rank, message)
            for rank, message in enumerate(
                all_gather_objects(None if error is None else repr(error))
            )
            if message is not None
        ]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{what} failed on rank(s) {failed}{consequence}")

    def _load(self, state: Mapping[str, Any], source: Path) -> None:
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: unknown checkpoint format {state.get('format')!r}")
        model_state, optimizer_state = self._model_and_optimizer_state(state, source)
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

    def _model_and_optimizer_state(
        self, state: Mapping[str, Any], source: Path
    ) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """This process's model and optimizer state from a checkpoint of this job's layout."""
        layout = state.get("expert_parallel")
        ep = self.expert_parallel
        if "expert_shard" in state:
            raise CheckpointLayoutError(
                f"{source} is one shard of an expert-parallel checkpoint; resume from its index "
                f"({source.parent / CHECKPOINT_NAME})",
                source,
            )
        if layout is None and ep is not None:
            raise CheckpointLayoutError(
                f"{source} was written with train.expert_parallel = 1 (every expert in every "
                f"process) but this run has train.expert_parallel = {ep.size} over "
                f"{ep.world_size} processes: resume it with expert_parallel = 1",
                source,
            )
        if layout is not None and ep is None:
            raise CheckpointLayoutError(
                f"{source} is an expert-parallel checkpoint written with "
                f"train.expert_parallel = {layout['size']} over {layout['world_size']} "
                f"processes, but this run has expert_parallel = 1 over {self.dist.world_size}: "
                f"resume it under torchrun --nproc_per_node={layout['world_size']} with "
                f"--set train.expert_parallel={layout['size']}, or, for one process, gather it "
                f"first: spiking-moe-gather --checkpoint {source} --out <folder>",
                source,
            )
        if layout is not None and (layout["size"], layout["world_size"]) != (
            ep.size,
            ep.world_size,
        ):
            raise CheckpointLayoutError(
                f"{source} was written with train.expert_parallel = {layout['size']} over "
                f"{layout['world_size']} processes, but this run has expert_parallel = "
                f"{ep.size} over {ep.world_size}: resume it with the same layout, or gather it "
                f"into a single-process checkpoint (spiking-moe-gather --checkpoint {source} "
                "--out <folder>)",
                source,
            )
        names = [name for name, _ in self.model.named_parameters()]
        if layout is None:
            saved = state.get("parameter_names")  # written by the gather; checked when present
            if saved is not None and list(saved) != names:
                raise CheckpointError(
                    f"{source}: its optimizer state is for parameters {_differences(saved, names)}"
                    " in another order or set than this model's",
                    source,
                )
            return state["model"], state["optimizer"]
        shard: dict[str, Any] = {}

        def read() -> None:
            shard.update(load_expert_shard(state, source, ep.rank))
            if list(shard["parameter_names"]) != names:
                raise CheckpointError(
                    f"{source}: shard {ep.rank} holds parameters "
                    f"{_differences(shard['parameter_names'], names)} other than this model's",
                    source,
                )

        # Every rank learns if any shard is unreadable, and all stop with the same error.
        try:
            self._all_or_none(read, f"reading the expert shards of {source}")
        except RuntimeError as error:
            raise CheckpointError(str(error), source) from None
        return shard["model"], shard["optimizer"]

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
                    if self.batch_in_epoch >= self.steps_per_epoch * accum:
                        # Stopped (and checkpointed) on an epoch's last step, before the
                        # epoch's end was counted: the next step opens the next epoch.
                        self.epoch += 1
                        self.batch_in_epoch = 0
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

        Under expert parallelism every forward exchanges tokens, so every rank makes as many
        forward calls as the rank with the most batches: a rank with fewer (its shard one
        sample short of filling another batch) cuts its first batches in two, or more parts,
        until it has as many. Every sample is still evaluated exactly once and the metrics
        are sums over samples, so they equal one process's evaluation of the whole set; the
        callbacks see real samples only. A :class:`~spiking_moe.data.BatchLoader` says how
        many samples it holds; other loaders must yield the same number of batches on every
        rank. Raises ValueError, on every rank, when a rank has fewer samples than calls to
        make (an evaluation set smaller than the number of processes, or one sample short
        with ``train.eval_batch_size = 1``).
        """
        batches = self._eval_batches(loader)  # collective: agreed before any forward
        was_training = self.model.training
        self.model.eval()
        for callback in self.callbacks:
            callback.on_eval_start(self, prefix)
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for batch in batches:
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

    def _eval_batches(self, loader: Iterable) -> Iterable:
        """``loader``, or under expert parallelism its batches cut so that every rank makes
        the same number of forward calls (:meth:`evaluate`)."""
        if self.expert_parallel is None:
            return loader
        mine = (len(loader) if hasattr(loader, "__len__") else None, _loader_samples(loader))
        plan = all_gather_objects(mine)
        if any(batches is None for batches, _ in plan):
            raise TypeError(
                "under expert parallelism the evaluation loader needs len() on every rank "
                "(every rank must make the same number of forward calls)"
            )
        calls = max(batches for batches, _ in plan)
        short = {
            rank: (batches, samples)
            for rank, (batches, samples) in enumerate(plan)
            if batches < calls and (samples is None or samples < calls)
        }
        if short:
            raise ValueError(
                f"expert-parallel evaluation makes {calls} forward calls on every rank (the most "
                f"batches of any rank), but rank(s) {sorted(short)} have (batches, samples) "
                f"{list(short.values())} and cannot be cut into that many: use a larger "
                "evaluation set or train.eval_batch_size, or fewer processes (loaders other "
                "than BatchLoader must yield equally many batches on every rank)"
            )
        return _with_extra_calls(loader, calls - plan[self.dist.rank][0])

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


def _expert_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path of a layer's experts: {"ids": held expert ids, "num_experts": E}}``."""
    return {
        prefix: {"ids": list(module.global_ids), "num_experts": module.num_experts}
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertShard)
    }


def _differences(saved: Sequence[str], names: Sequence[str]) -> str:
    """A short account of how two parameter name lists differ."""
    saved_set, names_set = set(saved), set(names)
    missing = [n for n in names if n not in saved_set]
    extra = [n for n in saved if n not in names_set]
    if not missing and not extra:
        return "(the same names in another order)"
    return f"(missing here: {missing[:5]}, not in this model: {extra[:5]})"


def _batch_size(batch) -> int:
    return int(batch[1].shape[0])


def _loader_samples(loader) -> int | None:
    """Samples a :class:`~spiking_moe.data.BatchLoader` yields in one pass (None for other
    loaders, which do not say)."""
    if not all(hasattr(loader, a) for a in ("indices", "batch_size", "drop_last", "epoch")):
        return None
    if loader.drop_last:
        return len(loader) * loader.batch_size
    return len(loader.indices(loader.epoch))


def _with_extra_calls(loader: Iterable, extra: int) -> Iterator:
    """``loader``'s batches, the first ones cut into parts until ``extra`` more batches came
    out (possible when the loader holds at least ``len(loader) + extra`` samples)."""
    for batch in loader:
        parts = min(_batch_size(batch), extra + 1)
        if parts > 1:
            extra -= parts - 1
            yield from _split_batch(batch, parts)
        else:
            yield batch


def _split_batch(batch, parts: int) -> list:
    """``batch`` cut into ``parts`` batches of nearly equal size, samples in order.

    Targets are ``[B]`` or ``[B, S]``; inputs are time-major ``[T, B, ...]`` for ``[B]``
    targets and ``[B, S]`` token ids for ``[B, S]`` targets (the two layouts the trainer takes).
    """
    x, y = batch
    dim = 0 if x.dim() == y.dim() else 1
    return list(
        zip(torch.tensor_split(x, parts, dim), torch.tensor_split(y, parts, 0), strict=True)
    )
