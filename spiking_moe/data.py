"""Offline datasets presented as time-major spike trains or currents, and a deterministic loader.

Nothing here downloads. The small datasets are generated or bundled; the event datasets and
user text are read from files the user already has; the default text corpus is the Python
standard library's own source, which every machine running this code has.

=========  ==================================================  =======  ===========================
name       source                                              classes  batch ``x``
=========  ==================================================  =======  ===========================
digits     ``sklearn.datasets.load_digits`` (1797 8x8 images,  10       ``[T, B, F]``, F = 64;
           bundled), pixels / 16 in [0, 1]                              "rate": Bernoulli spikes;
                                                                        "current": constant
mnist1d    ``mnist1d.data.make_dataset`` (generated locally,   10       ``[T, B, F]``; "sequence":
           never ``get_dataset``, which downloads)                      T = 40, F = 1, the signal
                                                                        as input current;
                                                                        "current": F = 40
shd        Spiking Heidelberg Digits ``shd_{train,test}.h5``   20       ``[T, B, F]``, F = 700,
                                                                        binary spikes
nmnist     N-MNIST ``{Train,Test}/<digit>/*.bin``              10       ``[T, B, F]``,
                                                                        F = 2 * 34 * 34, binary
text       bytes of ``data.text_paths`` (files, folders), or   256      ``[B, S]`` int64 byte ids
           the ``*.py`` source of the running Python's                  ("tokens", T = 4 by
           standard library; split by file (see                         default: the model holds
           :func:`load_text_corpus`)                                    each as a current)
=========  ==================================================  =======  ===========================

Event data are binned into T equal bins over ``[0, max_time)``; several events of one channel in
one bin give a single spike (values stay in {0, 1}, so downstream layers count accumulates, not
multiply-accumulates). Events at or after ``max_time`` are dropped.

Event data through tonic (optional, ``pip install "spiking-moe[events]"``): with
``data.event_reader = "tonic"`` the shd and nmnist frames are binned by tonic's ``ToFrame``, and
N-MNIST files are decoded by tonic's ``tonic.io.read_mnist_file``; :func:`tonic_frames` and
:class:`TonicFramesDataset` bin any tonic dataset (DVS Gesture, SSC, N-Caltech101, ...) the same
way for these models. Only files the user already has are read; nothing is downloaded. What is
kept of ours, and why:

- File location and listing (``data.root``): tonic's dataset classes (``tonic.datasets.SHD``,
  ``NMNIST``) look under ``<save_to>/<ClassName>/`` for the downloaded archive itself
  (``shd_train.h5.zip``, ``train.zip``; NMNIST also wants at least 10000 ``.bin`` files) and call
  ``download()`` when it is missing, so they cannot open a user's unzipped files offline. The
  tonic path lists files as the native one does and raises the same ``FileNotFoundError``
  naming the expected path.
- The SHD reader: tonic's (``tonic.datasets.hsd.HSD.__getitem__``) stores spike times as whole
  microseconds, truncating the file's float seconds, so an event less than 1 us after a bin
  edge that is not a whole microsecond would move one bin earlier. The h5py reader here keeps
  the exact times; tonic bins them.

How tonic's binning is made to reproduce the native frames exactly (same ``[T, F]`` float32
{0, 1} frames, labels and order; ``tests/test_data_tonic.py`` checks it):

- Bin edges: ``ToFrame`` slices ``[k w, (k+1) w)`` with edges from ``arange``, the native code
  takes ``floor(t * (T / max_time))``; in floating point these disagree exactly at some edges
  (e.g. N-MNIST, T = 30 over 0.3 s: events at 70, 140, 270, 280 and 290 ms go one bin earlier
  natively; T = 3: at 100 ms). So event times are handed to ``ToFrame`` in units of one bin,
  computed with the native formula, with ``time_window = 1``, ``start_time = 0``,
  ``end_time = T``: its edges are then the integers 0..T, exact, and ``k <= u < k + 1`` is
  ``floor(u) = k``. Events before 0 or at/after ``max_time`` fall in no slice, as natively.
- ``ToFrame`` counts events (int16); the frames are clipped to {0, 1}. It needs time-sorted
  events (it slices with ``searchsorted``), so events are sorted first. For an empty
  recording it returns one frame (and with x and y swapped), so empty samples get T zero
  frames here.
- N-MNIST: tonic's decoder treats ``y == 240`` as a timestamp-overflow marker (drops it and
  adds 8192 us to every later event, after Garrick Orchard's ``eventvision.py``); the native
  reader drops the marker as an off-sensor event and shifts nothing, so on files that hold
  such markers the later events of the two paths differ by 8192 us (the MATLAB reader of the
  dataset's authors has no markers either). tonic keeps other events outside the 34 x 34
  sensor, which ``ToFrame`` cannot place, so they are dropped as natively; a file whose size
  is not a multiple of 5 bytes raises as natively (tonic would decode it misaligned).
- Caching: ``tonic.DiskCachedDataset`` works offline; wrap a tonic dataset in it before
  :class:`TonicFramesDataset` (pass ``sensor_size``). The built-in datasets do not cache.

Each dataset is described once, by a :class:`DatasetSpec` in :data:`DATASETS` (encodings,
default steps, the files it reads, how it loads): configuration checks
(:class:`spiking_moe.config.DataConfig`) and :func:`build_datasets` both read it.

The classification datasets yield ``(x_TF, label)`` per sample and ``(x_TBF, y_B)`` per batch
through ``get_batch``; the text dataset yields next-byte pairs ``(x_BS, y_BS)`` (``y`` is ``x``
shifted by one byte) and leaves the encoding over T to the model. :class:`BatchLoader` draws
batches with a permutation fixed by ``(seed, epoch)`` and rate-encoding noise fixed by
``(seed, epoch, batch, rank)``, so an epoch can be replayed from any batch (exact resume) and
sharded across processes without a sampler object.

Letters: T time steps, B batch, N samples, F features, C classes, S context (bytes per
window), W windows, L bytes of a corpus split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import random
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import encoding as _encoding

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataSplits",
    "DatasetSpec",
    "EVENT_READERS",
    "InMemoryDataset",
    "NMNISTDataset",
    "SHDDataset",
    "TextCorpus",
    "TextDataset",
    "TonicFramesDataset",
    "build_datasets",
    "collate_time_major",
    "expected_files",
    "load_text_corpus",
    "split_indices",
    "stdlib_text_files",
    "text_split",
    "tonic_frames",
    "user_text_files",
]

logger = logging.getLogger(__name__)

SHD_CHANNELS = 700
SHD_CLASSES = 20
NMNIST_SIZE = 34
NMNIST_FEATURES = 2 * NMNIST_SIZE * NMNIST_SIZE
MNIST1D_LENGTH = 40
# Defaults of the event datasets (steps, binning window in seconds); their specs use them too.
SHD_DEFAULTS = (100, 1.4)
NMNIST_DEFAULTS = (30, 0.3)
#: ``data.event_reader`` values: "native" (this module's readers and binning) or "tonic" (the
#: optional tonic package; see the module docstring).
EVENT_READERS = ("native", "tonic")
_TONIC_INSTALL = 'pip install "spiking-moe[events]"'


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
        num_classes: C.
        seed: fixes the rate-code noise of :meth:`__getitem__`.
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


def _tonic():
    """The tonic package (optional), or an ImportError that says how to install it."""
    try:
        import tonic
        import tonic.io
        import tonic.transforms
    except ImportError as exc:
        raise ImportError(
            f'data.event_reader = "tonic" needs the optional tonic package: {_TONIC_INSTALL} '
            f'(or use the default event_reader "native"); import failed: {exc}'
        ) from exc
    return tonic


def tonic_frames(
    events: np.ndarray,
    sensor_size: Sequence[int],
    num_steps: int,
    max_time_s: float,
    *,
    time_unit_s: float = 1e-6,
) -> torch.Tensor:
    """Bin one tonic event array into ``[T, F]`` binary spikes with tonic's ``ToFrame``, exactly
    as the native readers bin (see the module docstring): T equal bins over
    ``[0, max_time_s)``, an event at time ``t`` in bin ``floor(t * time_unit_s * T /
    max_time_s)``, events outside ``[0, max_time_s)`` dropped, values in {0, 1}.

    Needs the optional tonic package (``pip install "spiking-moe[events]"``).

    Args:
        events: a tonic structured array with fields ``t``, ``x`` and optionally ``y`` and
            ``p`` (missing ``p``: one polarity), any order.
        sensor_size: tonic's ``(x, y, p)`` sizes (W, H, P), e.g. ``dataset.sensor_size``;
            ``(700, 1, 1)`` for SHD, ``(34, 34, 2)`` for N-MNIST.
        num_steps: T.
        max_time_s: the binning window in seconds.
        time_unit_s: seconds per unit of ``events["t"]`` (tonic's datasets use microseconds).

    Returns:
        ``[T, F]`` float32 tensor, F = W * H * P; an event's channel is ``p * H * W + y * W + x``
        (``p * W + x`` without ``y``), the native channel layout of SHD and N-MNIST.

    Raises:
        ImportError: tonic is not installed.
        ValueError: an event lies outside ``sensor_size``, or the array lacks ``t`` or ``x``.

    Example (with tonic installed; tonic datasets yield such ``events`` too)::

        events = tonic.io.read_mnist_file("Train/3/00001.bin", tonic.datasets.NMNIST.dtype)
        x_TF = tonic_frames(events, (34, 34, 2), num_steps=30, max_time_s=0.3)  # [30, 2312]
    """
    tonic = _tonic()
    width, height, polarities = (int(s) for s in sensor_size)
    names = events.dtype.names or ()
    if "t" not in names or "x" not in names:
        raise ValueError(f"events need fields 't' and 'x' (tonic structured array), got {names}")
    has_y = "y" in names
    if not has_y and height != 1:
        raise ValueError(f"events without 'y' need sensor_size (W, 1, P), got {tuple(sensor_size)}")
    if len(events) == 0:  # ToFrame returns one frame for an empty recording, not T
        return torch.zeros(num_steps, width * height * polarities)
    # ToFrame indexes frames with x, y, p as they are (a negative one wraps around silently).
    checked = [("x", width)] + [("y", height)] * has_y + [("p", polarities)] * (polarities > 1)
    for name, size in checked:
        if name in names:
            values = events[name].astype(np.int64)
            if values.min() < 0 or values.max() >= size:
                raise ValueError(
                    f"event {name!r} values must lie in [0, {size}) for sensor_size "
                    f"{tuple(sensor_size)}, got [{values.min()}, {values.max()}]"
                )
    if polarities == 1 and "p" in names and np.unique(events["p"]).size > 1:
        raise ValueError(f"sensor_size {tuple(sensor_size)} has one polarity, events have several")
    # Time in units of one bin, by the native formula; then ToFrame's edges are 0, 1, ..., T.
    fields = [("t", np.float64), ("x", np.int64)] + [("y", np.int64)] * has_y + [("p", np.int64)]
    binned = np.empty(len(events), dtype=fields)
    binned["t"] = (events["t"] * time_unit_s) * (num_steps / max_time_s)
    binned["x"] = events["x"]
    if has_y:
        binned["y"] = events["y"]
    binned["p"] = events["p"] if "p" in names and polarities > 1 else 0  # tonic: p = 0 if P = 1
    binned = binned[np.argsort(binned["t"], kind="stable")]
    to_frame = tonic.transforms.ToFrame(
        sensor_size=(width, height, polarities),
        time_window=1.0,
        start_time=0.0,
        end_time=float(num_steps),
    )
    frames = to_frame(binned)  # [T, P, H, W] (or [T, P, W]) event counts, int16
    if frames.shape[0] != num_steps:  # pragma: no cover - a tonic change; never silently
        raise RuntimeError(f"tonic ToFrame gave {frames.shape[0]} frames, expected {num_steps}")
    return torch.from_numpy((frames.reshape(num_steps, -1) != 0).astype(np.float32))


class _EventDataset(Dataset):
    """Shared binning of (time, channel) events into ``[T, B, F]`` binary spikes: natively, or
    with tonic's ``ToFrame`` (``event_reader = "tonic"``, same frames)."""

    num_features: int
    num_classes: int
    #: tonic ``(x, y, p)`` sensor size and seconds per time unit of :meth:`_tonic_events`.
    sensor_size: tuple[int, int, int]
    time_unit_s: float = 1.0

    def __init__(
        self,
        num_steps: int,
        max_time_s: float,
        indices: np.ndarray,
        event_reader: str = "native",
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not max_time_s > 0:
            raise ValueError(f"max_time_s must be > 0, got {max_time_s}")
        if event_reader not in EVENT_READERS:
            raise ValueError(f"unknown event_reader {event_reader!r}; valid: {list(EVENT_READERS)}")
        if event_reader == "tonic":
            _tonic()  # fail now, not at the first batch
        self.num_steps = num_steps
        self.max_time_s = float(max_time_s)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.event_reader = event_reader

    def __len__(self) -> int:
        return len(self.indices)

    def _events(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(times in seconds, channel ids, label) of stored sample ``index``."""
        raise NotImplementedError

    def _tonic_events(self, index: int) -> tuple[np.ndarray, int]:
        """(tonic structured events, label) of stored sample ``index``; by default the native
        events as a one-row sensor ``(F, 1, 1)`` with times in seconds."""
        times, channels, label = self._events(index)
        events = np.empty(len(times), dtype=[("t", np.float64), ("x", np.int64), ("p", np.int64)])
        events["t"], events["x"], events["p"] = times, channels, 0
        return events, label

    def _tonic_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            empty = torch.zeros(self.num_steps, 0, self.num_features)
            return empty, torch.zeros(0, dtype=torch.long)
        frames, labels = [], []
        for i in indices.tolist():
            events, label = self._tonic_events(int(self.indices[i]))
            frames.append(
                tonic_frames(
                    events,
                    self.sensor_size,
                    self.num_steps,
                    self.max_time_s,
                    time_unit_s=self.time_unit_s,
                )
            )
            labels.append(int(label))
        return torch.stack(frames, dim=1), torch.tensor(labels, dtype=torch.long)

    def _bin(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        x_TBF = np.zeros((self.num_steps, len(samples), self.num_features), dtype=np.float32)
        for b, (times, channels) in enumerate(samples):
            bins = np.floor(times * (self.num_steps / self.max_time_s)).astype(np.int64)
            keep = (bins >= 0) & (bins < self.num_steps)
            x_TBF[bins[keep], b, channels[keep]] = 1.0
        return torch.from_numpy(x_TBF)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x_TBF, y_B = self.get_batch(torch.tensor([index]))
        return x_TBF[:, 0], int(y_B[0])

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_TBF, y_B)`` binary spikes for the samples at ``indices`` (no randomness)."""
        if self.event_reader == "tonic":
            return self._tonic_batch(indices)
        samples, labels = [], []
        for i in indices.tolist():
            times, channels, label = self._events(int(self.indices[i]))
            samples.append((times, channels))
            labels.append(label)
        return self._bin(samples), torch.tensor(labels, dtype=torch.long)


class SHDDataset(_EventDataset):
    """Spiking Heidelberg Digits from a local ``.h5`` file (Cramer, Zenke et al. 2020 format).

    The file holds ``spikes/times`` (seconds, one array per sample), ``spikes/units`` (channel
    0..699 per event) and ``labels`` (0..19).

    Args:
        path: ``.../shd_train.h5`` or ``.../shd_test.h5``.
        num_steps: T bins over ``[0, max_time_s)``.
        indices: which stored samples to use (all when None).
        event_reader: "native", or "tonic" to bin with tonic's ``ToFrame`` (same frames; the
            file is read here either way, see the module docstring).
    """

    num_features = SHD_CHANNELS
    num_classes = SHD_CLASSES
    sensor_size = (SHD_CHANNELS, 1, 1)

    def __init__(
        self,
        path: str | Path,
        num_steps: int = SHD_DEFAULTS[0],
        max_time_s: float = SHD_DEFAULTS[1],
        indices: np.ndarray | None = None,
        event_reader: str = "native",
    ):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"SHD file not found: {self.path} (expected shd_train.h5 and shd_test.h5 in "
                "data.root; get them from https://zenkelab.org/datasets/ and gunzip)"
            )
        self._file = h5py.File(self.path, "r")
        for key in ("spikes/times", "spikes/units", "labels"):
            if key not in self._file:
                raise ValueError(f"{self.path} is not an SHD file: it has no {key!r} dataset")
        self._times = self._file["spikes/times"]
        self._units = self._file["spikes/units"]
        self._labels = np.asarray(self._file["labels"][:], dtype=np.int64)
        if len(self._labels) and (self._labels.min() < 0 or self._labels.max() >= SHD_CLASSES):
            raise ValueError(f"{self.path}: labels must lie in [0, {SHD_CLASSES})")
        all_indices = np.arange(len(self._labels)) if indices is None else indices
        super().__init__(num_steps, max_time_s, all_indices, event_reader)

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.indices]

    def subset(self, indices: torch.Tensor) -> SHDDataset:
        return SHDDataset(
            self.path,
            self.num_steps,
            self.max_time_s,
            self.indices[indices.numpy()],
            self.event_reader,
        )

    def _events(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        units = np.asarray(self._units[index], dtype=np.int64)
        if units.size and (units.min() < 0 or units.max() >= SHD_CHANNELS):
            raise ValueError(f"{self.path}: sample {index} has units outside [0, {SHD_CHANNELS})")
        times = np.asarray(self._times[index], dtype=np.float64)
        return times, units, int(self._labels[index])


def read_nmnist_events(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode one N-MNIST ``.bin`` file (Orchard et al. 2015): 5 bytes per event.

    Byte 0 is x, byte 1 is y, bit 7 of byte 2 the polarity, and the remaining 23 bits
    (byte 2 bits 6..0, bytes 3, 4; big-endian) the timestamp in microseconds.

    Returns:
        ``(x, y, polarity, t_us)`` int64 arrays, one entry per event.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of 5 (N-MNIST events)")
    raw = raw.reshape(-1, 5).astype(np.int64)
    t_us = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]
    return raw[:, 0], raw[:, 1], raw[:, 2] >> 7, t_us


class NMNISTDataset(_EventDataset):
    """N-MNIST from local binary event files in ``<root>/<Train|Test>/<digit>/*.bin``.

    Channel of an event: ``polarity * 34 * 34 + y * 34 + x`` (F = 2312).

    Args:
        split_dir: ``<root>/Train`` or ``<root>/Test``.
        num_steps: T bins over ``[0, max_time_s)``.
        indices: which files (in sorted order) to use (all when None).
        event_reader: "native", or "tonic" to decode each file with tonic's
            ``read_mnist_file`` and bin with its ``ToFrame`` (the same frames, except after
            timestamp-overflow markers; see the module docstring).
    """

    num_features = NMNIST_FEATURES
    num_classes = 10
    sensor_size = (NMNIST_SIZE, NMNIST_SIZE, 2)
    time_unit_s = 1e-6

    def __init__(
        self,
        split_dir: str | Path,
        num_steps: int = NMNIST_DEFAULTS[0],
        max_time_s: float = NMNIST_DEFAULTS[1],
        indices: np.ndarray | None = None,
        event_reader: str = "native",
        *,
        _files: list[tuple[Path, int]] | None = None,
    ):
        self.split_dir = Path(split_dir)
        if _files is None:
            if not self.split_dir.is_dir():
                raise FileNotFoundError(
                    f"N-MNIST folder not found: {self.split_dir} (expected data.root to hold "
                    "Train/<digit>/*.bin and Test/<digit>/*.bin, as unzipped from the "
                    "original release)"
                )
            _files = [
                (path, digit)
                for digit in range(10)
                for path in sorted((self.split_dir / str(digit)).glob("*.bin"))
            ]
            if not _files:
                raise FileNotFoundError(f"no N-MNIST files {self.split_dir}/<digit>/*.bin")
        self._files = _files
        all_indices = np.arange(len(_files)) if indices is None else indices
        super().__init__(num_steps, max_time_s, all_indices, event_reader)

    @property
    def labels(self) -> np.ndarray:
        return np.array([self._files[i][1] for i in self.indices], dtype=np.int64)

    def subset(self, indices: torch.Tensor) -> NMNISTDataset:
        return NMNISTDataset(
            self.split_dir,
            self.num_steps,
            self.max_time_s,
            self.indices[indices.numpy()],
            self.event_reader,
            _files=self._files,
        )

    def _events(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        path, label = self._files[index]
        x, y, polarity, t_us = read_nmnist_events(path)
        inside = (x < NMNIST_SIZE) & (y < NMNIST_SIZE)
        channels = polarity * NMNIST_SIZE * NMNIST_SIZE + y * NMNIST_SIZE + x
        return t_us[inside] * 1e-6, channels[inside], label

    def _tonic_events(self, index: int) -> tuple[np.ndarray, int]:
        tonic = _tonic()
        path, label = self._files[index]
        size = path.stat().st_size
        if size % 5:  # tonic would decode a misaligned file without a word
            raise ValueError(f"{path}: size {size} bytes is not a multiple of 5 (N-MNIST events)")
        events = tonic.io.read_mnist_file(str(path), dtype=tonic.datasets.NMNIST.dtype)
        # tonic keeps events off the 34 x 34 sensor (ToFrame cannot place them); drop them.
        return events[(events["x"] < NMNIST_SIZE) & (events["y"] < NMNIST_SIZE)], label


class TonicFramesDataset(_EventDataset):
    """Any tonic dataset (or anything whose ``dataset[i]`` is ``(events, label)`` with tonic
    structured events) as binary ``[T, F]`` spike frames for these models: ``get_batch`` for
    :class:`BatchLoader`, ``(x_TF, label)`` per item, binned by :func:`tonic_frames`.

    Nothing is downloaded here; construct the tonic dataset from files you already have (its
    own ``download`` may run when they are missing). ``tonic.DiskCachedDataset`` (offline) can
    wrap ``dataset`` to cache decoded events; pass ``sensor_size`` then.

    Args:
        dataset: e.g. ``tonic.datasets.DVSGesture("~/data")``.
        num_steps: T bins over ``[0, max_time_s)``.
        max_time_s: the binning window in seconds.
        num_classes: C; default ``len(dataset.classes)``.
        sensor_size: tonic ``(x, y, p)``; default ``dataset.sensor_size``.
        time_unit_s: seconds per unit of the events' ``t`` (tonic's datasets: microseconds).
        indices: which items of ``dataset`` to use (all when None).

    Example (with tonic installed)::

        frames = TonicFramesDataset(tonic.datasets.DVSGesture("~/data"), 50, 1.5)
        x_TBF, y_B = frames.get_batch(torch.arange(8))  # x_TBF: [50, 8, 128 * 128 * 2]
    """

    def __init__(
        self,
        dataset: Any,
        num_steps: int,
        max_time_s: float,
        *,
        num_classes: int | None = None,
        sensor_size: Sequence[int] | None = None,
        time_unit_s: float = 1e-6,
        indices: np.ndarray | None = None,
    ):
        sensor_size = (
            sensor_size if sensor_size is not None else getattr(dataset, "sensor_size", None)
        )
        if sensor_size is None or len(sensor_size) != 3:
            raise ValueError(
                f"sensor_size must be tonic's (x, y, p) sizes; {type(dataset).__name__} has no "
                f"sensor_size attribute, so pass one (got {sensor_size!r})"
            )
        if num_classes is None:
            classes = getattr(dataset, "classes", None)
            if classes is None or not len(classes):
                raise ValueError(f"{type(dataset).__name__} has no classes; pass num_classes")
            num_classes = len(classes)
        if not time_unit_s > 0:
            raise ValueError(f"time_unit_s must be > 0, got {time_unit_s}")
        self.dataset = dataset
        self.sensor_size = tuple(int(s) for s in sensor_size)
        self.num_features = math.prod(self.sensor_size)
        self.num_classes = int(num_classes)
        self.time_unit_s = float(time_unit_s)
        all_indices = np.arange(len(dataset)) if indices is None else indices
        super().__init__(num_steps, max_time_s, all_indices, event_reader="tonic")

    def subset(self, indices: torch.Tensor) -> TonicFramesDataset:
        return TonicFramesDataset(
            self.dataset,
            self.num_steps,
            self.max_time_s,
            num_classes=self.num_classes,
            sensor_size=self.sensor_size,
            time_unit_s=self.time_unit_s,
            indices=self.indices[indices.numpy()],
        )

    def _tonic_events(self, index: int) -> tuple[np.ndarray, int]:
        events, label = self.dataset[index]
        return events, int(label)


TEXT_VOCAB = 256
TEXT_DEFAULT_STEPS = 4
#: Folders left out of the standard-library corpus: test suites are not library code, and
#: installed third-party packages differ between machines (the corpus, and its hash, would too).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
TEXT_SPLITS = ("train", "val", "test")
#: Upper ends of the train and val buckets out of 100 (the rest is test): 90/5/5.
TEXT_SPLIT_BUCKETS = (90, 95)


def text_split(relpath: str) -> str:
    """The split ("train", "val" or "test") of a corpus file, from its relative POSIX path alone.

    Bucket ``int(sha256(relpath).hexdigest()[:8], 16) % 100``: below 90 train, below 95 val,
    else test. As nothing else enters, a file keeps its split when other files are added,
    removed or edited, so a grown corpus never moves test files into training.

    Example:
        >>> [text_split(p) for p in ("os.py", "shutil.py", "pprint.py")]
        ['train', 'val', 'test']
    """
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).hexdigest()
    bucket = int(digest[:8], 16) % 100
    train_end, val_end = TEXT_SPLIT_BUCKETS
    return "train" if bucket < train_end else "val" if bucket < val_end else "test"


def _raise(exc: OSError) -> None:
    raise exc


def _walk_files(
    root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]
) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of the files under ``root``, sorted by relative path."""
    found = []
    try:
        # os.walk drops unreadable folders silently by default; a corpus that shrinks with the
        # permissions of the machine would not be comparable across runs, so fail instead.
        for folder, dirs, names in os.walk(root, onerror=_raise):
            dirs[:] = [d for d in dirs if keep_dir(d)]
            rel_folder = Path(folder).relative_to(root)
            found += [
                ((rel_folder / n).as_posix(), Path(folder) / n) for n in names if keep_file(n)
            ]
    except OSError as exc:
        raise ValueError(f"cannot list text folder {exc.filename}: {exc.strerror or exc}") from exc
    return sorted(found)


def stdlib_text_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """The built-in corpus: every ``*.py`` file of the standard library's source.

    Args:
        root: the standard library folder; default ``sysconfig.get_paths()["stdlib"]`` of the
            running interpreter.

    Returns:
        ``(relative POSIX path, path)`` pairs sorted by relative path, without anything under
        a folder named in :data:`STDLIB_EXCLUDED_DIRS`.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library source folder {root} does not exist")
    return _walk_files(root, lambda d: d not in STDLIB_EXCLUDED_DIRS, lambda n: n.endswith(".py"))


def user_text_files(path: str | Path) -> list[tuple[str, Path]]:
    """The files of one entry of ``data.text_paths``.

    A file is itself (relative path: its name); a folder is read recursively, every file in it
    whatever its extension, except hidden files and anything under a hidden folder (names
    starting with "."); relative paths are relative to the folder, sorted.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        visible = lambda name: not name.startswith(".")  # noqa: E731
        return _walk_files(path, visible, visible)
    if not path.exists():
        raise FileNotFoundError(f"text path {path} does not exist")
    return [(path.name, path)]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read text file {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class TextCorpus:
    """A byte corpus cut into train, validation and test bytes.

    Attributes:
        source: "stdlib" or the user's paths, as given.
        root: the standard library folder ("" for user paths).
        files: relative paths of the files read, in corpus order.
        split_by: "file" (each file wholly in the split :func:`text_split` gives it) or
            "bytes" (too few files to give every split one: the corpus cut 90/5/5 by bytes).
        train, val, test: ``[L]`` uint8, the split's files' bytes concatenated in corpus order.
        sha256: hex digest of all files' bytes in corpus order; equal digests, equal corpora.
        files_per_split: files per split (with ``split_by = "bytes"`` a file cut in two
            counts in both splits).
    """

    source: str | tuple[str, ...]
    root: str
    files: tuple[str, ...]
    split_by: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    sha256: str
    files_per_split: Mapping[str, int]

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready description: source, file count, bytes per split, sha256."""
        return {
            "corpus": self.source if isinstance(self.source, str) else list(self.source),
            "root": self.root,
            "python": platform.python_version() if self.source == "stdlib" else None,
            "files": len(self.files),
            "split_by": self.split_by,
            "files_per_split": dict(self.files_per_split),
            "bytes": {name: int(getattr(self, name).numel()) for name in TEXT_SPLITS},
            "sha256": self.sha256,
        }


def _as_uint8(buffer: bytearray) -> torch.Tensor:
    # frombuffer refuses empty buffers.
    if not buffer:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def load_text_corpus(
    paths: Sequence[str | Path] = (), *, stdlib_root: str | Path | None = None
) -> TextCorpus:
    """Read a byte-level corpus and split it into train/val/test by file.

    With ``paths`` (files or folders, see :func:`user_text_files`), their files in the order
    given, each folder's files sorted by relative path; a file reached twice is read once.
    Files containing NUL bytes are skipped inside folders (binary) and refused when named
    directly. Without ``paths``, the standard library source (:func:`stdlib_text_files`).

    Each file goes wholly to the split :func:`text_split` gives its relative path, so a file's
    split depends on its relative path only. When that leaves a split without bytes (a tiny
    corpus: one file or a handful), the corpus is cut by bytes instead: the
    concatenation of all files, first 90% train, next 5% val, last 5% test, contiguous
    (``split_by = "bytes"``; adding files then moves the cut, so compare such runs by sha256).

    Args:
        paths: ``data.text_paths``.
        stdlib_root: the standard library folder when ``paths`` is empty (for tests).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a named file is empty, unreadable or binary; a folder has no readable text;
            the corpus is empty (each names the path).
    """
    if paths:
        groups = [(str(p), user_text_files(p), not Path(p).expanduser().is_dir()) for p in paths]
        source: str | tuple[str, ...] = tuple(str(p) for p in paths)
        root = ""
    else:
        root_path = Path(sysconfig.get_paths()["stdlib"] if stdlib_root is None else stdlib_root)
        groups = [(str(root_path), stdlib_text_files(root_path), False)]
        source, root = "stdlib", str(root_path)

    entries: list[tuple[str, bytes]] = []
    seen: dict[Path, int] = {}
    skipped = 0
    for given, files, named_file in groups:
        found = 0
        for rel, path in files:
            key = path.resolve()
            if key in seen:
                found += seen[key]
                continue
            data = _read_bytes(path)
            if b"\0" in data:
                if named_file:
                    raise ValueError(f"text path {given} contains NUL bytes: not a text file")
                logger.debug("skipping %s: NUL bytes (binary)", path)
                skipped += 1
                seen[key] = 0
                continue
            seen[key] = len(data)
            found += len(data)
            entries.append((rel, data))
        if not found:
            what = "is an empty file" if named_file else "holds no readable text"
            raise ValueError(
                f"text path {given} {what} (hidden files and files with NUL bytes are skipped)"
            )

    digest = hashlib.sha256()
    for _, data in entries:
        digest.update(data)
    split_of = [text_split(rel) for rel, _ in entries]
    sizes = {
        s: sum(len(d) for (_, d), t in zip(entries, split_of, strict=True) if t == s)
        for s in TEXT_SPLITS
    }
    if all(sizes.values()):
        split_by = "file"
        parts = {
            s: bytearray().join(d for (_, d), t in zip(entries, split_of, strict=True) if t == s)
            for s in TEXT_SPLITS
        }
        files_per_split = {s: split_of.count(s) for s in TEXT_SPLITS}
    else:
        split_by = "bytes"
        whole = bytearray().join(d for _, d in entries)
        cuts = [0, *(len(whole) * b // 100 for b in TEXT_SPLIT_BUCKETS), len(whole)]
        parts = {s: whole[cuts[i] : cuts[i + 1]] for i, s in enumerate(TEXT_SPLITS)}
        # Files straddle splits here; a file counts for each split holding some of its bytes.
        ends = np.cumsum([len(d) for _, d in entries])
        starts = ends - np.array([len(d) for _, d in entries])
        files_per_split = {
            s: int(((starts < cuts[i + 1]) & (ends > cuts[i])).sum())
            for i, s in enumerate(TEXT_SPLITS)
        }
    corpus = TextCorpus(
        source=source,
        root=root,
        files=tuple(rel for rel, _ in entries),
        split_by=split_by,
        train=_as_uint8(parts["train"]),
        val=_as_uint8(parts["val"]),
        test=_as_uint8(parts["test"]),
        sha256=digest.hexdigest(),
        files_per_split=files_per_split,
    )
    meta = corpus.metadata
    logger.info(
        "text corpus %s: %d files (%d binary skipped), split by %s, bytes train %d / val %d / "
        "test %d, sha256 %s",
        root or ", ".join(source),
        meta["files"],
        skipped,
        split_by,
        *(meta["bytes"][s] for s in TEXT_SPLITS),
        corpus.sha256,
    )
    return corpus


def _evenly_spaced(num_windows: int, limit: int) -> torch.Tensor:
    """At most ``limit`` window indices spread evenly over ``range(num_windows)``; 0: all."""
    if limit == 0 or limit >= num_windows:
        return torch.arange(num_windows)
    return torch.arange(limit) * num_windows // limit


class TextDataset(Dataset):
    """Non-overlapping next-byte windows of a byte string, for a byte-level language model.

    Window ``w`` is bytes ``[w*S, w*S + S + 1)``: ``x`` its first S bytes, ``y`` its last S (the
    next byte of each). Consecutive windows share one byte, so every byte but the first is a
    target exactly once. Bytes after the last whole window are not used.

    Args:
        data: ``[L]`` uint8 bytes (shared, not copied, by :meth:`subset`).
        context: S >= 1.

    Example:
        >>> ds = TextDataset(torch.tensor(list(b"hello world"), dtype=torch.uint8), context=4)
        >>> len(ds)
        2
        >>> x, y = ds.get_batch(torch.tensor([1]))
        >>> bytes(x[0].tolist()), bytes(y[0].tolist())
        (b'o wo', b' wor')
    """

    num_features = TEXT_VOCAB
    num_classes = TEXT_VOCAB

    def __init__(self, data: torch.Tensor, context: int, *, _starts: torch.Tensor | None = None):
        if data.dim() != 1 or data.dtype != torch.uint8:
            raise ValueError(f"data must be 1-D uint8 bytes, got {data.dtype} {tuple(data.shape)}")
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.data = data
        self.context = context
        if _starts is None:
            _starts = torch.arange(max(data.numel() - 1, 0) // context) * context
        self.starts = _starts

    def __len__(self) -> int:
        return self.starts.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_BS, y_BS = self.get_batch(torch.tensor([index]))
        return x_BS[0], y_BS[0]

    def subset(self, indices: torch.Tensor) -> TextDataset:
        """The windows at ``indices`` (the bytes are shared)."""
        return TextDataset(self.data, self.context, _starts=self.starts[indices])

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_BS, y_BS)`` int64 byte ids of the windows at ``indices``; ``generator`` is unused
        (nothing random: the model encodes tokens over T itself)."""
        starts_B = self.starts[torch.as_tensor(indices, dtype=torch.long)]
        window_BS1 = self.data[starts_B[:, None] + torch.arange(self.context + 1)].long()
        return window_BS1[:, :-1].contiguous(), window_BS1[:, 1:].contiguous()


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test datasets with their shape facts.

    Attributes:
        num_features: F; for text the vocabulary (256 byte values).
        num_classes: C; for text the vocabulary too (next-byte targets).
        num_steps: T.
        context: S, bytes per window of a sequence dataset (text); 0 for the others.
        metadata: what identifies the data of a run (text: corpus, files, bytes per split,
            sha256, windows); empty for datasets fixed by their name.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_features: int
    num_classes: int
    num_steps: int
    context: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the package knows about one dataset, in one place.

    Attributes:
        name: ``data.name``.
        encodings: allowed ``data.encoding`` values; the first is the default.
        default_steps: ``T`` when ``data.num_steps = 0``.
        fixed_steps: encodings whose ``T`` is fixed by the data (``{"sequence": 40}``).
        files: paths under ``data.root`` that must exist (empty: nothing is read from disk).
        path_fields: ``data`` fields listing the user's own paths, each of which must exist
            (``("text_paths",)``).
        default_max_time_s: binning window of event data when ``data.max_time_s = 0``.
        event_readers: allowed ``data.event_reader`` values (:data:`EVENT_READERS`).
        ships_test_set: False when the test set is split off the data
            (``data.test_fraction``).
        load: ``load(config, encoding, num_steps, max_time_s) -> DataSplits``.
    """

    name: str
    encodings: tuple[str, ...]
    default_steps: int
    load: Callable[[Any, str, int, float], DataSplits]
    fixed_steps: Mapping[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    path_fields: tuple[str, ...] = ()
    default_max_time_s: float = 0.0
    event_readers: tuple[str, ...] = ("native",)
    ships_test_set: bool = True

    def expected_files(self, root: str | Path) -> list[Path]:
        """Paths under ``root`` that must exist before the dataset can be read."""
        root = Path(root).expanduser()
        return [root / f for f in self.files]

    def missing_paths(self, config) -> list[tuple[str, Path]]:
        """``(field, path)`` of every path ``config`` names in :attr:`path_fields` that does not
        exist; the field is written ``data.<name>[<i>]``."""
        return [
            (f"data.{name}[{i}]", Path(p).expanduser())
            for name in self.path_fields
            for i, p in enumerate(getattr(config, name))
            if not Path(p).expanduser().exists()
        ]


def expected_files(name: str, root: str | Path) -> list[Path]:
    """Paths that must exist before dataset ``name`` can be read from ``root`` (empty if none)."""
    return DATASETS[name].expected_files(root)


def _load_mnist1d(num_samples: int, seed: int) -> dict:
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


def _splits(train, val, test, num_steps: int) -> DataSplits:
    return DataSplits(
        train=train,
        val=val if len(val) else None,
        test=test,
        num_features=train.num_features,
        num_classes=train.num_classes,
        num_steps=num_steps,
    )


def _carve_val(full_train, test, config, num_steps: int) -> DataSplits:
    """Validation carved from the training set by ``config.val_fraction``."""
    val_idx, train_idx = split_indices(len(full_train), (config.val_fraction,), config.seed)
    return _splits(full_train.subset(train_idx), full_train.subset(val_idx), test, num_steps)


def _digits(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    full = InMemoryDataset(
        torch.from_numpy(digits.data / 16.0).float(),
        torch.from_numpy(digits.target),
        encoding=encoding,
        num_steps=num_steps,
        num_classes=10,
        seed=config.seed,
    )
    test_idx, val_idx, train_idx = split_indices(
        len(full), (config.test_fraction, config.val_fraction), config.seed
    )
    return _splits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx), num_steps)


def _mnist1d(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
    raw = _load_mnist1d(config.mnist1d_num_samples, config.mnist1d_seed)
    x_train = torch.from_numpy(raw["x"]).float()
    x_test = torch.from_numpy(raw["x_test"]).float()
    if encoding == "sequence":
        x_train, x_test = x_train.unsqueeze(-1), x_test.unsqueeze(-1)
    kwargs = dict(encoding=encoding, num_steps=num_steps, num_classes=10, seed=config.seed)
    full_train = InMemoryDataset(x_train, torch.from_numpy(raw["y"]), **kwargs)
    test = InMemoryDataset(x_test, torch.from_numpy(raw["y_test"]), **kwargs)
    return _carve_val(full_train, test, config, num_steps)


def _shd(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
    root = Path(config.root).expanduser()
    reader = config.event_reader
    full_train = SHDDataset(root / "shd_train.h5", num_steps, max_time_s, event_reader=reader)
    test = SHDDataset(root / "shd_test.h5", num_steps, max_time_s, event_reader=reader)
    return _carve_val(full_train, test, config, num_steps)


def _nmnist(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
    root = Path(config.root).expanduser()
    reader = config.event_reader
    full_train = NMNISTDataset(root / "Train", num_steps, max_time_s, event_reader=reader)
    test = NMNISTDataset(root / "Test", num_steps, max_time_s, event_reader=reader)
    return _carve_val(full_train, test, config, num_steps)


def _text(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
    corpus = load_text_corpus(config.text_paths)
    context = config.context
    splits = {name: TextDataset(getattr(corpus, name), context) for name in TEXT_SPLITS}
    for name in ("train", "test"):
        if not len(splits[name]):
            raise ValueError(
                f"data.context: the {name} split of the text corpus ({corpus.source}) has "
                f"{getattr(corpus, name).numel()} bytes, too few for one window of "
                f"data.context + 1 = {context + 1} bytes; use more text or a smaller context"
            )
    for name in ("val", "test"):
        splits[name] = splits[name].subset(_evenly_spaced(len(splits[name]), config.eval_windows))
    metadata = {
        **corpus.metadata,
        "context": context,
        "windows": {name: len(ds) for name, ds in splits.items()},
    }
    return DataSplits(
        train=splits["train"],
        val=splits["val"] if len(splits["val"]) else None,
        test=splits["test"],
        num_features=TEXT_VOCAB,
        num_classes=TEXT_VOCAB,
        num_steps=num_steps,
        context=context,
        metadata=metadata,
    )


#: Every dataset, by ``data.name``.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("digits", ("rate", "latency", "current"), 16, _digits, ships_test_set=False),
        DatasetSpec(
            "mnist1d",
            ("sequence", "current"),
            MNIST1D_LENGTH,
            _mnist1d,
            fixed_steps={"sequence": MNIST1D_LENGTH},
        ),
        DatasetSpec(
            "shd",
            ("events",),
            SHD_DEFAULTS[0],
            _shd,
            files=("shd_train.h5", "shd_test.h5"),
            default_max_time_s=SHD_DEFAULTS[1],
            event_readers=EVENT_READERS,
        ),
        DatasetSpec(
            "nmnist",
            ("events",),
            NMNIST_DEFAULTS[0],
            _nmnist,
            files=("Train", "Test"),
            default_max_time_s=NMNIST_DEFAULTS[1],
            event_readers=EVENT_READERS,
        ),
        DatasetSpec("text", ("tokens",), TEXT_DEFAULT_STEPS, _text, path_fields=("text_paths",)),
    )
}


def build_datasets(config) -> DataSplits:
    """Build the train/val/test datasets named by ``config`` (a
    :class:`~spiking_moe.config.DataConfig`, which has checked its values against the
    dataset's :class:`DatasetSpec`; see the module table).

    Splits are deterministic in ``config.seed``: digits is split into train/val/test by
    ``val_fraction`` and ``test_fraction``; shd, nmnist and mnist1d come with a test set, and
    val is carved from their training set. Text is split by file (:func:`load_text_corpus`)
    and keeps at most ``config.eval_windows`` evenly spaced windows of val and test.

    Raises:
        FileNotFoundError: the dataset's files are missing from ``config.root``, or a path of
            ``config.text_paths`` does not exist.
    """
    spec = DATASETS.get(config.name)
    if spec is None:
        raise ValueError(f"unknown dataset {config.name!r}; valid: {sorted(DATASETS)}")
    encoding = config.encoding if config.encoding != "default" else spec.encodings[0]
    num_steps = config.num_steps or spec.fixed_steps.get(encoding, spec.default_steps)
    missing = [p for p in spec.expected_files(config.root) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"data.root: {spec.name} needs {', '.join(str(p) for p in missing)}, which do not exist"
        )
    absent = spec.missing_paths(config)
    if absent:
        raise FileNotFoundError(", ".join(f"{where}: {p} does not exist" for where, p in absent))
    return spec.load(config, encoding, num_steps, config.max_time_s or spec.default_max_time_s)


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
