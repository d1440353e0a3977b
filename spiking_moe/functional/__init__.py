"""Pure tensor functions: no nn.Module, no hidden state."""

from .event import event_linear
from .lif import LIFOutput, lif_multistep, lif_step
from .surrogate import SURROGATES, Surrogate, resolve_surrogate, spike

__all__ = [
    "SURROGATES",
    "LIFOutput",
    "Surrogate",
    "event_linear",
    "lif_multistep",
    "lif_step",
    "resolve_surrogate",
    "spike",
]
