"""
Export to neuromorphic hardware with NIR
========================================

The `Neuromorphic Intermediate Representation <https://neuroir.org>`_ (NIR, the ``nir``
package) is a graph format for spiking networks that snnTorch, Norse, Sinabs, Rockpool,
Lava-DL and Spyx read and write, and through which Loihi 2 (Lava-DL), SpiNNaker2, Xylo, Speck
and BrainScaleS-2 take models. :mod:`spiking_moe.nir` writes our models as NIR graphs and reads
NIR graphs back as our modules. Here we train a small spiking classifier, export it, run the
graph in snnTorch, in Norse and in our own importer and check that all of them compute the
same thing; then we look at what cannot be exported and at how a mixture of experts, which NIR
cannot express, goes out as a bundle.
"""

# %%
# A small model to export
# -----------------------
#
# A :class:`spiking_moe.models.DenseSNNClassifier` (input layer, LIF, one spiking expert of
# Linear, LIF, Linear, then a LIF and the readout) trained for two epochs on scikit-learn's
# bundled 8x8 digits, rate-coded over ``T = 10`` steps. One choice matters for the export:
# ``reset="zero"``. NIR's LIF resets to a value; our default, subtracting the threshold, is
# discussed below. The default ``readout="count"`` gives logits that are the mean over time of
# the readout current, which the graph outputs at every step (``readout="membrane"`` exports an
# ``LI`` integrator node as well).

import torch
from sklearn.datasets import load_digits
from torch import nn

from spiking_moe import DenseSNNClassifier

torch.manual_seed(0)
T = 10
digits = load_digits()
pixels = torch.tensor(digits.data, dtype=torch.float32) / 16  # [1797, 64] in [0, 1]
labels = torch.tensor(digits.target)
order = torch.randperm(len(labels))
train, test = order[:1400], order[1400:]


def rate_code(p, generator):
    """[B, F] intensities -> [T, B, F] Bernoulli spikes."""
    return torch.bernoulli(p.expand(T, *p.shape), generator=generator)


model = DenseSNNClassifier(
    64, 10, hidden_features=64, k=2, expert_hidden=32, beta=0.9, threshold=0.5, reset="zero"
)
generator = torch.Generator().manual_seed(0)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(2):
    for batch in torch.randperm(len(train), generator=generator).split(100):
        i = train[batch]
        loss = nn.functional.cross_entropy(model(rate_code(pixels[i], generator)).logits, labels[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()

x = rate_code(pixels[test], torch.Generator().manual_seed(1))  # [10, 397, 64] spikes
y = labels[test]
with torch.no_grad():
    logits = model(x).logits
print(f"test accuracy: {(logits.argmax(1) == y).float().mean():.1%}")

# %%
# Export
# ------
#
# :func:`spiking_moe.nir.export.export_nir` turns a feed-forward module (``nn.Linear``,
# :class:`spiking_moe.neurons.LIF`, a :class:`spiking_moe.experts.SpikingExpert`, an
# ``nn.Sequential`` of those, or a whole ``DenseSNNClassifier``) into a chain of NIR nodes:
# ``Affine`` for a Linear with bias (``Linear`` without), ``LIF`` for a leaky neuron, ``IF`` for
# ``beta = 1``, and ``LI`` for the integrator of a ``readout="membrane"`` classifier. Node names
# are the module paths with ``_`` for ``.``. :func:`spiking_moe.nir.bundle.summarize_graph`
# gives what a hardware mapper asks first: neurons, nonzero synapses and the largest fan-in.

import nir

from spiking_moe.nir import export_nir, summarize_graph

graph = export_nir(model)
for name, node in graph.nodes.items():
    shape = getattr(node, "weight", None)
    shape = f"weight {tuple(shape.shape)}" if shape is not None else ""
    print(f"{name:24} {type(node).__name__:7} {shape}")
print(graph.metadata)
print(summarize_graph(graph, "classifier"))

# %%
# The parameter mapping
# ---------------------
#
# Our LIF is discrete, :math:`h_t = \beta v_{t-1} + x_t`, a spike when :math:`h_t > \theta`,
# then the reset. NIR's LIF is a differential equation,
# :math:`\tau \dot v = (v_{leak} - v) + R I`, a spike when :math:`v > v_{threshold}`, then
# :math:`v \leftarrow v_{reset}`. snnTorch's and Norse's importers integrate it with forward
# Euler at a time step :math:`dt`:
#
# .. math::
#
#     v_t = v_{t-1} + \frac{dt}{\tau}\big((v_{leak} - v_{t-1}) + R I_t\big)
#         = \Big(1 - \frac{dt}{\tau}\Big) v_{t-1} + \frac{R\, dt}{\tau} I_t .
#
# So with :math:`v_{leak} = 0` our neuron is exactly :math:`\tau = dt / (1 - \beta)` and an
# input gain :math:`R\, dt / \tau = 1`, that is :math:`R = \tau / dt`; the threshold is ours and
# :math:`v_{reset} = 0` is the zero reset. A non-leaky neuron (:math:`\beta = 1`) is NIR's ``IF``
# with :math:`R = 1 / dt`, and the integrator of a membrane readout is ``LI`` (``I`` when
# :math:`\beta = 1`) under the same mapping. ``dt`` does not change our discrete model, it only
# sets the time constants written down: the default ``1e-4`` s is the step snnTorch's
# ``import_from_nir`` hard-codes, and the graph stores it in ``graph.metadata["dt"]``. Every
# neuron node also keeps our exact ``beta``, ``threshold`` and reset in its metadata.

node = graph.nodes["input_neuron"]
dt = graph.metadata["dt"]
beta = float(model.input_neuron.beta)
print(f"tau = {node.tau[0]:.6g} s   dt / (1 - beta) = {dt / (1 - beta):.6g} s")
print(f"r = {node.r[0]:.6g}          tau / dt = {node.tau[0] / dt:.6g}")
print(f"v_threshold = {node.v_threshold[0]:.3g}, v_leak = {node.v_leak[0]}, ", end="")
print(f"v_reset = {node.v_reset[0]}")
exact = node.metadata["spiking_moe"]
print(f"metadata: beta {exact['beta'][:3]}..., threshold {exact['threshold'][:3]}..., ", end="")
print(f"reset {exact['reset']!r}")

# %%
# A graph goes to disk with ``nir.write`` (HDF5) and comes back with ``nir.read``; we use a
# temporary folder so that nothing is left behind.

import tempfile
from pathlib import Path

workdir = Path(tempfile.mkdtemp())
nir.write(str(workdir / "classifier.nir"), graph)
graph = nir.read(str(workdir / "classifier.nir"))
print(f"{(workdir / 'classifier.nir').stat().st_size:,} bytes; nodes: {list(graph.nodes)}")

# %%
# Run it in snnTorch
# ------------------
#
# ``snntorch.import_nir.import_from_nir`` builds a stateful network of ``Leaky`` neurons that
# takes one time step at a time and returns ``(output, state)``. It prints the rewrites it
# makes to the graph, which we silence. The output node is the readout current at each step;
# the classifier's logits are its mean over time (``graph.metadata["decode"]``).

import contextlib
import io

from snntorch.import_nir import import_from_nir


def run_steps(net, x_TBF):
    """Run a stateful peer network over the time steps of ``x_TBF``, stacking its outputs."""
    state, outputs = None, []
    with torch.no_grad():
        for x_t in x_TBF:
            out, state = net(x_t, state)
            outputs.append(out)
    return torch.stack(outputs)


with contextlib.redirect_stdout(io.StringIO()):
    snntorch_net = import_from_nir(graph)
snntorch_current = run_steps(snntorch_net, x)  # [T, B, 10]
difference = (snntorch_current.mean(0) - logits).abs().max()
print(f"snnTorch logits vs ours: max difference {difference:.2g}")
agree = (snntorch_current.mean(0).argmax(1) == logits.argmax(1)).float().mean()
print(f"same predicted class for {agree:.1%} of the test set")

# %%
# The logits agree to float rounding, not to the bit, only because our classifier averages the
# spikes before the readout (``readout(mean(s))``) while the graph's consumer averages the
# readout currents (``mean(readout(s))``).
#
# Read it back with our importer
# ------------------------------
#
# :func:`spiking_moe.nir.importer.import_nir` builds a time-major
# :class:`spiking_moe.nir.importer.NIRModule` of our own layers (an ``EventLinear`` per
# ``Affine``, a ``LIF`` per ``LIF``) that runs the whole ``[T, B, F]`` input at once. It
# reads ``dt`` from the graph's metadata (pass ``dt=`` for graphs that do not state it) and
# takes a path as well as a graph. On the same input it gives the same per-step output as
# snnTorch, to the bit.

from spiking_moe.nir import import_nir

ours = import_nir(workdir / "classifier.nir")
with torch.no_grad():
    ours_current = ours(x)
print(ours.layers["input_neuron"])
print("equal to snnTorch's output:", torch.equal(ours_current, snntorch_current))

# %%
# Norse reads ``r = 1``
# ---------------------
#
# Norse's ``from_nir`` ignores ``r``: its box neuron integrates
# :math:`v + dt\,\tau^{-1}(v_{leak} - v + I)`, i.e. NIR's equation with :math:`R = 1`. With our
# default :math:`R = \tau / dt` its neurons would see :math:`1 - \beta` times the intended
# input. ``export_nir(..., unit_resistance=True)`` writes the other exact form: :math:`R = 1`
# and :math:`v_{threshold} = (1 - \beta)\,\theta` (NIR's membrane is ours times
# :math:`1 - \beta`, so the same spikes). Pass Norse the graph's ``dt``. snnTorch reads this
# form exactly too.

import norse.torch as norse

unit_graph = export_nir(model, unit_resistance=True)
unit_node = unit_graph.nodes["input_neuron"]
print(f"r = {unit_node.r[0]:.3g}, v_threshold = {unit_node.v_threshold[0]:.3g}")
norse_current = run_steps(norse.from_nir(unit_graph, dt=dt), x)
print(f"Norse vs ours: max difference {(norse_current - ours_current).abs().max():.2g}")
# The default graph (r = tau / dt) in Norse, which warns that r is not 1 (silenced here):
wrong = run_steps(norse.from_nir(graph, dt=dt, ignore_warnings=True), x)
print(f"Norse on the r = tau / dt graph: max difference {(wrong - ours_current).abs().max():.2g}")

# %%
# The other direction: Norse 1.1's own ``to_nir`` writes ``tau * dt`` where NIR means
# ``tau``, and a batch dimension in the input type, so its own ``from_nir`` reads such graphs
# back wrong. ``import_nir(graph, dt=norse_dt, dialect="norse")`` reads them as Norse ran them.

torch.manual_seed(1)
box = norse.LIFBoxParameters(  # beta = 1 - dt * tau_mem_inv = 0.9 at dt = 1e-3
    tau_mem_inv=torch.full((16,), 100.0),
    v_th=torch.full((16,), 0.05),
    v_leak=torch.zeros(16),
    v_reset=torch.zeros(16),
)
norse_model = norse.SequentialState(nn.Linear(64, 16), norse.LIFBoxCell(box), nn.Linear(16, 10))
norse_graph = norse.to_nir(norse_model, torch.zeros(1, 64), dt=1e-3)
print(f"Norse wrote tau = {norse_graph.nodes['1'].tau[0]:.3g} for 1 / tau_mem_inv = 0.01")
from_norse = import_nir(norse_graph, dt=1e-3, dialect="norse")
with torch.no_grad():
    same = torch.equal(from_norse(x), run_steps(norse_model, x))
print("our reading of Norse's graph equals Norse's own run:", same)

# %%
# What is refused, and why
# ------------------------
#
# Export refuses what NIR cannot express rather than write a graph that other tools would
# simulate differently. The errors name the module and the way out.
#
# **Subtractive reset.** NIR's LIF resets to ``v_reset``; it has no "subtract the threshold".
# Our default neuron subtracts, so its export is refused unless you accept a zero reset with
# ``subtract_reset="zero"``: then other tools simulate a zero reset (the same spikes until a
# neuron crosses its threshold by a margin the subtractive reset would have kept, different
# after), while the node's metadata keeps the true reset, which ``import_nir`` restores.

from spiking_moe import LIF, MultiSpike, SpikingMoEClassifier

torch.manual_seed(0)
subtract = nn.Sequential(nn.Linear(64, 32), LIF(beta=0.9, threshold=0.3, reset="subtract"))
try:
    export_nir(subtract)
except ValueError as error:
    print(f"ValueError: {error}\n")
zeroed = export_nir(subtract, subtract_reset="zero")
print("reset in the node's metadata:", zeroed.nodes["1"].metadata["spiking_moe"]["reset"])
with torch.no_grad():
    true_spikes = subtract(x)
    restored = import_nir(zeroed)(x)
with contextlib.redirect_stdout(io.StringIO()):
    elsewhere = run_steps(import_from_nir(zeroed), x)
print("import_nir restores the subtractive reset:", torch.equal(restored, true_spikes))
changed, fired = int((elsewhere != true_spikes).sum()), int(true_spikes.sum())
print(f"snnTorch (zero reset) differs at {changed:,} entries; the model fired {fired:,} spikes")

# %%
# **Multi-level spikes.** A :class:`spiking_moe.neurons.MultiSpike` neuron emits integer
# counts ``0..D`` per step; NIR has no node for that, and a binary neuron in its place would
# fire differently.

try:
    export_nir(nn.Sequential(nn.Linear(64, 32), MultiSpike(levels=4)))
except ValueError as error:
    print(f"ValueError: {error}")

# %%
# **Routing.** NIR has no routing primitive, so a mixture of experts cannot be one graph. The
# error points to bundles (next section). The same goes for attention: of a language model,
# only the dense parts export (its token table, as a ``Linear`` node on one-hot inputs, and its
# readout). Importing is limited the other way: ``import_nir`` reads ``Input``, ``Affine``,
# ``Linear``, ``LIF``, ``IF``, ``LI``, ``I`` and ``Output`` nodes, with ``v_leak = 0`` and
# ``v_reset = 0``, and names any other node. (Two upstream limits to know: snnTorch 1.0's
# ``export_to_nir`` fails nir 1.0.8's type check, and its ``import_from_nir`` reads ``IF`` as a
# leaky neuron with ``beta = 0.9``, so ``beta = 1`` networks cannot go through snnTorch.)

moe = SpikingMoEClassifier(  # untrained: the bundle does not care
    64, 10, hidden_features=32, num_experts=4, k=2, expert_hidden=16, threshold=0.5, reset="zero"
).eval()
try:
    export_nir(moe)
except ValueError as error:
    print(f"ValueError: {error}\n")

import numpy as np

cuba = nir.NIRGraph(
    nodes={
        "input": nir.Input(input_type={"input": np.array([4])}),
        "syn": nir.CubaLIF(
            tau_syn=np.full(4, 2e-3),
            tau_mem=np.full(4, 1e-3),
            r=np.ones(4),
            v_leak=np.zeros(4),
            v_threshold=np.ones(4),
        ),
        "output": nir.Output(output_type={"output": np.array([4])}),
    },
    edges=[("input", "syn"), ("syn", "output")],
)
try:
    import_nir(cuba, dt=1e-4)
except ValueError as error:
    print(f"ValueError: {error}")

# %%
# Mixture of experts: deployment bundles
# --------------------------------------
#
# :func:`spiking_moe.nir.bundle.export_bundle` writes one NIR graph per part of a
# ``SpikingMoEClassifier`` (the input layer and its neuron; per MoE layer the router's
# projection, every expert, and the output neuron that integrates the gated sum of the
# experts' currents; the readout) and a ``manifest.json`` with what NIR cannot say: the routing
# rule (router kind, ``k``, gates, balancing bias, capacity, window), how the parts connect and
# how logits are decoded. It returns the per-part summary. (Subtractive resets are written as
# zero resets with the true reset in the metadata, as above; this model uses zero resets.)

from spiking_moe.nir import export_bundle, load_bundle

bundle = workdir / "moe_bundle"
summaries = export_bundle(moe, bundle)
print(f"{'part':20} {'neurons':>8} {'synapses':>9} {'max fan-in':>10}")
for part in summaries:
    print(f"{part.name:20} {part.neurons:8,} {part.synapses:9,} {part.max_fan_in:10,}")
print(sorted(p.name for p in bundle.iterdir()))

# %%
# The manifest's routing rule is written for whoever implements the routing around the parts
# on the target (per token: average the layer's input spikes over the routing window, apply
# the router part, take the top-k of the logits plus the balancing bias, feed the token's
# spikes to those experts, sum their currents times the gates, drive the output neuron).

import json

manifest = json.loads((bundle / "manifest.json").read_text())
print(sorted(manifest))
print(manifest["routing"][0]["rule"][:300], "...")

# %%
# :func:`spiking_moe.nir.bundle.load_bundle` rebuilds the model from the files alone (every
# weight, ``beta`` and threshold from the NIR graphs, the routing from the manifest): logits,
# routing decisions and spikes are equal to the original's, to the bit. Each part is an
# ordinary NIR graph, so any importer runs it: here an expert through snnTorch against the
# expert itself, on random spike trains standing in for the layer's input.

reloaded = load_bundle(bundle)
with torch.no_grad():
    a, b = moe(x), reloaded(x)
print("logits equal:", torch.equal(a.logits, b.logits))
print("experts chosen equal:", torch.equal(a.routing[0].expert_ids, b.routing[0].expert_ids))
print("spikes equal:", torch.equal(a.activity.spikes, b.activity.spikes))

hidden = (torch.rand(T, 8, 32, generator=torch.Generator().manual_seed(2)) < 0.3).float()
with contextlib.redirect_stdout(io.StringIO()):
    expert_net = import_from_nir(nir.read(str(bundle / "layers.0.experts.0.nir")))
with torch.no_grad():
    expert = moe.layers[0].experts[0].run(hidden)
difference = (run_steps(expert_net, hidden) - expert.current).abs().max()
print(f"expert 0 fired {int(expert.activity.spikes.sum())} hidden spikes; ", end="")
print(f"snnTorch vs ours: max difference {difference:.2g}")

# %%
# The command line does the same for a trained checkpoint:
# ``spiking-moe-export --checkpoint runs/default/checkpoint.pt --out runs/default/nir`` writes
# the bundle and prints the per-part table.

import shutil

shutil.rmtree(workdir)
