"""spiking-moe-sweep end to end on tiny digits runs."""

import json

import pytest

from spiking_moe.cli import sweep_main
from spiking_moe.training import load_checkpoint

TINY_MOE = (
    '[data]\nname = "digits"\nnum_steps = 4\n'
    '[model]\nkind = "{kind}"\nhidden_features = 32\nnum_experts = 4\nk = 1\nexpert_hidden = 16\n'
    'threshold = 0.5\nreadout = "membrane"\n'
    "[train]\nmax_steps = 50\nbatch_size = 64\nlr = 1e-2\nlog_every = 5\nprogress = false\n"
)


def _markdown_rows(text):
    """Body cells of a Markdown table (header and rule skipped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _config(tmp_path, kind="moe"):
    path = tmp_path / f"tiny_{kind}.toml"
    path.write_text(TINY_MOE.format(kind=kind))
    return path


@pytest.mark.slow
def test_sweep_trains_each_valid_pair_and_writes_one_table(tmp_path, caplog, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", str(_config(tmp_path)), "--experts", "2,4", "--k", "1,2,4"]
    argv += ["--out", str(out), "--max-steps", "5", "--device", "cpu"]
    with caplog.at_level("WARNING", logger="spiking_moe.sweep"):
        assert sweep_main(argv) == 0
    assert "skipping E=2 k=4" in caplog.text
    valid = {(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)}

    table = (out / "sweep.md").read_text()
    assert table in capsys.readouterr().out
    assert {(int(r[0]), int(r[1])) for r in _markdown_rows(table)} == valid
    assert len(_markdown_rows(table)) == len(valid)
    rows = {(r["num_experts"], r["k"]): r for r in json.loads((out / "sweep.json").read_text())}
    assert set(rows) == valid
    assert not (out / "E2_k4").exists()
    assert load_checkpoint(out / "E4_k1" / "checkpoint.pt")["step"] == 5  # --max-steps wins

    # With k = E the routed model runs every expert on every token: it *is* the dense MoE,
    # and every expert carries the same load. With k < E routing saves, more so as E/k grows.
    for (num_experts, k), row in rows.items():
        if k == num_experts:
            assert row["ratio_dense_snn"] == pytest.approx(1.0, rel=1e-9)
            assert row["max_load_ratio"] == pytest.approx(1.0)
        else:
            assert row["ratio_dense_snn"] > 1
            assert row["max_load_ratio"] >= 1
    assert rows[4, 1]["ratio_dense_snn"] > rows[2, 1]["ratio_dense_snn"]
    assert rows[4, 1]["ratio_dense_snn"] > rows[4, 2]["ratio_dense_snn"]
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["uJ_per_sample"] > 0 and row["runs"] == 1
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    caplog.clear()
    assert sweep_main(argv) == 2  # the run folders exist: nothing is overwritten
    assert "already holds a run" in caplog.text
    caplog.clear()
    dense = ["--config", str(_config(tmp_path, kind="dense_snn")), "--experts", "2", "--k", "1"]
    assert sweep_main([*dense, "--out", str(tmp_path / "dense")]) == 2
    assert "model.kind must be 'moe'" in caplog.text


@pytest.mark.slow
def test_sweep_with_seeds_reports_mean_and_std_per_pair(tmp_path):
    out = tmp_path / "sweep"
    argv = ["--config", str(_config(tmp_path)), "--experts", "2", "--k", "1", "--seeds", "0,1"]
    assert sweep_main([*argv, "--out", str(out), "--set", "train.max_steps=4"]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())
    assert row["runs"] == 2 and "accuracy_std" in row
    assert (out / "E2_k1" / "seed1" / "checkpoint.pt").exists()
    assert " ± " in (out / "sweep.md").read_text()
