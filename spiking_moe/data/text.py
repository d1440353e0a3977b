"""The text corpus of the byte-level language models, read from files already on this machine.

By default the ``*.py`` source of the running Python's standard library (every machine running
this code has it); otherwise the user's files and folders (``data.text_paths``). Files go
wholly to train, val or test by a hash of their relative path (:func:`text_split`), so a grown
corpus never moves test files into training; :class:`TextDataset` cuts a split into
next-byte windows. Letters as in :mod:`spiking_moe.data`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "STDLIB_EXCLUDED_DIRS",
    "TEXT_DEFAULT_STEPS",
    "TEXT_SPLITS",
    "TEXT_SPLIT_BUCKETS",
    "TEXT_VOCAB",
    "TextCorpus",
    "TextDataset",
    "load_text_corpus",
    "stdlib_text_files",
    "text_split",
    "user_text_files",
]

logger = logging.getLogger(__name__)

#: Vocabulary of the byte-level language models: the 256 byte values, the input features and
#: classes of :class:`TextDataset`.
TEXT_VOCAB = 256
#: ``T`` of the ``"text"`` dataset when ``data.num_steps = 0``: steps of constant input current
#: per byte.
TEXT_DEFAULT_STEPS = 4
#: Folders left out of the standard-library corpus: test suites are not library code, and
#: installed third-party packages differ between machines (the corpus, and its hash, would too).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
#: The corpus's splits, in order: fields of :class:`TextCorpus`, shared out by
#: :data:`TEXT_SPLIT_BUCKETS`.
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
        train: 1-D uint8, the train split's files' bytes concatenated in corpus order.
        val: 1-D uint8, the val split's files' bytes concatenated in corpus order.
        test: 1-D uint8, the test split's files' bytes concatenated in corpus order.
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


class TextDataset(Dataset):
    """Non-overlapping next-byte windows of a byte string, for a byte-level language model.

    Window ``w`` is bytes ``[w*S, w*S + S + 1)``: ``x`` its first S bytes, ``y`` its last S (the
    next byte of each). Consecutive windows share one byte, so every byte but the first is a
    target exactly once. Bytes after the last whole window are not used.

    Args:
        data: 1-D uint8 bytes (shared, not copied, by :meth:`subset`).
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
