"""Build the classifier that a :class:`~spiking_moe.config.ModelConfig` describes.

Every model takes ``x`` ``[T, B, F]`` and returns logits ``[B, C]`` or an object with
``.logits`` and ``.aux_loss`` (the contract :class:`~spiking_moe.training.Trainer` relies on).

Letters: T time steps, B batch, F input features, H hidden units, C classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .neurons import LIF

__all__ = ["MODEL_BUILDERS", "build_model"]


class _DenseSNN(nn.Module):
    """Stand-in until ``spiking_moe.models.DenseSNNClassifier`` lands: Linear -> LIF stacks.

    Readout "membrane": mean over T of the last Linear's current; "rate": mean over T of a
    spiking output layer (logits = spike rates scaled by 10 so softmax can be confident).
    """

    def __init__(self, config: ModelConfig, in_features: int, num_classes: int):
        super().__init__()
        neuron = dict(
            beta=config.beta,
            threshold=config.threshold,
            reset=config.reset,
            surrogate=config.surrogate,
            alpha=config.alpha,
        )
        widths = [in_features, config.hidden_features] + [
            config.expert_hidden
        ] * config.expert_layers
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.neurons = nn.ModuleList(LIF(**neuron) for _ in self.layers)
        self.readout = nn.Linear(widths[-1], num_classes)
        self.readout_neuron = LIF(**neuron) if config.readout == "rate" else None

    def forward(self, x_TBF: torch.Tensor) -> torch.Tensor:
        h = x_TBF
        for layer, neuron in zip(self.layers, self.neurons, strict=True):
            h = neuron(layer(h))
        current_TBC = self.readout(h)
        if self.readout_neuron is None:
            return current_TBC.mean(0)
        return 10.0 * self.readout_neuron(current_TBC).mean(0)


class _ANN(nn.Module):
    """Stand-in until ``spiking_moe.models.ANNClassifier`` lands: the same widths, ReLU, mean over T."""

    def __init__(self, config: ModelConfig, in_features: int, num_classes: int):
        super().__init__()
        widths = [in_features, config.hidden_features] + [
            config.expert_hidden
        ] * config.expert_layers
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))

    def forward(self, x_TBF: torch.Tensor) -> torch.Tensor:
        return self.net(x_TBF.mean(0) if x_TBF.dim() == 3 else x_TBF)


#: kind -> builder(config, in_features, num_classes, num_steps). "moe" arrives with
#: ``spiking_moe.models``; register it here.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dense_snn": lambda cfg, f, c, t: _DenseSNN(cfg, f, c),
    "ann": lambda cfg, f, c, t: _ANN(cfg, f, c),
}


def build_model(
    config: ModelConfig, *, in_features: int, num_classes: int, num_steps: int
) -> nn.Module:
    """The model of kind ``config.kind`` for inputs ``[num_steps, B, in_features]``."""
    if config.kind not in MODEL_BUILDERS:
        raise NotImplementedError(
            f"model.kind {config.kind!r} has no builder yet; available: {sorted(MODEL_BUILDERS)}"
        )
    return MODEL_BUILDERS[config.kind](config, in_features, num_classes, num_steps)
