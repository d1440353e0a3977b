"""Offline datasets, event-file loaders and the deterministic batch loader."""

import random

import h5py
import numpy as np
import pytest
import torch

from spiking_moe.config import DataConfig
from spiking_moe.data import (
    BatchLoader,
    InMemoryDataset,
    NMNISTDataset,
    SHDDataset,
    build_datasets,
    collate_time_major,
    read_nmnist_events,
    split_indices,
)


def test_split_indices_is_a_seeded_partition():
    a = split_indices(100, (0.2, 0.1), seed=3)
    b = split_indices(100, (0.2, 0.1), seed=3)
    c = split_indices(100, (0.2, 0.1), seed=4)
    assert [len(s) for s in a] == [20, 10, 70]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert sorted(torch.cat(a).tolist()) == list(range(100))


def test_digits_rate_coded_splits_and_batches():
    splits = build_datasets(DataConfig(name="digits", encoding="rate", num_steps=5, seed=1))
    assert (splits.num_features, splits.num_classes, splits.num_steps) == (64, 10, 5)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and sizes[2] == round(0.2 * 1797) and sizes[1] == round(0.1 * 1797)
    x, y = splits.train.get_batch(torch.arange(7), torch.Generator().manual_seed(0))
    assert x.shape == (5, 7, 64) and y.shape == (7,)
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    # Rate code: the spike probability is the pixel intensity (/16). White pixels always fire.
    pixels = splits.train.x[:7]
    assert torch.all(x[:, pixels == 0] == 0) and torch.all(x[:, pixels == 1] == 1)
    again = build_datasets(DataConfig(name="digits", encoding="rate", num_steps=5, seed=1))
    assert torch.equal(splits.test.x, again.test.x) and torch.equal(splits.test.y, again.test.y)


def test_digits_current_encoding_repeats_the_image():
    splits = build_datasets(DataConfig(name="digits", encoding="current", num_steps=3))
    x, y = splits.test.get_batch(torch.tensor([0, 4]))
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Find the stored test images among the originals: the oracle is sklearn's raw data.
    for b in range(2):
        matches = np.where((digits.data / 16.0 == x[0, b].numpy()).all(1))[0]
        assert len(matches) >= 1 and int(y[b]) in digits.target[matches]
    assert torch.equal(x[0], x[2])


def test_mnist1d_is_generated_locally_as_a_40_step_series(monkeypatch):
    import mnist1d.data
    from mnist1d.data import get_dataset_args, make_dataset

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; the loader must use make_dataset")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    cfg = DataConfig(name="mnist1d", mnist1d_num_samples=200, mnist1d_seed=7, val_fraction=0.25)
    splits = build_datasets(cfg)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before

    args = get_dataset_args()
    args.num_samples, args.seed = 200, 7
    reference = make_dataset(args)
    assert (splits.num_steps, splits.num_features, splits.num_classes) == (40, 1, 10)
    assert len(splits.test) == 40 and len(splits.train) + len(splits.val) == 160
    x, y = splits.test.get_batch(torch.arange(3))
    assert x.shape == (40, 3, 1)
    np.testing.assert_allclose(x[:, :, 0].T.numpy(), reference["x_test"][:3], rtol=1e-6, atol=1e-6)
    assert y.tolist() == reference["y_test"][:3].tolist()


def test_mnist1d_sequence_rejects_other_lengths_when_configured():
    # The spec fixes T for the "sequence" encoding, so the config refuses it before loading.
    with pytest.raises(ValueError, match="data.num_steps must be 40"):
        DataConfig(name="mnist1d", num_steps=20, mnist1d_num_samples=100)
    assert DataConfig(name="mnist1d", encoding="current", num_steps=20).num_steps == 20


def test_every_dataset_is_described_once_and_both_readers_use_the_spec(monkeypatch, tmp_path):
    """Validation (DataConfig) and loading (build_datasets) read the same DatasetSpec: a new
    encoding, default or file list in the spec reaches both."""
    import dataclasses

    from spiking_moe.config import ConfigError
    from spiking_moe.data import DATASETS, DatasetSpec, expected_files

    assert set(DATASETS) == {"digits", "mnist1d", "shd", "nmnist", "text"}
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.name == name and spec.encodings
        assert expected_files(name, tmp_path) == [tmp_path / f for f in spec.files]
        if spec.files:
            with pytest.raises(ConfigError, match="data.root must name"):
                DataConfig(name=name)

    loaded = []

    def fake_load(config, encoding, num_steps, max_time_s):
        loaded.append((encoding, num_steps, max_time_s))
        return "splits"

    spec = dataclasses.replace(
        DATASETS["digits"],
        encodings=("spikes", "rate"),
        default_steps=7,
        files=("needed.bin",),
        default_max_time_s=0.5,
        load=fake_load,
    )
    monkeypatch.setitem(DATASETS, "digits", spec)
    with pytest.raises(ConfigError, match=r"\['default', 'spikes', 'rate'\]"):
        DataConfig(name="digits", encoding="latency", root=str(tmp_path))
    config = DataConfig(name="digits", root=str(tmp_path))
    with pytest.raises(ConfigError, match="needed.bin"):
        config.check_files()
    with pytest.raises(FileNotFoundError, match="needed.bin"):
        build_datasets(config)
    (tmp_path / "needed.bin").write_bytes(b"")
    assert build_datasets(config) == "splits"
    assert loaded == [("spikes", 7, 0.5)]


def _write_shd(path, samples):
    with h5py.File(path, "w") as f:
        vlen_f = h5py.vlen_dtype(np.float32)
        vlen_u = h5py.vlen_dtype(np.uint16)
        times = f.create_dataset("spikes/times", (len(samples),), dtype=vlen_f)
        units = f.create_dataset("spikes/units", (len(samples),), dtype=vlen_u)
        for i, (t, u, _) in enumerate(samples):
            times[i] = np.asarray(t, dtype=np.float32)
            units[i] = np.asarray(u, dtype=np.uint16)
        f.create_dataset("labels", data=np.array([s[2] for s in samples], dtype=np.uint8))


def test_shd_events_are_binned_into_binary_spikes(tmp_path):
    # T=4 bins of 0.25 s over [0, 1): 0.1 -> bin 0; 0.3 (twice, same unit) -> one spike in bin 1;
    # 0.99 -> bin 3; 1.2 is past max_time and dropped.
    samples = [
        ([0.1, 0.3, 0.3, 0.99, 1.2], [5, 699, 699, 0, 3], 7),
        ([0.5], [1], 19),
    ]
    _write_shd(tmp_path / "shd_train.h5", samples)
    ds = SHDDataset(tmp_path / "shd_train.h5", num_steps=4, max_time_s=1.0)
    x, y = ds.get_batch(torch.tensor([0, 1]))
    assert x.shape == (4, 2, 700) and y.tolist() == [7, 19]
    expected = torch.zeros(4, 2, 700)
    expected[0, 0, 5] = expected[1, 0, 699] = expected[3, 0, 0] = 1
    expected[2, 1, 1] = 1
    assert torch.equal(x, expected)
    x0, label = ds[1]
    assert torch.equal(x0, expected[:, 1]) and label == 19


def test_shd_build_and_missing_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shd_train\.h5"):
        build_datasets(DataConfig(name="shd", root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing.h5")):
        SHDDataset(tmp_path / "nothing.h5")
    samples = [([0.01 * i], [i], i % 20) for i in range(10)]
    _write_shd(tmp_path / "shd_train.h5", samples)
    _write_shd(tmp_path / "shd_test.h5", samples[:4])
    splits = build_datasets(
        DataConfig(name="shd", root=str(tmp_path), num_steps=10, val_fraction=0.2)
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert (splits.num_features, splits.num_classes) == (700, 20)
    labels = sorted(splits.train.labels.tolist() + splits.val.labels.tolist())
    assert labels == sorted(s[2] for s in samples)


# One N-MNIST event by hand: x=3, y=5, polarity 1, t=0x012345 = 74565 us.
_EVENT = bytes([3, 5, 0x81, 0x23, 0x45])
# x=33, y=0, polarity 0, t=0x000102 = 258 us; and x=40 (outside the 34x34 sensor), dropped.
_EVENT2 = bytes([33, 0, 0x00, 0x01, 0x02])
_OUTSIDE = bytes([40, 1, 0x00, 0x00, 0x10])


def test_nmnist_decoding_matches_the_bit_layout(tmp_path):
    path = tmp_path / "e.bin"
    path.write_bytes(_EVENT + _EVENT2)
    x, y, p, t = read_nmnist_events(path)
    assert x.tolist() == [3, 33] and y.tolist() == [5, 0]
    assert p.tolist() == [1, 0] and t.tolist() == [74565, 258]
    (tmp_path / "bad.bin").write_bytes(_EVENT[:4])
    with pytest.raises(ValueError, match="multiple of 5"):
        read_nmnist_events(tmp_path / "bad.bin")


def test_nmnist_folder_loader(tmp_path):
    for split in ("Train", "Test"):
        for digit in (2, 7):
            folder = tmp_path / split / str(digit)
            folder.mkdir(parents=True)
            (folder / "00001.bin").write_bytes(_EVENT + _EVENT2 + _OUTSIDE)
    ds = NMNISTDataset(tmp_path / "Train", num_steps=3, max_time_s=0.3)
    assert len(ds) == 2 and ds.labels.tolist() == [2, 7]
    x, y = ds.get_batch(torch.tensor([1]))
    assert x.shape == (3, 1, 2312) and y.tolist() == [7]
    # 74565 us in 0.1 s bins -> bin 0; channel 1*34*34 + 5*34 + 3. 258 us -> bin 0, channel 33.
    assert x.sum() == 2
    assert x[0, 0, 1156 + 5 * 34 + 3] == 1 and x[0, 0, 33] == 1
    with pytest.raises(FileNotFoundError, match="Train"):
        NMNISTDataset(tmp_path / "missing" / "Train")
    splits = build_datasets(DataConfig(name="nmnist", root=str(tmp_path), val_fraction=0.5))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1, 1, 2)


def test_collate_time_major_matches_get_batch():
    ds = InMemoryDataset(
        torch.rand(6, 4), torch.arange(6) % 3, encoding="current", num_steps=2, num_classes=3
    )
    x, y = collate_time_major([ds[i] for i in (4, 1)])
    x_ref, y_ref = ds.get_batch(torch.tensor([4, 1]))
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def _numbered(n):
    """Sample i is the constant current i (one step, one feature): batches show their indices."""
    return InMemoryDataset(
        torch.arange(n, dtype=torch.float32).unsqueeze(1),
        torch.zeros(n, dtype=torch.long),
        encoding="current",
        num_steps=1,
        num_classes=1,
    )


def test_batch_loader_epochs_are_seeded_permutations():
    n = 23
    ds = _numbered(n)
    loader = BatchLoader(ds, 5, shuffle=True, seed=0)
    assert len(loader) == 5
    epoch0 = [x[0, :, 0].tolist() for x, _ in loader.iter_epoch(0)]
    epoch1 = [x[0, :, 0].tolist() for x, _ in loader.iter_epoch(1)]
    flat0 = [int(v) for b in epoch0 for v in b]
    assert sorted(flat0) == list(range(n)) and flat0 != list(range(n))
    assert flat0 != [int(v) for b in epoch1 for v in b]
    assert epoch0 == [x[0, :, 0].tolist() for x, _ in BatchLoader(ds, 5, shuffle=True, seed=0)]
    tail = [x[0, :, 0].tolist() for x, _ in loader.iter_epoch(0, start_batch=3)]
    assert tail == epoch0[3:]
    no_shuffle = [int(v) for x, _ in BatchLoader(ds, 5) for v in x[0, :, 0]]
    assert no_shuffle == list(range(n))


def test_batch_loader_shards_cover_the_data():
    n = 23
    ds = _numbered(n)
    full = [int(v) for x, _ in BatchLoader(ds, 100, shuffle=True, seed=2) for v in x[0, :, 0]]
    # Evaluation shards (no padding): every sample exactly once over the ranks.
    seen = []
    for rank in range(3):
        shard = BatchLoader(ds, 4, rank=rank, world_size=3)
        seen += [int(v) for x, _ in shard for v in x[0, :, 0]]
    assert sorted(seen) == list(range(n))
    # Training shards (padded): equal batch counts, rank r takes positions r, r+W, ...
    shards = [BatchLoader(ds, 4, shuffle=True, seed=2, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    for r, shard in enumerate(shards):
        got = [int(v) for x, _ in shard for v in x[0, :, 0]]
        padded = full + full[:1]
        assert got == padded[r::3]


def test_batch_loader_rate_noise_is_fresh_per_epoch_and_reproducible():
    ds = InMemoryDataset(
        torch.full((8, 50), 0.5),
        torch.zeros(8, dtype=torch.long),
        encoding="rate",
        num_steps=4,
        num_classes=1,
    )
    loader = BatchLoader(ds, 8, shuffle=False, seed=0)
    a = next(loader.iter_epoch(0))[0]
    b = next(loader.iter_epoch(1))[0]
    assert torch.equal(a, next(loader.iter_epoch(0))[0]) and not torch.equal(a, b)
    assert 0.4 < a.mean().item() < 0.6


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        InMemoryDataset(
            torch.full((2, 3), 2.0), torch.zeros(2), encoding="rate", num_steps=2, num_classes=1
        )
    with pytest.raises(ValueError, match="unknown encoding"):
        InMemoryDataset(
            torch.zeros(2, 3), torch.zeros(2), encoding="phase", num_steps=2, num_classes=1
        )
    with pytest.raises(TypeError, match="get_batch"):
        BatchLoader([1, 2, 3], 2)


def test_latency_encoded_digits_fire_at_most_once_per_pixel():
    data = InMemoryDataset(
        torch.tensor([[1.0, 0.5, 0.0]]),
        torch.zeros(1),
        encoding="latency",
        num_steps=5,
        num_classes=1,
    )
    x_TBF, _ = data.get_batch(torch.tensor([0]))
    # linear latency: t = round((1 - x) * (T - 1)) -> 0, 2, never
    assert x_TBF[:, 0].T.tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
