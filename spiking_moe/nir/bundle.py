"""MoE deployment bundles (:func:`export_bundle`, :func:`load_bundle`): one NIR graph per part
plus ``manifest.json`` (format :data:`BUNDLE_FORMAT_VERSION`) with the routing rule NIR cannot
express and how the parts connect; and :func:`summarize_graph`, the counts a hardware mapper
needs first about one graph.

The parts are listed in :func:`export_bundle`, which also writes the manifest; the parameter
mapping of each part's graph is in the package docstring (:mod:`spiking_moe.nir`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch
from torch import nn

from ..args import ModelArgs
from ..models import DenseSNNClassifier, SpikingMoEClassifier
from ..moe import SpikingMoE
from ..neurons import LIF, MultiSpike
from ..parallel import is_expert_parallel
from ..router import SpikingRouter
from .export import DEFAULT_DT, export_nir
from .importer import NIRModule, _numpy, import_nir

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "PartSummary",
    "export_bundle",
    "load_bundle",
    "summarize_graph",
]

#: 2: the model is its class, sizes and ModelArgs as written (1 listed constructor keywords).
BUNDLE_FORMAT_VERSION = 2
#: File name of a bundle's manifest, next to its parts' NIR graphs: written by
#: :func:`export_bundle`, read by :func:`load_bundle`.
MANIFEST_NAME = "manifest.json"


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
    """Neurons, nonzero synapses and the largest fan-in of a graph's layers.

    Args:
        graph: a NIR graph; its ``Affine``/``Linear`` nodes count as synapses and its
            ``LIF``/``IF``/``LI``/``I`` nodes as neurons (one per entry of ``r``; with a scalar
            ``r`` shared by the population, as many as the weights feeding it have outputs),
            other nodes are ignored.
        name: the label the summary carries (a bundle's part name).

    Returns:
        A :class:`PartSummary`: ``neurons`` summed over the neuron nodes, ``synapses``
        (nonzero weights) over the weight nodes, and ``max_fan_in``, the largest number of
        nonzero weights into one output unit of any weight node.
    """
    neurons = synapses = fan_in = 0
    for node_name, node in graph.nodes.items():
        if isinstance(node, (nir.Affine, nir.Linear)):
            nonzero = _numpy(node.weight) != 0
            synapses += int(nonzero.sum())
            fan_in = max(fan_in, int(nonzero.sum(1).max(initial=0)))
        elif isinstance(node, (nir.LIF, nir.IF, nir.LI, nir.I)):
            neurons += _population_size(graph, node_name, node)
    return PartSummary(name, neurons, synapses, fan_in)


def _population_size(graph: nir.NIRGraph, name: str, node: nir.NIRNode) -> int:
    """Neurons of a neuron node: the size of its per-neuron parameters, or, where a graph
    gives them as scalars shared by the population, the width of the weights feeding it."""
    size = int(np.asarray(_numpy(node.r)).size)
    if size > 1:
        return size
    widths = [
        _numpy(graph.nodes[source].weight).shape[0]
        for source, target in graph.edges
        if target == name and isinstance(graph.nodes[source], (nir.Affine, nir.Linear))
    ]
    return max(widths, default=size)


_CLASSES = {cls.__name__: cls for cls in (SpikingMoEClassifier, DenseSNNClassifier)}


def _model_description(model: nn.Module) -> dict[str, Any]:
    """The class, sizes and :class:`~spiking_moe.args.ModelArgs` that rebuild ``model``'s
    structure (its values come from the NIR files)."""
    if type(model).__name__ not in _CLASSES:
        raise ValueError(
            f"export_bundle supports SpikingMoEClassifier and DenseSNNClassifier, got "
            f"{type(model).__name__} (a language model's attention and embeddings have no NIR "
            "node; an ANN has no spiking neurons)"
        )
    if isinstance(model, SpikingMoEClassifier) and model.args.moe.shared_experts:
        raise ValueError("export_bundle does not support shared experts in a classifier yet")
    return {
        "class": type(model).__name__,
        "in_features": model.in_features,
        "num_classes": model.num_classes,
        "args": model.args.to_dict(),
    }


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

    Args:
        model: a :class:`~spiking_moe.models.SpikingMoEClassifier` or
            :class:`~spiking_moe.models.DenseSNNClassifier` on one process.
        folder: where to write; created (with its parents) if missing, and it must be
            empty. The files are written to a sibling ``.<folder>.partial`` first and
            renamed at the end.
        dt: the time step the graphs' time constants are written for (seconds, > 0;
            package docstring), stored in the manifest and in each graph.

    Returns:
        A :class:`PartSummary` per part, in the order above (neurons, synapses, largest
        fan-in); the manifest lists the same counts.

    Raises:
        ValueError: an unsupported model (an ANN, a language model), shared experts, an
            expert-parallel model, multi-level spiking neurons, a bad ``dt``.
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
    multi = [name for name, m in model.named_modules() if isinstance(m, MultiSpike)]
    if multi:
        raise ValueError(
            f"{multi[0]!r} (and {len(multi) - 1} more) are multi-level spiking neurons (neuron "
            "kind 'multi'), which NIR has no node for: export_bundle refuses the model"
        )
    description = _model_description(model)
    # Written into a sibling folder and renamed at the end, so a failed export leaves nothing
    # that looks like a bundle.
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        summaries = _write_bundle(model, staging, dt, description)
    except BaseException:
        # Nothing half-written stays behind (a bad dt, an unexportable part, an interrupt).
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        folder.rmdir()  # empty (checked above)
    staging.rename(folder)
    return summaries


def _write_bundle(model, staging: Path, dt: float, description: dict) -> list[PartSummary]:
    """Write every part's graph and the manifest into ``staging``; the parts' summaries."""
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
    # The routing settings are the model's args (manifest "model"); what training changed is
    # each layer's balancing bias.
    routing = [
        {"expert_bias": layer.router.expert_bias.detach().cpu().tolist(), "rule": _ROUTING_RULE}
        for layer in model.layers
        if isinstance(layer, SpikingMoE)
    ]
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
            "readout": model.args.readout,
            "beta": readout_beta,
            "rule": _DECODE_RULE,
        },
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
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
    if version != BUNDLE_FORMAT_VERSION:
        advice = "upgrade spiking_moe" if version > BUNDLE_FORMAT_VERSION else "export it again"
        raise ValueError(
            f"{path} is bundle format {version}; this spiking_moe reads format "
            f"{BUNDLE_FORMAT_VERSION}: {advice}"
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

    The model's class, sizes and :class:`~spiking_moe.args.ModelArgs` come from the manifest;
    every weight, bias, ``beta`` and threshold from the NIR files (our exact values in the
    neuron nodes' metadata); each router's balancing bias from the manifest.

    Args:
        folder: a bundle written by :func:`export_bundle` (``manifest.json`` and the part
            files it names).

    Returns:
        The rebuilt :class:`~spiking_moe.models.SpikingMoEClassifier` or
        :class:`~spiking_moe.models.DenseSNNClassifier`, in eval mode, whose outputs equal
        the exported model's.

    Raises:
        FileNotFoundError: no manifest, or a part file it names is missing (named).
        ValueError: a newer bundle format, a part that does not fit the model (named).
    """
    folder = Path(folder)
    manifest = _check_manifest(folder)
    description = manifest["model"]
    if description["class"] not in _CLASSES:
        raise ValueError(f"unknown model class {description['class']!r} in the manifest")
    args = ModelArgs.from_dict(description["args"])
    model = _CLASSES[description["class"]](
        description["in_features"], description["num_classes"], args=args
    )
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
    return model.eval()


def _module_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module, _ in _parts(model)]
