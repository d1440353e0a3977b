"""What one training step computes: the objective, its statistics, the learning-rate schedule.

Objective per micro-batch (``x`` ``[T, B, F]``, labels ``y`` ``[B]``)::

    loss = loss_fn(logits_BV, y_B) + aux_loss + spike_rate_penalty * activity_penalty

where the model returns logits ``[B, V]`` (a sequence model: ``[B, S, V]`` with targets
``[B, S]``, every position one prediction: the loss is the mean over positions and accuracy
counts positions) either directly or as the ``.logits`` field of an output object whose
optional ``.aux_loss`` (a scalar tensor: balancing and z-losses, already weighted) is added
(the ``ModelOutput`` contract of :mod:`spiking_moe.models`). With
``train.spike_rate_penalty > 0`` the model must also report its ``.activity``
(:class:`~spiking_moe.activity.Activity`), and::

    activity_penalty = mean over populations p that ran of max(0, rate_p - spike_rate_target)

A hinge, because pushing rates to zero silences the network and, with it, the surrogate
gradients it learns from (:func:`activity_penalty`).

With a teacher (``train.distill_from``: logit distillation, Hinton et al. 2015) the
cross-entropy term becomes::

    (1 - alpha) * loss_fn(logits, y) + alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau))

(``alpha = distill_weight``, ``tau = distill_temperature``, ``t`` the teacher's logits, ``s``
the model's, the KL averaged over predictions; ``tau^2`` keeps the soft term's gradient scale
independent of ``tau``). The logged ``cross_entropy`` stays the plain cross-entropy, so bits
per byte read the same with and without a teacher (:func:`distillation_loss`).

A step's statistics (:class:`StepStats`) average the loss terms over its micro-batches and sum
the counts; the trainer logs their means over the steps of a logging window.

Learning rate at optimizer step ``s`` (0-based) of ``total`` with ``warmup`` warmup steps
(``train.warmup_steps``)::

    lr(s) = lr * (s + 1) / warmup                        s < warmup
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * q)) / 2)   otherwise ("cosine")

with ``q = (s - warmup) / (total - warmup)`` and ``m = min_lr_ratio``; ``"constant"`` keeps
``lr`` after warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..activity import Activity
from ..config import TrainConfig
from .evaluate import flat_predictions, unpack_output

__all__ = [
    "MicroBatchStats",
    "StepStats",
    "activity_penalty",
    "distillation_loss",
    "lr_factor",
    "micro_batch_loss",
]


def activity_penalty(activity: Activity, target: float) -> torch.Tensor:
    """``mean over populations that ran of max(0, rate - target)`` (a differentiable scalar).

    Populations with no updates in the call (an expert that got no tokens) are left out, so
    idle experts neither dilute the penalty nor count as silent.

    Args:
        activity: the :class:`~spiking_moe.activity.Activity` a model reported for one call
            (its ``spikes`` carry the surrogate gradient).
        target: the firing rate (spikes per neuron update) up to which a population costs
            nothing (``train.spike_rate_target``).

    Returns:
        A 0-d tensor, differentiable through ``activity.spikes``; 0 when no population ran.
    """
    ran = activity.updates > 0
    excess = torch.relu(activity.rates() - target) * ran
    return excess.sum() / ran.sum().clamp_min(1)


class MicroBatchStats(NamedTuple):
    """Detached statistics of one micro-batch (0-d float32 tensors on the device)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    aux_loss: torch.Tensor
    correct: torch.Tensor
    samples: torch.Tensor


class StepStats(NamedTuple):
    """Statistics of one optimizer step (or, summed, of a logging window), 0-d float32
    tensors on the device: the loss terms are means over the step's micro-batches, the
    counts sums.

    Attributes:
        loss: the objective that was backpropagated (module docstring): task loss (with
            distillation, if any) plus ``aux_loss``.
        cross_entropy: the plain ``loss_fn(logits, y)`` term, without distillation.
        aux_loss: the model's ``.aux_loss`` plus the weighted activity penalty (0 without
            either).
        grad_norm: the gradients' total norm before clipping; 0 when ``train.grad_clip`` is
            0 (no clipping, no norm taken).
        correct: predictions whose argmax is the target.
        samples: predictions counted: samples, or positions for sequence targets ``[B, S]``.
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    correct: torch.Tensor
    samples: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        """All fields 0 on ``device``: an empty logging window."""
        return cls(*torch.zeros(len(cls._fields), device=device))

    @classmethod
    def of_step(cls, micro: Sequence[MicroBatchStats], grad_norm: torch.Tensor) -> StepStats:
        """The statistics of a step from those of its micro-batches."""
        # One stacked sum: the same float32 additions whatever the number of micro-batches.
        loss, ce, aux, correct, samples = torch.stack([torch.stack(m) for m in micro]).sum(0)
        n = len(micro)
        return cls(loss / n, ce / n, aux / n, grad_norm, correct, samples)


def distillation_loss(
    logits_PC: torch.Tensor, teacher_PC: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` averaged over the predictions (rows).

    Example:
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> float(distillation_loss(s, s, 2.0))  # the same distribution: no divergence
        0.0
    """
    if teacher_PC.shape != logits_PC.shape:
        raise ValueError(
            f"train.distill_from: the teacher's logits {tuple(teacher_PC.shape)} do not match "
            f"the model's {tuple(logits_PC.shape)} (another vocabulary or number of classes?)"
        )
    log_p_model = torch.log_softmax(logits_PC.float() / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_PC.float() / temperature, dim=-1)
    kl_P = (log_p_teacher.exp() * (log_p_teacher - log_p_model)).sum(-1)
    return temperature**2 * kl_P.mean()


def micro_batch_loss(
    output: Any,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainConfig,
    teacher_output: Any = None,
) -> tuple[torch.Tensor, MicroBatchStats]:
    """The objective of one micro-batch (module docstring) and its statistics.

    Args:
        output: the model's output (logits, or an object with ``.logits``, ``.aux_loss``,
            ``.activity``).
        y: targets ``[B]`` (or ``[B, S]``), on the logits' device.
        loss_fn: ``(logits_RV, y_R) -> mean loss`` (one row per prediction).
        config: ``spike_rate_penalty``, ``spike_rate_target``, ``distill_weight`` and
            ``distill_temperature`` are read.
        teacher_output: the teacher's output on the same input (distillation), or None.

    Raises:
        ValueError: a spike-rate penalty for a model that reports no activity; teacher
            logits of another shape.
    """
    logits, aux = unpack_output(output)
    logits, y = flat_predictions(logits, y)
    ce = loss_fn(logits.float(), y)
    task = ce
    if teacher_output is not None:
        teacher, _ = unpack_output(teacher_output)
        teacher = teacher.reshape(-1, teacher.shape[-1]).detach()
        soft = distillation_loss(logits, teacher, config.distill_temperature)
        task = (1 - config.distill_weight) * ce + config.distill_weight * soft
    aux = torch.zeros((), device=logits.device) if aux is None else aux.float()
    if config.spike_rate_penalty > 0:
        activity = getattr(output, "activity", None)
        if not isinstance(activity, Activity) or not len(activity):
            raise ValueError(
                "train.spike_rate_penalty > 0 but the model reports no spiking activity: "
                "its output needs an .activity (spiking_moe.Activity) with at least one "
                f"neuron population; got {type(output).__name__}"
            )
        penalty = activity_penalty(activity, config.spike_rate_target)
        aux = aux + config.spike_rate_penalty * penalty
    loss = task + aux
    correct = (logits.detach().argmax(-1) == y).sum().float()
    samples = torch.full((), float(y.shape[0]), device=logits.device)
    return loss, MicroBatchStats(loss.detach(), ce.detach(), aux.detach(), correct, samples)


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """``s -> lr(s) / lr`` (module docstring), for ``torch.optim.lr_scheduler.LambdaLR``."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
