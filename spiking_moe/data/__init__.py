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

Each dataset is described once, by a :class:`DatasetSpec` in :data:`DATASETS` (encodings,
default steps, the files it reads, how it loads): configuration checks
(:class:`spiking_moe.config.DataConfig`) and :func:`build_datasets` both read it.

The classification datasets yield ``(x_TF, label)`` per sample and ``(x_TBF, y_B)`` per batch
through ``get_batch``; the text dataset yields next-byte pairs ``(x_BS, y_BS)`` (``y`` is ``x``
shifted by one byte) and leaves the encoding over T to the model. :class:`BatchLoader` draws
batches with a permutation fixed by ``(seed, epoch)`` and rate-encoding noise fixed by
``(seed, epoch, batch, rank)``, so an epoch can be replayed from any batch (exact resume) and
sharded across processes without a sampler object.

Shape letters: the package legend (:mod:`spiking_moe`); a sample is a token (``N``), ``S`` the
bytes of a text window.

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
:mod:`.registry`    :class:`DatasetSpec` per dataset (:data:`DATASETS`), :func:`build_datasets`
:mod:`.loader`      :class:`BatchLoader`, :func:`split_indices`, :func:`collate_time_major`
:mod:`.tabular`     :class:`InMemoryDataset`; digits and MNIST-1D made on this machine
:mod:`.events`      SHD, N-MNIST and any tonic dataset as binary frames; how events are binned
:mod:`.text`        the byte corpus (:func:`load_text_corpus`) and :class:`TextDataset`
==================  ==========================================================================

Example:
    >>> import torch
    >>> from spiking_moe.data import BatchLoader, InMemoryDataset
    >>> data = InMemoryDataset(
    ...     torch.rand(10, 4), torch.arange(10) % 2, encoding="rate", num_steps=3, num_classes=2
    ... )
    >>> [tuple(x_TBF.shape) for x_TBF, y_B in BatchLoader(data, batch_size=4)]
    [(3, 4, 4), (3, 4, 4), (3, 2, 4)]
"""

from .events import (
    EVENT_READERS,
    NMNIST_DEFAULTS,
    NMNIST_FEATURES,
    NMNIST_SIZE,
    SHD_CHANNELS,
    SHD_CLASSES,
    SHD_DEFAULTS,
    NMNISTDataset,
    SHDDataset,
    TonicFramesDataset,
    read_nmnist_events,
    tonic_frames,
)
from .loader import BatchLoader, collate_time_major, split_indices
from .registry import DATASETS, DatasetSpec, DataSplits, build_datasets, expected_files
from .tabular import MNIST1D_LENGTH, InMemoryDataset, load_digits, load_mnist1d
from .text import (
    STDLIB_EXCLUDED_DIRS,
    TEXT_DEFAULT_STEPS,
    TEXT_SPLIT_BUCKETS,
    TEXT_SPLITS,
    TEXT_VOCAB,
    TextCorpus,
    TextDataset,
    load_text_corpus,
    stdlib_text_files,
    text_split,
    user_text_files,
)

__all__ = [
    "DATASETS",
    "EVENT_READERS",
    "MNIST1D_LENGTH",
    "NMNIST_DEFAULTS",
    "NMNIST_FEATURES",
    "NMNIST_SIZE",
    "SHD_CHANNELS",
    "SHD_CLASSES",
    "SHD_DEFAULTS",
    "STDLIB_EXCLUDED_DIRS",
    "TEXT_DEFAULT_STEPS",
    "TEXT_SPLITS",
    "TEXT_SPLIT_BUCKETS",
    "TEXT_VOCAB",
    "BatchLoader",
    "DataSplits",
    "DatasetSpec",
    "InMemoryDataset",
    "NMNISTDataset",
    "SHDDataset",
    "TextCorpus",
    "TextDataset",
    "TonicFramesDataset",
    "build_datasets",
    "collate_time_major",
    "expected_files",
    "load_digits",
    "load_mnist1d",
    "load_text_corpus",
    "read_nmnist_events",
    "split_indices",
    "stdlib_text_files",
    "text_split",
    "tonic_frames",
    "user_text_files",
]
