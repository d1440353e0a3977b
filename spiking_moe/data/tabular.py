"""Small tabular data held in memory and encoded over time per batch: sklearn's digits and
MNIST-1D, both made on this machine (nothing is downloaded). Letters as in
:mod:`spiking_moe.data`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import encoding as _encoding
from .loader import _mix_seed

__all__ = ["MNIST1D_LENGTH", "InMemoryDataset", "load_digits", "load_mnist1d"]

#: Points of an MNIST-1D series (:func:`load_mnist1d`): ``T`` of the ``"sequence"`` encoding (one
#: point per step), and the default ``T`` of ``"current"``.
MNIST1D_LENGTH = 40


class InMemoryDataset(Dataset):
    """Small data held as tensors, encoded over time per batch.

    Args:
        x: ``[N, F]`` static features (encodings "rate", "current") or ``[N, T, F]`` time series
            (encoding "sequence").
        y: ``[N]`` integer labels in ``[0, num_classes)``.
        encoding: "rate" (Bernoulli spikes with probability ``x``, needs ``x`` in [0, 1]),
            "latency" (one spike per feature, earlier for larger ``x``, none for ``x`` near 0;
            needs ``x`` in [0, 1]: the sparsest input code, see
            :func:`spiking_moe.encoding.latency`), "current" (``x`` as constant input current at
            every step) or "sequence".
        num_steps: T for "rate" and "current"; must equal ``x.shape[1]`` for "sequence".
        num_classes: V.
        seed: fixes the rate-code noise of ``__getitem__``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        encoding: str,
        num_steps: int,
        num_classes: int,
        seed: int = 0,
    ):
        if encoding not in ("rate", "latency", "current", "sequence"):
            raise ValueError(
                f"unknown encoding {encoding!r}; valid: ['rate', 'latency', 'current', 'sequence']"
            )
        expected_dim = 3 if encoding == "sequence" else 2
        if x.dim() != expected_dim:
            raise ValueError(
                f"encoding {encoding!r} needs x of {expected_dim} dims "
                f"({'[N, T, F]' if expected_dim == 3 else '[N, F]'}), got shape {tuple(x.shape)}"
            )
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
        if encoding == "sequence" and x.shape[1] != num_steps:
            raise ValueError(f"sequence length {x.shape[1]} != num_steps {num_steps}")
        if encoding in ("rate", "latency") and bool(((x < 0) | (x > 1)).any()):
            raise ValueError(f"encoding {encoding!r} needs x in [0, 1] (intensities)")
        self.x = x.float().contiguous()
        self.y = y.long()
        self.encoding = encoding
        self.num_steps = num_steps
        self.num_classes = num_classes
        self.num_features = x.shape[-1]
        self.seed = seed

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, index))
        x_TBF, y_B = self.get_batch(torch.tensor([index]), generator)
        return x_TBF[:, 0], int(y_B[0])

    def subset(self, indices: torch.Tensor) -> InMemoryDataset:
        """A dataset of the samples at ``indices`` (copies the small tensors)."""
        return InMemoryDataset(
            self.x[indices],
            self.y[indices],
            encoding=self.encoding,
            num_steps=self.num_steps,
            num_classes=self.num_classes,
            seed=self.seed,
        )

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_TBF, y_B)`` for the samples at ``indices``; ``generator`` seeds the rate code."""
        x = self.x[indices]
        if self.encoding == "rate":
            x_TBF = _encoding.rate(x, self.num_steps, generator=generator)
        elif self.encoding == "latency":
            x_TBF = _encoding.latency(x, self.num_steps)
        elif self.encoding == "current":
            x_TBF = _encoding.direct(x, self.num_steps).contiguous()
        else:
            x_TBF = x.transpose(0, 1).contiguous()
        return x_TBF, self.y[indices]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits: ``(x_NF, y_N)``, 1797 8x8 images as F = 64 pixel intensities
    ``/ 16`` in [0, 1] (float32) and their labels 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return torch.from_numpy(digits.data / 16.0).float(), torch.from_numpy(digits.target)


def load_mnist1d(num_samples: int, seed: int) -> dict:
    """MNIST-1D generated here by ``mnist1d.data.make_dataset`` (never ``get_dataset``, which
    downloads): the dict it returns, with ``x``, ``y``, ``x_test`` and ``y_test`` (series of
    length :data:`MNIST1D_LENGTH`). The caller's numpy and python random streams are kept."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global numpy and python generators; keep the caller's streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
