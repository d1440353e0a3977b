"""spiking-moe: spiking mixture-of-experts with rate-coded routing and honest energy accounting."""

import logging

from . import config, data, encoding, functional, training
from .config import ExperimentConfig, load_config
from .functional.surrogate import Surrogate
from .neurons import LIF
from .training import Trainer

__version__ = "0.1.0"

__all__ = [
    "LIF",
    "ExperimentConfig",
    "Surrogate",
    "Trainer",
    "config",
    "data",
    "encoding",
    "functional",
    "load_config",
    "training",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
