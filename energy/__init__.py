"""energy: synaptic-operation counting and energy estimates for any torch spiking model.

Imports only torch, numpy and the standard library, so it can profile snnTorch, Norse,
SpikingJelly or spiking_moe models without pulling any of them in.
"""

import logging

__version__ = "0.1.0"

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
