"""Event datasets read from the user's own files, binned into time-major binary spikes.

SHD (``shd_{train,test}.h5``) and N-MNIST (``{Train,Test}/<digit>/*.bin``) are read from
``data.root``; :class:`TonicFramesDataset` bins any tonic dataset. Nothing here downloads.
Letters as in :mod:`spiking_moe.data`.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "EVENT_READERS",
    "NMNIST_DEFAULTS",
    "NMNIST_FEATURES",
    "NMNIST_SIZE",
    "SHD_CHANNELS",
    "SHD_CLASSES",
    "SHD_DEFAULTS",
    "NMNISTDataset",
    "SHDDataset",
    "TonicFramesDataset",
    "read_nmnist_events",
    "tonic_frames",
]

#: SHD's input channels (an event's unit, 0..699): :class:`SHDDataset`'s ``num_features``.
SHD_CHANNELS = 700
#: SHD's classes, spoken digits 0-9 in English and German: :class:`SHDDataset`'s ``num_classes``.
SHD_CLASSES = 20
#: Side of N-MNIST's square sensor, in pixels (34 x 34); events off it are dropped.
NMNIST_SIZE = 34
#: N-MNIST's input channels, 2 polarities x 34 x 34 pixels = 2312 (channel
#: ``polarity * 34 * 34 + y * 34 + x``): :class:`NMNISTDataset`'s ``num_features``.
NMNIST_FEATURES = 2 * NMNIST_SIZE * NMNIST_SIZE
#: SHD's default ``(T, max_time_s)``, 100 bins over 1.4 s: :class:`SHDDataset`'s, and its
#: :data:`~spiking_moe.data.registry.DATASETS` spec's (``data.num_steps = 0``, ``max_time_s = 0``).
SHD_DEFAULTS = (100, 1.4)
#: N-MNIST's default ``(T, max_time_s)``, 30 bins over 0.3 s: :class:`NMNISTDataset`'s, and its
#: :data:`~spiking_moe.data.registry.DATASETS` spec's (``data.num_steps = 0``, ``max_time_s = 0``).
NMNIST_DEFAULTS = (30, 0.3)
#: ``data.event_reader`` values: "native" (this module's readers and binning) or "tonic" (the
#: optional tonic package; see the module docstring).
EVENT_READERS = ("native", "tonic")
_TONIC_INSTALL = 'pip install "spiking-moe[events]"'


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
        sensor_size: tonic's ``(x, y, p)`` sizes (width, height, polarities), e.g.
            ``dataset.sensor_size``;
            ``(700, 1, 1)`` for SHD, ``(34, 34, 2)`` for N-MNIST.
        num_steps: T.
        max_time_s: the binning window in seconds.
        time_unit_s: seconds per unit of ``events["t"]`` (tonic's datasets use microseconds).

    Returns:
        ``[T, F]`` float32 tensor, F = width * height * polarities; an event's channel is
        ``(p * height + y) * width + x`` (``p * width + x`` without ``y``), the native channel
        layout of SHD and N-MNIST.

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
    binned["p"] = events["p"] if "p" in names and polarities > 1 else 0  # tonic: p = 0, 1 polarity
    binned = binned[np.argsort(binned["t"], kind="stable")]
    to_frame = tonic.transforms.ToFrame(
        sensor_size=(width, height, polarities),
        time_window=1.0,
        start_time=0.0,
        end_time=float(num_steps),
    )
    frames = to_frame(binned)  # [T, polarities, height, width] (or [T, polarities, width]) counts
    if frames.shape[0] != num_steps:  # pragma: no cover - a tonic change; never silently
        raise RuntimeError(f"tonic ToFrame gave {frames.shape[0]} frames, expected {num_steps}")
    return torch.from_numpy((frames.reshape(num_steps, -1) != 0).astype(np.float32))


class _EventDataset(Dataset):
    """Shared binning of (time, channel) events into ``[T, B, F]`` binary spikes: natively, or
    with tonic's ``ToFrame`` (``event_reader = "tonic"``, same frames)."""

    num_features: int
    num_classes: int
    #: tonic ``(x, y, p)`` sensor size and seconds per time unit of ``_tonic_events``.
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
        num_classes: V; default ``len(dataset.classes)``.
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
