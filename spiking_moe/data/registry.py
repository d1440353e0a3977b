"""Every dataset described once, as a :class:`DatasetSpec` in :data:`DATASETS`, and
:func:`build_datasets`, which builds the train/val/test splits a configuration names. A
``config`` here is anything with the ``data`` fields read: this package knows nothing of
:mod:`spiking_moe.config`, which reads these specs to check its values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .events import (
    EVENT_READERS,
    NMNIST_DEFAULTS,
    SHD_DEFAULTS,
    NMNISTDataset,
    SHDDataset,
)
from .loader import split_indices
from .tabular import MNIST1D_LENGTH, InMemoryDataset, load_digits, load_mnist1d
from .text import TEXT_DEFAULT_STEPS, TEXT_SPLITS, TEXT_VOCAB, TextDataset, load_text_corpus

__all__ = ["DATASETS", "DataSplits", "DatasetSpec", "build_datasets", "expected_files"]


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test datasets with their shape facts.

    Attributes:
        num_features: F; for text the vocabulary (256 byte values).
        num_classes: V; for text the vocabulary too (next-byte targets).
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
        """``(field, path)`` of every path ``config`` names in ``path_fields`` that does not
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
    x, y = load_digits()
    full = InMemoryDataset(
        x,
        y,
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
    raw = load_mnist1d(config.mnist1d_num_samples, config.mnist1d_seed)
    x_train = torch.from_numpy(raw["x"]).float()
    x_test = torch.from_numpy(raw["x_test"]).float()
    if encoding == "sequence":
        x_train, x_test = x_train.unsqueeze(-1), x_test.unsqueeze(-1)
    kwargs = dict(encoding=encoding, num_steps=num_steps, num_classes=10, seed=config.seed)
    full_train = InMemoryDataset(x_train, torch.from_numpy(raw["y"]), **kwargs)
    test = InMemoryDataset(x_test, torch.from_numpy(raw["y_test"]), **kwargs)
    return _carve_val(full_train, test, config, num_steps)


def _event_spec(name: str, dataset: type[Dataset], files: tuple[str, str], defaults) -> DatasetSpec:
    """The spec of an event dataset whose ``files`` (train, test) under ``data.root`` open with
    ``dataset(path, num_steps, max_time_s, event_reader=...)``; val is carved from train."""

    def load(config, encoding: str, num_steps: int, max_time_s: float) -> DataSplits:
        root = Path(config.root).expanduser()
        full_train, test = (
            dataset(root / f, num_steps, max_time_s, event_reader=config.event_reader)
            for f in files
        )
        return _carve_val(full_train, test, config, num_steps)

    steps, max_time_s = defaults
    return DatasetSpec(
        name,
        ("events",),
        steps,
        load,
        files=files,
        default_max_time_s=max_time_s,
        event_readers=EVENT_READERS,
    )


def _evenly_spaced(num_windows: int, limit: int) -> torch.Tensor:
    """At most ``limit`` window indices spread evenly over ``range(num_windows)``; 0: all."""
    if limit == 0 or limit >= num_windows:
        return torch.arange(num_windows)
    return torch.arange(limit) * num_windows // limit


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
        _event_spec("shd", SHDDataset, ("shd_train.h5", "shd_test.h5"), SHD_DEFAULTS),
        _event_spec("nmnist", NMNISTDataset, ("Train", "Test"), NMNIST_DEFAULTS),
        DatasetSpec("text", ("tokens",), TEXT_DEFAULT_STEPS, _text, path_fields=("text_paths",)),
    )
}


def build_datasets(config) -> DataSplits:
    """Build the train/val/test datasets named by ``config`` (a
    :class:`~spiking_moe.config.DataConfig`, which has checked its values against the
    dataset's :class:`DatasetSpec`; see the table of :mod:`spiking_moe.data`).

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
