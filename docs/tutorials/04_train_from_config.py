"""
Train from a TOML config and read the run in TensorBoard
========================================================

An experiment of ``spiking_moe`` is a TOML file: the data, the model, the training recipe and
the energy profile, each a table validated field by field. ``spiking-moe-train`` turns one
into a *run folder* holding checkpoints, metrics, TensorBoard events and an energy report on
the test set. This tutorial does the same from Python, through the function the command
calls, with the default experiment (a spiking MoE on scikit-learn's digits) cut from 60 epochs
to 12. Then it opens everything the run wrote: it reads the TensorBoard scalars back to plot
loss, accuracy and energy per sample over the steps, prints the energy report, resumes the run
from its checkpoint, and shows which TensorBoard panels hold the energy report.
"""

# %%
# The config
# ----------
#
# ``experiments/configs/default.toml`` is the Quickstart's default experiment: the 8x8 digits,
# rate-coded over ``T = 6`` steps, 384 input neurons, one MoE layer of 4 spiking experts (384
# hidden neurons each) with top-1 rate routing, AdamW at 3e-3 with 50 warm-up steps and a
# cosine decay over 60 epochs, a hinge penalty on firing rates above 5%, and the energy report
# under the ``cmos45`` profile (45 nm CMOS, fp32). :func:`spiking_moe.config.load_config` reads
# it into an :class:`spiking_moe.config.ExperimentConfig` of frozen dataclasses, one per table,
# and rejects an unknown key or a bad value with a
# :exc:`spiking_moe.args.ConfigError` that names the field.
#
# The configs live in the repository's ``experiments/`` folder, beside the package in a
# checkout; we find it from the package's location, which works wherever the script runs.

import json
import tempfile
from pathlib import Path

import torch

import spiking_moe
from spiking_moe.config import ConfigError, apply_overrides

ROOT = Path(spiking_moe.__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "default.toml"

config = spiking_moe.load_config(CONFIG)
model_args = config.model
print(
    f"name {config.name!r}: data {config.data.name} ({config.data.encoding}, T = "
    f"{config.data.num_steps}), model {model_args.kind}"
)
print(
    f"  {model_args.moe.num_experts} experts x {model_args.expert.hidden} neurons, "
    f"top-{model_args.moe.k}, router {model_args.router.kind}, "
    f"hidden width {model_args.hidden_features}"
)
print(
    f"  train: {config.train.epochs} epochs of batch {config.train.batch_size}, "
    f"lr {config.train.lr}, {config.train.schedule} schedule, "
    f"spike-rate penalty {config.train.spike_rate_penalty} above {config.train.spike_rate_target}"
)
print(f"  energy: profile {config.energy.profile!r}")

# %%
# Overrides: ``--set section.key=value``
# --------------------------------------
#
# We change only what costs time: 12 epochs instead of 60 (the cosine schedule then spans the
# 240 steps of those epochs), training metrics logged every 5 steps instead of 10 (smoother
# curves), and the CPU (``train.device = "auto"`` would take a GPU where there is one, and
# this run is too small to gain from it). Overrides are the strings ``spiking-moe-train --set`` takes: TOML values
# (a bare word is a string) checked exactly like the file's.
# :func:`spiking_moe.config.apply_overrides` applies them; a bad one fails before any work,
# naming the field.

OVERRIDES = ["train.epochs=12", "train.log_every=5", "train.device=cpu"]

short = apply_overrides(config, OVERRIDES)
print("epochs", config.train.epochs, "->", short.train.epochs)
print("log_every", config.train.log_every, "->", short.train.log_every)
try:
    apply_overrides(config, ["train.lr=fast"])
except ConfigError as error:
    print("ConfigError:", error)
try:
    apply_overrides(config, ["model.moe.k=5"])
except ConfigError as error:
    print("ConfigError:", error)

print("\nthe same run from the command line:")
print("spiking-moe-train --config experiments/configs/default.toml --out runs/default_short \\")
print("    " + " ".join(f"--set {o}" for o in OVERRIDES))

# %%
# Train
# -----
#
# ``spiking-moe-train`` (:func:`spiking_moe.cli.train_main`) parses its arguments and calls
# :func:`spiking_moe.experiment.run_experiment` with the loaded config and the ``--set``
# strings; we call it the same way. It applies and records the overrides, splits the data
# (``data.seed`` fixes the split), seeds the model's initialisation with ``train.seed``, and
# trains with the :class:`spiking_moe.training.trainer.Trainer` and four callbacks: router
# bias balancing, the firing-rate and routing monitors, and the
# :class:`spiking_moe.training.callbacks.EnergyReportCallback`, which counts the energy of
# every validation (here at each epoch end, with a checkpoint). After the last step it
# evaluates the test set, counts its energy against the baselines (the same MoE with every
# expert on every token, and the ANN with the same routing at fp32 and int8) and writes the
# report files. The run is deterministic on a given machine: every random stream comes from
# ``train.seed``.
#
# We train on one thread: layers this small gain little from a second one, and the docs build
# then does not compete with whatever else runs on the machine (the thread count is restored
# at the end). The command uses torch's default.

from spiking_moe.experiment import run_experiment

threads = torch.get_num_threads()
torch.set_num_threads(1)
workdir = Path(tempfile.mkdtemp())
run_dir = workdir / "runs" / "default_short"

result = run_experiment(config, run_dir, overrides=OVERRIDES)

metrics = result.metrics
print(
    f"trained in {result.wall_time_s:.1f} s; test accuracy {metrics['test/accuracy']:.2%} "
    f"on {result.samples} test samples"
)
print(f"energy per sample {metrics['test/energy/uJ_per_sample']:.4f} uJ ({config.energy.profile})")
for baseline in ("dense_snn", "ann_fp32", "ann_int8"):
    print(f"  {baseline:>9} / this model: {metrics[f'test/energy/ratio_{baseline}']:.2f}x")

# %%
# The returned :class:`spiking_moe.experiment.ExperimentResult` holds the last validation's
# metrics and the test set's, the wall time and the test set's
# :class:`energy.report.EnergyReport`. A ratio above 1 means the baseline needs more energy
# than the spiking MoE: routing saves the dense-MoE ratio, spiking saves the fp32-ANN ratio,
# and the int8 ANN below 1 is the unequal-precision caveat of the :doc:`results </results>` (an fp32 SNN against an
# int8 ANN). The results page's 60-epoch runs reach 97.6 ± 0.4% (mean over three seeds) at
# 0.151 uJ per sample.
#
# What the run folder holds
# -------------------------
#
# - ``config.json``: the config the run used, with the overrides it was given and the data's
#   metadata (for a text corpus, its files, size and sha256; nothing for the digits).
# - ``checkpoint.pt``: the model, optimizer, learning-rate scheduler, step, epoch, position
#   in the epoch and every random stream, written atomically at each evaluation;
#   ``checkpoint.prev.pt`` is the one before, kept in case the newest is damaged.
# - ``events.out.tfevents.*``: TensorBoard's event file (scalars, histograms, text, the
#   custom-scalars layout, hyperparameters).
# - ``metrics.jsonl``: the ``train/``, ``val/`` and ``test/`` scalars as JSON lines, one
#   object per logged step, and the hyperparameters last, for scripts that do not want
#   TensorBoard (the full energy breakdown, ``val_energy/`` and ``test_energy/``, is only in
#   the event file and the report files).
# - ``report.json``, ``report.md``, ``report.png``: the test set's energy report (below).
# - ``result.json``: the final metrics and wall time, written last: its presence marks a
#   finished run (what ``--seeds`` and sweeps read back).

from spiking_moe.training.checkpoint import load_checkpoint

for path in sorted(run_dir.iterdir()):
    print(f"{path.name:<45} {path.stat().st_size / 1024:>9.1f} KiB")

recorded = json.loads((run_dir / "config.json").read_text())
print("\nconfig.json overrides:", recorded["overrides"])
with open(run_dir / "metrics.jsonl") as lines:
    first = json.loads(next(lines))
print("metrics.jsonl, first line:", {k: round(v, 4) for k, v in first.items()})
checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
print(
    "checkpoint.pt:",
    sorted(checkpoint),
    "at step",
    checkpoint["step"],
    "epoch",
    checkpoint["epoch"],
)

# %%
# Read the TensorBoard events back
# --------------------------------
#
# TensorBoard's ``EventAccumulator`` reads an event folder without starting a server: every
# scalar as ``(wall_time, step, value)``, histograms, and the text and layout summaries as
# tensors (``size_guidance`` 0 keeps every point; the default keeps a sample). The tags come
# in families:
#
# - ``train/...``, every ``train.log_every`` steps, means over those steps: ``loss`` (the
#   optimised objective), ``cross_entropy`` and ``aux_loss`` (the rest of it: the router's
#   balancing and z-losses and the activity penalty), ``grad_norm``, ``accuracy``, ``lr``,
#   ``epoch``; and ``time/steps_per_second``.
# - ``val/...`` at every validation and ``test/...`` once: ``loss``, ``accuracy``,
#   ``firing_rate/<population>`` and ``firing_rate/mean``, ``moe0/load/<e>``,
#   ``moe0/utilisation/<e>``, ``moe0/max_load_ratio``, ``moe0/router_entropy``,
#   ``moe0/dropped_fraction``, and the energy summary ``energy/uJ_per_sample`` and
#   ``energy/ratio_<baseline>``.
# - ``val_energy/...`` and ``test_energy/...``: the whole report, written by
#   :func:`energy.tensorboard.write_report`: totals in pJ **over the evaluated set** (the
#   validation and test sets differ in size: compare runs with ``val/energy/uJ_per_sample``),
#   their synaptic, neuron and memory shares, each baseline's energy and ratio (compute only
#   and with memory traffic), and per expert its synaptic operations, tokens and energy; the
#   histograms ``expert_load``, ``expert_firing_rate`` and ``layer_firing_rate``; the
#   Markdown report as text.

from collections import Counter

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
events.Reload()
tags = events.Tags()
families = Counter(tag.split("/")[0] for tag in tags["scalars"])
print(f"{len(tags['scalars'])} scalar tags:", dict(families))
print("histograms:", tags["histograms"])
print("text and layout:", tags["tensors"])


def series(tag):
    """Steps and values of one scalar tag."""
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


for tag in ("val/accuracy", "val/energy/uJ_per_sample", "val/firing_rate/input_neuron"):
    steps, values = series(tag)
    print(f"{tag:<29}", " ".join(f"{v:.3f}" for v in values), f"(steps {steps[0]}..{steps[-1]})")

# %%
# Loss, accuracy and energy over the steps
# ----------------------------------------
#
# Energy per sample is counted on the validation set at every epoch end. It moves with the
# firing of the input neurons and of the experts' hidden neurons, since each of their spikes
# costs 384 accumulates in the layer it feeds. After the first epoch the network barely fires
# (cheap, and 7% accurate); then firing and energy jump as it learns, and the activity penalty
# (firing above 5% costs loss) pulls both back to the 5% target while the accuracy keeps
# rising. The MoE layer's output neurons fire at about 18%, but each of their spikes costs
# only 10 accumulates in the readout. The rest does not move with training: every neuron
# updates at every step whether it fires or not, the router multiplies graded rates (MACs),
# and the input layer's accumulates follow the rate-coded pixels. The per-population rates
# are the ``val/firing_rate/<population>`` tags.

import matplotlib.pyplot as plt

fig, ((ax_loss, ax_acc), (ax_energy, ax_rate)) = plt.subplots(2, 2, figsize=(10, 6.5))
ax_loss.plot(*series("train/loss"), label="train (objective)")
ax_loss.plot(*series("train/cross_entropy"), label="train (cross-entropy)", alpha=0.7)
ax_loss.plot(*series("val/loss"), "o-", ms=3, label="validation")
ax_loss.set_yscale("log")
ax_loss.set_title("loss")
ax_acc.plot(*series("train/accuracy"), label="train")
ax_acc.plot(*series("val/accuracy"), "o-", ms=3, label="validation")
ax_acc.set_title("accuracy")
ax_energy.plot(*series("val/energy/uJ_per_sample"), "o-", ms=3, color="black")
ax_energy.set_title(f"validation energy per sample ({config.energy.profile})")
ax_energy.set_ylabel("uJ")
steps, input_rate = series("val/firing_rate/input_neuron")
experts = [t for t in tags["scalars"] if t.startswith("val/firing_rate/layers.0.experts.")]
expert_mean = [sum(v) / len(v) for v in zip(*(series(t)[1] for t in experts), strict=True)]
ax_rate.plot(steps, input_rate, "o-", ms=3, label="input neurons")
ax_rate.plot(
    steps, expert_mean, "o-", ms=3, label=f"experts' hidden neurons (mean of {len(experts)})"
)
ax_rate.plot(*series("val/firing_rate/layers.0.neuron"), "o-", ms=3, label="MoE output neurons")
ax_rate.axhline(config.train.spike_rate_target, color="k", ls=":", lw=1, label="penalty target")
ax_rate.set_title("validation firing rates")
for ax in (ax_loss, ax_acc, ax_energy, ax_rate):
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
for ax in (ax_loss, ax_acc, ax_rate):
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# The energy report
# -----------------
#
# ``report.md`` is the test set's report (:meth:`energy.report.EnergyReport.to_markdown`,
# headed by the energy per sample): the profile and its source, the totals and who wins, with
# and without memory traffic, then one table of baselines, one row per layer (synaptic layers
# charge accumulates, ACs, for spike inputs and multiply-accumulates, MACs, for graded ones;
# neuron layers charge updates and spikes) and one row per expert, with what the same expert
# would cost on every token. ``report.json`` holds the same numbers
# (:meth:`energy.report.EnergyReport.from_json` reads it back), and
# ``spiking-moe-energy-report --checkpoint .../checkpoint.pt --profile loihi`` re-counts the
# trained model under another profile.

print((run_dir / "report.md").read_text())

# %%
# ``report.png`` plots the model's test accuracy against its energy per sample, each
# baseline's energy as a vertical line, and the tokens routed to each expert.

image = plt.imread(run_dir / "report.png")
fig, ax = plt.subplots(figsize=(9, 9 * image.shape[0] / image.shape[1]))
ax.imshow(image)
ax.axis("off")
fig.tight_layout()
plt.show()

# %%
# Resume from the checkpoint
# --------------------------
#
# ``spiking-moe-train ... --resume`` (``resume=True`` here) loads ``<out>/checkpoint.pt`` and
# continues from its step: weights, optimizer moments, scheduler, epoch, position in the epoch
# and random streams. The data order and the encoding noise are functions of
# ``(seed, epoch, batch)``, so a run stopped by Ctrl-C or SIGTERM (which write a checkpoint and
# exit with code 130 or 143) and resumed with the same config gives the same weights and losses
# as an uninterrupted one on CPU. ``--resume-from .../checkpoint.prev.pt`` continues from the
# previous checkpoint instead.
#
# Here we *extend* the finished run to 15 epochs. The learning-rate schedule is recomputed for
# the new length: the cosine had decayed to 0 at step 240, and resumes at step 241 where a
# 300-step cosine would be (the jump below). That is more training, but not the run that 15
# epochs from scratch would give, and the Trainer's log says which ``train`` fields changed.
# The package logs through ``logging`` and stays silent until you configure it (the
# command logs at INFO level); we show the resumed run's log lines here. The resumed run
# writes a second event file in the same folder (events that an interrupted run logged after
# its checkpoint are hidden), and TensorBoard joins the files into one run.

import logging
import sys

log = logging.getLogger("spiking_moe")
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
log.addHandler(handler)
log.setLevel(logging.INFO)
try:
    resumed = run_experiment(
        config, run_dir, overrides=[*OVERRIDES, "train.epochs=15"], resume=True
    )
finally:
    log.removeHandler(handler)
    log.setLevel(logging.NOTSET)

print(
    f"\ntest accuracy {resumed.metrics['test/accuracy']:.2%}, energy per sample "
    f"{resumed.metrics['test/energy/uJ_per_sample']:.4f} uJ"
)
print("event files:", len(list(run_dir.glob("events.out.tfevents.*"))))

events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
events.Reload()
fig, (ax_lr, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
ax_lr.plot(*series("train/lr"))
ax_lr.set_title("learning rate")
ax_acc.plot(*series("val/accuracy"), "o-", ms=3, label="validation accuracy")
ax_acc.set_title("validation accuracy")
for ax in (ax_lr, ax_acc):
    ax.axvline(checkpoint["step"], color="k", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %%
# Open it in TensorBoard
# ----------------------
#
# Point TensorBoard at the folder that holds the run folders, so that every run is one line
# in each chart (here there is one, and the folder is temporary)::
#
#     tensorboard --logdir runs      # then open http://localhost:6006
#
# Where the energy report is:
#
# - **SCALARS** (and **TIME SERIES**, the default tab, which shows the same tags): type
#   ``energy`` in the tag filter. ``val/energy/uJ_per_sample`` and ``val/energy/ratio_*`` sit
#   beside ``val/accuracy`` and the firing rates; ``val_energy/*`` holds the full breakdown
#   at every validation.
# - **CUSTOM SCALARS**: the layout of :func:`energy.tensorboard.custom_scalars_layout`: total
#   energy with every baseline in one chart, the energy split, the ratios (compute only and
#   with memory traffic), the firing rate, and synaptic operations, tokens and energy per
#   expert, in one category per report prefix: ``val_energy`` (a point per curve at every
#   validation) and below it ``test_energy`` (one point per curve at the last step, two after
#   the resume above).
# - **TEXT**: ``val_energy/report`` (one entry per validation, the latest on top) and
#   ``test_energy/report``: the Markdown report, tables included.
# - **HISTOGRAMS** and **DISTRIBUTIONS**: ``expert_load`` (bucket ``i`` holds the tokens
#   routed to expert ``i``), ``expert_firing_rate`` and ``layer_firing_rate``.
# - **HPARAMS**: the flattened config with the final validation and test metrics, to compare
#   runs (e.g. the ones of a sweep) by their settings.
#
# The screenshots below (click one for its full size) are TensorBoard 2.21 on a run of this
# tutorial's shortened config (the 12 epochs, before the resume), made by
# ``docs/tools/tensorboard_screenshots.py``: it trains that run, starts
# ``tensorboard --logdir runs`` and captures each tab with headless Chromium, the tab and tag
# filter given in the URL (``http://localhost:6006/#scalars&tagFilter=...``).
#
# .. image:: /_static/tensorboard/scalars_energy.png
#    :target: ../_static/tensorboard/scalars_energy.png
#    :alt: TensorBoard's SCALARS tab filtered to four validation tags: accuracy, energy per
#          sample, and the energy ratios of the fp32 ANN and of the dense MoE, over 240 steps.
#
# SCALARS, filtered to ``val/(accuracy|energy/(uJ_per_sample|ratio_dense_snn|ratio_ann_fp32))$``:
# validation accuracy, energy per sample and what the fp32 ANN and the dense MoE would use,
# at every epoch. The "ignore outliers" option, on by default, crops the first epochs.
#
# .. image:: /_static/tensorboard/custom_scalars.png
#    :target: ../_static/tensorboard/custom_scalars.png
#    :alt: TensorBoard's CUSTOM SCALARS tab showing the val_energy category: charts of the
#          total energy and the baselines' energies, the energy split and the energy ratios,
#          each curve over the validations from step 20 to 240.
#
# CUSTOM SCALARS, the ``val_energy`` category: every validation's total energy in pJ beside
# each baseline's, the split into synaptic, neuron and memory energy, and the baseline / SNN
# ratios (compute only and with memory traffic) over training; the charts below them, cut off
# here, are the firing rate and the per-expert synaptic operations, tokens and energy, and
# then the ``test_energy`` category.
#
# .. image:: /_static/tensorboard/text_report.png
#    :target: ../_static/tensorboard/text_report.png
#    :alt: TensorBoard's TEXT tab showing the test_energy report rendered from Markdown: the
#          profile and its source, the SNN total, the verdict against the int8 ANN and the
#          first rows of the baseline table.
#
# TEXT: the test set's report rendered from its Markdown; the card scrolls down to the rest of
# the baseline table and to the per-layer and per-expert tables.
#
# .. image:: /_static/tensorboard/histograms_energy.png
#    :target: ../_static/tensorboard/histograms_energy.png
#    :alt: TensorBoard's HISTOGRAMS tab filtered to val_energy: expert_firing_rate,
#          expert_load and layer_firing_rate, one slice per validation, the latest in front.
#
# HISTOGRAMS, filtered to ``val_energy/``: one slice per validation (the latest in front) of
# the experts' firing rates, of the load (bucket ``i``, around ``x = i``, is expert ``i``'s
# tokens) and of the firing rates of the neuron layers.

# %%
# This tutorial's run folder was temporary; we delete it. A run of the command stays in its
# ``--out`` folder (``runs/<config name>`` by default).

import shutil

shutil.rmtree(workdir)
torch.set_num_threads(threads)
