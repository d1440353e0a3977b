"""Tiny models and data shared by the tests (through the fixtures in conftest.py) and by the
DDP worker that torchrun starts (which cannot use fixtures)."""

from typing import NamedTuple

import torch
from torch import nn

from spiking_moe import LIF, Activity, SpikingMoEClassifier
from spiking_moe.config import TrainConfig
from spiking_moe.data import InMemoryDataset


class Output(NamedTuple):
    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple = ()
    activity: Activity | None = None


class TinySNN(nn.Module):
    """Linear -> LIF -> Linear, mean over time, reporting its LIF's activity; dropout (off by
    default) makes the torch RNG matter."""

    def __init__(self, features=8, hidden=16, classes=2, aux_weight=0.0, dropout=0.2):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.lif = LIF(beta=0.8, threshold=0.5)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)
        self.aux_weight = aux_weight

    def forward(self, x_TBF):
        spikes = self.lif(self.fc1(x_TBF))
        logits = self.fc2(self.drop(spikes)).mean(0)
        aux = self.aux_weight * self.fc1.weight.pow(2).sum()
        return Output(logits, aux, (), Activity.of("lif", spikes))


def two_class_data(n=72, seed=0, encoding="rate"):
    """Two classes with different firing-probability prototypes, rate-coded over 6 steps
    (``encoding="current"``: the same values as a constant current, no encoding noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    prototypes = torch.tensor([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    x = (prototypes[y] + 0.1 * torch.randn(n, 8, generator=g)).clamp(0, 1)
    return InMemoryDataset(x, y, encoding=encoding, num_steps=6, num_classes=2)


def tiny_moe(seed=0, **overrides):
    """A one-layer spiking MoE classifier for 8 features and 2 classes: 4 experts, top-1."""
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_features=16,
        num_experts=4,
        k=1,
        expert_hidden=8,
        bias_update_rate=0.0,
        threshold=0.5,
    )
    kwargs.update(overrides)
    return SpikingMoEClassifier(8, 2, **kwargs)


def train_config(**overrides):
    base = dict(
        max_steps=14,
        batch_size=16,
        lr=2e-2,
        warmup_steps=2,
        log_every=1,
        device="cpu",
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def random_spikes(shape, p=0.5, seed=0):
    """Bernoulli(p) spikes of ``shape`` from their own seeded generator."""
    return torch.bernoulli(torch.full(shape, p), generator=torch.Generator().manual_seed(seed))


def in_float64(model):
    """``model`` in float64, fed the loaders' float32 batches cast (exactly) to float64.

    Two processes run GEMMs of half the rows and all-reduce their gradients, one process sums
    them in one pass; AdamW divides each gradient by its own magnitude, so float32 rounding of
    a tiny gradient could become a step of lr on some CPU (and turn a near tie of two experts
    for the bias balancing). float64 rounding (1e-16) stays far below Adam's eps (1e-8).
    """
    model.double().register_forward_pre_hook(lambda module, args: (args[0].double(), *args[1:]))
    return model


def assert_causal(model, ids, *, exact, attention_spikes, drops, vocab):
    """No logit and no first-block output at a position before ``j`` moves when the token at
    ``j`` changes (float64 ``model``), while later positions do move.

    ``exact``: compare bitwise (what leaves each block is spikes), else to 1e-12 (real-valued
    expert currents round by row count, which capacity drops change; a leak moves them by
    orders of magnitude more). ``attention_spikes``: the first block's attention neuron must
    fire, or a leaky mask would go unseen. ``drops``: capacity must drop assignments.
    """
    first_block = []
    hook = model.blocks[0].register_forward_hook(lambda m, a, out: first_block.append(out[0]))
    base = model(ids)
    base_block = first_block.pop()
    if attention_spikes:
        fired = dict(zip(base.activity.names, base.activity.spikes.tolist(), strict=True))
        assert fired["blocks.0.attn.attn_neuron"] > 0, "the attention must spike to test its mask"
    if drops:
        assert all(int(r.dropped) > 0 for r in base.routing), "capacity must drop assignments"

    def same(changed, reference, j):
        if exact:
            assert torch.equal(changed, reference), j
        else:
            torch.testing.assert_close(changed, reference, rtol=0, atol=1e-12, msg=str(j))

    later_changed = 0
    for j in (0, 1, 3, 5, ids.shape[1] - 1):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % vocab
        out = model(changed)
        block = first_block.pop()
        same(out.logits[:, :j], base.logits[:, :j], j)
        # per step: spiking blocks give [T, B, S, D], the ANN block its [B, S, D] stream
        same(block[..., :j, :], base_block[..., :j, :], j)
        later_changed += bool((out.logits[:, j:] - base.logits[:, j:]).abs().max() > 1e-6)
    hook.remove()
    assert later_changed >= 4, "the change must reach the positions that may see it"
