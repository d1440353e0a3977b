"""Encoders from static or analog data to time-major spike trains or currents ``[T, B, ...]``.

- :func:`rate`: Bernoulli spikes with probability ``x`` per step (reproducible through a
  ``torch.Generator``).
- :func:`latency`: one spike per input; stronger inputs fire earlier.
- :func:`direct`: the input repeated as a constant current at every step (first layer MACs).
- :func:`delta`: spikes where a time series changes by more than a threshold.
"""

from __future__ import annotations

import math

import torch

__all__ = ["delta", "direct", "latency", "rate"]


def _check_data(x: torch.Tensor, name: str = "x", unit_interval: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN (shape {tuple(x.shape)})")
    if unit_interval and bool(((x < 0) | (x > 1)).any()):
        raise ValueError(
            f"{name} must lie in [0, 1] (probabilities / intensities), got range "
            f"[{x.min().item():.4g}, {x.max().item():.4g}]"
        )


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")


def rate(
    x: torch.Tensor, num_steps: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bernoulli rate code: ``out[t] ~ Bernoulli(x)`` independently per step.

    Args:
        x: ``[B, ...]`` firing probabilities in [0, 1].
        num_steps: T.
        generator: seeds the draws; same generator state, same spikes.

    Returns:
        ``[T, B, ...]`` spikes in {0, 1}, dtype of ``x``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> rate(torch.tensor([0.0, 1.0]), 3, generator=g).tolist()
        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    """
    _check_data(x, unit_interval=True)
    _check_steps(num_steps)
    probs = x.unsqueeze(0).expand(num_steps, *x.shape)
    uniform = torch.rand(probs.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (uniform < probs).to(x.dtype)


def latency(
    x: torch.Tensor,
    num_steps: int,
    *,
    mode: str = "linear",
    tau: float = 5.0,
    threshold: float = 0.01,
) -> torch.Tensor:
    """Time-to-first-spike code: each input above ``threshold`` fires exactly once.

    ``mode="linear"``: spike time ``round((1 - x) * (T - 1))`` (x=1 fires at t=0).
    ``mode="log"``: RC-charging time ``tau * ln(x / (x - threshold))``, clipped to T - 1
    (as snnTorch's ``spikegen.latency`` without normalisation).
    Inputs at or below ``threshold`` never fire.

    Args:
        x: ``[B, ...]`` intensities in [0, 1].
        num_steps: T.

    Returns:
        ``[T, B, ...]`` spikes in {0, 1}, at most one per input.

    Example:
        >>> latency(torch.tensor([1.0, 0.5, 0.0]), 3).T.tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    _check_data(x, unit_interval=True)
    _check_steps(num_steps)
    if mode not in ("linear", "log"):
        raise ValueError(f"unknown latency mode {mode!r}; valid: ['linear', 'log']")
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be > 0, got {tau}")
    fires = x > threshold
    if mode == "linear":
        t_spike = torch.round((1.0 - x) * (num_steps - 1))
    else:
        safe = torch.where(fires, x, torch.ones_like(x))
        t_spike = tau * torch.log(safe / (safe - threshold))
        t_spike = torch.clamp(torch.round(t_spike), max=num_steps - 1)
    steps = torch.arange(num_steps, device=x.device, dtype=x.dtype).view(-1, *([1] * x.dim()))
    return ((steps == t_spike.unsqueeze(0)) & fires.unsqueeze(0)).to(x.dtype)


def direct(x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Constant-current code: ``x`` repeated at every step (a view, no copy).

    Example:
        >>> direct(torch.tensor([0.3]), 2).tolist()
        [[0.30000001192092896], [0.30000001192092896]]
    """
    _check_data(x)
    _check_steps(num_steps)
    return x.unsqueeze(0).expand(num_steps, *x.shape)


def delta(x: torch.Tensor, threshold: float = 0.1, *, off_spikes: bool = False) -> torch.Tensor:
    """Delta modulation of a time series: spike when the signal moved by more than ``threshold``.

    Step t compares ``x[t]`` with ``x[t-1]`` (``x[-1]`` = 0, as snnTorch's ``spikegen.delta``).

    Args:
        x: ``[T, B, ...]`` time-major signal.
        threshold: change needed to fire (> 0).
        off_spikes: if True, return ``[T, B, ..., 2]`` with ON (increase) and OFF (decrease)
            channels, both binary; else only ON spikes ``[T, B, ...]``.

    Example:
        >>> delta(torch.tensor([[0.0], [0.5], [0.5], [0.0]]), 0.2, off_spikes=True)[:, 0].tolist()
        [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    """
    _check_data(x)
    if x.dim() < 2:
        raise ValueError(f"x must be a time-major series [T, B, ...], got shape {tuple(x.shape)}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be > 0, got {threshold}")
    previous = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
    change = x - previous
    on = (change > threshold).to(x.dtype)
    if not off_spikes:
        return on
    off = (change < -threshold).to(x.dtype)
    return torch.stack([on, off], dim=-1)
