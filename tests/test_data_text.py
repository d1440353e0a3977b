"""The byte-level text corpus (``data.name = "text"``): file lists, splits by file, windows."""

import hashlib
import logging
import sysconfig
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from spiking_moe.config import ConfigError, DataConfig, config_to_dict, load_config
from spiking_moe.data import (
    DATASETS,
    STDLIB_EXCLUDED_DIRS,
    TEXT_SPLIT_BUCKETS,
    TEXT_SPLITS,
    TEXT_VOCAB,
    BatchLoader,
    TextDataset,
    build_datasets,
    load_text_corpus,
    stdlib_text_files,
    text_split,
)


def _bucket_split(relpath: str) -> str:
    """The documented rule, written out again: the oracle for ``text_split``."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    train_end, val_end = TEXT_SPLIT_BUCKETS
    return "train" if bucket < train_end else "val" if bucket < val_end else "test"


def _expected_splits(files: list[tuple[str, Path]]) -> dict[str, bytes]:
    """Each split's bytes, read independently of the loader: files of the split, in order."""
    return {
        s: b"".join(p.read_bytes() for rel, p in files if _bucket_split(rel) == s)
        for s in TEXT_SPLITS
    }


def _stdlib_reference(root: Path) -> list[tuple[str, Path]]:
    """The stdlib corpus by another route: glob level by level, skipping excluded folders
    (a plain rglob would also walk the large site-packages, only to drop it)."""
    found, folders = [], [root]
    while folders:
        folder = folders.pop()
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if entry.name not in STDLIB_EXCLUDED_DIRS:
                    folders.append(entry)
            elif entry.suffix == ".py" and entry.is_file():
                found.append((entry.relative_to(root).as_posix(), entry))
    return sorted(found)


def _names_covering_every_split(per_split: int = 3) -> list[str]:
    """File names, in order, until every split has ``per_split`` of them by hash."""
    names: list[str] = []
    while min(sum(_bucket_split(n) == s for n in names) for s in TEXT_SPLITS) < per_split:
        names.append(f"part{len(names):03d}.txt")
    return names


def _write_many(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        # Lengths differ per file, so a misplaced file changes the split's length too.
        (folder / name).write_bytes(f"file {name}\n".encode() * (5 + i))


def test_text_is_a_dataset_of_tokens_with_a_default_of_four_steps():
    spec = DATASETS["text"]
    assert spec.encodings == ("tokens",) and spec.default_steps == 4 and not spec.files
    config = DataConfig(name="text")
    assert config.text_paths == () and config.context >= 1 and config.eval_windows >= 0


def test_real_stdlib_corpus_is_sorted_python_source_without_tests_or_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_text_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(set(rels)) == len(rels)
    assert all(rel.endswith(".py") for rel in rels)
    assert not any(set(rel.split("/")[:-1]) & STDLIB_EXCLUDED_DIRS for rel in rels)
    assert "json/decoder.py" in rels and "os.py" in rels
    assert files == _stdlib_reference(root)


def test_stdlib_corpus_splits_by_file_and_hashes_what_it_read(caplog):
    root = Path(sysconfig.get_paths()["stdlib"])
    reference = _stdlib_reference(root)
    with caplog.at_level(logging.INFO, logger="spiking_moe.data"):
        corpus = load_text_corpus()
    assert corpus.source == "stdlib" and corpus.root == str(root)
    assert corpus.files == tuple(rel for rel, _ in reference)
    assert corpus.split_by == "file"
    expected = _expected_splits(reference)
    assert all(expected[s] for s in TEXT_SPLITS)  # val and test are not empty
    for s in TEXT_SPLITS:
        assert bytes(getattr(corpus, s).numpy()) == expected[s]
    whole = b"".join(p.read_bytes() for _, p in reference)
    assert corpus.sha256 == hashlib.sha256(whole).hexdigest()
    meta = corpus.metadata
    assert meta["files"] == len(reference) and meta["sha256"] == corpus.sha256
    assert meta["bytes"] == {s: len(expected[s]) for s in TEXT_SPLITS}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert corpus.sha256 in logged and f"{len(reference)} files" in logged


def test_fake_stdlib_tree_excludes_the_named_folders_at_any_depth(tmp_path, monkeypatch):
    kept = ["zz.py", "a/x.py", "a/b/y.py", "pkg/testing.py", "pkg/test_mod.py", "a.py"]
    dropped = [f"{d}/m.py" for d in sorted(STDLIB_EXCLUDED_DIRS)]
    dropped += ["pkg/tests/t.py", "idlelib/idle_test/t.py", "notes.txt", "a/data.json"]
    for i, rel in enumerate(kept + dropped):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n" * (i + 1))
    files = stdlib_text_files(tmp_path)
    assert [rel for rel, _ in files] == sorted(kept)

    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})
    corpus = load_text_corpus()
    assert corpus.files == tuple(sorted(kept)) and corpus.root == str(tmp_path)
    whole = b"".join((tmp_path / rel).read_bytes() for rel in sorted(kept))
    assert corpus.sha256 == hashlib.sha256(whole).hexdigest()
    # Six files cannot fill three splits by hash, so the corpus is cut by bytes.
    assert corpus.split_by == "bytes"
    assert b"".join(bytes(getattr(corpus, s).numpy()) for s in TEXT_SPLITS) == whole


def test_a_files_split_depends_only_on_its_relative_path(tmp_path):
    names = _names_covering_every_split()
    _write_many(tmp_path / "corpus", names)
    folder = tmp_path / "corpus"
    before = load_text_corpus([folder])
    assert before.split_by == "file"
    files = [(n, folder / n) for n in sorted(names)]
    expected = _expected_splits(files)
    for s in TEXT_SPLITS:
        assert bytes(getattr(before, s).numpy()) == expected[s]
    assert [text_split(n) for n in names] == [_bucket_split(n) for n in names]

    new = "another/file.txt"
    (folder / new).parent.mkdir()
    (folder / new).write_bytes(b"new text\n" * 7)
    after = load_text_corpus([folder])
    grown = _expected_splits(sorted([*files, (new, folder / new)]))
    for s in TEXT_SPLITS:
        assert bytes(getattr(after, s).numpy()) == grown[s]
        # Removing the new file's bytes gives back exactly the old split: nothing moved.
        if s != _bucket_split(new):
            assert torch.equal(getattr(after, s), getattr(before, s))
    moved = {s: after.files_per_split[s] - before.files_per_split[s] for s in TEXT_SPLITS}
    assert moved == {s: int(s == _bucket_split(new)) for s in TEXT_SPLITS}
    again = load_text_corpus([folder])
    assert again.sha256 == after.sha256
    assert all(torch.equal(getattr(again, s), getattr(after, s)) for s in TEXT_SPLITS)


def test_user_files_and_folders_are_read_as_bytes_skipping_hidden_and_binary(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "b.txt").write_bytes("größer — naïve\r\n".encode() * 40)
    (folder / "sub" / "a.md").write_bytes(b"# heading\n\tindented\n" * 30)
    (folder / ".hidden.txt").write_bytes(b"secret\n")
    (folder / ".git" / "config").write_bytes(b"[core]\n")
    (folder / "image.bin").write_bytes(b"PNG\x00\x01\x02" * 10)
    single = tmp_path / "single.txt"
    single.write_bytes(b"one named file\n" * 20)

    corpus = load_text_corpus([str(folder), str(single)])
    assert corpus.files == ("b.txt", "sub/a.md", "single.txt")
    assert corpus.source == (str(folder), str(single)) and corpus.root == ""
    whole = b"".join(p.read_bytes() for p in (folder / "b.txt", folder / "sub" / "a.md", single))
    assert corpus.sha256 == hashlib.sha256(whole).hexdigest()
    # Three files: too few for every split to get one by hash, so a contiguous 90/5/5 byte cut.
    assert corpus.split_by == "bytes"
    train_end, val_end = (len(whole) * b // 100 for b in TEXT_SPLIT_BUCKETS)
    assert bytes(corpus.train.numpy()) == whole[:train_end]
    assert bytes(corpus.val.numpy()) == whole[train_end:val_end]
    assert bytes(corpus.test.numpy()) == whole[val_end:]
    # A file reached twice (on its own and inside its folder) is read once.
    twice = load_text_corpus([str(folder), str(folder / "b.txt")])
    assert twice.files == ("b.txt", "sub/a.md")


def test_windows_are_contiguous_and_targets_are_the_next_byte(tmp_path):
    text = tmp_path / "t.txt"
    raw = bytes(range(1, 256)) * 3 + b"tail"  # every byte value but NUL (binary marker)
    text.write_bytes(raw)
    context = 7
    splits = build_datasets(DataConfig(name="text", text_paths=[str(text)], context=context))
    assert (splits.num_features, splits.num_classes) == (TEXT_VOCAB, TEXT_VOCAB)
    assert splits.num_steps == DATASETS["text"].default_steps and splits.context == context
    train = bytes(splits.train.data.numpy())
    assert raw.startswith(train)
    assert len(splits.train) == (len(train) - 1) // context
    x, y = splits.train.get_batch(torch.arange(len(splits.train)))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (len(splits.train), context)
    for w in range(len(splits.train)):
        assert bytes(x[w].tolist()) == train[w * context : (w + 1) * context]
        assert bytes(y[w].tolist()) == train[w * context + 1 : (w + 1) * context + 1]
    xi, yi = splits.train[3]
    assert torch.equal(xi, x[3]) and torch.equal(yi, y[3])


def test_eval_windows_keeps_an_evenly_spaced_subset_of_val_and_test(tmp_path):
    folder = tmp_path / "corpus"
    _write_many(folder, _names_covering_every_split())
    common = dict(name="text", text_paths=[str(folder)], context=4)
    full = build_datasets(DataConfig(**common, eval_windows=0))
    limit = 5
    assert min(len(full.val), len(full.test)) > 2 * limit  # precondition: a real cut
    cut = build_datasets(DataConfig(**common, eval_windows=limit))
    assert len(cut.train) == len(full.train)
    for name in ("val", "test"):
        whole, kept = getattr(full, name), getattr(cut, name)
        assert len(kept) == limit and len(whole) == (whole.data.numel() - 1) // 4
        starts = kept.starts.tolist()
        assert starts == sorted(set(starts)) and set(starts) <= set(whole.starts.tolist())
        gaps = [b - a for a, b in pairwise(starts)]
        assert max(gaps) - min(gaps) <= whole.context  # even: gaps differ by one window at most
        assert starts[0] == 0 and whole.starts[-1] - starts[-1] <= max(gaps)
    assert cut.metadata["windows"] == {"train": len(full.train), "val": limit, "test": limit}
    assert cut.metadata["sha256"] == full.metadata["sha256"]


def test_batch_loader_replays_text_batches_exactly(tmp_path):
    folder = tmp_path / "corpus"
    _write_many(folder, _names_covering_every_split())
    splits = build_datasets(DataConfig(name="text", text_paths=[str(folder)], context=8))
    loader = BatchLoader(splits.train, 16, shuffle=True, seed=5)
    assert len(loader) > 4
    full = list(loader.iter_epoch(2))
    tail = list(loader.iter_epoch(2, start_batch=3))
    assert len(tail) == len(full) - 3
    for (x, y), (xr, yr) in zip(full[3:], tail, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert not torch.equal(full[0][0], next(loader.iter_epoch(3))[0])
    seen = torch.cat([x for x, _ in full])
    assert seen.shape[0] == len(splits.train)  # one epoch: every window once
    assert torch.equal(full[0][1][:, :-1], full[0][0][:, 1:])


def test_other_datasets_keep_empty_metadata_and_no_context():
    splits = build_datasets(DataConfig(name="digits", num_steps=2))
    assert splits.context == 0 and dict(splits.metadata) == {}


def test_text_paths_come_from_toml_and_round_trip(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    path = tmp_path / "exp.toml"
    path.write_text(f'[data]\nname = "text"\ntext_paths = ["{text}"]\ncontext = 16\n')
    config = load_config(path)
    assert config.data.text_paths == (str(text),) and config.data.context == 16
    assert config_to_dict(config)["data"]["text_paths"] == [str(text)]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(context=0), r"data\.context must be >= 1, got 0"),
        (dict(eval_windows=-1), r"data\.eval_windows must be >= 0, got -1"),
        (dict(text_paths="notes.txt"), r"data\.text_paths must be a list of str"),
        (dict(text_paths=["a.txt", " "]), r"data\.text_paths\[1\] must name a file or folder"),
        (dict(text_paths=[3]), r"data\.text_paths\[0\] must be a string"),
    ],
)
def test_bad_text_config_values_name_the_field(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DataConfig(name="text", **kwargs)


def test_missing_text_path_is_named_by_config_and_loader(tmp_path):
    present = tmp_path / "here.txt"
    present.write_text("text\n")
    missing = tmp_path / "nowhere"
    config = DataConfig(name="text", text_paths=[str(present), str(missing)])
    with pytest.raises(ConfigError, match=rf"data\.text_paths\[1\]: {missing} does not exist"):
        config.check_files()
    with pytest.raises(FileNotFoundError, match=rf"data\.text_paths\[1\]: {missing}"):
        build_datasets(config)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_text_corpus([missing])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        stdlib_text_files(missing)


def test_empty_or_unreadable_text_is_refused_naming_the_path(tmp_path, monkeypatch):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=rf"{empty_dir} holds no readable text"):
        load_text_corpus([empty_dir])
    only_skipped = tmp_path / "skipped"
    only_skipped.mkdir()
    (only_skipped / ".hidden").write_text("hidden\n")
    (only_skipped / "blob").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=rf"{only_skipped} holds no readable text"):
        load_text_corpus([only_skipped])
    empty_file = tmp_path / "empty.txt"
    empty_file.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty_file} is an empty file"):
        build_datasets(DataConfig(name="text", text_paths=[str(empty_file)]))
    with pytest.raises(ValueError, match=rf"{only_skipped / 'blob'} contains NUL bytes"):
        load_text_corpus([only_skipped / "blob"])

    locked = tmp_path / "locked.txt"
    locked.write_text("cannot be read\n")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ValueError, match=rf"cannot read text file {locked}: Permission denied"):
        load_text_corpus([locked])


def test_corpus_too_small_for_one_window_names_the_context(tmp_path):
    text = tmp_path / "short.txt"
    text.write_bytes(b"x" * 100)  # 5 test bytes after the 90/5/5 cut
    with pytest.raises(ValueError, match=r"data\.context.*test split"):
        build_datasets(DataConfig(name="text", text_paths=[str(text)], context=64))


def test_text_dataset_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        TextDataset(torch.arange(10), context=2)
    with pytest.raises(ValueError, match=r"context must be >= 1"):
        TextDataset(torch.zeros(10, dtype=torch.uint8), context=0)
    assert len(TextDataset(torch.zeros(0, dtype=torch.uint8), context=3)) == 0
