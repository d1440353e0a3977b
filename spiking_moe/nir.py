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
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch
from torch import nn

from .experts import _FeedForwardExpert
from .models import DenseSNNClassifier, SpikingMoEClassifier, _DenseBlock
from .moe import SpikingMoE
from .neurons import LIF
from .parallel import is_expert_parallel
from .router import SpikingRouter
from .synapses import EventLinear

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

logger = logging.getLogger(__name__)

#: snnTorch 1.0's ``import_from_nir`` hard-codes this time step.
DEFAULT_DT = 1e-4
DIALECTS = ("nir", "norse")
SUBTRACT_RESETS = ("error", "zero")
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SUPPORTED_NODES = ("Input", "Output", "Affine", "Linear", "LIF", "IF", "LI", "I")
_META = "spiking_moe"


# --------------------------------------------------------------------------- export


def _array(values: torch.Tensor | float, size: int) -> np.ndarray:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    return np.broadcast_to(tensor.numpy(), (size,)).astype(np.float64).copy()


def _affine(linear: nn.Linear) -> nir.NIRNode:
    weight = linear.weight.detach().cpu().numpy().astype(np.float32)
    if linear.bias is None:
        return nir.Linear(weight=weight)
    return nir.Affine(weight=weight, bias=linear.bias.detach().cpu().numpy().astype(np.float32))


def _neuron_node(
    lif: LIF,
    size: int,
    name: str,
    dt: float,
    unit_resistance: bool,
    subtract_reset: str,
) -> nir.NIRNode:
    if lif.reset == "subtract" and subtract_reset == "error":
        raise ValueError(
            f"LIF {name!r} uses reset='subtract', which NIR's LIF (a reset to v_reset) cannot "
            "express; pass subtract_reset='zero' to export a reset to zero instead (other NIR "
            "readers then simulate a zero reset; import_nir restores 'subtract'), or train "
            "with reset='zero'"
        )
    beta = lif.beta.detach().clamp(0, 1).to(torch.float64)
    threshold = lif.threshold.detach().to(torch.float64)
    beta_N, threshold_N = _array(beta, size), _array(threshold, size)
    metadata = {
        _META: {
            "beta": beta_N.astype(np.float32),
            "threshold": threshold_N.astype(np.float32),
            "reset": lif.reset,
        }
    }
    zeros = np.zeros(size)
    if (beta_N == 1).all():
        return nir.IF(
            r=np.full(size, 1 / dt), v_threshold=threshold_N, v_reset=zeros, metadata=metadata
        )
    if (beta_N == 1).any():
        raise ValueError(
            f"LIF {name!r} mixes beta = 1 (NIR's IF) with beta < 1 (NIR's LIF) in one layer; "
            "NIR has one neuron type per node"
        )
    tau = dt / (1 - beta_N)
    r = np.ones(size) if unit_resistance else tau / dt
    v_threshold = threshold_N * (1 - beta_N) if unit_resistance else threshold_N
    return nir.LIF(
        tau=tau, r=r, v_leak=zeros, v_threshold=v_threshold, v_reset=zeros, metadata=metadata
    )


def _integrator_node(beta: torch.Tensor, size: int, dt: float, unit_resistance: bool):
    beta_N = _array(beta.detach().clamp(0, 1), size)
    metadata = {_META: {"beta": beta_N.astype(np.float32)}}
    if (beta_N == 1).all():
        return nir.I(r=np.full(size, 1 / dt), metadata=metadata)
    tau = dt / (1 - beta_N)
    r = np.ones(size) if unit_resistance else tau / dt
    return nir.LI(tau=tau, r=r, v_leak=np.zeros(size), metadata=metadata)


@dataclass
class _Chain:
    """A feed-forward chain being built: node names in order, nodes, and the current width."""

    dt: float
    unit_resistance: bool
    subtract_reset: str
    width: int | None
    names: list[str]
    nodes: dict[str, nir.NIRNode]

    def add(self, name: str, node: nir.NIRNode, width: int) -> None:
        name = name.replace(".", "_") or "node"
        if name in self.nodes:
            raise ValueError(f"two modules map to the NIR node name {name!r}")
        self.names.append(name)
        self.nodes[name] = node
        self.width = width

    def module(self, module: nn.Module, name: str) -> None:
        if isinstance(module, SpikingMoE):
            raise ValueError(
                f"{name or type(module).__name__!r} is a SpikingMoE: NIR has no routing "
                "primitive; export the model with export_bundle (NIR graph per expert plus "
                "the routing rule)"
            )
        if isinstance(module, nn.Linear):
            if self.width is not None and module.in_features != self.width:
                raise ValueError(
                    f"{name!r} takes {module.in_features} inputs but receives {self.width}"
                )
            self.add(name, _affine(module), module.out_features)
        elif isinstance(module, nn.Embedding):
            # A lookup is a product with a one-hot input: row i of the table is column i.
            if self.width is not None and module.num_embeddings != self.width:
                raise ValueError(
                    f"{name!r} has {module.num_embeddings} entries but receives {self.width}"
                )
            weight = module.weight.detach().cpu().numpy().astype(np.float32).T.copy()
            self.add(name, nir.Linear(weight=weight), module.embedding_dim)
        elif isinstance(module, LIF):
            if self.width is None:
                raise ValueError(
                    f"LIF {name or 'module'!r} has no size on its own: pass features= (its "
                    "number of neurons) or export it after a Linear"
                )
            self.add(
                name,
                _neuron_node(
                    module, self.width, name, self.dt, self.unit_resistance, self.subtract_reset
                ),
                self.width,
            )
        elif isinstance(module, _FeedForwardExpert):
            self.module(module.net, _join(name, "net"))
        elif isinstance(module, _DenseBlock):
            self.module(module.expert, _join(name, "expert"))
            self.module(module.neuron, _join(name, "neuron"))
        elif isinstance(module, (nn.Sequential, nn.ModuleList)):
            for child_name, child in module.named_children():
                self.module(child, _join(name, child_name))
        elif isinstance(module, DenseSNNClassifier):
            self.classifier(module, name)
        elif isinstance(module, SpikingMoEClassifier):
            raise ValueError(
                "a SpikingMoEClassifier routes between experts, which NIR cannot express: "
                "export it with export_bundle, or export its dense parts (input_layer, "
                "input_neuron, readout) one by one"
            )
        else:
            raise ValueError(
                f"{name or 'module'!r} ({type(module).__name__}) has no NIR mapping here; "
                "supported: nn.Linear, nn.Embedding (on one-hot inputs), LIF, SpikingExpert, "
                "nn.Sequential of those, DenseSNNClassifier (and SpikingMoE models through "
                "export_bundle)"
            )

    def classifier(self, model: DenseSNNClassifier, name: str) -> None:
        self.module(model.input_layer, _join(name, "input_layer"))
        self.module(model.input_neuron, _join(name, "input_neuron"))
        self.module(model.layers, _join(name, "layers"))
        self.readout(model, name)

    def readout(self, model, name: str) -> None:
        self.module(model.readout, _join(name, "readout"))
        if model.readout_mode == "membrane":
            integrator = _integrator_node(
                model.input_neuron.beta, self.width, self.dt, self.unit_resistance
            )
            self.add(_join(name, "readout_integrator"), integrator, self.width)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _decode_rule(module: nn.Module) -> str:
    if isinstance(module, DenseSNNClassifier):
        what = "membrane" if module.readout_mode == "membrane" else "current"
        return f"logits = mean over time steps of the output ({what})"
    return "none: one output per time step"


def _graph(chain: _Chain, in_width: int, metadata: dict) -> nir.NIRGraph:
    nodes = {"input": nir.Input(input_type={"input": np.array([in_width])})}
    nodes.update(chain.nodes)
    nodes["output"] = nir.Output(output_type={"output": np.array([chain.width])})
    order = ["input", *chain.names, "output"]
    edges = list(zip(order[:-1], order[1:], strict=True))
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


def export_nir(
    module: nn.Module,
    *,
    dt: float = DEFAULT_DT,
    features: int | None = None,
    unit_resistance: bool = False,
    subtract_reset: str = "error",
) -> nir.NIRGraph:
    """A NIR graph of a feed-forward spiking module (module docstring for the mapping).

    Args:
        module: ``nn.Linear``, ``nn.Embedding`` (a ``Linear`` node on one-hot inputs: a
            language model's token table), :class:`~spiking_moe.neurons.LIF`, a
            :class:`~spiking_moe.experts.SpikingExpert`, an ``nn.Sequential`` of those
            (e.g. a language model's ``readout``), or a
            :class:`~spiking_moe.models.DenseSNNClassifier` (input layer, blocks, readout and,
            for ``readout="membrane"``, its integrator).
        dt: the time step the time constants are written for (> 0; stored in the graph).
        features: the number of neurons of a module that starts with a LIF (a LIF has no
            size of its own); otherwise the first Linear's ``in_features``.
        unit_resistance: write ``r = 1`` (Norse's convention) instead of ``r = tau / dt``.
        subtract_reset: ``"error"`` refuses ``reset="subtract"``; ``"zero"`` writes a reset
            to zero and records the true reset in the node's metadata.

    Returns:
        ``nir.NIRGraph`` with nodes ``input``, one per layer (module paths, dots as ``_``)
        and ``output``, a chain; ``graph.metadata`` holds ``dt``, ``time_major``, ``decode``.

    Raises:
        ValueError: a module without a NIR mapping (named), a MoE (use
            :func:`export_bundle`), a subtractive reset, a LIF without a size, bad ``dt``.
    """
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    if subtract_reset not in SUBTRACT_RESETS:
        raise ValueError(
            f"unknown subtract_reset {subtract_reset!r}; valid: {list(SUBTRACT_RESETS)}"
        )
    first = _first_linear(module)
    if features is None and isinstance(first, nn.Embedding):
        features = first.num_embeddings
    in_width = features if features is not None else (first.in_features if first else None)
    if in_width is None:
        raise ValueError(
            f"{type(module).__name__} starts with a LIF: pass features= (its number of neurons)"
        )
    chain = _Chain(float(dt), unit_resistance, subtract_reset, in_width, [], {})
    chain.module(module, "")
    if not chain.names:
        raise ValueError(f"{type(module).__name__} has no layer to export")
    metadata = {
        "dt": float(dt),
        "time_major": True,
        "decode": _decode_rule(module),
        "source": f"spiking_moe {type(module).__name__}",
    }
    return _graph(chain, in_width, metadata)


def _first_linear(module: nn.Module) -> nn.Linear | nn.Embedding | None:
    for child in module.modules():
        if isinstance(child, LIF):
            return None
        if isinstance(child, (nn.Linear, nn.Embedding)):
            return child
    return None


# --------------------------------------------------------------------------- import


class LeakyIntegrator(nn.Module):
    """Non-firing integrator ``v_t = beta v_{t-1} + gain I_t`` (NIR's ``LI`` and ``I``);
    the output is the membrane ``[T, ..., N]``."""

    def __init__(self, beta: torch.Tensor, gain: torch.Tensor):
        super().__init__()
        self.register_buffer("beta", torch.as_tensor(beta, dtype=torch.float32))
        self.register_buffer("gain", torch.as_tensor(gain, dtype=torch.float32))

    def forward(self, current_T: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(current_T[0])
        out = []
        for current in current_T:
            v = self.beta * v + self.gain * current
            out.append(v)
        return torch.stack(out)


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def _scalar_or_vector(values: np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if tensor.numel() > 1 and bool((tensor == tensor[0]).all()):
        return tensor[0].clone()
    return tensor if tensor.numel() > 1 else tensor.reshape(())


def _exact(node, key: str, computed: np.ndarray) -> np.ndarray:
    """Our exact parameter from the node's metadata when it agrees with the NIR value."""
    stored = getattr(node, "metadata", {}).get(_META, {}).get(key)
    if stored is None:
        return computed
    stored = _numpy(stored).reshape(-1)
    if stored.shape == computed.reshape(-1).shape and np.allclose(
        stored, computed.reshape(-1), rtol=1e-5, atol=1e-6
    ):
        return stored
    logger.warning(
        "node metadata %s disagrees with its NIR parameters; using the NIR parameters", key
    )
    return computed


def _lif_from_node(name: str, node, dt: float, dialect: str) -> LIF:
    threshold = _numpy(node.v_threshold).reshape(-1)
    r = _numpy(node.r).reshape(-1)
    reset = _numpy(node.v_reset).reshape(-1) if node.v_reset is not None else np.zeros(1)
    if not np.allclose(reset, 0):
        raise ValueError(
            f"node {name!r}: v_reset must be 0 (our neurons reset to zero), got {reset.tolist()}"
        )
    if isinstance(node, nir.IF):
        beta = np.ones_like(threshold)
        gain = np.ones_like(r) if dialect == "norse" else r * dt
    else:
        leak = _numpy(node.v_leak).reshape(-1)
        if not np.allclose(leak, 0):
            raise ValueError(
                f"node {name!r}: v_leak must be 0 (our neurons leak to zero), got {leak.tolist()}"
            )
        tau = _numpy(node.tau).reshape(-1)
        if dialect == "norse":
            tau = tau / dt  # Norse 1.1's to_nir writes tau * dt
        beta = 1 - dt / tau
        gain = r * dt / tau
        if ((beta < 0) | (beta > 1)).any():
            raise ValueError(
                f"node {name!r}: tau {tau.tolist()} with dt={dt} gives beta = 1 - dt/tau "
                "outside [0, 1]; is dt the graph's time step?"
            )
    if (gain <= 0).any():
        raise ValueError(f"node {name!r}: the input gain r * dt / tau must be > 0")
    # A neuron fed g * I with threshold th spikes exactly when one fed I reaches th / g.
    beta = _exact(node, "beta", beta * np.ones_like(threshold))
    threshold = _exact(node, "threshold", threshold / gain)
    reset = getattr(node, "metadata", {}).get(_META, {}).get("reset", "zero")
    return LIF(beta=_scalar_or_vector(beta), threshold=_scalar_or_vector(threshold), reset=reset)


def _integrator_from_node(name: str, node, dt: float, dialect: str) -> LeakyIntegrator:
    r = _numpy(node.r).reshape(-1)
    if isinstance(node, nir.I):
        beta = np.ones_like(r)
        gain = np.ones_like(r) if dialect == "norse" else r * dt
    else:
        leak = _numpy(node.v_leak).reshape(-1)
        if not np.allclose(leak, 0):
            raise ValueError(f"node {name!r}: v_leak must be 0, got {leak.tolist()}")
        tau = _numpy(node.tau).reshape(-1)
        if dialect == "norse":
            tau = tau / dt
        beta, gain = 1 - dt / tau, r * dt / tau
    beta = _exact(node, "beta", beta)
    return LeakyIntegrator(_scalar_or_vector(beta), _scalar_or_vector(gain))


def _linear_from_node(node) -> EventLinear:
    weight = torch.as_tensor(_numpy(node.weight), dtype=torch.float32)
    if weight.dim() != 2:
        raise ValueError(f"a NIR {type(node).__name__} weight must be 2-D, got {weight.shape}")
    bias = getattr(node, "bias", None)
    # Event-driven like the package's own spiking layers (a graph's layers are fed spikes).
    linear = EventLinear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(torch.as_tensor(_numpy(bias), dtype=torch.float32).reshape(-1))
    return linear


def _io_size(types: dict, name: str, dialect: str) -> int:
    shape = [int(s) for s in _numpy(next(iter(types.values()))).reshape(-1)]
    if dialect == "norse" and len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]  # Norse's to_nir records its sample's batch of 1
    if len(shape) != 1:
        raise ValueError(
            f"node {name!r}: only flat (1-D) inputs and outputs are supported, got shape {shape}"
        )
    return shape[0]


class NIRModule(nn.Module):
    """A feed-forward NIR graph as a time-major module of our layers.

    Layers live in ``layers`` (an ``nn.ModuleDict`` keyed by node name):
    :class:`~spiking_moe.synapses.EventLinear` (an ``nn.Linear``) for ``Affine``/``Linear``, :class:`~spiking_moe.neurons.LIF` for ``LIF``/``IF``,
    :class:`LeakyIntegrator` for ``LI``/``I``; a node with several inputs sums them (NIR's
    rule). ``forward(x)``: ``[T, ..., F]`` -> ``[T, ..., O]`` (one ``Output`` node) or a dict
    of outputs by node name. Energy counting sees ordinary Linear and LIF layers.
    """

    def __init__(self, layers: dict[str, nn.Module], order, inputs, input_name, outputs, meta):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.order = list(order)
        self.inputs = {k: list(v) for k, v in inputs.items()}
        self.input_name = input_name
        self.output_names = list(outputs)
        self.metadata = dict(meta)
        self.in_features = meta["in_features"]
        self.out_features = meta["out_features"]

    def forward(self, x: torch.Tensor):
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"NIR graph input must have {self.in_features} features, got shape {tuple(x.shape)}"
            )
        values = {self.input_name: x}
        for name in self.order:
            total = None
            for source in self.inputs[name]:
                total = values[source] if total is None else total + values[source]
            values[name] = self.layers[name](total) if name in self.layers else total
        if len(self.output_names) == 1:
            return values[self.output_names[0]]
        return {name: values[name] for name in self.output_names}


def _topological(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[str]:
    incoming = {n: 0 for n in nodes}
    for _, target in edges:
        incoming[target] += 1
    ready = [n for n in nodes if incoming[n] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for source, target in edges:
            if source == node:
                incoming[target] -= 1
                if incoming[target] == 0:
                    ready.append(target)
    if len(order) != len(nodes):
        raise ValueError(
            "the graph has a cycle through "
            f"{sorted(n for n in nodes if n not in order)}: recurrent graphs are not supported"
        )
    return order


def import_nir(
    graph: nir.NIRGraph | str | Path, *, dt: float | None = None, dialect: str = "nir"
) -> NIRModule:
    """Build our modules from a NIR graph (or a file written by ``nir.write``).

    Args:
        graph: a flat, feed-forward ``nir.NIRGraph`` of ``Input``, ``Affine``, ``Linear``,
            ``LIF``, ``IF``, ``LI``, ``I`` and ``Output`` nodes, or a path to read.
        dt: the Euler time step the graph's time constants are for; default: the graph's
            ``metadata["dt"]`` (our graphs store it).
        dialect: ``"nir"`` (the NIR definitions) or ``"norse"`` (graphs from Norse 1.1's
            ``to_nir``); module docstring.

    Raises:
        ValueError: another node type (named), a nested graph, a cycle, mismatched shapes
            along an edge (both named), ``v_leak`` or ``v_reset`` not 0, no ``dt``, an unknown
            dialect, an edge to a missing node.
    """
    if isinstance(graph, (str, Path)):
        graph = nir.read(str(graph))
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; valid: {list(DIALECTS)}")
    metadata = dict(getattr(graph, "metadata", None) or {})
    if dt is None:
        if "dt" not in metadata:
            raise ValueError(
                "the graph does not state its time step (metadata['dt']): pass dt= "
                "(snnTorch assumes 1e-4, Norse's from_nir defaults to 1e-3)"
            )
        dt = float(metadata["dt"])
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be > 0, got {dt!r}")
    nodes = dict(graph.nodes)
    for source, target in graph.edges:
        for end in (source, target):
            if end not in nodes:
                raise ValueError(f"edge {source!r} -> {target!r} names a missing node {end!r}")
    for name, node in nodes.items():
        kind = type(node).__name__
        if kind not in _SUPPORTED_NODES:
            raise ValueError(
                f"node {name!r} is a NIR {kind}, which import_nir does not support; "
                f"supported: {list(_SUPPORTED_NODES)}"
            )
    inputs_of = {name: [s for s, t in graph.edges if t == name] for name in nodes}
    order = _topological(list(nodes), graph.edges)
    input_names = [n for n in order if isinstance(nodes[n], nir.Input)]
    output_names = [n for n in order if isinstance(nodes[n], nir.Output)]
    if len(input_names) != 1 or not output_names:
        raise ValueError(
            f"the graph needs one Input and at least one Output node, got inputs {input_names} "
            f"and outputs {output_names}"
        )
    widths = {input_names[0]: _io_size(nodes[input_names[0]].input_type, input_names[0], dialect)}
    layers: dict[str, nn.Module] = {}
    for name in order:
        node = nodes[name]
        if name == input_names[0]:
            continue
        sources = inputs_of[name]
        if not sources:
            raise ValueError(f"node {name!r} has no input edge")
        incoming = {widths[s] for s in sources}
        if len(incoming) > 1:
            raise ValueError(f"node {name!r} sums inputs of different sizes {sorted(incoming)}")
        width = incoming.pop()
        if isinstance(node, (nir.Affine, nir.Linear)):
            layer = _linear_from_node(node)
            if layer.in_features != width:
                raise ValueError(
                    f"edge {sources[0]!r} -> {name!r}: {name!r} takes {layer.in_features} "
                    f"inputs but {sources[0]!r} gives {width}"
                )
            layers[name.replace(".", "_")] = layer
            widths[name] = layer.out_features
            continue
        if isinstance(node, nir.Output):
            out = _io_size(node.output_type, name, dialect)
            if out != width:
                raise ValueError(f"output {name!r} declares {out} features but receives {width}")
            widths[name] = width
            continue
        size = int(np.asarray(_numpy(node.r)).size)
        if size not in (1, width):
            raise ValueError(
                f"edge {sources[0]!r} -> {name!r}: {name!r} has {size} neurons but "
                f"{sources[0]!r} gives {width}"
            )
        if isinstance(node, (nir.LIF, nir.IF)):
            layers[name.replace(".", "_")] = _lif_from_node(name, node, dt, dialect)
        else:
            layers[name.replace(".", "_")] = _integrator_from_node(name, node, dt, dialect)
        widths[name] = width
    meta = {
        **metadata,
        "dt": dt,
        "in_features": widths[input_names[0]],
        "out_features": widths[output_names[0]],
    }
    safe = {n: n.replace(".", "_") for n in order}
    return NIRModule(
        layers,
        [safe[n] for n in order if n != input_names[0]],
        {safe[n]: [safe[s] for s in inputs_of[n]] for n in order},
        safe[input_names[0]],
        [safe[n] for n in output_names],
        meta,
    )


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class PartSummary:
    """What a hardware mapper needs first about one NIR graph.

    Attributes:
        name: the part.
        neurons: spiking (and integrating) neurons.
        synapses: nonzero weights.
        max_fan_in: the largest number of nonzero incoming weights of one unit.
    """

    name: str
    neurons: int
    synapses: int
    max_fan_in: int


def summarize_graph(graph: nir.NIRGraph, name: str = "") -> PartSummary:
    """Neurons, nonzero synapses and the largest fan-in of a graph's layers."""
    neurons = synapses = fan_in = 0
    for node in graph.nodes.values():
        if isinstance(node, (nir.Affine, nir.Linear)):
            nonzero = _numpy(node.weight) != 0
            synapses += int(nonzero.sum())
            fan_in = max(fan_in, int(nonzero.sum(1).max(initial=0)))
        elif isinstance(node, (nir.LIF, nir.IF, nir.LI, nir.I)):
            neurons += int(np.asarray(_numpy(node.r)).size)
    return PartSummary(name, neurons, synapses, fan_in)


# --------------------------------------------------------------------------- bundles


def _lif_settings(lif: LIF) -> dict[str, Any]:
    return {
        "reset": lif.reset,
        "surrogate": lif.surrogate.name,
        "alpha": lif.surrogate.alpha,
        "learn_beta": isinstance(lif.beta, nn.Parameter),
        "learn_threshold": isinstance(lif.threshold, nn.Parameter),
    }


def _model_description(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model``'s structure (values come from files)."""
    if not isinstance(model, (SpikingMoEClassifier, DenseSNNClassifier)):
        raise ValueError(
            f"export_bundle supports SpikingMoEClassifier and DenseSNNClassifier, got "
            f"{type(model).__name__} (a language model's attention and embeddings have no NIR "
            "node; an ANN has no spiking neurons)"
        )
    neuron = model.input_neuron
    kwargs: dict[str, Any] = {
        "in_features": model.in_features,
        "num_classes": model.num_classes,
        "hidden_features": model.input_layer.out_features,
        "num_moe_layers": len(model.layers),
        "readout": model.readout_mode,
        **_lif_settings(neuron),
    }
    first = model.layers[0]
    if isinstance(model, SpikingMoEClassifier):
        router = first.router
        expert = first.experts[0]
        kwargs.update(
            num_experts=first.num_experts,
            k=router.k,
            expert_hidden=expert.hidden_features,
            expert_layers=expert.num_layers,
            router="spiking" if isinstance(router, SpikingRouter) else "rate",
            window=router.window,
            capacity_factor=router.capacity_factor,
            noise=router.noise,
            balance_weight=router.balance_weight,
            z_loss_weight=router.z_loss_weight,
            bias_update_rate=router.bias_update_rate,
            renormalize=router.renormalize,
        )
        if any(len(layer.shared_experts) for layer in model.layers):
            raise ValueError("export_bundle does not support shared experts in a classifier yet")
    else:
        expert = first.expert
        kwargs.update(
            k=1,
            expert_hidden=expert.hidden_features,
            expert_layers=expert.num_layers,
        )
    return {"class": type(model).__name__, "kwargs": kwargs}


def _parts(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(part name, module, input width)`` for every NIR graph of a bundle."""
    hidden = model.input_layer.out_features
    parts: list[tuple[str, nn.Module, int]] = [
        ("input", nn.Sequential(model.input_layer, model.input_neuron), model.in_features)
    ]
    for l, layer in enumerate(model.layers):
        if isinstance(layer, SpikingMoE):
            router = layer.router
            proj = (
                nn.Sequential(router.proj, router.neuron)
                if isinstance(router, SpikingRouter)
                else router.proj
            )
            parts.append((f"layers.{l}.router", proj, hidden))
            for e, expert in enumerate(layer.experts):
                parts.append((f"layers.{l}.experts.{e}", expert, hidden))
            parts.append((f"layers.{l}.neuron", layer.neuron, hidden))
        else:
            parts.append((f"layers.{l}.expert", layer.expert, hidden))
            parts.append((f"layers.{l}.neuron", layer.neuron, hidden))
    parts.append(("readout", model.readout, hidden))
    return parts


def export_bundle(
    model: nn.Module, folder: str | Path, *, dt: float = DEFAULT_DT
) -> list[PartSummary]:
    """Write a deployment bundle: one NIR file per part and ``manifest.json``.

    Parts: ``input`` (input layer and neuron), per layer ``l``: ``layers.<l>.router`` (the
    router's projection, applied to each routing window's input rates; with its LIF for a
    spiking router), ``layers.<l>.experts.<e>`` (spikes in, current out),
    ``layers.<l>.neuron`` (the output LIF on the gated sum of expert currents); a dense
    classifier has ``layers.<l>.expert`` instead of router and experts; ``readout`` (current
    out; the membrane readout's integrator is in the manifest's ``decode``). Subtractive
    resets are written as zero resets with the true reset in metadata (module docstring).

    Returns:
        a :class:`PartSummary` per part (neurons, synapses, largest fan-in).

    Raises:
        ValueError: an unsupported model (an ANN, a language model), shared experts, an
            expert-parallel model.
        FileExistsError: ``folder`` exists and is not empty.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose another folder")
    if is_expert_parallel(model):
        raise ValueError(
            "this model is expert-parallel (each process holds some experts): gather its "
            "checkpoint into a single-process one first (spiking-moe-gather), then export that"
        )
    description = _model_description(model)
    # Written into a sibling folder and renamed at the end, so a failed export leaves nothing
    # that looks like a bundle.
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts, summaries = [], []
    for name, module, width in _parts(model):
        features = width if isinstance(module, LIF) else None
        graph = export_nir(module, dt=dt, features=features, subtract_reset="zero")
        graph.metadata["part"] = name
        file = f"{name}.nir"
        nir.write(str(staging / file), graph)
        summary = summarize_graph(graph, name)
        summaries.append(summary)
        parts.append({"name": name, "file": file, "in_features": width, **_counts(summary)})
    routing = []
    for layer in model.layers:
        if not isinstance(layer, SpikingMoE):
            continue
        router = layer.router
        routing.append(
            {
                "router": "spiking" if isinstance(router, SpikingRouter) else "rate",
                "num_experts": router.num_experts,
                "k": router.k,
                "gain": getattr(router, "gain", None),
                "window": router.window,
                "capacity_factor": router.capacity_factor,
                "renormalize": router.renormalize,
                "expert_bias": router.expert_bias.detach().cpu().tolist(),
                "noise": router.noise,
                "rule": _ROUTING_RULE,
            }
        )
    readout_beta = model.input_neuron.beta.detach().clamp(0, 1)
    readout_beta = readout_beta.item() if readout_beta.dim() == 0 else readout_beta.tolist()
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": description,
        "dt": dt,
        "parts": parts,
        "routing": routing,
        "connections": _CONNECTIONS,
        "decode": {
            "readout": model.readout_mode,
            "beta": readout_beta,
            "rule": _DECODE_RULE,
        },
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if folder.exists():
        folder.rmdir()  # empty (checked above)
    staging.rename(folder)
    return summaries


def _counts(summary: PartSummary) -> dict[str, int]:
    return {
        "neurons": summary.neurons,
        "synapses": summary.synapses,
        "max_fan_in": summary.max_fan_in,
    }


_ROUTING_RULE = (
    "rates r = mean over the routing window of the layer's input spikes (window None: all "
    "T steps; window L: window w is routed by the rates of window w - 1, window 0 by zero "
    "rates); logits z = router part(r) (spiking router: gain * spike count / L of its LIF "
    "population driven by the projection of the spikes); p = softmax(z); the experts are "
    "the top-k of z + expert_bias (ties to the lower id); gate = p (renormalized over the "
    "chosen k when renormalize); capacity: at most ceil(capacity_factor * N * k / E) "
    "assignments per expert and window, largest gate first; noise only in training"
)
_CONNECTIONS = (
    "input -> for each layer l: [layers.l.experts.e on the tokens routed to e, their "
    "currents times the gates, summed] -> layers.l.neuron -> next layer (a dense layer: "
    "layers.l.expert -> layers.l.neuron) -> readout"
)
_DECODE_RULE = (
    "count: logits = mean over T of the readout current; membrane: the readout current drives "
    "v_t = beta v_(t-1) + I_t and logits = mean over T of v"
)


def _check_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no bundle manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path} has no integer format_version")
    if version > BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{path} is bundle format {version}, newer than this spiking_moe reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade spiking_moe"
        )
    for part in manifest.get("parts", []):
        if not (folder / part["file"]).is_file():
            raise FileNotFoundError(
                f"the manifest names part {part['name']!r} in {folder / part['file']}, "
                "which is missing"
            )
    return manifest


def _copy_into(target: nn.Module, source: NIRModule, part: str) -> None:
    """Copy the imported part's layers into the matching layers of ``target``, in order."""
    wanted = [m for m in target.modules() if isinstance(m, (nn.Linear, LIF))]
    given = [source.layers[name] for name in source.order if name in source.layers]
    kinds_wanted, kinds_given = _kinds(wanted), _kinds(given)
    if kinds_wanted != kinds_given:
        raise ValueError(
            f"part {part!r}: the file has layers {kinds_given}, the model needs {kinds_wanted}"
        )
    with torch.no_grad():
        for dst, src in zip(wanted, given, strict=True):
            if isinstance(dst, nn.Linear):
                if dst.weight.shape != src.weight.shape:
                    raise ValueError(
                        f"part {part!r}: weight of shape {tuple(src.weight.shape)}, the model "
                        f"needs {tuple(dst.weight.shape)}"
                    )
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias)
            else:
                _assign(dst, "beta", src.beta)
                _assign(dst, "threshold", src.threshold)
                if dst.reset != src.reset:
                    raise ValueError(
                        f"part {part!r}: reset {src.reset!r} in the file, {dst.reset!r} in "
                        "the manifest's model"
                    )


def _kinds(layers) -> list[str]:
    return ["Linear" if isinstance(m, nn.Linear) else type(m).__name__ for m in layers]


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a LIF's ``beta``/``threshold`` (a buffer or a parameter; a per-neuron value may
    replace a scalar) by ``value``."""
    current = getattr(module, name)
    value = value.detach().to(current.dtype).clone()
    setattr(module, name, nn.Parameter(value) if isinstance(current, nn.Parameter) else value)


def load_bundle(folder: str | Path) -> nn.Module:
    """Rebuild the model of a bundle from its NIR files and manifest (eval mode).

    The model's class and sizes come from the manifest; every weight, bias, ``beta`` and
    threshold from the NIR files (our exact values in the neuron nodes' metadata); the
    routing settings and balancing bias from the manifest.

    Raises:
        FileNotFoundError: no manifest, or a part file it names is missing (named).
        ValueError: a newer bundle format, a part that does not fit the model (named).
    """
    folder = Path(folder)
    manifest = _check_manifest(folder)
    description = manifest["model"]
    classes = {
        "SpikingMoEClassifier": SpikingMoEClassifier,
        "DenseSNNClassifier": DenseSNNClassifier,
    }
    if description["class"] not in classes:
        raise ValueError(f"unknown model class {description['class']!r} in the manifest")
    model = classes[description["class"]](**description["kwargs"])
    modules = dict(_module_parts(model))
    for part in manifest["parts"]:
        if part["name"] not in modules:
            raise ValueError(f"the manifest names part {part['name']!r}, which the model lacks")
        imported = import_nir(folder / part["file"], dt=manifest["dt"])
        _copy_into(modules.pop(part["name"]), imported, part["name"])
    if modules:
        raise ValueError(f"the bundle has no file for parts {sorted(modules)}")
    layers = [layer for layer in model.layers if isinstance(layer, SpikingMoE)]
    if len(layers) != len(manifest["routing"]):
        raise ValueError(
            f"the manifest routes {len(manifest['routing'])} layers, the model has {len(layers)}"
        )
    for layer, rule in zip(layers, manifest["routing"], strict=True):
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.tensor(rule["expert_bias"]))
        if rule.get("gain") is not None:
            layer.router.gain = float(rule["gain"])
    return model.eval()


def _module_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module, _ in _parts(model)]
