"""The precision comparison (spiking MoE vs dense SNN vs ANN twin at fp32, int8 and int4 QAT):
twin configs, the summary arithmetic, and spiking-moe-compare end to end on tiny digits runs,
checked against each run's own logged numbers and hand-quantized evaluations."""

import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import _hand_accuracy, _rebuild  # the same oracles as the energy report's

import energy
from spiking_moe.cli import compare_main
from spiking_moe.compare import Comparison, Evaluation, twin_config
from spiking_moe.config import ConfigError, flatten_config, load_config
from spiking_moe.quantization import quantize_model
from spiking_moe.training import count_energy

ROOT = Path(__file__).resolve().parents[1]

# The tiny digits MoE of test_cli.py: trains in well under a second on one thread.
TINY = (
    '[data]\nname = "digits"\nnum_steps = 4\n'
    '[model]\nkind = "moe"\nhidden_features = 32\nnum_experts = 4\nk = 1\nexpert_hidden = 16\n'
    'threshold = 0.5\nreadout = "membrane"\n'
    "[train]\nmax_steps = 20\nbatch_size = 64\nlr = 1e-2\nlog_every = 5\nprogress = false\n"
    '[energy]\nprofile = "cmos45"\n'
)
ARGS = ["--seeds", "0", "--kinds", "moe,ann", "--bits", "8", "--qat", "4"]
PROFILES = ("cmos45", "cmos45_int8")


def _logged(run):
    """The test accuracy a training run wrote in its result.json."""
    return json.loads((run / "result.json").read_text())["metrics"]["test/accuracy"]


def _markdown_rows(markdown):
    """The comparison table as ``{(model, precision): {header: cell}}``."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[cells["model"], cells["precision"]] = cells
    return rows


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("checkpoint.pt"))}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny comparison (spiking MoE and ANN twin, seed 0, int8 PTQ, int4 QAT), shared by
    the end-to-end tests; each test only reads its folder (or copies it)."""
    root = tmp_path_factory.mktemp("compare")
    config = root / "tiny.toml"
    config.write_text(TINY)
    out = root / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy machine
    try:
        code = compare_main(["--config", str(config), *ARGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(code=code, config=config, out=out, runs=out / "runs")


# --------------------------------------------------------------------------- twin_config


def test_twin_config_changes_only_what_the_twin_needs():
    config = load_config(ROOT / "experiments" / "configs" / "default.toml")
    assert config.model.kind == "moe" and config.data.encoding == "rate"
    assert config.train.spike_rate_penalty > 0
    base = flatten_config(config)

    def changes(twin):
        flat = flatten_config(twin)
        assert flat.keys() == base.keys()
        return {k: v for k, v in flat.items() if v != base[k]}

    assert changes(twin_config(config, "dense_snn")) == {
        "name": "default_dense_snn",
        "model.kind": "dense_snn",
    }
    assert changes(twin_config(config, "ann")) == {
        "name": "default_ann",
        "model.kind": "ann",
        "data.encoding": "current",
        "train.spike_rate_penalty": 0.0,
    }
    assert changes(twin_config(config, "moe")) == {"name": "default_moe"}
    with pytest.raises(ConfigError, match="'cnn'"):
        twin_config(config, "cnn")


# --------------------------------------------------------------------------- Comparison


def _evaluation(kind, precision, seed, accuracy, uj):
    """``uj``: ``{profile: (compute, with_memory)}`` uJ per sample."""
    return Evaluation(
        kind=kind,
        precision=precision,
        weight_bits={"fp32": 32, "int8": 8, "int4 QAT": 4}[precision],
        seed=seed,
        run=f"runs/{kind}/seed{seed}/checkpoint.pt",
        accuracy=accuracy,
        firing_rate=0.0 if kind == "ann" else 0.1 + 0.02 * seed,
        unit="sample",
        energy_uj={p: {"compute": c, "with_memory": m} for p, (c, m) in uj.items()},
    )


# (kind, precision): per seed (accuracy, cmos45 (compute, memory), cmos45_int8 (...)).
# The fp32 rows are cheapest under cmos45_int8 and the int8 rows under cmos45: a verdict that
# mixed precisions would name the wrong winner.
HAND = {
    ("moe", "fp32"): [(0.950, (2.0, 5.0), (0.001, 0.001)), (0.960, (2.2, 5.4), (0.001, 0.001))],
    ("moe", "int8"): [(0.946, (0.01, 0.01), (0.5, 1.5)), (0.958, (0.01, 0.01), (0.6, 1.7))],
    ("moe", "int4 QAT"): [(0.940, (0.02, 0.02), (0.3, 0.9)), (0.948, (0.02, 0.02), (0.4, 1.1))],
    ("dense_snn", "fp32"): [(0.940, (3.0, 6.0), (0.001, 0.001)), (0.930, (3.2, 6.2), (0.1, 0.1))],
    ("dense_snn", "int8"): [(0.935, (0.01, 0.01), (0.8, 1.0)), (0.931, (0.01, 0.01), (0.9, 1.2))],
    ("ann", "fp32"): [(0.970, (1.0, 7.0), (0.001, 0.001)), (0.975, (1.1, 7.2), (0.001, 0.001))],
    ("ann", "int8"): [(0.960, (0.01, 0.01), (1.2, 2.0)), (0.972, (0.01, 0.01), (1.3, 2.2))],
}


def _hand_comparison(hand=HAND):
    evaluations = [
        _evaluation(kind, precision, seed, acc, {"cmos45": c45, "cmos45_int8": c8})
        for (kind, precision), seeds in hand.items()
        for seed, (acc, c45, c8) in enumerate(seeds)
    ]
    # Out of order (ANN first, seed 1 before seed 0): rows and pairs must come from the keys.
    return Comparison("hand", PROFILES, tuple(reversed(evaluations)))


def test_comparison_summary_verdicts_and_targets_by_hand():
    comparison = _hand_comparison()
    rows = comparison.summary()
    assert [(r["kind"], r["precision"]) for r in rows] == list(HAND)  # table order
    for row in rows:
        seeds = HAND[row["kind"], row["precision"]]
        accuracies = [acc for acc, _, _ in seeds]
        assert row["seeds"] == [0, 1]
        assert row["accuracy"] == pytest.approx(sum(accuracies) / 2)
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert row["weight_bits"] == {"fp32": 32, "int8": 8, "int4 QAT": 4}[row["precision"]]
        for p, profile in enumerate(PROFILES):
            for a, accounting in enumerate(("compute", "with_memory")):
                values = [s[1 + p][a] for s in seeds]
                assert row[f"{profile}/{accounting}"] == pytest.approx(sum(values) / 2)
                assert row[f"{profile}/{accounting}_std"] == pytest.approx(statistics.stdev(values))
        if row["precision"] == "fp32":
            assert "drop" not in row
        else:
            # Paired by seed: the fp32 accuracy of the same seed minus this one.
            fp32 = [acc for acc, _, _ in HAND[row["kind"], "fp32"]]
            drops = [f - q for f, q in zip(fp32, accuracies, strict=True)]
            assert row["drop"] == pytest.approx(sum(drops) / 2)
            assert row["drop_std"] == pytest.approx(statistics.stdev(drops))
    moe_int8 = next(r for r in rows if (r["kind"], r["precision"]) == ("moe", "int8"))
    assert moe_int8["drop"] == pytest.approx(0.003)
    assert moe_int8["drop_std"] == pytest.approx(statistics.stdev([0.004, 0.002]))
    assert moe_int8["firing_rate"] == pytest.approx(0.11)

    verdicts = comparison.verdicts()
    assert len(verdicts) == 4
    by_start = {v.split(":")[0]: v for v in verdicts}
    c45 = by_start["Under `cmos45` at 32-bit weights, compute only"]
    assert "the ANN twin uses least (2.00x less than the spiking MoE)" in c45  # 2.1 / 1.05
    c45_memory = by_start["Under `cmos45` at 32-bit weights, with memory traffic"]
    assert "the spiking MoE uses least (1.17x less than the dense SNN)" in c45_memory  # 6.1/5.2
    assert by_start["Under `cmos45_int8` at 8-bit weights, compute only"] == (
        "Under `cmos45_int8` at 8-bit weights, compute only: spiking MoE 0.55 uJ (95.20% "
        "accuracy), dense SNN 0.85 uJ (93.30% accuracy), ANN twin 1.25 uJ (96.60% accuracy) "
        "per sample; the spiking MoE uses least (1.55x less than the dense SNN)."
    )
    int8_memory = by_start["Under `cmos45_int8` at 8-bit weights, with memory traffic"]
    assert "the dense SNN uses least (1.45x less than the spiking MoE)" in int8_memory  # 1.6/1.1

    std_int8 = 100 * statistics.stdev([0.004, 0.002])
    std_qat = 100 * statistics.stdev([0.010, 0.012])
    assert comparison.targets() == [
        f"Spiking MoE int8: +0.30 ± {std_int8:.2f} accuracy points lost (target <= 0.5: met).",
        f"Spiking MoE int4 QAT: +1.10 ± {std_qat:.2f} accuracy points lost (target <= 1.5: met).",
    ]
    # 0.7 points lost at int8 and 1.6 at int4 QAT miss their targets.
    worse = dict(HAND)
    worse["moe", "int8"] = [
        (0.943, *HAND["moe", "int8"][0][1:]),
        (0.953, *HAND["moe", "int8"][1][1:]),
    ]
    worse["moe", "int4 QAT"] = [
        (0.934, *HAND["moe", "int4 QAT"][0][1:]),
        (0.944, *HAND["moe", "int4 QAT"][1][1:]),
    ]
    targets = _hand_comparison(worse).targets()
    assert len(targets) == 2
    assert targets[0].startswith("Spiking MoE int8: +0.70 ± 0.00")
    assert targets[0].endswith("(target <= 0.5: NOT met).")
    assert targets[1].startswith("Spiking MoE int4 QAT: +1.60 ± 0.00")
    assert targets[1].endswith("(target <= 1.5: NOT met).")

    markdown = _markdown_rows(comparison.to_markdown())
    assert len(markdown) == len(HAND)
    for (model, precision), cells in markdown.items():
        for header, cell in cells.items():
            daggered = header.startswith("cmos45_int8 ") and precision == "fp32"
            assert ("†" in cell) == daggered, (model, precision, header)
    assert markdown["spiking MoE", "int8"]["lost (points)"] == f"+0.30 ± {std_int8:.2f}"
    assert markdown["ANN twin", "fp32"]["firing rate"] == ""

    back = Comparison.from_json(comparison.to_json())
    assert back == comparison
    assert back.summary() == json.loads(comparison.to_json())["summary"]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_compare_trains_evaluates_and_writes_the_comparison(compared):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert compared.code == 0
    out, runs = compared.out, compared.runs
    assert sorted(p.name for p in runs.iterdir()) == ["ann", "ann_qat4", "moe", "moe_qat4"]
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "comparison.json").read_text()
    comparison = Comparison.from_json(text)
    assert comparison.to_json() == text
    assert comparison.summary() == json.loads(text)["summary"]
    summary = {(r["kind"], r["precision"]): r for r in comparison.summary()}
    assert set(summary) == {
        (kind, precision) for kind in ("moe", "ann") for precision in ("fp32", "int8", "int4 QAT")
    }

    # fp32 rows: each run's own logged test accuracy; int8 and QAT drops paired with it.
    logged = {kind: _logged(runs / kind / "seed0") for kind in ("moe", "ann", "moe_qat4")}
    assert logged["moe"] > 0.2  # learned
    assert summary["moe", "fp32"]["accuracy"] == logged["moe"]
    assert summary["ann", "fp32"]["accuracy"] == logged["ann"]
    model, test_loader, test_size = _rebuild(runs / "moe" / "seed0" / "checkpoint.pt")
    quantized = quantize_model(model, 8)
    int8 = _hand_accuracy(quantized, test_loader)
    assert summary["moe", "int8"]["accuracy"] == int8
    assert summary["moe", "int8"]["drop"] == pytest.approx(logged["moe"] - int8, abs=1e-12)
    ann_int8 = summary["ann", "int8"]["accuracy"]
    assert summary["ann", "int8"]["drop"] == pytest.approx(logged["ann"] - ann_int8, abs=1e-12)
    # The spiking MoE's QAT forward and its integer model agree.
    assert summary["moe", "int4 QAT"]["accuracy"] == logged["moe_qat4"]
    assert summary["moe", "int4 QAT"]["drop"] == pytest.approx(
        logged["moe"] - logged["moe_qat4"], abs=1e-12
    )
    assert summary["moe", "int4 QAT"]["weight_bits"] == 4

    # fp32 energy under cmos45: the runs' own reports (train_main counted the same test set).
    for kind in ("moe", "ann"):
        report = energy.EnergyReport.from_json((runs / kind / "seed0" / "report.json").read_text())
        assert report.profile.name == "cmos45"
        for accounting, total in (
            ("compute", report.totals.compute_pj),
            ("with_memory", report.totals.with_memory_pj),
        ):
            assert summary[kind, "fp32"][f"cmos45/{accounting}"] == pytest.approx(
                total / test_size / 1e6, rel=1e-9
            ), (kind, accounting)

    # The int8 row's energy is its own activity (the quantized model's), priced at 8 bits.
    counts = energy.merge_counts(*(count_energy(quantized, x)[0] for x, _ in test_loader))
    totals = energy.build_report(counts, "cmos45_int8").totals
    for accounting, total in (
        ("compute", totals.compute_pj),
        ("with_memory", totals.with_memory_pj),
    ):
        assert summary["moe", "int8"][f"cmos45_int8/{accounting}"] == pytest.approx(
            total / test_size / 1e6, rel=1e-9
        ), accounting

    # † exactly on the fp32 rows' cmos45_int8 cells.
    markdown = (out / "comparison.md").read_text()
    table = _markdown_rows(markdown)
    assert len(table) == 6
    for (_, precision), cells in table.items():
        for header, cell in cells.items():
            daggered = header.startswith("cmos45_int8 ") and precision == "fp32"
            assert ("†" in cell) == daggered, (precision, header)

    # The verdicts name the model with the lowest value in the table at the profile's bits.
    for profile, precision, bits in (("cmos45_int8", "int8", 8), ("cmos45", "fp32", 32)):
        column = f"{profile} compute (uJ/sample)"
        at = {model: float(cells[column]) for (model, p), cells in table.items() if p == precision}
        winner = min(at, key=at.get)
        start = f"Under `{profile}` at {bits}-bit weights, compute only:"
        verdict = next(line for line in markdown.splitlines() if line.startswith(start))
        assert f"the {winner} uses least" in verdict
        assert "spiking MoE" in verdict and "ANN twin" in verdict

    drop = 100 * (logged["moe"] - int8)
    target = next(line for line in markdown.splitlines() if line.startswith("Spiking MoE int8:"))
    assert target.endswith(f"(target <= 0.5: {'met' if drop <= 0.5 else 'NOT met'}).")

    events = EventAccumulator(str(out), size_guidance={"tensors": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "comparison/moe/int8/accuracy",
        "comparison/moe/int4_QAT/accuracy",
        "comparison/ann/fp32/cmos45_int8/uJ_compute",
        "comparison/ann/int8/cmos45/uJ_with_memory",
    ):
        assert tag in scalars, tag
    (event,) = events.Scalars("comparison/moe/int8/accuracy")
    assert event.value == pytest.approx(int8, rel=1e-6)
    assert any("comparison/table" in tag for tag in events.Tags()["tensors"])


@pytest.mark.slow
def test_compare_reuse_finished_reads_runs_back_and_refuses_to_overwrite(
    compared, tmp_path, caplog, one_thread
):
    out = tmp_path / "again"
    shutil.copytree(compared.runs, out / "runs")  # copy2 keeps the modification times
    before = _mtimes(out / "runs")
    assert len(before) == 4
    argv = ["--config", str(compared.config), *ARGS, "--out", str(out)]
    caplog.set_level("INFO", logger="spiking_moe")
    assert compare_main([*argv, "--reuse-finished"]) == 0
    assert _mtimes(out / "runs") == before  # nothing trained again
    assert caplog.text.count("reusing the finished run") == 4
    assert (
        json.loads((out / "comparison.json").read_text())["summary"]
        == json.loads((compared.out / "comparison.json").read_text())["summary"]
    )

    # Without it, a run folder that exists stops everything before any training: the first
    # run (the spiking MoE, missing here) is not trained either.
    shutil.rmtree(out / "runs" / "moe")
    (out / "comparison.json").unlink()
    caplog.clear()
    assert compare_main(argv) == 2
    assert "already holds a run" in caplog.text
    assert str(out / "runs" / "ann" / "seed0") in caplog.text
    assert not (out / "runs" / "moe").exists()
    assert not (out / "comparison.json").exists()
    kept = {p: t for p, t in before.items() if p.relative_to(out / "runs").parts[0] != "moe"}
    assert len(kept) == 3 and _mtimes(out / "runs") == kept


@pytest.mark.slow
def test_compare_evaluates_checkpoints_without_training(compared, tmp_path, one_thread):
    runs = compared.runs
    checkpoints = [runs / k / "seed0" / "checkpoint.pt" for k in ("moe", "ann", "moe_qat4")]
    before = _mtimes(runs)
    out = tmp_path / "checkpoints"
    argv = [a for c in checkpoints for a in ("--checkpoint", str(c))]
    assert compare_main([*argv, "--bits", "8", "--out", str(out)]) == 0
    assert not (out / "runs").exists()
    assert _mtimes(runs) == before
    comparison = Comparison.from_json((out / "comparison.json").read_text())
    precisions = {(e.kind, e.precision): e for e in comparison.evaluations}
    assert set(precisions) == {
        ("moe", "fp32"),
        ("moe", "int8"),
        ("moe", "int4 QAT"),
        ("ann", "fp32"),
        ("ann", "int8"),
    }
    assert precisions["moe", "fp32"].accuracy == _logged(runs / "moe" / "seed0")
    assert precisions["ann", "fp32"].accuracy == _logged(runs / "ann" / "seed0")
    assert precisions["moe", "int8"].run == str(checkpoints[0])
    assert precisions["moe", "int4 QAT"].run == str(checkpoints[2])
    # The same checkpoints give the same rows as the comparison that trained them.
    trained = json.loads((compared.out / "comparison.json").read_text())["summary"]
    trained = {(r["kind"], r["precision"]): r for r in trained}
    for row in comparison.summary():
        assert row == trained[row["kind"], row["precision"]], (row["kind"], row["precision"])


def test_compare_exits_2_naming_the_problem(tmp_path, caplog):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    base = ["--config", str(config), "--out", str(out)]
    missing = tmp_path / "missing.pt"
    for argv, message in [
        ([*base, "--bits", "3"], "bits must be among [8, 4], got [3]"),
        ([*base, "--bits", "eight"], "--bits must be comma-separated integers"),
        ([*base, "--qat", "16"], "qat_bits must be among [8, 4], got [16]"),
        ([*base, "--kinds", "moe,cnn"], "unknown model kinds ['cnn']"),
        ([*base, "--profiles", "nope"], "unknown energy profile 'nope'"),
        ([*base, "--seeds", ""], "--seeds must name at least one value"),
        ([*base, "--seeds", "0,x"], "--seeds must be comma-separated integers, got '0,x'"),
        ([*base, "--seeds", "0,0"], "seeds must name at least one seed, each once; got [0, 0]"),
        ([*base, "--kinds", ","], "kinds must name at least one model, each once; got []"),
        ([*base, "--kinds", "ann,ann"], "each once; got ['ann', 'ann']"),
        ([*base, "--qat", "4,4"], "qat_bits must name each width once; got [4, 4]"),
        ([*base, "--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
        (["--checkpoint", str(missing), "--out", str(out)], str(missing)),
        (["--config", str(tmp_path / "nope.toml"), "--out", str(out)], "nope.toml"),
    ]:
        caplog.clear()
        assert compare_main(argv) == 2, argv
        assert message in caplog.text, argv
        assert "Traceback" not in caplog.text
    assert not out.exists()  # every refusal came before any work
    with pytest.raises(SystemExit) as exc:  # a config and checkpoints: argparse refuses
        compare_main([*base, "--checkpoint", str(missing)])
    assert exc.value.code == 2
