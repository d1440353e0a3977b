"""
The spiking MoE language model
==============================

:class:`spiking_moe.transformer.SpikingMoELM` is a byte-level transformer whose FFNs are
sparse top-k mixtures of spiking experts. This tutorial trains a small one on the corpus the
library builds offline from the Python standard library's sources, through the same path as
``spiking-moe-train`` (a TOML config, ``--set`` overrides,
:func:`spiking_moe.experiment.run_experiment`), then reads what the run wrote: the loss curve,
validation bits per byte, text sampled from a prompt (what ``spiking-moe-generate`` does) and
the energy per token of the run's energy report. The run is about 1/20 of the results page's
budget on a model with 4 experts instead of 16, so its numbers show the workflow, not the
model's quality; the last section puts them next to the study's.
"""

# %%
# The corpus: the standard library, as bytes
# -------------------------------------------
#
# With ``data.name = "text"`` and no ``data.text_paths``, the corpus is every ``*.py`` file of
# the running interpreter's standard library (test suites and ``site-packages`` left out), read
# as bytes: a vocabulary of 256, no tokenizer. Each file goes wholly to train, validation or
# test by a hash of its relative path, so adding files never moves a test file into training
# (:func:`spiking_moe.data.text.text_split`). The corpus's sha256 is logged and written to the
# run's ``config.json``: equal digests, equal data (the results page's runs used Python 3.11.7's,
# ``6542f751...``).
#
# Two references make the model's numbers readable: the cross-entropy on the validation bytes
# of a unigram and of a bigram byte model estimated on the training bytes (add-one smoothing).
# A language model that learns nothing about context cannot beat the first; the second is what
# counting byte pairs gives.

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from spiking_moe.data import load_text_corpus

corpus = load_text_corpus()
meta = corpus.metadata
print(f"{meta['files']} files of Python {meta['python']}, sha256 {meta['sha256'][:12]}...")
print("bytes per split:", meta["bytes"], "files per split:", meta["files_per_split"])
print(repr(bytes(corpus.val[:120].tolist()).decode("utf-8", errors="replace")))

train_ids, val_ids = corpus.train.long(), corpus.val.long()
unigram = torch.bincount(train_ids, minlength=256).double() + 1
unigram_bits = -(unigram / unigram.sum()).log2()[val_ids].mean().item()
pairs = torch.bincount(train_ids[:-1] * 256 + train_ids[1:], minlength=256 * 256).double()
bigram = (pairs.view(256, 256) + 1) / (pairs.view(256, 256) + 1).sum(1, keepdim=True)
bigram_bits = -bigram.log2()[val_ids[:-1], val_ids[1:]].mean().item()
print(f"validation bits per byte: unigram {unigram_bits:.3f}, bigram {bigram_bits:.3f}")

# %%
# The config: ``lm_moe.toml``, made small
# ---------------------------------------
#
# ``experiments/configs/lm_moe.toml`` is the spiking MoE of the :doc:`results </results>`: 2 blocks, ``d_model`` 64,
# 4 heads, context 64, one shared spiking expert of 128 neurons plus 16 routed experts of 128,
# top-1, multi-level spikes at ``T = 1``, a membrane (real-valued) residual stream and ANN
# attention; AdamW at 1e-2 with warm-up and cosine decay, 3,000 steps of 32 x 64 bytes. We keep
# the architecture and the optimiser, and shrink what costs time: 4 routed experts, 300 steps
# of 16 windows, 128 evenly spaced validation and test windows. The overrides are the strings
# ``spiking-moe-train --set`` takes, checked exactly like the file's values
# (:func:`spiking_moe.config.apply_overrides`); the equivalent command is printed below.
#
# The configs live in the repository's ``experiments/`` folder, beside the package in a
# checkout; we find it from the package's location, which works wherever the script runs.

import spiking_moe
from spiking_moe.config import apply_overrides, load_config

ROOT = Path(spiking_moe.__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "lm_moe.toml"
overrides = [
    "model.moe.num_experts=4",
    "train.max_steps=300",
    "train.batch_size=16",
    "train.warmup_steps=30",
    "train.eval_every=100",
    "train.log_every=10",
    "data.eval_windows=128",
    "train.device='cpu'",
    "train.progress=false",
]
config = apply_overrides(load_config(CONFIG), overrides)
model_args = config.model
print(
    f"d_model {model_args.hidden_features}, blocks {model_args.num_layers}, "
    f"heads {model_args.attention.num_heads}, context {config.data.context}, "
    f"T {config.data.num_steps}"
)
print(
    f"experts {model_args.moe.num_experts} x {model_args.expert.hidden} + "
    f"{model_args.moe.shared_experts} shared x {model_args.moe.shared_hidden}, "
    f"top-{model_args.moe.k}"
)
print(
    f"design: residual={model_args.block.residual!r} norm={model_args.block.norm!r} "
    f"neuron={model_args.neuron.kind!r} (levels {model_args.neuron.levels}) "
    f"attention={model_args.attention.kind!r}"
)
print("spiking-moe-train --config experiments/configs/lm_moe.toml --out <folder> \\")
print("    " + " ".join(f"--set {o}" for o in overrides))

# %%
# Training
# --------
#
# :func:`spiking_moe.experiment.run_experiment` is what ``spiking-moe-train`` runs: it builds
# the data and the model from the config, seeds the initialisation with ``train.seed``, trains
# with the :class:`spiking_moe.training.trainer.Trainer` (router bias balancing, firing-rate
# and routing monitors, and the energy report at every validation), evaluates the test set and
# writes the run folder. The loss is next-byte cross-entropy plus the router's auxiliary
# losses (Switch balancing and z-loss, weighted by ``model.router.balance_weight`` and
# ``z_loss_weight``).
#
# We train on one thread, as the results page's study did: a model this small gains little from
# intra-op parallelism, and the timing then does not depend on what else the machine runs.
# The thread count is restored at the end.

from spiking_moe.experiment import run_experiment

threads = torch.get_num_threads()
torch.set_num_threads(1)
workdir = Path(tempfile.mkdtemp())
run_folder = workdir / "lm_moe_small"
start = time.perf_counter()
result = run_experiment(config, run_folder)
print(
    f"trained {config.train.max_steps} steps in {result.wall_time_s:.1f} s "
    f"({time.perf_counter() - start:.1f} s with data, test set and energy report)"
)
print("run folder:", sorted(p.name for p in run_folder.iterdir()))

# %%
# The loss curve, in bits per byte
# --------------------------------
#
# The trainer logs a mean cross-entropy in **nats per token** (natural log, the
# ``F.cross_entropy`` convention). A token here is one byte, so dividing by ``ln 2`` gives
# **bits per byte**, the unit of the results page's tables and of compression benchmarks:
# ``bpb = loss / ln 2``. Evaluation logs it directly as ``val/bpb`` and ``test/bpb``
# (:func:`spiking_moe.training.evaluate.evaluate`). For a subword model one would also divide
# by the bytes per token; with bytes that factor is 1, which is why byte-level numbers compare
# across tokenizers. ``metrics.jsonl`` holds one JSON object per logged step:
# ``train/cross_entropy`` is the next-byte term alone (``train/loss`` adds the auxiliary
# losses), averaged over the 10 steps since the last log.

import matplotlib.pyplot as plt

records = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
train = [(r["step"], r["train/cross_entropy"] / math.log(2)) for r in records if "train/loss" in r]
val = [(r["step"], r["val/bpb"]) for r in records if "val/bpb" in r]
print("validation bits per byte by step:", {s: round(b, 3) for s, b in val})
print(
    f"test bits per byte: {result.metrics['test/bpb']:.3f}  "
    f"(= test/loss {result.metrics['test/loss']:.4f} nats / ln 2)"
)

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(*zip(*train, strict=True), label="train cross-entropy (10-step mean)")
ax.plot(*zip(*val, strict=True), "o-", label="validation (128 windows)")
ax.axhline(unigram_bits, color="gray", ls=":", label=f"unigram bytes ({unigram_bits:.2f})")
ax.axhline(bigram_bits, color="gray", ls="--", label=f"bigram bytes ({bigram_bits:.2f})")
ax.axhline(2.291, color="k", lw=0.8, label="results page: E = 16, 3,000 steps (2.29)")
ax.set_xlabel("optimizer step (16 x 64 bytes each)")
ax.set_ylabel("bits per byte")
ax.set_ylim(1.5, 8.5)
ax.set_title("SpikingMoELM, 4 experts, stdlib corpus")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# Generating text
# ---------------
#
# ``spiking-moe-generate --checkpoint <run>/checkpoint.pt --prompt "def "`` rebuilds the model
# from the checkpoint alone (the config is stored in it; the corpus is not read:
# :func:`spiking_moe.evaluation.load_language_model`) and samples one byte at a time from the
# last position's logits, feeding back the last ``context`` bytes
# (:func:`spiking_moe.evaluation.generate_text`,
# ``SpikingMoELM.generate``). Temperature 0 takes the most likely
# byte; the seed fixes the sampling stream. Sampled bytes that do not form UTF-8 show as
# U+FFFD. At about 3.5 bits per byte expect bits of Python's look (indentation, ``def``,
# colons, common words) rather than code, and greedy decoding (temperature 0) to fall into a
# loop, as weak language models do.

from spiking_moe.evaluation import generate_text, load_language_model

lm, _ = load_language_model(run_folder / "checkpoint.pt", device="cpu")
for temperature in (0.8, 0.0):
    text = generate_text(lm, "def ", 160, temperature=temperature, seed=0)
    print(f"--- temperature {temperature}\n{text}\n")

# %%
# Energy per token
# ----------------
#
# With ``[energy] enabled`` (the default) the run counts every operation of the test pass
# (:class:`spiking_moe.training.callbacks.EnergyReportCallback`): a spike into a synaptic layer
# is an accumulate per fan-out (a multi-level count ``c`` is ``c`` events), real x real is a
# multiply-accumulate, LayerNorm 4 MACs per element, softmax 3 MACs per visible score, one
# update per neuron per step. The counts are priced under ``energy.profile`` (``cmos45``:
# 45 nm CMOS, fp32, Horowitz 2014) and divided by the tokens counted:
# ``test/energy/uJ_per_token`` in the metrics, the head of ``report.md``. The same counts give the baselines
# (the ANN with the same routing, the dense MoE that runs every expert on every token) and a
# per-layer table, from which we sum what attention and the FFN cost.

report, tokens = result.report, result.samples
print(
    f"energy per token: {result.metrics['test/energy/uJ_per_token']:.4f} uJ "
    f"({report.totals.energy_pj / tokens / 1e6:.4f} = total / {tokens:,} tokens), "
    f"firing rate {report.totals.firing_rate:.1%}"
)
for baseline in report.baselines:
    print(
        f"  {baseline.description:<45} {baseline.compute_ratio:6.2f}x the SNN's energy"
        f" (compute), {baseline.with_memory_ratio:6.2f}x with memory traffic"
    )

parts = {"attention": 0.0, "FFN (router, experts)": 0.0, "final norm and readout": 0.0}
for layer in report.layers:
    part = (
        "attention"
        if ".attn" in layer.name
        else "FFN (router, experts)"
        if ".ffn" in layer.name
        else "final norm and readout"
    )
    parts[part] += layer.energy_pj
print({part: f"{pj / report.totals.energy_pj:.0%}" for part, pj in parts.items()})

# %%
# The int8 ANN rows above price an int8 ANN against the fp32 spiking model, under a profile
# whose ACs and MACs are fp32: not a comparison at equal precision. The results page's comparison prices both at int8
# (``spiking-moe-energy-report --checkpoint <run>/checkpoint.pt --profile cmos45_int8
# --quantize``: post-training int8 weights, the bits per byte measured again, the energy
# counted on the quantized model); :func:`spiking_moe.evaluation.evaluate_checkpoint` is that
# command as a function.

from spiking_moe.evaluation import evaluate_checkpoint

int8 = evaluate_checkpoint(run_folder / "checkpoint.pt", "cmos45_int8", quantize=True)
print(
    f"int8: test bits per byte {int8.quantized_metrics['test/bpb']:.3f} "
    f"(fp32 {result.metrics['test/bpb']:.3f}), "
    f"{int8.metrics['test/energy/uJ_per_token']:.4f} uJ per token under cmos45_int8"
)

# %%
# The design options
# ------------------
#
# The block is chosen by four config fields, each declared once with its default and allowed
# values (:class:`spiking_moe.args.BlockArgs`, :class:`spiking_moe.args.NeuronArgs`,
# :class:`spiking_moe.args.AttentionArgs`; the equations are in :mod:`spiking_moe.transformer`,
# the measured trade-offs in :doc:`/guide/language_model`):
#
# - ``model.block.residual``: ``"membrane"`` keeps a real-valued residual stream that every
#   synaptic layer reads through a spiking population (the Spike-driven Transformer V2's
#   membrane shortcut; sub-layers add currents back), ``"spike"`` passes binary spikes between
#   blocks, each sub-layer's input entering the next LIF's membrane as a shortcut. With
#   multi-level spikes the membrane stream is what every design that learns builds on; with
#   binary LIF at ``T = 4`` the results page measured no gain over the spike residual (3.46 against
#   3.41 validation bits per byte), a disagreement it leaves open.
# - ``model.block.norm``: ``"layer"`` puts LayerNorm before each population that reads the
#   stream (priced, 4 MACs per element; unlike BatchNorm it cannot be folded away).
# - ``model.neuron.kind``: ``"multi"`` emits integer spike counts ``0..levels`` per step
#   (:class:`spiking_moe.neurons.MultiSpike`, straight-through gradient), trained at ``T = 1``;
#   each count is ``levels`` binary virtual steps at inference
#   (:func:`spiking_moe.neurons.thermometer`), and the counter charges a count ``c`` as ``c``
#   events. Against binary LIF at ``T = 4``: 0.5 bits per byte better, 3.5x faster to train.
# - ``model.attention.kind``: ``"ssa"`` (spiking Q, K, V, no softmax), ``"spiking_softmax"``,
#   ``"real_softmax"`` (real Q, K, V projected from spikes) or ``"ann"`` (softmax attention on
#   the normalised stream, all MACs). The results page's design table runs from 2.95 (SSA) to 2.28
#   (ANN attention) validation bits per byte at 0.36x to 1x the energy per token.
#
# Any of them is one more override, e.g. ``--set model.attention.kind=spiking_softmax``. The
# declarations document themselves (``describe()``); note that the library's defaults are the
# binary end (spike residual, LIF, SSA), and ``lm_moe.toml`` picks the design that learns:

from spiking_moe.args import AttentionArgs, BlockArgs, NeuronArgs

chosen = {"block": model_args.block, "neuron": model_args.neuron, "attention": model_args.attention}
for section, cls, names in (
    ("block", BlockArgs, ("residual", "norm")),
    ("neuron", NeuronArgs, ("kind", "levels")),
    ("attention", AttentionArgs, ("kind",)),
):
    for name, _, default, doc in cls.describe():
        if name in names:
            value = getattr(chosen[section], name)
            print(f"model.{section}.{name} = {value!r} (default {default!r}): {doc}\n")

# %%
# How far this is from the results page
# -------------------------------------
#
# This run saw 300 x 16 x 64 = 0.3 M training bytes; the results page's runs 3,000 x 32 x 64 =
# 6.1 M, with 16 experts and three seeds, and report 2.29 ± 0.04 validation bits per byte for
# this design at E = 16 (2.28 for the dense spiking LM, 2.16 for its ANN twin), 0.25 uJ per
# token under ``cmos45`` and 0.012 under ``cmos45_int8`` (the int8 ANN twin: 0.029). The numbers above sit near the bigram reference: the tiny run shows
# the workflow and the units, not what the model learns; and one seed on one machine is not a
# result (``--seeds 0,1,2`` gives mean ± std). To reproduce the study, run the config as it is:
# ``spiking-moe-train --config experiments/configs/lm_moe.toml`` (4 to 6 minutes per run on
# one CPU thread in the results page's measurements).

torch.set_num_threads(threads)
shutil.rmtree(workdir)  # the run folder and its checkpoints
