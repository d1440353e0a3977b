"""
Energy of any model
===================

The ``energy`` package estimates what a spiking network costs to run on a given piece of
hardware. It does not simulate a chip: it counts, exactly, the operations one forward pass
performs (accumulates, multiply-accumulates, neuron updates, spikes) and prices them with
per-operation energies taken from the literature (a *hardware profile*). It works on any torch
model: here an snnTorch network and a Norse network, neither of which knows about ``energy``.
We read the per-layer report, change the hardware profile, compare with the equivalent ANN,
add memory traffic and see how a report keeps track of numerical precision.
"""

# %%
# A small task and an snnTorch network
# ------------------------------------
#
# Counts depend on activity, so we first train a network briefly; a random one would fire at
# an arbitrary rate. The task is scikit-learn's bundled 8x8 digits (no download), each pixel
# rate-coded as a Bernoulli spike train over ``T = 10`` steps. The network is written the
# usual snnTorch way: ``Leaky`` neurons stepped in a Python loop over time.

import snntorch
import torch
from sklearn.datasets import load_digits
from torch import nn

import energy

torch.manual_seed(0)
T = 10
digits = load_digits()
pixels = torch.tensor(digits.data, dtype=torch.float32) / 16  # [1797, 64] in [0, 1]
labels = torch.tensor(digits.target)
order = torch.randperm(len(labels))
train, test = order[:1400], order[1400:]


def rate_code(p, generator):
    """[B, F] intensities -> [T, B, F] Bernoulli spikes (time-major, what ``energy`` expects)."""
    return torch.bernoulli(p.expand(T, *p.shape), generator=generator)


class SnnTorchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.lif1 = snntorch.Leaky(beta=0.9)
        self.fc2 = nn.Linear(128, 10)
        self.lif2 = snntorch.Leaky(beta=0.9)

    def forward(self, x_TBF):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for x in x_TBF:  # one call of every layer per time step
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)  # [T, B, 10] output spikes


def fit(net, epochs=2, lr=1e-2):
    """Cross-entropy on output spike counts, Adam, surrogate gradients (snnTorch's default)."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=generator).split(100):
            i = train[batch]
            counts = net(rate_code(pixels[i], generator)).sum(0)
            loss = nn.functional.cross_entropy(counts, labels[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).sum(0).argmax(1) == y).float().mean().item()


x_test = rate_code(pixels[test], torch.Generator().manual_seed(1))  # [10, 397, 64]
y_test = labels[test]
snn_net = fit(SnnTorchNet())
print(f"test accuracy: {accuracy(snn_net, x_test, y_test):.1%}")
print(f"input spikes: {int(x_test.sum()):,} in {x_test.numel():,} slots")

# %%
# Counting operations
# -------------------
#
# :func:`energy.counting.count_operations` runs ``model(*inputs)`` once under
# ``torch.no_grad`` with forward hooks on every ``nn.Linear``/``nn.ConvNd`` and on every module
# a neuron adapter recognises (snnTorch's ``SpikingNeuron``, Norse's ``SNN``/``SNNCell``,
# SpikingJelly's ``BaseNode`` and our own neurons are built in). Inputs are time-major,
# ``[T, B, ...]``. The rules, per call:
#
# * a synaptic layer whose input is exactly 0/1 (checked per call) does one **accumulate**
#   (AC) per input event and reached synapse: ``nnz(x) * fan_out`` for a ``Linear``;
# * a layer fed graded values does ``rows * fan_in * fan_out`` **multiply-accumulates**;
# * a neuron does one **update** per neuron and step, and its nonzero outputs are **spikes**.
#
# The counts are exact integers, so we can check them against the spikes themselves. (The
# first count on a machine compiles a small C++ scanner, 20 to 40 seconds, then cached; without
# a compiler the counts are the same, computed in PyTorch.)

counts = energy.count_operations(snn_net, x_test)


def show(counts):
    print(f"{'layer':6} {'kind':7} {'input':7} {'calls':>5} {'ACs':>11} {'MACs':>11}", end="")
    print(f" {'updates':>9} {'spikes':>8} {'ANN MACs':>10}")
    for m in counts.layers:
        print(f"{m.name:6} {m.kind:7} {m.input_kind or '-':7} {m.calls:5} {m.acs:11,}", end="")
        print(f" {m.macs:11,} {m.neuron_updates:9,} {m.spikes:8,} {m.ann_macs:10,}")


show(counts)
fc1, lif1, fc2 = counts.layer("fc1"), counts.layer("lif1"), counts.layer("fc2")
B = x_test.shape[1]
assert fc1.acs == int(x_test.sum()) * 128  # every input spike reaches 128 synapses
assert fc2.acs == lif1.spikes * 10  # every hidden spike reaches 10 synapses
assert lif1.neuron_updates == T * B * 128  # every neuron, every step
assert fc1.ann_macs == B * 64 * 128  # the ANN runs each sample once, not T times
print(f"hidden firing rate: {lif1.firing_rate:.1%}")

# %%
# Each layer was called ``T`` times (the snnTorch loop), and the counter still knows the ANN
# equivalent: the same layers run once per sample, every input graded, so ``ann_macs`` is
# ``tokens * fan_in * fan_out`` with ``tokens`` the samples (397 here). That is the ANN
# baseline of the report below.
#
# The same architecture in Norse
# -------------------------------
#
# Norse's sequence modules (``norse.torch.LIF``) take the whole ``[T, B, F]`` tensor in one
# call; nothing changes for the counter. Norse's ``LIF`` filters its input through a synaptic
# current before the membrane, so it is a different neuron; we train it the same way.

import norse.torch as norse


class NorseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = norse.SequentialState(
            nn.Linear(64, 128), norse.LIF(), nn.Linear(128, 10), norse.LIF()
        )

    def forward(self, x_TBF):
        spikes, _state = self.net(x_TBF)
        return spikes


torch.manual_seed(0)
norse_net = fit(NorseNet())
print(f"test accuracy: {accuracy(norse_net, x_test, y_test):.1%}")
show(energy.count_operations(norse_net, x_test))

# %%
# Every layer ran once (``calls``), yet the counts mean the same as above: the first layer's
# ACs are identical (same input spikes, same fan-out) and the rest follow each network's own
# spikes.
#
# Your own neurons
# ----------------
#
# A neuron class the counter does not know is simply not counted; its synaptic layers still
# are. Describe it with an :class:`energy.adapters.NeuronAdapter`: a predicate that
# recognises the module, and where the spikes are in its output (by default the output itself,
# or its first element, as in snnTorch's ``(spk, mem)`` and Norse's ``(spikes, state)``).


class MyNeuron(nn.Module):
    """A stateless threshold unit returning a dict (a stand-in for your own neuron class)."""

    def forward(self, x):
        return {"spikes": (x > 0.5).float(), "membrane": x}


mine = energy.NeuronAdapter(
    "mine", matches=lambda m: isinstance(m, MyNeuron), spikes=lambda out: out["spikes"]
)
toy = nn.Sequential(nn.Linear(64, 32), MyNeuron())
for adapters in ((), (mine,)):
    found = energy.count_operations(toy, x_test, neuron_adapters=adapters)
    print([(m.name, m.kind, m.neuron_updates, m.spikes) for m in found.layers])

# %%
# Reading the report
# ------------------
#
# :func:`energy.report.estimate` counts and prices in one call and returns an
# :class:`energy.report.EnergyReport`. Its Markdown form states the profile and its source,
# the precision, the totals, a verdict, the baselines and one row per layer.

report = energy.estimate(snn_net, x_test, profile="cmos45")
print(report.to_markdown())

# %%
# The energy of a row is ``AC * ac_pj + MAC * mac_pj + updates * neuron_update_pj +
# spikes * spike_pj`` (all in picojoules), so it can be rebuilt by hand from the counts and
# the profile. A report keeps the whole profile, so it stands alone (``report.to_json()``
# and ``EnergyReport.from_json`` round-trip it).

p = report.profile
by_hand = lif1.neuron_updates * p.neuron_update_pj + lif1.spikes * p.spike_pj
print(f"lif1: {report.layers[1].energy_pj:,.0f} pJ in the report, {by_hand:,.0f} pJ by hand")
print(f"fc1:  {report.layers[0].energy_pj:,.0f} pJ in the report, {fc1.acs * p.ac_pj:,.0f} pJ")

# %%
# The encoding decides the first layer
# ------------------------------------
#
# Spikes are what make ACs. Feed the same network the pixel intensities as a constant input
# current (a common "direct" encoding) and its first layer receives graded values: every one
# of them is a MAC, and the first layer dominates the bill. The counter needs no trained model
# for this; only the kind of input changes.

x_current = pixels[test].expand(T, -1, -1)  # [T, B, 64], graded
current = energy.estimate(snn_net, x_current, profile="cmos45")
for spikes_in, name in ((report, "spikes"), (current, "current")):
    first = spikes_in.layers[0]
    print(
        f"{name:7} input: fc1 {first.acs:>11,} ACs {first.macs:>11,} MACs "
        f"{first.energy_pj / 1e6:6.2f} uJ; total {spikes_in.totals.energy_pj / 1e6:6.2f} uJ"
    )

# %%
# Hardware profiles
# -----------------
#
# A profile is a set of per-operation energies in picojoules, each traceable to a publication
# (:class:`energy.profiles.EnergyProfile`). The bundled ones
# (:func:`energy.profiles.available_profiles`): ``cmos45`` (fp32), ``cmos45_fp16`` and
# ``cmos45_int8`` from Horowitz, ISSCC 2014 (45 nm arithmetic: an fp32 add is 0.9 pJ, an fp32
# multiply-add 4.6 pJ, an int8 add 0.03 pJ; the neuron update, a multiply-add plus a compare,
# and the spike, a subtraction, are the package's derivation from those); ``loihi`` from Davies et al., IEEE Micro 2018
# (23.6 pJ per synaptic operation, 52 pJ per neuron update); ``truenorth`` from Merolla et al.,
# Science 2014 and Akopyan et al., IEEE TCAD 2015 (26 pJ per synaptic event, neuron updates and
# routing folded in); ``spinnaker2``, indicative only. Each profile's ``note`` gives the
# derivations and caveats; the file is ``energy/profiles.toml``.

print(f"{'profile':12} {'AC':>6} {'MAC':>5} {'update':>6} {'spike':>5} {'read':>5} {'bits w/a':>8}")
for name in energy.available_profiles():
    q = energy.get_profile(name)
    print(
        f"{q.name:12} {q.ac_pj:6.2f} {q.mac_pj:5.2f} {q.neuron_update_pj:6.2f} "
        f"{q.spike_pj:5.2f} {q.memory_read_pj:5.2f} {q.weight_bits:>5}/{q.activation_bits}"
    )
print()
loihi = energy.get_profile("loihi")
print(f"loihi: {loihi.source}\n{loihi.note}")

# %%
# Your own hardware is a TOML file with the same fields, read by
# :func:`energy.profiles.load_profile`. ``name``, ``description``, ``source``, ``ac_pj``,
# ``mac_pj``, ``neuron_update_pj``, ``weight_bits`` and ``activation_bits`` are required, the
# rest default to 0 (the ANN MACs to the ``cmos45`` figures); errors name the offending field.

import tempfile
from pathlib import Path

toml = """
name = "my_chip"
description = "hypothetical 22 nm digital SNN core"
source = "illustrative numbers, not a measurement"
ac_pj = 2.0
mac_pj = 4.6
neuron_update_pj = 8.0
spike_pj = 1.0
weight_bits = 8
activation_bits = 1
"""
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "my_chip.toml"
    path.write_text(toml)
    my_chip = energy.load_profile(path)
print(my_chip)

# %%
# Counting is the expensive part and does not depend on the profile: count once, then price
# the same :class:`energy.counts.OperationCounts` under as many profiles as you like with
# :func:`energy.report.build_report` (a bundled name or an ``EnergyProfile``). Below, the
# energy of each layer of the snnTorch network under ``cmos45`` and ``loihi`` (and our made-up
# chip); note the logarithmic axis.

import matplotlib.pyplot as plt
import numpy as np

priced = {
    name: energy.build_report(counts, profile)
    for name, profile in (("cmos45", "cmos45"), ("loihi", "loihi"), ("my_chip", my_chip))
}
names = [m.name for m in counts.layers]
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.27
for i, (name, r) in enumerate(priced.items()):
    values = [m.energy_pj / 1e6 for m in r.layers]
    ax.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=name)
ax.set_xticks(np.arange(len(names)), names)
ax.set_yscale("log")
ax.set_ylabel("energy for the test set (uJ)")
ax.set_title(f"snnTorch network, {B} samples x {T} steps, compute only")
ax.legend()
fig.tight_layout()
plt.show()

for name, r in priced.items():
    shares = ", ".join(f"{m.name} {m.energy_pj / r.totals.energy_pj:.0%}" for m in r.layers)
    print(f"{name:8} {r.totals.energy_pj / B / 1e3:6.1f} nJ per sample ({shares})")

# %%
# On every profile the input layer dominates: each pixel spikes on about a third of the steps
# and each spike reaches 128 synapses. Loihi's synaptic operation costs 26 times an fp32 add,
# but its figures include on-core memory and spike routing, so they compare with a ``cmos45``
# total that includes memory traffic (below), not with its compute-only total.
#
# Against the ANN
# ---------------
#
# Every report carries two baselines built from the same counting pass: the equivalent ANN
# (same layers, ReLU instead of neurons, one step, every input graded) at fp32 and at int8, its
# MACs priced at ``ann_mac_fp32_pj`` / ``ann_mac_int8_pj`` (4.6 pJ and 0.23 pJ, Horowitz 2014,
# in every bundled profile: the ANN runs on a conventional accelerator, not on the neuromorphic
# chip). ``ratio = E_baseline / E_SNN``: above 1, the SNN saves energy. The int8 ANN is the
# honest competitor (Yan et al. 2024 find it beats an SNN above a spike rate of about 6%), so
# the report also gives the *break-even firing rate*, below which the SNN would win, assuming
# the activity-driven energy (ACs, spikes) scales with the rate and the rest (MACs, neuron
# updates) does not.

for name, r in priced.items():
    fp32, int8 = r.baseline("ann_fp32"), r.baseline("ann_int8")
    print(
        f"{name:8} ANN fp32 / SNN = {fp32.ratio:5.2f}, ANN int8 / SNN = {int8.ratio:5.2f}, "
        f"break-even rate {r.break_even_firing_rate:.1%} (now {r.totals.firing_rate:.1%})"
    )
print()
print(priced["cmos45"].verdict)

# %%
# On ``cmos45`` this SNN beats the fp32 ANN: it performs about three times more ACs than the
# ANN performs MACs (``T`` steps of an input that spikes a third of the time, against one
# graded pass), but an AC costs a fifth of an fp32 MAC. It loses to the int8 ANN by an order of
# magnitude, and on ``loihi`` to both. A break-even rate of 0 means that the activity-independent
# part alone (every neuron updated at every step, whether it fires or not) already costs more
# than the int8 ANN: no sparsity would make this SNN win on that hardware. An estimate that
# counted only synaptic events would have missed it.
#
# For a mixture-of-experts model, pass its dense twin, ``estimate(model, x, dense_model=twin)``
# (for this package's models: a copy with ``spiking_moe.moe.set_dense(twin, True)``), and the
# report adds what routing saves (``dense_snn``, ``dense_ann_fp32``, ``dense_ann_int8``) and a
# per-expert table; modules under ``...experts.<i>`` are attributed to expert ``i``.
#
# Memory traffic
# --------------
#
# Arithmetic is not the whole bill: on a conventional chip every synaptic operation reads a
# weight. The memory term (after Lemaire et al., ICONIP 2022) charges each layer one weight
# read per AC or MAC, one input read per event (or per graded operand), a membrane read and
# write per neuron update and a write per spike, with no cache reuse (an upper bound); the ANN
# baselines read a weight and an activation per MAC and write each output. Every report holds
# both totals (``compute_pj`` and ``with_memory_pj``; each baseline has a ratio for each);
# ``include_memory=True`` makes the per-layer energies, ``energy_pj``, ``ratio`` and the first
# sentence of the verdict follow the second.

with_memory = energy.build_report(counts, "cmos45", include_memory=True)
fc1_row = with_memory.layers[0]
by_hand = fc1.acs + fc1.input_events  # a weight per AC, an address per input spike
print(f"fc1 memory reads: {fc1_row.memory_reads:,}; ACs + input events: {by_hand:,}")
t = with_memory.totals
print(f"compute only {t.compute_pj / 1e6:.1f} uJ, with memory {t.with_memory_pj / 1e6:.1f} uJ")
print(with_memory.verdict)

# %%
# A 32-bit SRAM read (5 pJ on ``cmos45``) costs more than an fp32 multiply-add and twenty times
# an int8 one, so with memory traffic both totals are dominated by memory accesses, and the gap
# to the int8 ANN narrows towards the ratio of their numbers of accesses. The ANN's int8 reads are priced like 32-bit ones, which favours the
# SNN. On ``loihi`` and ``truenorth`` the memory prices are 0: their per-operation figures
# already include it.
#
# Precision
# ---------
#
# Every profile states the precision its prices hold for (``weight_bits``,
# ``activation_bits``: ``cmos45`` 32/32, ``cmos45_int8`` 8/8, ``loihi`` 8-bit weights and
# 1-bit spikes, ``truenorth`` 2/1). Pricing our float32 network on 8-bit hardware is only half
# a claim, and the report says so rather than quoting the float accuracy beside an 8-bit energy.

fp32_accuracy = accuracy(snn_net, x_test, y_test)
naive = energy.build_report(counts, "cmos45_int8", accuracy=fp32_accuracy)
print(naive.precision_statement)

# %%
# To complete the claim, run the network at the profile's precision and measure it. Here the
# weights are quantized to 8 bits, symmetrically per output channel, with
# :func:`spiking_moe.quantization.quantize_weights`, which takes any weight tensor (for this
# package's models, :func:`spiking_moe.quantization.quantize_model` swaps in integer layers).
# The quantized network is counted again, since its spikes may differ, and the report gets
# both accuracies; ``model_weight_bits=32`` says the model was trained in float32.

import copy

from spiking_moe.quantization import quantize_weights

int8_net = copy.deepcopy(snn_net)
with torch.no_grad():
    for layer in (int8_net.fc1, int8_net.fc2):
        q, scale = quantize_weights(layer.weight, bits=8)  # int8 codes, one scale per row
        layer.weight.copy_(q.float() * scale[:, None])
int8_counts = energy.count_operations(int8_net, x_test)
int8_report = energy.build_report(
    int8_counts,
    "cmos45_int8",
    model_weight_bits=32,
    accuracy=fp32_accuracy,
    accuracy_at_profile_precision=accuracy(int8_net, x_test, y_test),
)
print(f"spikes: {counts.total('spikes'):,} at fp32, {int8_counts.total('spikes'):,} at int8")
print(int8_report.verdict)

# %%
# On ``cmos45_int8`` the SNN's accumulates and neuron updates are int8 operations too, so the
# comparison with the int8 ANN is like for like, and the verdict now quotes an accuracy measured
# at the precision it prices. Here the SNN wins on compute (an int8 add is about an eighth of an
# int8 multiply-add) and loses once memory traffic is counted. The numbers depend on the
# network, the data and above all the firing rate; what the report guarantees is that each is
# an exact count times a cited price, and that it says what was not measured.
