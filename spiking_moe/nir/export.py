"""Export our feed-forward spiking layers as NIR graphs (:func:`export_nir`).

The parameter mapping, the reset rules and the time step are in the package docstring
(:mod:`spiking_moe.nir`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nir
import numpy as np
import torch
from torch import nn

from ..experts import _FeedForwardExpert
from ..models import DenseSNNClassifier, SpikingMoEClassifier
from ..moe import DenseFFN, SpikingMoE
from ..neurons import LIF, MultiSpike

__all__ = ["DEFAULT_DT", "SUBTRACT_RESETS", "export_nir"]

#: snnTorch 1.0's ``import_from_nir`` hard-codes this time step.
DEFAULT_DT = 1e-4
#: ``subtract_reset`` values of :func:`export_nir`: ``"error"`` refuses a ``reset="subtract"`` LIF
#: (NIR has none); ``"zero"`` writes a reset to zero and keeps the true one in the node's metadata.
SUBTRACT_RESETS = ("error", "zero")
#: The key of a node's metadata that holds our exact parameters (read back by the importer).
_META = "spiking_moe"


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
    beta_U, threshold_U = _array(beta, size), _array(threshold, size)
    metadata = {
        _META: {
            "beta": beta_U.astype(np.float32),
            "threshold": threshold_U.astype(np.float32),
            "reset": lif.reset,
        }
    }
    zeros = np.zeros(size)
    if (beta_U == 1).all():
        return nir.IF(
            r=np.full(size, 1 / dt), v_threshold=threshold_U, v_reset=zeros, metadata=metadata
        )
    if (beta_U == 1).any():
        raise ValueError(
            f"LIF {name!r} mixes beta = 1 (NIR's IF) with beta < 1 (NIR's LIF) in one layer; "
            "NIR has one neuron type per node"
        )
    tau = dt / (1 - beta_U)
    r = np.ones(size) if unit_resistance else tau / dt
    v_threshold = threshold_U * (1 - beta_U) if unit_resistance else threshold_U
    return nir.LIF(
        tau=tau, r=r, v_leak=zeros, v_threshold=v_threshold, v_reset=zeros, metadata=metadata
    )


def _integrator_node(beta: torch.Tensor, size: int, dt: float, unit_resistance: bool):
    beta_U = _array(beta.detach().clamp(0, 1), size)
    metadata = {_META: {"beta": beta_U.astype(np.float32)}}
    if (beta_U == 1).all():
        return nir.I(r=np.full(size, 1 / dt), metadata=metadata)
    tau = dt / (1 - beta_U)
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
        elif isinstance(module, MultiSpike):
            raise ValueError(
                f"{name or 'module'!r} is a multi-level spiking neuron (neuron kind 'multi', "
                f"counts up to {module.args.levels} per step), which NIR has no node for: export "
                "refuses it rather than write a binary neuron that would fire differently"
            )
        elif isinstance(module, _FeedForwardExpert):
            self.module(module.net, _join(name, "net"))
        elif isinstance(module, DenseFFN):
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
