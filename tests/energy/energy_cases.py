"""Models, inputs and checks shared by the energy tests."""

import dataclasses

import torch
from torch import nn

import energy
from energy import LayerCounts, OperationCounts
from spiking_moe import LIF

# Every count of a LayerCounts that sums over calls, i.e. all but what identifies the module.
ADDITIVE = tuple(
    f.name
    for f in dataclasses.fields(LayerCounts)
    if f.name not in ("name", "kind", "group", "order", "fan_in", "fan_out")
)
PER_CALL = ("calls", "binary_calls")  # count module calls, so depend on how a set is cut

X = torch.tensor(
    [
        [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    ]
)  # [T=2, B=2, 4], 5 events


def spikes(*shape, p=0.3, seed=0):
    """Bernoulli(p) spikes from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


def graded(*shape, seed=1):
    """Values in [0.1, 1.1): never binary."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.1


def unit_profile(ac_pj=1.0, mac_pj=0.0, neuron_update_pj=0.0, **prices):
    """A profile of round prices for hand counts: 1 pJ per AC, 0 for the rest unless given."""
    return energy.EnergyProfile(
        name="unit",
        description="unit costs",
        source="test",
        ac_pj=ac_pj,
        mac_pj=mac_pj,
        neuron_update_pj=neuron_update_pj,
        **prices,
    )


def small_net():
    """Linear(4, 3) with every weight 0.3, no bias, then a LIF."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), LIF(beta=0.5, threshold=0.2))
    with torch.no_grad():
        net[0].weight.fill_(0.3)
        net[0].bias.zero_()
    return net


def make_snn(neuron=lambda: LIF(beta=0.8, threshold=0.3)):
    """Conv -> neuron -> Linear -> neuron -> Linear on ``[T=6, B, 1, 5, 5]``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(0, 1),  # [T, B, C, H, W] -> [T*B, C, H, W] for the conv
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Unflatten(0, (6, -1)),
        neuron(),
        nn.Flatten(2),
        nn.Linear(4 * 5 * 5, 8),
        neuron(),
        nn.Linear(8, 3),
    )


class TinyMoE(nn.Module):
    """Three Linear -> LIF -> Linear experts on fixed tokens (dense: every expert on all)."""

    def __init__(self, dense=False, ids=((0, 1), (1, 2, 3), (0, 2, 3))):
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 6), LIF(threshold=0.2), nn.Linear(6, 4)) for _ in ids
        )
        self.dense = dense
        self.ids = [torch.tensor(token_ids) for token_ids in ids]

    def forward(self, x):
        out = torch.zeros_like(x)
        for expert, ids in zip(self.experts, self.ids, strict=True):
            ids = torch.arange(x.shape[1]) if self.dense else ids
            out[:, ids] += expert(x[:, ids])
        return out


class Threshold(nn.Module):
    """A neuron without host reads of its own (spiking_moe's LIF checks its input for NaN)."""

    def forward(self, x):
        return (x > 0.2).to(x.dtype)


THRESHOLD = energy.NeuronAdapter("threshold", lambda m: isinstance(m, Threshold))


def masked_product(mask, a, b):
    if mask == "output":  # causal scores: query m sees keys n <= m
        return (a @ b).tril()
    if mask == "contraction":  # row m sums the values of positions k <= m
        return a.tril() @ b
    return a @ b


class MatMul(nn.Module):
    """A product module (:mod:`energy.rules`): any mask, protocol as instance attributes."""

    def __init__(self, mask=None, ann_softmax=False):
        super().__init__()
        self.matmul_mask = mask
        self.ann_softmax = ann_softmax

    def forward(self, a, b):
        return masked_product(self.matmul_mask, a, b)


class SpikingAttention(nn.Module):
    """Spikformer-style: binary Q, K, V, causal scores without softmax, then a neuron."""

    def __init__(self, d=2, ann_softmax=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        for fc in (self.q, self.k, self.v):
            nn.init.uniform_(fc.weight, 0.0, 0.6)  # excitatory, so every neuron can fire
        self.q_lif, self.k_lif, self.v_lif, self.out_lif = (Threshold() for _ in range(4))
        self.scores = MatMul("output", ann_softmax=ann_softmax)
        self.mix = MatMul("contraction")

    def forward(self, x_TBSD):
        q = self.q_lif(self.q(x_TBSD))
        k = self.k_lif(self.k(x_TBSD))
        v = self.v_lif(self.v(x_TBSD))
        return self.out_lif(self.mix(self.scores(q, k.transpose(-2, -1)), v))


class AnnAttention(nn.Module):
    """The ANN twin: graded Q, K, V, causal softmax attention."""

    def __init__(self, d=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.scores = MatMul("output")
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul("contraction")

    def forward(self, x_TBSD):
        S = x_TBSD.shape[-2]
        q, k, v = self.q(x_TBSD), self.k(x_TBSD), self.v(x_TBSD)
        causal = torch.ones(S, S, dtype=torch.bool, device=x_TBSD.device).tril()
        scores = self.scores(q, k.transpose(-2, -1)).masked_fill(~causal, float("-inf"))
        return self.mix(self.softmax(scores), v)


def assert_equal_except_calls(merged: OperationCounts, whole: OperationCounts):
    """Every LayerCounts field (names, order, layer order included) but the per-call ones."""
    assert merged.time_steps == whole.time_steps
    assert [m.name for m in merged.layers] == [m.name for m in whole.layers]
    for got, want in zip(merged.layers, whole.layers, strict=True):
        for field in dataclasses.fields(want):
            if field.name not in PER_CALL:
                assert getattr(got, field.name) == getattr(want, field.name), (
                    got.name,
                    field.name,
                )
