"""Import NIR graphs as modules of our layers (:func:`import_nir`), in two dialects.

The parameter mapping and the dialects (``"nir"``, ``"norse"``) are in the package docstring
(:mod:`spiking_moe.nir`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import nir
import numpy as np
import torch
from torch import nn

from ..neurons import LIF
from ..synapses import EventLinear
from .export import _META

__all__ = ["DIALECTS", "LeakyIntegrator", "NIRModule", "import_nir"]

logger = logging.getLogger(__name__)

#: ``dialect`` values of :func:`import_nir`: the NIR definitions (``"nir"``) or graphs written by
#: Norse 1.1's ``to_nir`` (``"norse"``).
DIALECTS = ("nir", "norse")
_SUPPORTED_NODES = ("Input", "Output", "Affine", "Linear", "LIF", "IF", "LI", "I")


class LeakyIntegrator(nn.Module):
    """Non-firing integrator ``v_t = beta v_{t-1} + gain I_t`` (NIR's ``LI`` and ``I``);
    the output is the membrane ``[T, ..., U]``.

    ``forward(current_T)`` takes the input current ``[T, ..., U]``, starts from ``v = 0`` and
    returns every step's membrane ``[T, ..., U]``.

    Args:
        beta: the decay per step, a scalar or one per neuron ``[U]`` (1: no leak, NIR's
            ``I``); stored as a float32 buffer.
        gain: the input gain ``R dt / tau`` of the forward-Euler mapping (package docstring),
            a scalar or ``[U]``; stored as a float32 buffer.
    """

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


def _euler(
    name: str, node, r: np.ndarray, dt: float, dialect: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(beta, gain, tau)`` of a neuron or integrator node under forward Euler (package
    docstring); a non-leaky node (``IF``, ``I``) has ``beta = 1`` and ``tau = inf``."""
    if isinstance(node, (nir.IF, nir.I)):
        gain = np.ones_like(r) if dialect == "norse" else r * dt
        return np.ones_like(r), gain, np.full_like(r, np.inf)
    leak = _numpy(node.v_leak).reshape(-1)
    if not np.allclose(leak, 0):
        raise ValueError(
            f"node {name!r}: v_leak must be 0 (our neurons leak to zero), got {leak.tolist()}"
        )
    tau = _numpy(node.tau).reshape(-1)
    if dialect == "norse":
        tau = tau / dt  # Norse 1.1's to_nir writes tau * dt
    return 1 - dt / tau, r * dt / tau, tau


def _lif_from_node(name: str, node, dt: float, dialect: str) -> LIF:
    threshold = _numpy(node.v_threshold).reshape(-1)
    r = _numpy(node.r).reshape(-1)
    reset = _numpy(node.v_reset).reshape(-1) if node.v_reset is not None else np.zeros(1)
    if not np.allclose(reset, 0):
        raise ValueError(
            f"node {name!r}: v_reset must be 0 (our neurons reset to zero), got {reset.tolist()}"
        )
    beta, gain, tau = _euler(name, node, r, dt, dialect)
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
    beta, gain, _ = _euler(name, node, _numpy(node.r).reshape(-1), dt, dialect)
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

    Built by :func:`import_nir`; node names have their dots replaced by ``_`` (module names
    cannot hold dots).

    Args:
        layers: node name -> our layer, for the nodes that compute (not ``Input`` or
            ``Output``).
        order: the node names to evaluate, in topological order, without the input node.
        inputs: node name -> the names of the nodes feeding it (summed when several).
        input_name: the ``Input`` node's name.
        outputs: the ``Output`` nodes' names; one gives a tensor, several a dict.
        meta: the graph's metadata plus ``dt``, ``in_features`` (``F``) and
            ``out_features`` (``O``, of the first output); kept as ``metadata``.
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

    Returns:
        A :class:`NIRModule` mapping ``[T, ..., F]`` to ``[T, ..., O]``: an
        :class:`~spiking_moe.synapses.EventLinear` per ``Affine``/``Linear`` node, a
        :class:`~spiking_moe.neurons.LIF` per ``LIF``/``IF`` node, a :class:`LeakyIntegrator`
        per ``LI``/``I`` node; ``metadata`` holds the graph's metadata with the ``dt`` used.

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
    # Module names cannot hold dots; two node names that differ only there ("a.b", "a_b")
    # would silently share one module.
    safe = {n: n.replace(".", "_") for n in order}
    by_safe: dict[str, list[str]] = {}
    for node_name, safe_name in safe.items():
        by_safe.setdefault(safe_name, []).append(node_name)
    clashes = [names for names in by_safe.values() if len(names) > 1]
    if clashes:
        raise ValueError(
            f"nodes {clashes[0]} map to the same module name {safe[clashes[0][0]]!r} "
            "(dots become underscores): rename one of them in the graph"
        )
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
            layers[safe[name]] = layer
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
            layers[safe[name]] = _lif_from_node(name, node, dt, dialect)
        else:
            layers[safe[name]] = _integrator_from_node(name, node, dt, dialect)
        widths[name] = width
    meta = {
        **metadata,
        "dt": dt,
        "in_features": widths[input_names[0]],
        "out_features": widths[output_names[0]],
    }
    return NIRModule(
        layers,
        [safe[n] for n in order if n != input_names[0]],
        {safe[n]: [safe[s] for s in inputs_of[n]] for n in order},
        safe[input_names[0]],
        [safe[n] for n in output_names],
        meta,
    )
