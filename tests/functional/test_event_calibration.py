"""auto_dense_above: one threshold per machine and layer shape, kept across processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from spiking_moe.functional import event as event_module
from spiking_moe.functional.kernels import calibration, event_cpu

ROOT = Path(__file__).resolve().parents[2]
LOGGER = "spiking_moe.functional.event"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has calibrated nothing yet, with its calibration file under tmp_path."""
    if event_cpu.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here: nothing to calibrate")
    monkeypatch.delenv("SPIKING_MOE_EVENT_DENSITY", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the kernel is loaded already
    monkeypatch.setattr(event_module, "_calibrated", {})
    monkeypatch.setattr(event_module, "_logged", set())
    return tmp_path / calibration.FILE_NAME


def _entries(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())["break_even"]


def _key(n_in, n_out):
    isa = event_cpu.available_isas()[-1]
    return calibration.entry_key(isa, torch.get_num_threads(), n_in, n_out)


def test_calibration_is_saved_capped_and_cached_in_the_process(fresh, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        threshold = event_module.auto_dense_above("cpu", 512, 256)
    assert 0.0 < threshold <= event_module.AUTO_DENSE_ABOVE["cpu"]
    break_even = _entries(fresh)[_key(512, 256)]
    assert threshold == min(event_module.AUTO_DENSE_ABOVE["cpu"], 0.75 * break_even)
    assert [r.getMessage() for r in caplog.records if "measured now" in r.getMessage()]
    # Within the process: neither timed nor read again, and not logged again.
    monkeypatch.setattr(event_module, "_measure_break_even", None)  # calling it would fail
    monkeypatch.setattr(calibration, "read_break_even", None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert event_module.auto_dense_above("cpu", 512, 256) == threshold
    assert caplog.records == []


def test_a_stored_break_even_is_read_not_measured(fresh, caplog, monkeypatch):
    fresh.write_text(json.dumps({"break_even": {_key(300, 200): 0.2}}))
    monkeypatch.setattr(event_module, "_measure_break_even", None)  # calling it would fail
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert event_module.auto_dense_above("cpu", 300, 200) == pytest.approx(0.75 * 0.2)
    assert [r for r in caplog.records if f"read from {fresh}" in r.getMessage()]


PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys
    import torch
    from spiking_moe.functional.kernels import event_cpu
    # Load the kernel from the shared build first: an empty extensions folder would rebuild it
    # (30-60 s). The calibration file is looked up when it is needed, so it goes to the folder
    # named here.
    assert event_cpu.EXTENSION.load() is not None
    os.environ["TORCH_EXTENSIONS_DIR"] = sys.argv[1]
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from spiking_moe.functional.event import auto_dense_above
    print(json.dumps([auto_dense_above("cpu", 384, 96), torch.get_num_threads()]))
    """
)


def _run_fresh_process(folder: Path) -> tuple[float, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPIKING_MOE_EVENT_DENSITY"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", PROCESS_SCRIPT, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    threshold, threads = json.loads(result.stdout.strip().splitlines()[-1])
    return threshold, threads, result.stderr


def test_two_fresh_processes_take_the_same_threshold_and_the_second_times_nothing(tmp_path):
    if event_cpu.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here: nothing to calibrate")
    first, first_threads, first_log = _run_fresh_process(tmp_path)
    assert "measured now; saved to" in first_log, first_log
    stored = (tmp_path / calibration.FILE_NAME).read_bytes()
    second, second_threads, second_log = _run_fresh_process(tmp_path)
    assert second_threads == first_threads  # the same key
    assert second == first  # exactly: the same stored number through the same formula
    assert f"read from {tmp_path / calibration.FILE_NAME}" in second_log, second_log
    assert "measured now" not in second_log
    assert (tmp_path / calibration.FILE_NAME).read_bytes() == stored  # nothing rewritten


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        "[0.1, 0.2]",
        '{"break_even": [0.1]}',
        '{"break_even": {"some key": -1}}',
        '{"break_even": {"some key": "fast"}}',
        "",
    ],
    ids=["not-json", "a-list", "table-a-list", "negative", "a-string", "empty"],
)
def test_a_damaged_file_is_measured_again_with_a_warning(fresh, caplog, damage):
    fresh.write_text(damage)
    with caplog.at_level(logging.INFO):
        threshold = event_module.auto_dense_above("cpu", 256, 64)
    assert 0.0 < threshold <= event_module.AUTO_DENSE_ABOVE["cpu"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0].getMessage()
    assert [r for r in caplog.records if "measured now" in r.getMessage()]
    assert list(_entries(fresh)) == [_key(256, 64)]  # replaced by a whole, valid file


def test_an_unwritable_folder_warns_and_keeps_the_measurement(fresh, caplog, monkeypatch):
    blocker = fresh.parent / "a file, not a folder"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker))
    with caplog.at_level(logging.INFO):
        threshold = event_module.auto_dense_above("cpu", 256, 64)
    assert 0.0 < threshold <= event_module.AUTO_DENSE_ABOVE["cpu"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not save" in m for m in messages), messages
    assert any("measured now; not saved" in m for m in messages), messages


def test_the_environment_override_wins_over_the_file(fresh, caplog, monkeypatch):
    fresh.write_text(json.dumps({"break_even": {_key(300, 200): 0.2}}))
    monkeypatch.setenv("SPIKING_MOE_EVENT_DENSITY", "0.125")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert event_module.auto_dense_above("cpu", 300, 200) == 0.125
        assert event_module.auto_dense_above("cpu", 300, 200) == 0.125
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "12.5%" in messages[0] and "environment override" in messages[0]
    assert event_module.auto_dense_above("cuda", 7, 9) == 0.125


def test_density_override_validation_and_the_cuda_default(monkeypatch):
    for bad in ("1.5", "-0.1", "often", "nan"):
        monkeypatch.setenv("SPIKING_MOE_EVENT_DENSITY", bad)
        with pytest.raises(ValueError, match="SPIKING_MOE_EVENT_DENSITY"):
            event_module.auto_dense_above("cpu", 7, 9)
    monkeypatch.delenv("SPIKING_MOE_EVENT_DENSITY")
    assert event_module.auto_dense_above("cuda", 7, 9) == event_module.AUTO_DENSE_ABOVE["cuda"]


def test_concurrent_writers_keep_every_entry_and_the_first_value(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    results: dict[str, float | None] = {}

    def write(worker):
        for shape in range(10):
            key = f"test|worker={worker}|shape={shape}"
            results[key] = calibration.store_break_even(key, 0.01 * (worker + 1))
        results[f"shared|worker={worker}"] = calibration.store_break_even("shared", 0.5 + worker)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = _entries(tmp_path / calibration.FILE_NAME)
    assert len(entries) == 6 * 10 + 1  # no writer dropped another's entries
    for key, value in results.items():
        if key.startswith("test|"):
            assert entries[key] == value
    # Whoever stored "shared" first, every writer was told that one value.
    assert {results[f"shared|worker={w}"] for w in range(6)} == {entries["shared"]}
    assert not list(tmp_path.glob("*.tmp"))
