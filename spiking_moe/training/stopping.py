"""Stopping a training run cleanly, on every rank at the same step.

A run stops early for two reasons:

- **asked to**: SIGINT/SIGTERM on any rank (a second signal stops at once, without a
  checkpoint) or :meth:`StopControl.request`. The trainer saves a checkpoint and returns.
- **a non-finite loss**: the first step whose loss is NaN or infinite is tracked on the device,
  ``[step, loss]`` (``[-1, 0]`` while none), so no step waits for the host. When the ranks
  compare notes, the earliest such step of any rank ends the run with
  :class:`NonFiniteLossError`, and no checkpoint is written after it.

The ranks compare notes (:meth:`StopControl.agree`) in one all-reduce of
``[-first bad step, stop?]`` with MAX, which gives the earliest bad step of any rank and
whether any rank must stop.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["NonFiniteLossError", "StopControl", "first_non_finite", "no_bad_step"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. ``step`` is the 1-based optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    @classmethod
    def at(
        cls, step: int, loss: float, checkpoint: Path | None, checkpoint_step: int | None
    ) -> NonFiniteLossError:
        """The error of a loss ``loss`` at ``step``, naming the checkpoint kept (the one
        written at ``checkpoint_step``, None when none was)."""
        if checkpoint_step is None:
            kept = "no checkpoint had been written"
        else:
            kept = f"the last good checkpoint {checkpoint} (step {checkpoint_step}) is kept"
        return cls(
            f"non-finite training loss ({loss}) at step {step}; training stopped and {kept}. "
            "Lower train.lr, enable train.grad_clip or check the data.",
            step=step,
        )


def no_bad_step(device: torch.device) -> torch.Tensor:
    """``[-1, 0]``: no non-finite loss seen yet (float64, on ``device``)."""
    return torch.tensor([-1.0, 0.0], device=device, dtype=torch.float64)


def first_non_finite(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``[step, loss]`` of the first non-finite loss so far (``[-1, 0]`` if none), on device."""
    with torch.no_grad():
        is_first = ~torch.isfinite(loss) & (first_bad[0] < 0)
        here = torch.stack([torch.full_like(first_bad[0], step), loss.double()])
        return torch.where(is_first, here, first_bad)


class StopControl:
    """Stop requests of one process (signals and :meth:`request`), agreed across ranks.

    Attributes:
        signal: the number of the first signal received, or None.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._requested = False

    def request(self) -> None:
        """Stop after the current step (as on SIGINT/SIGTERM)."""
        self._requested = True

    def install(self) -> dict[int, Any]:
        """Catch SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second signal {signum}: stopping without a checkpoint")
        self.signal = signum
        logger.warning("signal %d: will save a checkpoint and stop after this step", signum)

    def agree(self, first_bad: torch.Tensor) -> tuple[int, float, bool]:
        """``(earliest non-finite step of any rank or -1, this rank's bad loss, stop?)``.

        Collective in a multi-process job (every rank calls it at the same steps).
        """
        stop = self.signal is not None or self._requested
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return int(first_bad[0].item()), float(first_bad[1].item()), stop
        # MAX over (-first bad step, stop) gives the earliest bad step on any rank.
        step = first_bad[0]
        neg_first = torch.where(step < 0, torch.full_like(step, -math.inf), -step)
        votes = torch.stack([neg_first, torch.full_like(step, float(stop))])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        first, stop_any = votes.tolist()
        return (
            (-1 if math.isinf(first) else int(-first)),
            float(first_bad[1].item()),
            bool(stop_any),
        )
