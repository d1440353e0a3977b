"""Deterministic batching: seeded index splits, a time-major ``collate_fn`` and
:class:`BatchLoader`, whose permutations and rate-code noise come from seeds mixed with where
they are used (``_mix_seed``). Letters as in :mod:`spiking_moe.data`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["BatchLoader", "collate_time_major", "split_indices"]


def _mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (statistically independent streams)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def split_indices(num_samples: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Seeded random split of ``range(num_samples)`` into ``len(fractions) + 1`` index sets.

    The last set takes the remainder. Same ``(num_samples, fractions, seed)``, same split.

    Example:
        >>> [len(s) for s in split_indices(10, (0.2, 0.3), seed=0)]
        [2, 3, 5]
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1:
        raise ValueError(f"fractions must be >= 0 and sum to <= 1, got {fractions}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    sizes = [int(round(f * num_samples)) for f in fractions]
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size].sort().values)
        start += size
    out.append(perm[start:].sort().values)
    return out


def collate_time_major(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` for a ``torch.utils.data.DataLoader``: ``(x_TF, y)`` items -> ``(x_TBF, y_B)``.

    Example:
        >>> x, y = collate_time_major([(torch.zeros(3, 2), 0), (torch.ones(3, 2), 1)])
        >>> tuple(x.shape), y.tolist()
        ((3, 2, 2), [0, 1])
    """
    x_TBF = torch.stack([x for x, _ in items], dim=1)
    y_B = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    return x_TBF, y_B


class BatchLoader:
    """Deterministic batches from a dataset with ``get_batch``: ``(x_TBF, y_B)``, or
    ``(x_BS, y_BS)`` for :class:`TextDataset`.

    Epoch ``e`` visits a permutation fixed by ``(seed, e)`` (or the stored order when
    ``shuffle=False``). Under data parallelism every rank computes the same permutation and
    takes every ``world_size``-th sample from position ``rank``; with ``pad=True`` (training)
    the permutation is padded by wrapping around so all ranks see the same number of batches,
    with ``pad=False`` (evaluation) each sample is seen exactly once overall. Rate-code noise of
    batch ``b`` comes from a generator seeded by ``(seed, epoch, b, rank)``.

    Args:
        dataset: an :class:`InMemoryDataset`, :class:`SHDDataset`, :class:`NMNISTDataset`,
            :class:`TextDataset` or anything with ``__len__`` and
            ``get_batch(indices, generator)``.
        batch_size: per-process batch size B.
        shuffle: reshuffle every epoch.
        seed: permutation and encoding seed.
        drop_last: drop the last incomplete batch.
        rank, world_size: this process's shard.
        pad: pad the permutation to a multiple of ``world_size`` (see above).
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool | None = None,
    ):
        if not hasattr(dataset, "get_batch"):
            raise TypeError(f"{type(dataset).__name__} has no get_batch(indices, generator)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = shuffle if pad is None else pad
        self.epoch = 0

    def _shard_size(self) -> int:
        n = len(self.dataset)
        if self.pad:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``iter(loader)`` replays."""
        self.epoch = epoch

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order in ``epoch``."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            )
        else:
            order = torch.arange(n)
        if self.pad and n % self.world_size:
            extra = self.world_size - n % self.world_size
            order = torch.cat([order, order[:extra].repeat(math.ceil(extra / max(n, 1)))[:extra]])
        return order[self.rank :: self.world_size]

    def iter_epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of ``epoch`` (exactly as a full pass)."""
        order = self.indices(epoch)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, b, self.rank))
            yield self.dataset.get_batch(idx, generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)
