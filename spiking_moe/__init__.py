"""spiking-moe: spiking mixture-of-experts with rate-coded routing and honest energy accounting.

Tensors are time-major (``[T, B, ...]``). A name carries its tensor's shape as a suffix of
letters (``x_TBD``, ``ids_XK``); the letters mean one thing across the package (the one
legend: modules do not define their own):

=====  ======================================================================================
``T``  time steps
``B``  batch (samples)
``S``  sequence positions
``N``  tokens: the ``B`` samples, or the ``B S`` positions of a sequence
``W``  routing windows
``L``  window length (steps)
``X``  routed rows, one per (window, token): ``W N``
``E``  experts
``K``  experts each token is routed to
``A``  assignments, ``X K``
``R``  rows: a MoE layer's dispatched rows (its kept assignments), or a synaptic layer's
       input rows (all leading dimensions folded)
``Z``  nonzero entries of an input
``P``  expert-parallel processes
``D``  model width: the features a MoE layer or a block reads and writes (a classifier's
       hidden width, a language model's ``d_model``)
``F``  input features (of a model's data, or of the rows a helper takes)
``I``  a synaptic layer's input features
``O``  output features
``U``  neurons of one population (hidden units)
``G``  neuron populations
``H``  attention heads
``C``  width of one attention head
``V``  classes, or a language model's vocabulary
=====  ======================================================================================

A ``1`` is a dimension of size one (``x_1BD``: one time step).
"""

import logging

from . import config, data, encoding, functional, training
from .activity import Activity
from .args import (
    AttentionArgs,
    BlockArgs,
    ConfigError,
    ExpertArgs,
    ModelArgs,
    MoEArgs,
    NeuronArgs,
    RouterArgs,
)
from .attention import AttentionOutput, MatMul, SoftmaxAttention, SpikingSelfAttention
from .config import ExperimentConfig, load_config
from .dispatch import (
    DispatchPlan,
    ExpertsOutput,
    combine,
    dense_masked,
    dispatch,
    run_experts,
    run_experts_with_activity,
)
from .experts import ExpertOutput, MLPExpert, SpikingExpert
from .functional.surrogate import Surrogate
from .models import (
    ANNClassifier,
    ClassifierOutput,
    DenseSNNClassifier,
    ModelOutput,
    SpikingMoEClassifier,
    active_parameter_count,
)
from .moe import (
    DenseFFN,
    MoEOutput,
    SpikingMoE,
    set_dense,
    swapped_strategies,
    update_router_biases,
)
from .neurons import LIF, MultiSpike, SpikingNeuron, make_neuron, thermometer
from .router import RateRouter, RoutingInfo, SpikingRouter, build_router, route
from .strategies import ExpertParallelExperts, ExpertStrategy, LocalExperts
from .synapses import EventLinear
from .training import Trainer
from .transformer import (
    Add,
    ANNTransformerLM,
    BlockOutput,
    DenseSNNLM,
    LMOutput,
    SpikingMoELM,
    SpikingTransformerBlock,
)

__version__ = "0.1.0"

__all__ = [
    "LIF",
    "Activity",
    "ExperimentConfig",
    "Surrogate",
    "Trainer",
    "config",
    "data",
    "encoding",
    "functional",
    "load_config",
    "training",
    # MoE (issue 4)
    "ANNClassifier",
    "ClassifierOutput",
    "DenseSNNClassifier",
    "DispatchPlan",
    "ExpertOutput",
    "ExpertsOutput",
    "MLPExpert",
    "MoEOutput",
    "RateRouter",
    "RoutingInfo",
    "SpikingExpert",
    "SpikingMoE",
    "SpikingMoEClassifier",
    "SpikingRouter",
    "active_parameter_count",
    "combine",
    "dense_masked",
    "dispatch",
    "route",
    "run_experts",
    "run_experts_with_activity",
    "set_dense",
    "update_router_biases",
    # spiking transformers and language models (issue 11)
    "ANNTransformerLM",
    "AttentionOutput",
    "BlockOutput",
    "DenseSNNLM",
    "LMOutput",
    "MatMul",
    "SoftmaxAttention",
    "SpikingMoELM",
    "SpikingSelfAttention",
    "SpikingTransformerBlock",
    # event-driven synaptic products (issue 14)
    "EventLinear",
    # one args dataclass per part, expert strategies, one output contract (issue 21)
    "AttentionArgs",
    "DenseFFN",
    "ExpertArgs",
    "ExpertParallelExperts",
    "ExpertStrategy",
    "LocalExperts",
    "ModelArgs",
    "ModelOutput",
    "MoEArgs",
    "NeuronArgs",
    "RouterArgs",
    "build_router",
    "swapped_strategies",
    # the language-model designs: membrane residual, multi-level spikes (issue 22)
    "Add",
    "BlockArgs",
    "ConfigError",
    "MultiSpike",
    "SpikingNeuron",
    "make_neuron",
    "thermometer",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
