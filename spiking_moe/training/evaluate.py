"""Evaluation of a model on batches, without a Trainer: loss, accuracy and bits per position,
summed over ranks, with the callbacks' metrics.

Over the predictions of one pass (every sample of every rank; for sequence targets
``[B, S]``, every position), with ``loss_fn`` the mean loss of a batch (cross-entropy by
default)::

    <prefix>/loss     = mean_p loss_p
    <prefix>/accuracy = mean_p [argmax logits_p == y_p]
    <prefix>/bpb      = <prefix>/loss / ln 2          (sequence targets only: bits per position,
                                                      bits per byte for byte-level text)

The model returns logits ``[B, V]`` (or ``[B, S, V]``) itself or as the ``.logits`` of its
output (:func:`unpack_output`). :func:`evaluate` builds no optimizer and touches no random
number generator: the data order and encoding noise are the loader's (a function of its seed),
and the model runs in eval mode (no dropout, no router noise), restored afterwards.

Expert parallelism (a model whose experts are sharded over processes,
:mod:`spiking_moe.parallel`): every forward exchanges tokens between the processes of a
group, so every rank makes as many forward calls as the rank with the most batches. A rank
with fewer (its shard one sample short of filling another batch) cuts its first batches in
two, or more parts, until it has as many. Every sample is still evaluated exactly once and the
metrics are sums over samples, so they equal one process's evaluation of the whole set; the
callbacks see real samples only. A :class:`~spiking_moe.data.BatchLoader` says how many
samples it holds; other loaders must yield the same number of batches on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..parallel import is_expert_parallel
from .callbacks import Callback, CallbackContext
from .distributed import (
    DistInfo,
    add_fields,
    all_gather_objects,
    all_reduce_sum,
    current_dist,
    reduce_fields,
)
from .sinks import as_scalar

__all__ = ["EvaluationContext", "EvaluationTotals", "evaluate", "flat_predictions", "unpack_output"]


def unpack_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits and auxiliary loss of a model's output.

    Args:
        output: what the model returned: logits ``[B, V]`` (``[B, S, V]`` for a sequence
            model) as a tensor, or an object with a ``.logits`` tensor and, optionally,
            ``.aux_loss`` (the ``ModelOutput`` contract of :mod:`spiking_moe.models`).

    Returns:
        ``(logits, aux_loss)``: the logits as they are, and ``output.aux_loss`` (a scalar
        tensor), or None for a tensor output or an object without one.

    Raises:
        TypeError: ``output`` is neither a tensor nor an object with a ``.logits`` tensor.
    """
    if isinstance(output, torch.Tensor):
        return output, None
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "model must return logits [B, V] or an object with a .logits tensor "
            f"(and optional .aux_loss), got {type(output).__name__}"
        )
    return logits, getattr(output, "aux_loss", None)


def flat_predictions(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, V]`` logits and ``[R]`` targets, one row per prediction: ``[B, V]`` with ``[B]``,
    or ``[B, S, V]`` with ``[B, S]`` flattened over positions."""
    if logits.dim() < 2 or logits.shape[:-1] != y.shape:
        raise ValueError(
            f"model logits must be [B, V] for targets [B] (or [B, S, V] for targets [B, S]); "
            f"targets have shape {tuple(y.shape)}, logits {tuple(logits.shape)}"
        )
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


@dataclass
class EvaluationContext:
    """The :class:`~spiking_moe.training.CallbackContext` of an evaluation without a Trainer.

    Nothing is logged: :meth:`log` and :meth:`log_text` drop what they get (the caller of
    :func:`evaluate` receives the metrics), and there is no TensorBoard writer unless one is
    given.

    Attributes:
        model: the evaluated model, unwrapped (no DDP, no ``torch.compile``).
        device: where the batches go and :meth:`all_reduce_sum` reduces.
        step: the step the hooks report (callbacks that write to ``tensorboard_writer``
            log at it).
        epoch: the epoch the hooks report.
        dist: this process's place in the job; default: the job it has joined
            (:func:`~spiking_moe.training.distributed.current_dist`).
        tensorboard_writer: a TensorBoard ``SummaryWriter`` for the callbacks that write to
            one (e.g. :class:`~spiking_moe.training.callbacks.EnergyReportCallback`), or None.
    """

    model: nn.Module
    device: torch.device
    step: int = 0
    epoch: int = 0
    dist: DistInfo = field(default_factory=current_dist)
    tensorboard_writer: Any = None

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Dropped (see the class docstring)."""

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """Dropped (see the class docstring)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks on ``self.device`` (identity in a single process)."""
        return all_reduce_sum(tensor, self.device)


class EvaluationTotals(NamedTuple):
    """Sums over the predictions of an evaluation (float64 scalars on the device)."""

    loss: torch.Tensor  # sum over predictions of their loss
    correct: torch.Tensor
    predictions: torch.Tensor

    @classmethod
    def of_batch(cls, loss_mean: torch.Tensor, correct: torch.Tensor, count: int, device):
        return cls(
            loss_mean.double() * count,
            correct.double(),
            torch.full((), float(count), device=device, dtype=torch.float64),
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    device: torch.device | str | None = None,
    prefix: str = "val",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    amp: bool = False,
    forward: Callable[[torch.Tensor], Any] | None = None,
    context: CallbackContext | None = None,
) -> dict[str, float]:
    """Loss, accuracy (and bits per position) of ``model`` on ``batches``, summed over ranks,
    with the callbacks' metrics (module docstring).

    Under DDP give each rank its shard (``BatchLoader(..., rank, world_size, pad=False)``);
    every rank must call it. Builds no optimizer and draws from no random generator; the
    model is in eval mode during the pass and back in its own mode afterwards.

    Args:
        model: returns logits ``[B, V]`` (``[B, S, V]``) or an object with ``.logits``.
        batches: re-iterable of ``(x, y)``: ``x`` time-major ``[T, B, ...]`` (or token ids
            ``[B, S]``), ``y`` ``[B]`` (or ``[B, S]``).
        device: where batches go (default: where ``model``'s parameters are).
        prefix: metric names' prefix ("val", "test", ...).
        loss_fn: ``(logits_RV, y_R) -> mean loss`` (one row per prediction:
            :func:`flat_predictions`); cross-entropy if None.
        callbacks: their ``on_eval_*`` hooks run, and :meth:`Callback.on_eval_end` metrics
            join the result.
        amp: bf16 autocast on CUDA (ignored on other devices).
        forward: what runs ``model`` (e.g. ``torch.compile(model)``); ``model`` itself if None.
        context: what the hooks receive (the Trainer passes itself); default an
            :class:`EvaluationContext` of ``model`` and ``device``.

    Returns:
        ``{f"{prefix}/loss": ..., f"{prefix}/accuracy": ..., [f"{prefix}/bpb": ...], ...}``.

    Raises:
        ValueError: the batches held no sample; logits and targets of mismatched shapes; under
            expert parallelism, on every rank, a rank with fewer samples than forward calls to
            make (an evaluation set smaller than the number of processes, or one sample short
            with batches of 1).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 2)
        ...     def forward(self, x_TBF):
        ...         return self.fc(x_TBF.mean(0))  # logits [B, 2]
        >>> batches = [(torch.rand(4, 5, 3), torch.tensor([0, 1, 0, 1, 0]))]
        >>> metrics = evaluate(Net(), batches, prefix="test")
        >>> sorted(metrics), 0.0 <= metrics["test/accuracy"] <= 1.0
        (['test/accuracy', 'test/loss'], True)
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = model if forward is None else forward
    context = EvaluationContext(model, device) if context is None else context
    if is_expert_parallel(model):
        batches = _equal_forward_calls(batches, context.dist.rank)  # collective, before any forward
    was_training = model.training
    model.eval()
    try:
        for callback in callbacks:
            callback.on_eval_start(context, prefix)
        totals = EvaluationTotals(*torch.zeros(3, device=device, dtype=torch.float64))
        sequence = False
        for x, y in batches:
            x, y = _to_device(x, device), _to_device(y, device)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"
            ):
                output = forward(x)
            logits, _ = unpack_output(output)
            logits_PC, y_P = flat_predictions(logits.float(), y)
            correct = (logits_PC.argmax(-1) == y_P).sum()
            batch = EvaluationTotals.of_batch(
                loss_fn(logits_PC, y_P), correct, y_P.shape[0], device
            )
            totals = add_fields(totals, batch)
            sequence = y.dim() > 1
            for callback in callbacks:
                callback.on_eval_batch_end(context, prefix, (x, y), output)
        loss_sum, correct, count = reduce_fields(totals, context.all_reduce_sum)
        if count == 0:
            raise ValueError(f"evaluation batches for {prefix!r} held no samples")
        metrics = {f"{prefix}/loss": loss_sum / count, f"{prefix}/accuracy": correct / count}
        if sequence:  # one prediction per position: the loss in bits per position too
            metrics[f"{prefix}/bpb"] = loss_sum / count / math.log(2)
        for callback in callbacks:
            extra = callback.on_eval_end(context, prefix)
            if extra:
                metrics.update({k: as_scalar(k, v) for k, v in extra.items()})
    finally:
        model.train(was_training)
    return metrics


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device, non_blocking=device.type == "cuda")


def _equal_forward_calls(loader: Iterable, rank: int) -> Iterable:
    """``loader``'s batches cut so that every rank makes the same number of forward calls
    (module docstring). Collective: every rank calls it."""
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
    return _with_extra_calls(loader, calls - plan[rank][0])


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
        parts = min(int(batch[1].shape[0]), extra + 1)
        if parts > 1:
            extra -= parts - 1
            yield from _split_batch(batch, parts)
        else:
            yield batch


def _split_batch(batch, parts: int) -> list:
    """``batch`` cut into ``parts`` batches of nearly equal size, samples in order.

    Targets are ``[B]`` or ``[B, S]``; inputs are time-major ``[T, B, ...]`` for ``[B]``
    targets and ``[B, S]`` token ids for ``[B, S]`` targets (the two layouts evaluated).
    """
    x, y = batch
    dim = 0 if x.dim() == y.dim() else 1
    return list(
        zip(torch.tensor_split(x, parts, dim), torch.tensor_split(y, parts, 0), strict=True)
    )
