"""Why the spiking MoE LM gains less from experts than its ANN twin: train the config's model
with one part swapped, exactly as ``spiking-moe-train`` trains it.

Each variant replaces modules of the built model before training (the energy report then
prices what runs; a swapped-in real-valued input is graded, so MACs):

- ``none``: the model as configured (the baseline).
- ``hidden_relu``: the FFN experts' hidden multi-level neurons become ReLU.
- ``router_real``: each MoE router reads the real LayerNorm output instead of the FFN's input
  spikes (the experts still read the spikes).
- ``ffn_input_signed``: the FFN's input spikes are signed, ``round(clamp(x, -D, D))``
  (straight-through).
- ``ffn_input_fine``: the FFN's input spikes have 4x the resolution over the same range:
  counts ``0..4D`` at threshold 1/4, scaled back by 1/4 (a weight scale the next Linear would
  fold in), so the next layer's current keeps its scale.
- ``ffn_input_real``: the FFN reads the LayerNorm output itself (no input spikes).
- ``final_real``: the readout reads the final LayerNorm output (no final population).

Usage (docs/results.md, the language-model scaling study, has the table these gave)::

    python experiments/lm_ffn_ablation.py ffn_input_real --out runs/ablation/dense_ffn_input_real
    python experiments/lm_ffn_ablation.py ffn_input_real --config experiments/configs/lm_moe.toml \\
        --out runs/ablation/moe16_ffn_input_real
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import spiking_moe.experiment as experiment
from spiking_moe.config import load_config
from spiking_moe.moe import SpikingMoE
from spiking_moe.neurons import MultiSpike

CONFIG = Path(__file__).resolve().parent / "configs" / "lm_dense_snn.toml"


class _SignedLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x.abs() <= levels)
        return x.clamp(-levels, levels).round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (passes,) = ctx.saved_tensors
        return grad * passes, None


class SignedSpike(nn.Module):
    """Signed multi-level spikes ``round(clamp(x, -D, D))`` at T = 1 (ternary-spike style)."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignedLevels.apply(x, self.levels)


class FineSpike(nn.Module):
    """Counts ``0..4D`` at threshold 1/4, times 1/4: the same range at 4x the resolution."""

    def __init__(self, levels: int):
        super().__init__()
        self.neuron = MultiSpike(levels=4 * levels, threshold=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neuron(x) * 0.25


class RealRouterInput(nn.Module):
    """The FFN's input population, handing its real input to the MoE's router."""

    def __init__(self, neuron: nn.Module, moe: SpikingMoE):
        super().__init__()
        self.neuron = neuron
        self._moe = [moe]  # a list: the block owns the MoE, this must not register it twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._moe[0].real_router_input = x
        return self.neuron(x)


def _route_real(self: SpikingMoE, x_TND: torch.Tensor, lead):
    return _ROUTE(self, self.real_router_input.reshape(x_TND.shape), lead)


_ROUTE = SpikingMoE._route

SWAPS: dict[str, tuple[Callable[[str], bool], Callable[[MultiSpike], nn.Module]]] = {
    "none": (lambda name: False, lambda n: n),
    "hidden_relu": (lambda name: ".ffn." in name and ".net." in name, lambda n: nn.ReLU()),
    "ffn_input_signed": (
        lambda name: name.endswith("ffn_input"),
        lambda n: SignedSpike(n.args.levels),
    ),
    "ffn_input_fine": (lambda name: name.endswith("ffn_input"), lambda n: FineSpike(n.args.levels)),
    "ffn_input_real": (lambda name: name.endswith("ffn_input"), lambda n: nn.Identity()),
    "final_real": (lambda name: name == "final_neuron", lambda n: nn.Identity()),
    "router_real": (lambda name: False, lambda n: n),
}


def swap(model: nn.Module, variant: str) -> nn.Module:
    """``model`` with the variant's populations replaced (in place)."""
    where, replacement = SWAPS[variant]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, MultiSpike) and where(full):
                setattr(module, child_name, replacement(child))
    if variant == "router_real":
        blocks = [b for b in model.blocks if isinstance(getattr(b, "ffn", None), SpikingMoE)]
        if not blocks or not all(hasattr(b, "ffn_input") for b in blocks):
            raise SystemExit("router_real needs a membrane-residual MoE LM (lm_moe.toml)")
        for block in blocks:
            block.ffn_input = RealRouterInput(block.ffn_input, block.ffn)
            block.ffn._route = types.MethodType(_route_real, block.ffn)  # this instance only
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(SWAPS))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config)
    build = experiment.build_model_for
    experiment.build_model_for = lambda cfg, data: swap(build(cfg, data), args.variant)
    experiment.run_experiment(config, args.out, overrides=args.set)


if __name__ == "__main__":
    main()
