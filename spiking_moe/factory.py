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

With ``context > 0`` (the text data) the same kinds build language models
(:mod:`spiking_moe.transformer`) on token ids ``[B, S]``, returning
:class:`~spiking_moe.transformer.LMOutput` (logits ``[B, S, V]``):
:class:`~spiking_moe.transformer.SpikingMoELM`, :class:`~spiking_moe.transformer.DenseSNNLM`
(FFN width ``k * expert_hidden + shared_experts * shared_hidden``: the same active
parameters) and :class:`~spiking_moe.transformer.ANNTransformerLM` (routed when
``num_experts > 1``, else dense with that FFN width).
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError, ModelConfig
from .models import ANNClassifier, DenseSNNClassifier, SpikingMoEClassifier
from .transformer import ANNTransformerLM, DenseSNNLM, SpikingMoELM

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
        renormalize=cfg.router_renormalize,
    )


def _shape_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        hidden_features=cfg.hidden_features,
        k=cfg.k,
        num_moe_layers=cfg.num_moe_layers,
        expert_hidden=cfg.expert_hidden,
        expert_layers=cfg.expert_layers,
    )


def _build_lm(config: ModelConfig, vocab_size: int, num_steps: int, context: int) -> nn.Module:
    if config.hidden_features % config.num_heads:
        raise ConfigError(
            f"model.hidden_features (d_model, {config.hidden_features}) must be divisible by "
            f"model.num_heads ({config.num_heads})"
        )
    if config.router_window:
        raise ConfigError(
            "model.router_window must be 0 for language models (routing is per position)"
        )
    shared_hidden = config.shared_hidden or config.expert_hidden
    ffn_hidden = config.k * config.expert_hidden + config.shared_experts * shared_hidden
    sizes = (vocab_size, config.hidden_features, config.num_moe_layers, config.num_heads, context)
    if config.kind == "moe":
        return SpikingMoELM(
            *sizes,
            num_experts=config.num_experts,
            k=config.k,
            expert_hidden=config.expert_hidden,
            shared_experts=config.shared_experts,
            shared_hidden=shared_hidden,
            num_steps=num_steps,
            readout=config.readout,
            router=config.router,
            **_routing_kwargs(config),
            **_neuron_kwargs(config),
        )
    if config.kind == "dense_snn":
        return DenseSNNLM(
            *sizes,
            ffn_hidden=ffn_hidden,
            num_steps=num_steps,
            readout=config.readout,
            **_neuron_kwargs(config),
        )
    routed = config.num_experts > 1
    return ANNTransformerLM(
        *sizes,
        ffn_hidden=ffn_hidden,
        num_experts=config.num_experts if routed else None,
        k=config.k,
        expert_hidden=config.expert_hidden,
        shared_experts=config.shared_experts,
        shared_hidden=shared_hidden,
        **_routing_kwargs(config),
    )


def build_model(
    config: ModelConfig,
    *,
    in_features: int,
    num_classes: int,
    num_steps: int,
    context: int = 0,
) -> nn.Module:
    """The model of kind ``config.kind`` for inputs ``[num_steps, B, in_features]``, or, with
    ``context > 0``, the language model over a vocabulary of ``num_classes`` tokens."""
    if context:
        return _build_lm(config, num_classes, num_steps, context)
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
