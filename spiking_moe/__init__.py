"""spiking-moe: spiking mixture-of-experts with rate-coded routing and honest energy accounting."""

import logging

from . import encoding, functional
from .functional.surrogate import Surrogate
from .neurons import LIF

__version__ = "0.1.0"

__all__ = ["LIF", "Surrogate", "encoding", "functional"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
