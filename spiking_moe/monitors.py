"""Training callbacks that measure spiking and routing statistics during evaluation.

Both read only public contracts: :class:`FiringRateMonitor` hooks the output of every spiking
neuron module (``spiking_moe.LIF`` by default); :class:`RoutingMonitor` reads the
``routing`` field of the model output (a tuple of ``RoutingInfo``-like objects, one per MoE
layer, with ``probs [N, E]``, ``tokens_per_expert [E]`` and optionally ``dropped``).

For MoE layer ``l`` over an evaluation pass with ``N`` tokens and ``k`` experts per token:

- ``load/e = n_e / sum_e' n_e'``: share of the routed assignments that expert ``e`` got
  (sums to 1; ``1 / E`` each when balanced);
- ``utilisation/e = n_e / N``: fraction of tokens that use expert ``e`` (sums to ``k``);
- ``max_load_ratio = E * max_e load/e`` (1 = perfectly balanced, ``E`` = one expert takes all);
- ``router_entropy = mean_tokens(-sum_e p_e log p_e)`` in nats (``log E`` = uniform router);
- ``dropped_fraction = dropped / (routed + dropped)`` assignments, when the layer reports
  drops (capacity overflow); ``routed = sum_e n_e``.

Letters: N tokens, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .neurons import LIF
from .training import Callback

if TYPE_CHECKING:
    from .training import Trainer

__all__ = ["FiringRateMonitor", "RoutingMonitor"]


class FiringRateMonitor(Callback):
    """Mean firing rate (spikes per neuron per step) of every neuron module, per evaluation.

    Logged as ``{prefix}/firing_rate/{module name}`` and ``{prefix}/firing_rate/mean`` (over all
    spikes). A neuron inside a routed expert counts only the tokens routed to it.

    Args:
        neuron_types: module classes whose ``forward`` returns spikes.
    """

    def __init__(self, neuron_types: tuple[type[nn.Module], ...] = (LIF,)):
        self.neuron_types = neuron_types
        self._handles: list = []
        self._sums: dict[str, list[torch.Tensor]] = {}

    def on_eval_start(self, trainer: Trainer, prefix: str) -> None:
        self._sums = {}
        for name, module in trainer.model.named_modules():
            if isinstance(module, self.neuron_types):
                self._sums[name] = []
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(module, inputs, output):
            spikes = output if isinstance(output, torch.Tensor) else output[0]
            self._sums[name].append(
                torch.stack(
                    [
                        spikes.detach().float().sum(),
                        torch.full((), float(spikes.numel()), device=spikes.device),
                    ]
                )
            )

        return record

    def on_eval_end(self, trainer: Trainer, prefix: str) -> Mapping[str, float]:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self._sums:
            return {}
        names = sorted(self._sums)
        per_module = torch.stack(
            [
                torch.stack(self._sums[n]).sum(0).to(trainer.device)
                if self._sums[n]
                else torch.zeros(2, device=trainer.device)
                for n in names
            ]
        )
        per_module = trainer.all_reduce_sum(per_module.double())
        metrics = {}
        for name, (spikes, count) in zip(names, per_module.tolist(), strict=True):
            if count > 0:
                metrics[f"{prefix}/firing_rate/{name or 'model'}"] = spikes / count
        total_spikes, total_count = per_module.sum(0).tolist()
        if total_count > 0:
            metrics[f"{prefix}/firing_rate/mean"] = total_spikes / total_count
        self._sums = {}
        return metrics


class RoutingMonitor(Callback):
    """Per-expert load and utilisation, router entropy and drops of every MoE layer.

    Logged as ``{prefix}/moe{l}/load/{e}``, ``.../utilisation/{e}``, ``.../max_load_ratio``,
    ``.../router_entropy`` and ``.../dropped_fraction`` (see the module docstring). Does nothing
    for models whose output has no ``routing``.
    """

    def __init__(self):
        self._stats: list[torch.Tensor] = []

    def on_eval_start(self, trainer: Trainer, prefix: str) -> None:
        self._stats = []

    def on_eval_batch_end(self, trainer, prefix, batch, output) -> None:
        routing = getattr(output, "routing", None)
        if not routing:
            return
        for layer, info in enumerate(routing):
            probs_NE = info.probs.detach().float()
            tokens_E = info.tokens_per_expert.detach().double()
            entropy = -(probs_NE * probs_NE.clamp_min(1e-12).log()).sum(-1).sum().double()
            dropped = getattr(info, "dropped", None)
            dropped = (
                torch.zeros((), device=tokens_E.device, dtype=torch.float64)
                if dropped is None
                else dropped.detach().double().sum()
            )
            # [n_0 .. n_{E-1}, tokens N, entropy sum, dropped]
            row = torch.cat(
                [
                    tokens_E,
                    torch.stack(
                        [
                            torch.full(
                                (),
                                float(probs_NE.shape[0]),
                                dtype=torch.float64,
                                device=tokens_E.device,
                            ),
                            entropy,
                            dropped,
                        ]
                    ),
                ]
            )
            if layer < len(self._stats):
                self._stats[layer] = self._stats[layer] + row
            else:
                self._stats.append(row)

    def on_eval_end(self, trainer: Trainer, prefix: str) -> Mapping[str, float]:
        metrics: dict[str, float] = {}
        for layer, row in enumerate(self._stats):
            row = trainer.all_reduce_sum(row.to(trainer.device)).tolist()
            tokens_E, num_tokens, entropy_sum, dropped = row[:-3], row[-3], row[-2], row[-1]
            assignments = sum(tokens_E)
            num_experts = len(tokens_E)
            base = f"{prefix}/moe{layer}"
            for e, n in enumerate(tokens_E):
                metrics[f"{base}/load/{e}"] = n / assignments if assignments else 0.0
                metrics[f"{base}/utilisation/{e}"] = n / num_tokens if num_tokens else 0.0
            if assignments:
                metrics[f"{base}/max_load_ratio"] = num_experts * max(tokens_E) / assignments
            if num_tokens:
                metrics[f"{base}/router_entropy"] = entropy_sum / num_tokens
            if assignments + dropped:
                metrics[f"{base}/dropped_fraction"] = dropped / (assignments + dropped)
        self._stats = []
        return metrics
