"""experiments/energy_report.py and experiments/sweep.py end to end, on tiny digits runs."""

import json

import pytest

import energy
from spiking_moe.cli import energy_report_main, evaluate_checkpoint, sweep_main, train_main
from spiking_moe.training import load_checkpoint, save_checkpoint

# Small enough to train in well under a second, large enough to learn above chance (10%).
TINY_MOE = (
    '[data]\nname = "digits"\nnum_steps = 4\n'
    '[model]\nkind = "{kind}"\nhidden_features = 32\nnum_experts = 4\nk = 1\nexpert_hidden = 16\n'
    'threshold = 0.5\nreadout = "membrane"\n'
    "[train]\nmax_steps = {steps}\nbatch_size = 64\nlr = 1e-2\nlog_every = 5\nprogress = false\n"
)


def _config(tmp_path, kind="moe", steps=20):
    path = tmp_path / f"tiny_{kind}.toml"
    path.write_text(TINY_MOE.format(kind=kind, steps=steps))
    return path


def _markdown_rows(text):
    """Body cells of a Markdown table (header and rule skipped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_energy_report_recounts_the_trained_model_under_the_asked_profile(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert train_main(["--config", str(_config(tmp_path)), "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged_accuracy = next(r["test/accuracy"] for r in records if "test/accuracy" in r)
    assert logged_accuracy > 0.2  # it learned: equal accuracies below mean the weights loaded
    capsys.readouterr()

    checkpoint = str(run / "checkpoint.pt")
    assert energy_report_main(["--checkpoint", checkpoint, "--profile", "loihi"]) == 0
    assert "## Energy report: profile `loihi`" in capsys.readouterr().out
    loihi = energy.EnergyReport.from_json((run / "report_loihi.json").read_text())
    assert loihi.profile.name == "loihi"
    assert "profile `loihi`" in (run / "report_loihi.md").read_text()
    events = EventAccumulator(str(run)).Reload()
    assert "test_energy_loihi/total_pJ" in events.Tags()["scalars"]

    # Under train_main's profile, the re-count is train_main's own test report, to the bit.
    other = tmp_path / "reports"
    argv = ["--checkpoint", checkpoint, "--profile", "cmos45", "--out", str(other)]
    assert energy_report_main([*argv, "--device", "cpu"]) == 0
    assert (other / "report_cmos45.json").read_text() == (run / "report.json").read_text()
    cmos45 = energy.EnergyReport.from_json((other / "report_cmos45.json").read_text())
    assert (loihi.totals.acs, loihi.totals.spikes) == (cmos45.totals.acs, cmos45.totals.spikes)
    assert loihi.totals.energy_pj != cmos45.totals.energy_pj

    evaluation = evaluate_checkpoint(checkpoint, "loihi", device="cpu")
    assert evaluation.metrics["test/accuracy"] == logged_accuracy
    assert evaluation.step == 20

    # --num-batches 1 counts one evaluation batch (eval_batch_size 256) of the 359 samples.
    assert evaluate_checkpoint(checkpoint, "loihi", num_batches=1).samples == 256


def test_energy_report_exits_2_naming_the_problem(tmp_path, caplog):
    missing = tmp_path / "nothing" / "checkpoint.pt"
    assert energy_report_main(["--checkpoint", str(missing), "--profile", "nope"]) == 2
    assert "unknown energy profile 'nope'" in caplog.text
    for name in energy.available_profiles():
        assert repr(name) in caplog.text
    caplog.clear()
    assert energy_report_main(["--checkpoint", str(missing), "--profile", "loihi"]) == 2
    assert str(missing) in caplog.text
    caplog.clear()
    foreign = save_checkpoint({"model": {}, "step": 0, "extra": {}}, tmp_path / "foreign.pt")
    assert energy_report_main(["--checkpoint", str(foreign), "--profile", "loihi"]) == 2
    assert "holds no experiment config" in caplog.text


def test_sweep_trains_each_valid_pair_and_writes_one_table(tmp_path, caplog, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", str(_config(tmp_path, steps=50)), "--experts", "2,4", "--k", "1,2,4"]
    argv += ["--out", str(out), "--max-steps", "5", "--device", "cpu"]
    with caplog.at_level("WARNING", logger="spiking_moe.cli"):
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
        assert 0 <= row["accuracy"] <= 1 and row["uJ_per_sample"] > 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    caplog.clear()
    assert sweep_main(argv) == 2  # the run folders exist: nothing is overwritten
    assert "already holds a run" in caplog.text
    caplog.clear()
    dense = ["--config", str(_config(tmp_path, kind="dense_snn")), "--experts", "2", "--k", "1"]
    assert sweep_main([*dense, "--out", str(tmp_path / "dense")]) == 2
    assert "model.kind must be 'moe'" in caplog.text
