"""Build the classifier that a :class:`~spiking_moe.config.ModelConfig` describes.

Every model takes ``x`` ``[T, B, F]`` and returns a
:class:`~spiking_moe.models.ClassifierOutput` (logits, aux loss, routing), the contract
:class:`~spiking_moe.training.Trainer` relies on.

=============  ===========================================================================
``kind``       model
=============  ===========================================================================
``moe``        :class:`~spiking_moe.models.SpikingMoEClassifier`
``dense_snn``  :class:`~spiking_moe.models.DenseSNNClassifier`: same active parameters
``ann``        :class:`~spiking_moe.models.ANNClassifier`: same layers, ReLU, one step
               (with the MoE's routing when ``num_experts > 1``, else the dense ANN)
=============  ===========================================================================
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .models import ANNClassifier, DenseSNNClassifier, SpikingMoEClassifier

__all__ = ["build_model"]


def _neuron_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        beta=cfg.beta,
        threshold=cfg.threshold,
        reset=cfg.reset,
        surrogate=cfg.surrogate,
        alpha=cfg.alpha,
    )


def _routing_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        capacity_factor=cfg.capacity_factor,
        noise=cfg.router_noise,
        balance_weight=cfg.load_balancing_weight,
        z_loss_weight=cfg.z_loss_weight,
        bias_update_rate=cfg.bias_balancing,
    )


def _shape_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        hidden_features=cfg.hidden_features,
        k=cfg.k,
        num_moe_layers=cfg.num_moe_layers,
        expert_hidden=cfg.expert_hidden,
        expert_layers=cfg.expert_layers,
    )


def build_model(
    config: ModelConfig, *, in_features: int, num_classes: int, num_steps: int
) -> nn.Module:
    """The model of kind ``config.kind`` for inputs ``[num_steps, B, in_features]``."""
    if config.kind == "moe":
        return SpikingMoEClassifier(
            in_features,
            num_classes,
            num_experts=config.num_experts,
            readout=config.readout,
            router=config.router,
            window=config.router_window or None,
            **_shape_kwargs(config),
            **_routing_kwargs(config),
            **_neuron_kwargs(config),
        )
    if config.kind == "dense_snn":
        return DenseSNNClassifier(
            in_features,
            num_classes,
            readout=config.readout,
            **_shape_kwargs(config),
            **_neuron_kwargs(config),
        )
    if config.kind == "ann":
        return ANNClassifier(
            in_features,
            num_classes,
            num_experts=config.num_experts if config.num_experts > 1 else None,
            **_shape_kwargs(config),
            **_routing_kwargs(config),
        )
    raise ValueError(f"unknown model.kind {config.kind!r}; valid: ['moe', 'dense_snn', 'ann']")
