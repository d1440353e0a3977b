r"""The Neuromorphic Intermediate Representation (NIR): export our spiking layers as NIR graphs,
import NIR graphs as our modules, and MoE deployment bundles (NIR graphs plus the routing rule
NIR cannot express).

**Parameter mapping.** Our LIF is discrete: :math:`h_t = \beta v_{t-1} + x_t`, a spike when
:math:`h_t > \theta`, then the reset. NIR's LIF is continuous: :math:`\tau \dot v = (v_{leak}
- v) + R I`, a spike when :math:`v > v_{threshold}`, then :math:`v \leftarrow v_{reset}`. The
mapping assumes the **forward-Euler** integrator with time step :math:`dt` (what snnTorch's
``import_from_nir`` and Norse's ``from_nir`` assume):

.. math::

    v_t = v_{t-1} + \tfrac{dt}{\tau}\big((v_{leak} - v_{t-1}) + R I_t\big)
        = (1 - \tfrac{dt}{\tau})\, v_{t-1} + \tfrac{dt R}{\tau} I_t

so with :math:`v_{leak} = 0`: :math:`\beta = 1 - dt/\tau`, i.e. :math:`\tau = dt / (1 -
\beta)`, and an input gain :math:`g = R\, dt / \tau`. :func:`export_nir` writes one of two
exact forms (``unit_resistance``):

* ``False`` (default): :math:`R = \tau / dt` (:math:`g = 1`), :math:`v_{threshold} = \theta`:
  NIR's membrane is ours. snnTorch reads it exactly; Norse's ``from_nir`` ignores ``r`` (it
  warns, and its neurons then see :math:`(1 - \beta)` times the input), so for Norse use:
* ``True``: :math:`R = 1`, :math:`v_{threshold} = (1 - \beta)\,\theta` (NIR's membrane is
  ours times :math:`1 - \beta`). Norse reads it exactly (``from_nir(graph, dt=dt)``); so does
  snnTorch, which divides the threshold by :math:`g` (when :math:`g` is the same for all
  neurons).

A non-leaky neuron (:math:`\beta = 1`) becomes NIR's ``IF`` (:math:`\dot v = R I`) with
:math:`R = 1/dt`. The membrane readout's non-firing integrator becomes ``LI`` (the same
mapping, no threshold; ``I`` with :math:`R = 1/dt` when :math:`\beta = 1`).

``dt`` is not a property of our discrete model: any value gives the same discrete dynamics, it
only sets the time constants written. The default is ``1e-4`` s because snnTorch 1.0's
``import_from_nir`` assumes exactly that (it hard-codes ``dt = 1e-4``); Norse's ``from_nir``
takes ``dt`` as an argument (default ``1e-3``). The graph stores it in ``graph.metadata["dt"]``
and every neuron node stores our exact parameters in ``metadata["spiking_moe"]`` (``beta``,
``threshold``, ``reset``), which :func:`import_nir` prefers when they agree with the NIR
parameters, so a round trip is exact to the bit.

**Resets.** Our ``"zero"`` reset is NIR's reset to :math:`v_{reset} = 0`. NIR's LIF has no
subtractive reset, so a ``"subtract"`` neuron is refused (``subtract_reset="error"``, the
default) unless ``subtract_reset="zero"`` is passed: then the graph's LIF resets to zero (what
every other NIR reader simulates: the same spikes until the first step where a neuron's
membrane exceeds its threshold by a margin it would have kept, different after) and the node's
metadata records ``reset = "subtract"``, which :func:`import_nir` restores.

**Time and decoding.** A graph maps one time step of input to one time step of output; our
modules are time-major (``[T, B, F]``). The classifiers' logits are the mean over ``T`` of the
readout part's output (the readout current for ``readout="count"``, the integrator's membrane
for ``"membrane"``), which the graph states in ``graph.metadata["decode"]``.

**Reading other tools' graphs** (:func:`import_nir`, ``dialect``):

* ``"nir"``: the NIR definitions above. Graphs by hand with snnTorch's conventions
  (``tau = dt / (1 - beta)``, ``r = tau / dt``, ``v_leak = 0``) and files by ``nir.write``.
* ``"norse"``: graphs written by Norse 1.1's ``to_nir``, which stores ``tau = dt /
  tau_mem_inv`` (i.e. :math:`\tau \cdot dt` instead of :math:`\tau`; its own ``from_nir`` reads
  them back wrong), ``r = 1`` for a neuron whose input Norse does not scale (its box cell
  integrates :math:`v + dt\,\tau^{-1}(v_{leak} - v + i)`, which is ``r = 1``), ``IF`` as
  :math:`v + i`, and input types with a leading batch dimension of 1 (which nir 1.0.8's type
  inference rejects; we drop it). Pass Norse's ``dt``.

snnTorch 1.0's own ``export_to_nir`` fails type inference with nir 1.0.8 (an upstream bug), and
its ``import_from_nir`` reads ``IF`` as a leaky neuron with ``beta = 0.9`` (another upstream bug),
so a network with ``beta = 1`` cannot go through snnTorch.

**MoE bundles.** NIR has no routing primitive. :func:`export_bundle` writes one NIR graph per
part (input layer, every expert, every MoE layer's output neuron, the router's projection,
the readout) and a ``manifest.json`` with the routing rule (router kind, ``k``, gates,
balancing bias, capacity, window, gain) and how the parts connect; :func:`load_bundle`
rebuilds the model from the files, with outputs equal to the original's to the bit.

**Layout.** :mod:`~spiking_moe.nir.export` writes graphs, :mod:`~spiking_moe.nir.importer`
reads them, :mod:`~spiking_moe.nir.bundle` writes and reads bundles (with both).

Example (a LIF with :math:`\beta = 0.5` at the default :math:`dt = 10^{-4}`: :math:`\tau =
dt / (1 - \beta) = 2 \cdot 10^{-4}`, :math:`R = \tau / dt = 2`):

>>> from torch import nn
>>> from spiking_moe.neurons import LIF
>>> from spiking_moe.nir import export_nir, import_nir
>>> layer = nn.Sequential(nn.Linear(4, 3), LIF(beta=0.5, threshold=1.0, reset="zero"))
>>> graph = export_nir(layer)
>>> list(graph.nodes), type(graph.nodes["1"]).__name__
(['input', '0', '1', 'output'], 'LIF')
>>> graph.nodes["1"].r.tolist()
[2.0, 2.0, 2.0]
>>> imported = import_nir(graph)
>>> float(imported.layers["1"].beta), float(imported.layers["1"].threshold)
(0.5, 1.0)
"""

from .bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    PartSummary,
    export_bundle,
    load_bundle,
    summarize_graph,
)
from .export import DEFAULT_DT, export_nir
from .importer import DIALECTS, LeakyIntegrator, NIRModule, import_nir

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "DEFAULT_DT",
    "DIALECTS",
    "LeakyIntegrator",
    "MANIFEST_NAME",
    "NIRModule",
    "PartSummary",
    "export_bundle",
    "export_nir",
    "import_nir",
    "load_bundle",
    "summarize_graph",
]
