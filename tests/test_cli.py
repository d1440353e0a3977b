"""The command-line entry points end to end on tiny digits runs: exit codes, run folders,
--set overrides, damaged checkpoints, energy re-counts."""

import json
import random

import numpy as np
import pytest
import torch

import energy
from spiking_moe.cli import energy_report_main, generate_main, train_main
from spiking_moe.compare import evaluate_precisions
from spiking_moe.evaluation import load_run
from spiking_moe.experiment import (
    build_datasets,
    build_loaders,
    build_model_for,
    config_from_checkpoint,
    evaluate_checkpoint,
    load_trained_model,
)
from spiking_moe.quantization import quantize_model
from spiking_moe.training import (
    count_energy,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
    seed_everything,
)

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


@pytest.mark.slow
def test_train_refuses_to_overwrite_resumes_and_rejects_bad_configs(tmp_path):
    config = _config(tmp_path, kind="dense_snn", steps=10)
    out = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    assert train_main(["--config", str(config), "--out", str(out)]) == 2
    argv = ["--config", str(config), "--out", str(out), "--resume"]
    assert train_main([*argv, "--set", "train.max_steps=15"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 15
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("test/accuracy" in r for r in records)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = -1\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.slow
def test_set_overrides_are_validated_applied_and_recorded(tmp_path, caplog):
    config = _config(tmp_path, steps=3)
    out = tmp_path / "run"
    overrides = [
        "--set",
        "train.lr=5e-3",
        "--set",
        "model.router.kind=spiking",
        "--set",
        "model.noise=0.25",  # an old flat key, read as model.router.noise
        "--set",
        "data.encoding=latency",
    ]
    assert train_main(["--config", str(config), "--out", str(out), *overrides]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["lr"] == 5e-3
    assert recorded["model"]["router"]["kind"] == "spiking"
    assert recorded["model"]["router"]["noise"] == 0.25
    assert recorded["data"]["encoding"] == "latency"
    assert recorded["overrides"] == [
        "train.lr=5e-3",
        "model.router.kind=spiking",
        "model.noise=0.25",
        "data.encoding=latency",
    ]
    stored = load_checkpoint(out / "checkpoint.pt")["extra"]["experiment"]
    assert stored["model"]["router"]["kind"] == "spiking"

    for bad, message in [
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.learning_rate=1", "unknown key(s) ['train.learning_rate']"),
        ("trian.lr=1", "unknown section 'trian'"),
        ("model.router=magic", "model.router.kind must be one of ['rate', 'spiking']"),
        ("model.router.kind=magic", "model.router.kind must be one of ['rate', 'spiking']"),
        ("train.lr", "--set needs section.key=value"),
    ]:
        caplog.clear()
        argv = ["--config", str(config), "--out", str(tmp_path / "bad"), "--set", bad]
        assert train_main(argv) == 2, bad
        assert message in caplog.text, bad
    assert not (tmp_path / "bad").exists()  # nothing was started


@pytest.mark.slow
def test_resume_on_a_damaged_checkpoint_exits_2_naming_the_previous_one(tmp_path, caplog):
    config = _config(tmp_path, kind="dense_snn", steps=10)
    out = tmp_path / "run"
    argv = ["--config", str(config), "--out", str(out), "--set", "train.checkpoint_every=4"]
    assert train_main(argv) == 0
    path = out / "checkpoint.pt"
    assert load_checkpoint(previous_checkpoint(path))["step"] == 8
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short

    caplog.clear()
    resume = [*argv, "--resume", "--set", "train.max_steps=12"]
    assert train_main(resume) == 2
    assert f"checkpoint {path} is damaged" in caplog.text
    assert f"--resume-from {previous_checkpoint(path)}" in caplog.text
    assert "Traceback" not in caplog.text
    from_previous = [
        *argv,
        "--resume-from",
        str(previous_checkpoint(path)),
        "--set",
        "train.max_steps=12",
    ]
    assert train_main(from_previous) == 0
    assert load_checkpoint(path)["step"] == 12


@pytest.mark.slow
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

    # --num-batches 1 counts one evaluation batch (eval_batch_size 256) of the 359 samples;
    # --set changes the stored config for the re-count (here the evaluation batch).
    assert evaluate_checkpoint(checkpoint, "loihi", num_batches=1).samples == 256
    smaller = evaluate_checkpoint(
        checkpoint, "loihi", num_batches=1, overrides=["train.eval_batch_size=100"]
    )
    assert smaller.samples == 100


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
    caplog.clear()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x00" * 64)
    assert energy_report_main(["--checkpoint", str(damaged), "--profile", "loihi"]) == 2
    assert f"checkpoint {damaged} is damaged" in caplog.text
    caplog.clear()
    assert (
        energy_report_main(
            ["--checkpoint", str(foreign), "--profile", "loihi", "--num-batches", "-1"]
        )
        == 2
    )
    assert "--num-batches must be >= 0" in caplog.text


def test_bad_flags_exit_2_naming_the_problem_without_a_traceback(tmp_path, caplog):
    config = str(_config(tmp_path))
    missing = str(tmp_path / "missing.pt")
    for main, argv, message in [
        (train_main, ["--seeds", "0,x"], "--seeds must be comma-separated integers, got '0,x'"),
        (train_main, ["--seeds", "0", "--resume-from", missing], "cannot go with --seeds"),
        (train_main, ["--set", "train.device='tpu'"], "train.device must be one of"),
        (generate_main, ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (generate_main, ["--temperature", "-1"], "--temperature must be >= 0"),
        (generate_main, [], f"no checkpoint at {missing}"),
    ]:
        caplog.clear()
        source = ["--config", config, "--out", str(tmp_path / "run")]
        if main is generate_main:
            source = ["--checkpoint", missing]
        assert main([*source, *argv]) == 2, argv
        assert message in caplog.text, argv
        assert "Traceback" not in caplog.text
    assert not (tmp_path / "run").exists()


def _tiny_run(tmp_path):
    """The checkpoint of a two-step run of the tiny MoE."""
    run = tmp_path / "run"
    assert train_main(["--config", str(_config(tmp_path, steps=2)), "--out", str(run)]) == 0
    return run / "checkpoint.pt"


def _random_streams():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.slow
def test_reading_a_checkpoint_draws_no_random_number_and_builds_no_optimizer(tmp_path, monkeypatch):
    checkpoint = _tiny_run(tmp_path)

    def no_optimizer(*args, **kwargs):
        raise AssertionError("reading a checkpoint built an optimizer")

    monkeypatch.setattr(torch.optim, "AdamW", no_optimizer)
    seed_everything(7)
    before = _random_streams()
    evaluation = evaluate_checkpoint(checkpoint, "cmos45_int8", quantize=True)
    evaluate_precisions(checkpoint, bits=(8,), profiles=("cmos45",))
    load_trained_model(checkpoint)
    run = load_run(checkpoint)
    after = _random_streams()
    assert torch.equal(after[0], before[0])
    assert np.array_equal(after[1], before[1]) and after[2] == before[2]
    # What was read is the trained run: its logged test accuracy, step and weights.
    assert evaluation.metrics["test/accuracy"] == _logged_test_accuracy(checkpoint.parent)
    assert run.step == evaluation.step == 2 and not run.model.training
    for name, value in load_checkpoint(checkpoint)["model"].items():
        assert torch.equal(run.model.state_dict()[name], value), name


@pytest.mark.slow
def test_a_bug_during_an_evaluation_keeps_its_traceback(tmp_path, monkeypatch):
    """Only bad input exits 2: a ValueError from deep inside the energy count is a bug."""
    checkpoint = _tiny_run(tmp_path)

    def bug(*args, **kwargs):
        raise ValueError("a bug deep in the energy count")

    monkeypatch.setattr(energy, "count_operations", bug)
    argv = ["--checkpoint", str(checkpoint), "--profile", "cmos45"]
    with pytest.raises(ValueError, match="a bug deep in the energy count"):
        energy_report_main(argv)


@pytest.mark.slow
def test_train_main_trains_a_spiking_moe_and_writes_the_energy_report(tmp_path):
    """The main job end to end: the run folder holds report.json/.md/.png, and TensorBoard
    holds the energy scalars (with the dense-MoE and ANN ratios) and the report's text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "moe.toml"
    config.write_text(
        '[data]\nname = "digits"\nencoding = "latency"\nnum_steps = 4\n'
        '[model]\nkind = "moe"\nhidden_features = 32\nnum_experts = 4\nk = 1\n'
        "expert_hidden = 16\nbias_balancing = 0.01\n"
        "[train]\nmax_steps = 12\nbatch_size = 64\nlr = 5e-3\nlog_every = 4\nprogress = false\n"
        "spike_rate_penalty = 1.0\nspike_rate_target = 0.1\n"
        '[energy]\nprofile = "loihi"\n'
    )
    out = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    report = energy.EnergyReport.from_json((out / "report.json").read_text())
    assert report.profile.name == "loihi"
    assert len(report.experts) == 4
    # Every test token is routed to exactly one expert (k = 1, no capacity limit).
    assert sum(e.tokens for e in report.experts) == report.layers[0].tokens
    assert report.baseline("dense_snn").ratio > 1  # routing saves synaptic operations
    assert "Energy report" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    events = EventAccumulator(str(out), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "test/energy/uJ_per_sample",
        "test/energy/ratio_dense_snn",
        "test/energy/ratio_ann_fp32",
        "test_energy/total_pJ",
        "val/energy/uJ_per_sample",
        "test/firing_rate/layers.0.neuron",
    ):
        assert tag in scalars, tag
    texts = [t for t in events.Tags()["tensors"] if "test_energy" in t]
    assert texts, "the Markdown report must be logged as text"


@pytest.mark.slow
def test_seeds_train_one_run_per_seed_and_summarise_mean_and_std(tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["--config", str(_config(tmp_path, steps=5)), "--out", str(out), "--seeds", "0,1"]
    assert train_main(argv) == 0
    summary = json.loads((out / "seeds.json").read_text())
    runs = summary["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for seed in (0, 1):
        recorded = json.loads((out / f"seed{seed}" / "config.json").read_text())
        assert recorded["train"]["seed"] == seed
    accuracies = [r["test/accuracy"] for r in runs]
    mean = sum(accuracies) / 2
    std = abs(accuracies[0] - accuracies[1]) / 2**0.5  # sample std of two values
    assert summary["summary"]["accuracy"] == pytest.approx(mean)
    assert summary["summary"]["accuracy_std"] == pytest.approx(std)
    assert summary["summary"]["runs"] == 2
    table = (out / "seeds.md").read_text()
    assert f"{mean:.2%} ± {std:.2%}" in table and table in capsys.readouterr().out
    assert train_main([*argv[:-2], "--seeds", "0,x"]) == 2


# --------------------------------------------------------------------------- --quantize


def _logged_test_accuracy(run):
    """The test accuracy the run logged while training (metrics.jsonl)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["test/accuracy"] for r in records if "test/accuracy" in r)


def _rebuild(checkpoint):
    """The run's trained model and test loader, rebuilt by hand from its checkpoint, and the
    number of test samples."""
    state = load_checkpoint(checkpoint)
    config = config_from_checkpoint(state, checkpoint)
    data = build_datasets(config.data)
    _, _, test_loader = build_loaders(config, data)
    model = build_model_for(config, data)
    model.load_state_dict(state["model"])
    return model.eval(), test_loader, len(data.test)


def _hand_accuracy(model, loader):
    """argmax == label over the whole loader, in eval mode, without gradients."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).logits.argmax(-1) == y).sum().item()
            total += y.numel()
    return correct / total


def _hand_totals(model, loader, profile):
    """The model's activity over the whole loader (one count per batch, summed), priced."""
    model.eval()
    counts = energy.merge_counts(*(count_energy(model, x)[0] for x, _ in loader))
    return energy.build_report(counts, profile).totals


@pytest.mark.slow
def test_energy_report_quantize_measures_the_accuracy_at_the_profile_precision(
    tmp_path, caplog, one_thread
):
    run = tmp_path / "run"
    assert train_main(["--config", str(_config(tmp_path)), "--out", str(run)]) == 0
    logged = _logged_test_accuracy(run)
    assert logged > 0.2  # it learned, so a quantized copy has something to lose
    checkpoint = run / "checkpoint.pt"
    argv = ["--checkpoint", str(checkpoint), "--profile", "cmos45_int8"]

    # Without --quantize: the fp32 accuracy, and the report says the 8-bit one is unknown.
    plain_dir = tmp_path / "plain"
    assert energy_report_main([*argv, "--out", str(plain_dir)]) == 0
    plain = energy.EnergyReport.from_json((plain_dir / "report_cmos45_int8.json").read_text())
    assert plain.accuracy == logged
    assert plain.accuracy_at_profile_precision is None
    assert plain.model_weight_bits == 32
    assert "accuracy at 8 bits: not measured" in plain.verdict

    # The independent oracle: the loaded model with 8-bit weights, evaluated by hand.
    model, test_loader, test_size = _rebuild(checkpoint)
    quantized = quantize_model(model, 8)
    expected = _hand_accuracy(quantized, test_loader)
    fp32_totals = _hand_totals(model, test_loader, "cmos45_int8")
    int8_totals = _hand_totals(quantized, test_loader, "cmos45_int8")
    # 8-bit weights move some membranes across the threshold: the two models spike
    # differently, so the counts below tell which model a report counted.
    assert int8_totals.spikes != fp32_totals.spikes

    quantized_dir = tmp_path / "quantized"
    caplog.clear()
    assert energy_report_main([*argv, "--quantize", "--out", str(quantized_dir)]) == 0
    assert "Traceback" not in caplog.text
    text = (quantized_dir / "report_cmos45_int8.json").read_text()
    report = energy.EnergyReport.from_json(text)
    assert report.accuracy == logged
    assert report.accuracy_at_profile_precision == expected
    assert "at 8 bits (the profile's precision)" in report.verdict
    assert f"{logged:.4g}" in report.verdict and f"{expected:.4g}" in report.verdict
    assert "not measured" not in report.verdict
    assert (
        "at 8 bits (the profile's precision)"
        in (quantized_dir / "report_cmos45_int8.md").read_text()
    )
    back = energy.EnergyReport.from_json(report.to_json())
    assert (back.accuracy, back.accuracy_at_profile_precision) == (logged, expected)
    assert back == report
    # Every test metric, as run and quantized (a language model's bits per byte live here).
    metrics = json.loads((quantized_dir / "metrics_cmos45_int8.json").read_text())
    assert metrics["metrics"]["test/accuracy"] == logged
    assert metrics["quantized_metrics"]["test/accuracy"] == expected

    # The energy is the quantized model's (the one the profile prices); without --quantize,
    # the fp32 model's.
    assert (report.totals.spikes, report.totals.acs, report.totals.neuron_updates) == (
        int8_totals.spikes,
        int8_totals.acs,
        int8_totals.neuron_updates,
    )
    assert (plain.totals.spikes, plain.totals.acs) == (fp32_totals.spikes, fp32_totals.acs)

    evaluation = evaluate_checkpoint(checkpoint, "cmos45_int8", quantize=True)
    assert evaluation.samples == test_size
    assert evaluation.weight_bits == 32
    assert evaluation.metrics["test/accuracy"] == logged
    assert evaluation.quantized_metrics["test/accuracy"] == expected
    assert evaluation.metrics["test/energy/uJ_per_sample"] == pytest.approx(
        int8_totals.energy_pj / test_size / 1e6, rel=1e-9
    )


@pytest.mark.slow
def test_energy_report_quantize_under_a_32_bit_profile_has_nothing_to_quantize(
    tmp_path, caplog, one_thread
):
    run = tmp_path / "run"
    assert train_main(["--config", str(_config(tmp_path, steps=10)), "--out", str(run)]) == 0
    logged = _logged_test_accuracy(run)
    out = tmp_path / "reports"
    caplog.set_level("INFO", logger="spiking_moe")
    argv = ["--checkpoint", str(run / "checkpoint.pt"), "--profile", "cmos45", "--out", str(out)]
    assert energy_report_main([*argv, "--quantize"]) == 0
    assert "nothing to quantize" in caplog.text
    report = energy.EnergyReport.from_json((out / "report_cmos45.json").read_text())
    assert report.accuracy == logged
    assert report.accuracy_at_profile_precision is None
    assert "within the profile's 32 bits" in report.precision_statement
    # Nothing changed: it is train_main's own report under its profile, to the bit.
    assert (out / "report_cmos45.json").read_text() == (run / "report.json").read_text()


@pytest.mark.slow
def test_energy_report_quantize_exits_2_for_a_precision_it_cannot_give(
    tmp_path, caplog, one_thread
):
    run = tmp_path / "moe"
    assert train_main(["--config", str(_config(tmp_path, steps=2)), "--out", str(run)]) == 0
    out = tmp_path / "reports"
    argv = ["--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--quantize"]
    assert energy_report_main([*argv, "--profile", "cmos45_fp16"]) == 2
    assert "16-bit" in caplog.text and "cmos45_fp16" in caplog.text
    caplog.clear()
    assert energy_report_main([*argv, "--profile", "truenorth"]) == 2
    assert "2-bit" in caplog.text

    ann = tmp_path / "ann"
    config = _config(tmp_path, kind="ann", steps=2)
    assert train_main(["--config", str(config), "--out", str(ann)]) == 0
    ann_argv = ["--checkpoint", str(ann / "checkpoint.pt"), "--out", str(out)]
    caplog.clear()
    assert energy_report_main([*ann_argv, "--profile", "loihi", "--quantize"]) == 2
    assert "1-bit activations" in caplog.text
    assert "Traceback" not in caplog.text
    assert not out.exists()  # every refusal came before any report was written
    # The refusal is --quantize's: the same ANN under loihi is re-counted without it.
    assert energy_report_main([*ann_argv, "--profile", "loihi"]) == 0
    assert (out / "report_loihi.json").exists()


@pytest.mark.slow
def test_a_qat_checkpoint_is_evaluated_as_its_integer_model(tmp_path, one_thread):
    run = tmp_path / "qat"
    argv = ["--config", str(_config(tmp_path)), "--out", str(run)]
    assert train_main([*argv, "--set", "train.quantize_bits=4"]) == 0
    logged = _logged_test_accuracy(run)
    checkpoint = run / "checkpoint.pt"

    evaluation = evaluate_checkpoint(checkpoint, "cmos45")
    assert evaluation.weight_bits == 4
    # The QAT forward the run was tested with and the integer model agree.
    assert evaluation.metrics["test/accuracy"] == logged
    model, test_loader, _ = _rebuild(checkpoint)
    assert _hand_accuracy(quantize_model(model, 4), test_loader) == logged
    report = evaluation.report
    assert report.model_weight_bits == 4
    assert report.accuracy == logged
    assert "4-bit" in report.precision_statement
    trained = energy.EnergyReport.from_json((run / "report.json").read_text())
    assert trained.model_weight_bits == 4
    assert report.totals.spikes == trained.totals.spikes

    # Under an 8-bit profile, 4-bit weights are already within its precision.
    out = tmp_path / "reports"
    assert (
        energy_report_main(
            ["--checkpoint", str(checkpoint), "--profile", "cmos45_int8", "--quantize"]
            + ["--out", str(out)]
        )
        == 0
    )
    int8 = energy.EnergyReport.from_json((out / "report_cmos45_int8.json").read_text())
    assert int8.accuracy == logged and int8.accuracy_at_profile_precision is None
    assert "at 4-bit weights, within the profile's 8 bits" in int8.precision_statement

    # An ANN's QAT forward has float activations; the re-count evaluates it as it trained.
    ann_run = tmp_path / "ann_qat"
    ann_argv = ["--config", str(_config(tmp_path, kind="ann")), "--out", str(ann_run)]
    assert train_main([*ann_argv, "--set", "train.quantize_bits=4"]) == 0
    ann = evaluate_checkpoint(ann_run / "checkpoint.pt", "cmos45")
    assert ann.weight_bits == 4
    assert ann.metrics["test/accuracy"] == _logged_test_accuracy(ann_run)
