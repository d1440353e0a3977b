"""energy: synaptic-operation counting and energy estimates for any torch spiking model.

Imports only torch, numpy and the standard library, so it can profile snnTorch, Norse,
SpikingJelly or spiking_moe models without pulling any of them in.

Example:
    >>> import torch, energy
    >>> report = energy.estimate(torch.nn.Linear(4, 3), torch.ones(2, 1, 4), profile="cmos45")
    >>> report.totals.acs
    24
"""

import logging

from . import profiles, tensorboard
from .counting import (
    GroupCounts,
    LayerCounts,
    NeuronAdapter,
    OperationCounts,
    count_operations,
    merge_counts,
)
from .profiles import EnergyProfile, available_profiles, get_profile, load_profile
from .report import EnergyReport, build_report, estimate

__version__ = "0.1.0"

__all__ = [
    "EnergyProfile",
    "EnergyReport",
    "GroupCounts",
    "LayerCounts",
    "NeuronAdapter",
    "OperationCounts",
    "available_profiles",
    "build_report",
    "count_operations",
    "estimate",
    "get_profile",
    "load_profile",
    "merge_counts",
    "profiles",
    "tensorboard",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
