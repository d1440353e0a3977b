"""Build the model that a :class:`~spiking_moe.config.ModelConfig` describes.

A config's ``[model]`` table is the model's :class:`~spiking_moe.args.ModelArgs` (plus
``kind``), so the model is built from it as it is, and the three kinds of a comparison are
twins of the same args. Every model returns a :class:`~spiking_moe.models.ModelOutput`
(logits, aux loss, routing, activity), the contract :class:`~spiking_moe.training.Trainer`
relies on.

=============  =========================================  =========================================
``kind``       classifier (``[T, B, F]`` -> ``[B, V]``)   language model (text: ``[B, S]`` ids)
=============  =========================================  =========================================
``moe``        :class:`~spiking_moe.models.               :class:`~spiking_moe.transformer.
               SpikingMoEClassifier`                      SpikingMoELM`
``dense_snn``  :class:`~spiking_moe.models.               :class:`~spiking_moe.transformer.
               DenseSNNClassifier` (same active           DenseSNNLM`
               parameters)
``ann``        :class:`~spiking_moe.models.               :class:`~spiking_moe.transformer.
               ANNClassifier` (same layers, ReLU, one     ANNTransformerLM`
               step; routed when ``moe.num_experts > 1``)
=============  =========================================  =========================================
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .models import ANNClassifier, DenseSNNClassifier, SpikingMoEClassifier
from .transformer import ANNTransformerLM, DenseSNNLM, SpikingMoELM

__all__ = ["build_model"]

_CLASSIFIERS = {"moe": SpikingMoEClassifier, "dense_snn": DenseSNNClassifier, "ann": ANNClassifier}
_LANGUAGE_MODELS = {"moe": SpikingMoELM, "dense_snn": DenseSNNLM, "ann": ANNTransformerLM}


def build_model(
    config: ModelConfig,
    *,
    in_features: int,
    num_classes: int,
    num_steps: int,
    context: int = 0,
) -> nn.Module:
    """The model of kind ``config.kind`` for inputs ``[num_steps, B, in_features]``, or, with
    ``context > 0``, the language model over a vocabulary of ``num_classes`` tokens.

    Example:
        >>> from spiking_moe.config import ModelConfig
        >>> config = ModelConfig.from_dict({"kind": "dense_snn", "hidden_features": 16})
        >>> type(build_model(config, in_features=8, num_classes=2, num_steps=4)).__name__
        'DenseSNNClassifier'
    """
    if not context:
        return _CLASSIFIERS[config.kind](in_features, num_classes, args=config)
    sizes = (config.hidden_features, config.num_layers, config.attention.num_heads, context)
    return _LANGUAGE_MODELS[config.kind](num_classes, *sizes, args=config, num_steps=num_steps)
