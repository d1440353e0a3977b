"""Event datasets through the optional tonic package (``data.event_reader = "tonic"``).

The tonic path must give the native frames exactly (same [T, F] float32 {0, 1} frames, labels,
order) on tiny SHD and N-MNIST files written here; expectations are worked out by hand from the
rule "bin k holds [k * max_time / T, (k + 1) * max_time / T)", with settings whose bin edges
floating point hits exactly (one where it does not has its own test). Tests that need tonic use
``pytest.importorskip`` as a guard only: install.sh installs the "events" extra, so CI runs them.
"""

import dataclasses
import sys
import urllib.request

import numpy as np
import pytest
import torch
from test_data import _write_shd

from spiking_moe.config import ConfigError, DataConfig
from spiking_moe.data import (
    BatchLoader,
    NMNISTDataset,
    SHDDataset,
    TonicFramesDataset,
    build_datasets,
    tonic_frames,
)

N = 34 * 34  # N-MNIST channels per polarity


def _nmnist_event(x, y, polarity, t_us):
    """One 5-byte N-MNIST event: x, y, polarity bit 7 + 23-bit big-endian timestamp."""
    return bytes([x, y, (polarity << 7) | (t_us >> 16), (t_us >> 8) & 0xFF, t_us & 0xFF])


def _write_nmnist(root, files):
    """``files``: ``{(split, digit, name): [(x, y, p, t_us), ...]}``."""
    for (split, digit, name), events in files.items():
        folder = root / split / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"".join(_nmnist_event(*e) for e in events))


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to reach the network or tonic's downloader."""
    tonic = pytest.importorskip("tonic")
    from tonic import download_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    for name in ("download_url", "download_and_extract_archive"):
        monkeypatch.setattr(download_utils, name, refuse)
    monkeypatch.setattr(tonic.dataset.Dataset, "download", refuse)
    return tonic


# SHD, T = 4 bins of 0.25 s over [0, 1). Times that float32 holds exactly sit on the edges.
_SHD_SAMPLES = [
    # 0.0 -> bin 0; 0.25 (edge) -> bin 1; 0.3 twice on unit 699 -> one spike in bin 1;
    # 0.5 (edge) -> bin 2; 0.999 -> bin 3; 1.0 (= max_time) and 1.2 are dropped.
    ([0.0, 0.25, 0.3, 0.3, 0.5, 0.999, 1.0, 1.2], [3, 4, 699, 699, 0, 5, 6, 7], 7),
    # Out of time order: the native binning does not care, tonic's slicing needs sorting.
    ([0.75, 0.1, 0.74], [1, 2, 1], 19),
    ([], [], 0),  # no events at all: four zero frames
    ([0.2499], [10], 2),  # just before the first edge -> bin 0
]


def _shd_expected():
    x = torch.zeros(4, len(_SHD_SAMPLES), 700)
    x[0, 0, 3] = x[1, 0, 4] = x[1, 0, 699] = x[2, 0, 0] = x[3, 0, 5] = 1
    x[3, 1, 1] = x[0, 1, 2] = x[2, 1, 1] = 1
    x[0, 3, 10] = 1
    return x


def test_shd_tonic_frames_equal_native_and_hand_binned(no_download, tmp_path):
    _write_shd(tmp_path / "shd_train.h5", _SHD_SAMPLES)
    native = SHDDataset(tmp_path / "shd_train.h5", num_steps=4, max_time_s=1.0)
    via_tonic = SHDDataset(
        tmp_path / "shd_train.h5", num_steps=4, max_time_s=1.0, event_reader="tonic"
    )
    order = torch.tensor([3, 0, 2, 1])
    x_native, y_native = native.get_batch(order)
    x_tonic, y_tonic = via_tonic.get_batch(order)
    expected = _shd_expected()[:, order]
    assert x_tonic.dtype == torch.float32 and x_tonic.shape == (4, 4, 700)
    assert torch.equal(x_tonic, expected) and torch.equal(x_native, expected)
    assert y_tonic.tolist() == y_native.tolist() == [2, 7, 0, 19]
    first = via_tonic.subset(torch.tensor([0]))  # stored sample 0
    x0, label = first[0]
    assert torch.equal(x0, _shd_expected()[:, 0]) and label == 7
    assert first.event_reader == "tonic"


def test_shd_build_datasets_with_either_reader_gives_the_same_splits(no_download, tmp_path):
    samples = [([0.014 * i, 1.39], [i, 699 - i], i % 20) for i in range(10)]
    _write_shd(tmp_path / "shd_train.h5", samples)
    _write_shd(tmp_path / "shd_test.h5", samples[:3])
    splits = {
        reader: build_datasets(
            DataConfig(name="shd", root=str(tmp_path), val_fraction=0.2, event_reader=reader)
        )
        for reader in ("native", "tonic")
    }
    for part in ("train", "val", "test"):
        a, b = getattr(splits["native"], part), getattr(splits["tonic"], part)
        assert b.event_reader == "tonic" and len(a) == len(b)
        xa, ya = a.get_batch(torch.arange(len(a)))
        xb, yb = b.get_batch(torch.arange(len(b)))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Default binning (T = 100 over 1.4 s, 14 ms bins): sample 0 of the test set has unit 0 at
    # 0 s -> bin 0 and unit 699 at 1.39 s -> bin 99.
    x, _ = splits["tonic"].test.get_batch(torch.tensor([0]))
    assert x.shape == (100, 1, 700) and x.sum() == 2 and x[0, 0, 0] == 1 and x[99, 0, 699] == 1


# N-MNIST: T = 10 bins of 30 ms over [0, 0.3 s) (t_us * 1e-6 * 10 / 0.3 is exact at the edges).
_NMNIST_FILES = {
    ("Train", 2, "00001.bin"): [
        (3, 5, 1, 0),  # bin 0, channel N + 5 * 34 + 3
        (33, 0, 0, 30000),  # on the first edge -> bin 1, channel 33
        (33, 0, 0, 50000),  # same channel and bin again: still one spike
        (0, 33, 1, 299999),  # last microsecond -> bin 9, channel N + 33 * 34
        (1, 1, 0, 300000),  # = max_time: dropped
        (40, 1, 0, 10),  # x outside the 34 x 34 sensor: dropped
    ],
    # Out of time order: 250 ms -> bin 8 (polarity 0), 50 ms -> bin 1 (polarity 1).
    ("Train", 2, "00002.bin"): [(7, 7, 0, 250000), (7, 7, 1, 50000)],
    ("Train", 7, "00001.bin"): [],
    ("Test", 0, "00001.bin"): [(0, 0, 0, 1)],
}


def test_nmnist_tonic_frames_equal_native_and_hand_binned(no_download, tmp_path):
    _write_nmnist(tmp_path, _NMNIST_FILES)
    kwargs = dict(num_steps=10, max_time_s=0.3)
    native = NMNISTDataset(tmp_path / "Train", **kwargs)
    via_tonic = NMNISTDataset(tmp_path / "Train", event_reader="tonic", **kwargs)
    assert via_tonic.labels.tolist() == native.labels.tolist() == [2, 2, 7]
    expected = torch.zeros(10, 3, 2 * N)
    expected[0, 0, N + 5 * 34 + 3] = expected[1, 0, 33] = expected[9, 0, N + 33 * 34] = 1
    expected[8, 1, 7 * 34 + 7] = expected[1, 1, N + 7 * 34 + 7] = 1
    order = torch.tensor([1, 2, 0])
    x_native, y_native = native.get_batch(order)
    x_tonic, y_tonic = via_tonic.get_batch(order)
    assert x_tonic.dtype == torch.float32
    assert torch.equal(x_tonic, expected[:, order]) and torch.equal(x_native, expected[:, order])
    assert y_tonic.tolist() == y_native.tolist() == [2, 7, 2]

    config = DataConfig(name="nmnist", root=str(tmp_path), num_steps=10, val_fraction=0.34)
    reference = build_datasets(config)
    splits = build_datasets(dataclasses.replace(config, event_reader="tonic"))
    for part in ("train", "val", "test"):
        a, b = getattr(reference, part), getattr(splits, part)
        xa, ya = a.get_batch(torch.arange(len(a)))
        xb, yb = b.get_batch(torch.arange(len(b)))
        assert len(b) and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_nmnist_float_edges_are_reproduced_not_fixed(no_download, tmp_path):
    """Natively an event exactly at 70 ms (T = 30 over 0.3 s) lands in bin 6, not 7:
    ``70000 * 1e-6 * (30 / 0.3)`` rounds to 6.999.... The tonic path reproduces that; tonic's
    own ``ToFrame(time_window=10000)`` would say 7 (why times are rescaled to bins first)."""
    tonic = no_download
    _write_nmnist(tmp_path, {("Train", 1, "a.bin"): [(2, 3, 0, 70000), (2, 3, 1, 60000)]})
    channel = 3 * 34 + 2
    for reader in ("native", "tonic"):
        x, _ = NMNISTDataset(tmp_path / "Train", event_reader=reader).get_batch(torch.tensor([0]))
        assert x[:, 0, channel].nonzero().flatten().tolist() == [6]
        assert x[:, 0, N + channel].nonzero().flatten().tolist() == [6]
    events = tonic.io.read_mnist_file(
        str(tmp_path / "Train" / "1" / "a.bin"), dtype=tonic.datasets.NMNIST.dtype
    )
    events = np.sort(events, order="t")
    frames = tonic.transforms.ToFrame(
        (34, 34, 2), time_window=10000, start_time=0, end_time=300000
    )(events)
    assert frames[7, 0, 3, 2] == 1 and frames[6, 1, 3, 2] == 1


def test_nmnist_overflow_marker_is_the_documented_difference(no_download, tmp_path):
    """tonic's decoder reads ``y == 240`` as a timestamp-overflow marker and shifts every later
    event by 8192 us; the native reader drops the marker and shifts nothing."""
    _write_nmnist(
        tmp_path,
        {("Train", 4, "a.bin"): [(1, 2, 0, 1000), (0, 240, 0, 0), (1, 2, 1, 5000)]},
    )
    channel = 2 * 34 + 1
    kwargs = dict(num_steps=30, max_time_s=0.3)  # 10 ms bins
    x_native, _ = NMNISTDataset(tmp_path / "Train", **kwargs).get_batch(torch.tensor([0]))
    x_tonic, _ = NMNISTDataset(tmp_path / "Train", event_reader="tonic", **kwargs).get_batch(
        torch.tensor([0])
    )
    assert x_native.sum() == x_tonic.sum() == 2  # the marker itself is no spike in either
    assert x_native[0, 0, channel] == x_tonic[0, 0, channel] == 1  # before the marker: equal
    assert x_native[0, 0, N + channel] == 1  # 5000 us -> bin 0
    assert x_tonic[1, 0, N + channel] == 1  # 5000 + 8192 = 13192 us -> bin 1


def test_tonic_reader_missing_and_bad_files(no_download, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "shd_train.h5")):
        build_datasets(DataConfig(name="shd", root=str(tmp_path), event_reader="tonic"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing.h5")):
        SHDDataset(tmp_path / "nothing.h5", event_reader="tonic")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "Train")):
        build_datasets(DataConfig(name="nmnist", root=str(tmp_path), event_reader="tonic"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing" / "Train")):
        NMNISTDataset(tmp_path / "missing" / "Train", event_reader="tonic")
    (tmp_path / "Train" / "3").mkdir(parents=True)
    (tmp_path / "Train" / "3" / "bad.bin").write_bytes(_nmnist_event(1, 1, 0, 5)[:4])
    ds = NMNISTDataset(tmp_path / "Train", event_reader="tonic")
    with pytest.raises(ValueError, match="multiple of 5"):
        ds.get_batch(torch.tensor([0]))


def test_event_reader_values_are_checked():
    with pytest.raises(
        ConfigError, match=r"data.event_reader must be one of \['native', 'tonic'\]"
    ):
        DataConfig(name="shd", root="/data", event_reader="spikingjelly")
    with pytest.raises(ConfigError, match=r"one of \['native'\] for dataset 'digits'"):
        DataConfig(name="digits", event_reader="tonic")
    assert DataConfig(name="nmnist", root="/data", event_reader="tonic").event_reader == "tonic"
    assert DataConfig().event_reader == "native"


def test_unknown_event_reader_on_a_dataset(tmp_path):
    _write_shd(tmp_path / "s.h5", [([0.1], [1], 1)])
    with pytest.raises(
        ValueError, match=r"unknown event_reader 'fast'; valid: \['native', 'tonic'\]"
    ):
        SHDDataset(tmp_path / "s.h5", event_reader="fast")


def test_tonic_reader_without_tonic_says_how_to_install(monkeypatch, tmp_path):
    # A None entry in sys.modules makes the import fail, as if tonic were not installed.
    for name in ("tonic", "tonic.io", "tonic.transforms"):
        monkeypatch.setitem(sys.modules, name, None)
    _write_shd(tmp_path / "s.h5", [([0.1], [1], 1)])
    install = r'pip install "spiking-moe\[events\]"'
    with pytest.raises(ImportError, match=install):
        SHDDataset(tmp_path / "s.h5", event_reader="tonic")
    with pytest.raises(ImportError, match=install):
        tonic_frames(np.zeros(0, dtype=[("t", int), ("x", int)]), (700, 1, 1), 4, 1.0)
    x, y = SHDDataset(tmp_path / "s.h5", num_steps=2, max_time_s=1.0).get_batch(torch.tensor([0]))
    assert x[0, 0, 1] == 1 and x.sum() == 1 and y.tolist() == [1]  # native needs no tonic


def _xytp(rows):
    """tonic's (x, y, t, p) structured array from ``(x, y, t_us, p)`` rows."""
    events = np.zeros(len(rows), dtype=[("x", int), ("y", int), ("t", int), ("p", int)])
    for i, (x, y, t, p) in enumerate(rows):
        events[i] = (x, y, t, p)
    return events


def test_tonic_frames_bins_any_tonic_events_by_hand(no_download):
    # Sensor W=3, H=2, P=2 -> F = 12, channel p*6 + y*3 + x; T = 2 bins of 500 us over 1 ms.
    events = _xytp([(2, 1, 700, 1), (0, 0, 0, 0), (1, 1, 500, 0), (1, 0, 999, 1), (0, 1, 1000, 0)])
    x = tonic_frames(events, (3, 2, 2), num_steps=2, max_time_s=1e-3)
    expected = torch.zeros(2, 12)
    expected[1, 6 + 3 + 2] = expected[0, 0] = expected[1, 3 + 1] = expected[1, 6 + 1] = 1
    assert x.dtype == torch.float32 and torch.equal(x, expected)
    # x and t only (tonic's audio datasets): channel p*W + x with one polarity; times in s.
    xtp = np.zeros(3, dtype=[("t", float), ("x", int), ("p", int)])
    xtp["t"], xtp["x"], xtp["p"] = [0.2, 0.9, 0.45], [4, 0, 4], 1
    x = tonic_frames(xtp, (5, 1, 1), num_steps=2, max_time_s=1.0, time_unit_s=1.0)
    assert x[:, 4].tolist() == [1.0, 0.0] and x[:, 0].tolist() == [0.0, 1.0] and x.sum() == 2
    assert torch.equal(tonic_frames(events[:0], (3, 2, 2), 5, 1e-3), torch.zeros(5, 12))


def test_tonic_frames_rejects_events_off_the_sensor(no_download):
    with pytest.raises(ValueError, match=r"'x' values must lie in \[0, 3\)"):
        tonic_frames(_xytp([(3, 0, 0, 0)]), (3, 2, 2), 2, 1e-3)
    with pytest.raises(ValueError, match=r"'x' values must lie in \[0, 3\)"):
        tonic_frames(_xytp([(-1, 0, 0, 0)]), (3, 2, 2), 2, 1e-3)  # would wrap around in numpy
    with pytest.raises(ValueError, match=r"'y' values must lie in \[0, 2\)"):
        tonic_frames(_xytp([(0, 2, 0, 0)]), (3, 2, 2), 2, 1e-3)
    with pytest.raises(ValueError, match="one polarity"):
        tonic_frames(_xytp([(0, 0, 0, 0), (0, 0, 1, 1)]), (3, 2, 1), 2, 1e-3)


class _TinyTonicDataset:
    """What a tonic dataset offers: ``sensor_size``, ``classes``, ``[i] -> (events, label)``."""

    sensor_size = (2, 2, 2)
    classes = ["left", "right", "none"]

    def __init__(self):
        self.samples = [
            (_xytp([(1, 0, 10, 0), (0, 1, 2500, 1)]), 1),
            (_xytp([(1, 1, 1999, 1)]), 0),
            (_xytp([]), 2),
        ]

    def __getitem__(self, index):
        events, label = self.samples[index]
        return events.copy(), label

    def __len__(self):
        return len(self.samples)


def test_tonic_frames_dataset_feeds_the_batch_loader(no_download, tmp_path):
    # T = 3 bins of 1 ms over 3 ms; channel p*4 + y*2 + x.
    ds = TonicFramesDataset(_TinyTonicDataset(), num_steps=3, max_time_s=3e-3)
    assert (len(ds), ds.num_features, ds.num_classes) == (3, 8, 3)
    expected = torch.zeros(3, 3, 8)
    expected[0, 0, 1] = expected[2, 0, 4 + 2] = expected[1, 1, 4 + 2 + 1] = 1
    batches = list(BatchLoader(ds, batch_size=2))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 2, 8), (3, 1, 8)]
    assert torch.equal(torch.cat([x for x, _ in batches], dim=1), expected)
    assert torch.cat([y for _, y in batches]).tolist() == [1, 0, 2]
    x, label = ds.subset(torch.tensor([1]))[0]
    assert torch.equal(x, expected[:, 1]) and label == 0

    # tonic's disk cache (offline) in front: pass sensor_size, as it has none.
    cached = no_download.DiskCachedDataset(_TinyTonicDataset(), cache_path=str(tmp_path / "c"))
    via_cache = TonicFramesDataset(
        cached, 3, 3e-3, num_classes=3, sensor_size=_TinyTonicDataset.sensor_size
    )
    assert torch.equal(via_cache.get_batch(torch.arange(3))[0], expected)
    assert len(list((tmp_path / "c").glob("*.hdf5"))) == 3
    with pytest.raises(ValueError, match="pass one"):
        TonicFramesDataset(cached, 3, 3e-3, num_classes=3)
    with pytest.raises(ValueError, match="pass num_classes"):
        TonicFramesDataset(cached, 3, 3e-3, sensor_size=(2, 2, 2))
