"""SpikingMoE: shared experts, the residual (shortcut) current, and first-come-first-served
capacity in position order for sequence inputs."""

import math

import pytest
import torch
from tiny import random_spikes
from torch import nn

from spiking_moe import LIF
from spiking_moe.experts import SpikingExpert
from spiking_moe.moe import SpikingMoE
from spiking_moe.router import RateRouter

T, B, S, D, E, K = 3, 2, 4, 8, 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _parts(seed=0, shared=2, capacity_factor=None):
    torch.manual_seed(seed)
    router = RateRouter(D, E, K, capacity_factor=capacity_factor)
    experts = [SpikingExpert(D, 16, D, threshold=0.5) for _ in range(E)]
    shared_experts = [SpikingExpert(D, 12, D, threshold=0.5) for _ in range(shared)]
    return router, experts, shared_experts


def _count_rows(modules):
    rows = {}
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(
            lambda m, args, i=i: rows.__setitem__(i, rows.get(i, 0) + args[0].shape[1])
        )
    return rows


# --- shared experts ---------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_shared_experts_see_every_token_and_routed_experts_only_their_own(capacity_factor):
    router, experts, shared = _parts(capacity_factor=capacity_factor)
    moe = SpikingMoE(router=router, experts=experts, shared_experts=shared)
    routed_rows, shared_rows = _count_rows(experts), _count_rows(shared)
    out = moe(random_spikes((T, B, S, D), p=0.3))
    N = B * S
    assert shared_rows == {0: N, 1: N}
    per_expert = out.routing.tokens_per_expert.tolist()
    assert {e: c for e, c in enumerate(per_expert) if c} == routed_rows
    assert sum(per_expert) == N * K - int(out.routing.dropped)
    if capacity_factor is not None:
        assert int(out.routing.dropped) > 0, "the capacity case must drop something"


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_output_with_shared_experts_is_routed_current_plus_shared_current(capacity_factor):
    router, experts, shared = _parts(capacity_factor=capacity_factor)
    # float64: the loop calls each expert on one token, the layer on all of its rows, and a
    # GEMM's rounding depends on its row count (and the CPU); in float32 that could flip an
    # expert's hidden spike, in float64 it cannot, and assert_close's float64 tolerance (1e-7)
    # is far above the remaining rounding (about 1e-15 here).
    with_shared = SpikingMoE(
        router=router, experts=experts, shared_experts=shared, neuron=nn.Identity()
    ).double()
    routed_only = SpikingMoE(router=router, experts=experts, neuron=nn.Identity())
    x = random_spikes((T, B, S, D), p=0.4, seed=1).double()
    out = with_shared(x)

    # Oracle: a loop over tokens through the chosen experts and every shared expert.
    x_TND = x.reshape(T, B * S, D)
    ids, gates = out.routing.expert_ids[0], out.routing.gates[0]
    current = torch.zeros(T, B * S, D, dtype=torch.float64)
    for n in range(B * S):
        token = x_TND[:, n : n + 1]
        for j in range(K):
            if out.routing.kept[0, n, j]:
                current[:, n] += gates[n, j] * experts[int(ids[n, j])](token)[:, 0]
        for expert in shared:
            current[:, n] += expert(token)[:, 0]
    torch.testing.assert_close(out.spikes, current.reshape(T, B, S, D))

    shared_current = sum(expert(x_TND) for expert in shared).reshape(T, B, S, D)
    torch.testing.assert_close(out.spikes, routed_only(x).spikes + shared_current)
    assert shared_current.abs().sum() > 0
    assert out.activity.names[-2:] == ("shared_experts.0.net.1", "shared_experts.1.net.1")


# --- residual (shortcut) current --------------------------------------------------------


def test_residual_is_added_to_the_current_before_the_neuron():
    router, experts, shared = _parts(shared=1)
    identity = SpikingMoE(
        router=router, experts=experts, shared_experts=shared, neuron=nn.Identity()
    )
    firing = SpikingMoE(
        router=router, experts=experts, shared_experts=shared, neuron=LIF(beta=0.8, threshold=0.7)
    )
    x = random_spikes((T, B, S, D), p=0.4, seed=2)
    r = random_spikes((T, B, S, D), p=0.5, seed=3)
    current = identity(x).spikes
    # Bitwise: the same forward, and the residual is one addition to the same current.
    assert torch.equal(identity(x, residual=r).spikes, current + r)
    expected = LIF(beta=0.8, threshold=0.7)(current + r)
    out = firing(x, residual=r).spikes
    assert torch.equal(out, expected)
    assert not torch.equal(out, firing(x).spikes), "the residual must change the spikes"
    # 3-D input: the residual has the same [T, B, O] layout.
    x3, r3 = x.reshape(T, B * S, D), r.reshape(T, B * S, D)
    assert torch.equal(identity(x3, residual=r3).spikes, identity(x3).spikes + r3)


@pytest.mark.parametrize(
    "shape",
    [(T, B, S, D + 1), (T, B, S - 1, D), (T, B * S, D), (T - 1, B, S, D)],
)
def test_residual_of_the_wrong_shape_is_rejected(shape):
    router, experts, shared = _parts(shared=1)
    moe = SpikingMoE(router=router, experts=experts, shared_experts=shared)
    with pytest.raises(ValueError, match=r"residual must have shape \(3, 2, 4, 8\)"):
        moe(random_spikes((T, B, S, D)), residual=torch.zeros(shape))


# --- capacity in position order ---------------------------------------------------------

# Two experts, k = 1, capacity ceil(0.3 * 6 / 2) = 1. The router is set by hand: logits
# (4 r, 0.1) where r is the rate of feature 0, so r = 0 goes to expert 1 and r > 0 to expert 0
# with gate softmax(4 r, 0.1)[0], larger for larger r.
RATE = {  # (b, s) -> rate of feature 0 over T = 2 steps
    (0, 0): 0.0,
    (0, 1): 0.0,
    (0, 2): 1.0,  # late position, large gate, expert 0
    (1, 0): 0.5,  # early position, smaller gate, expert 0
    (1, 1): 0.0,
    (1, 2): 0.0,
}
PB, PS = 2, 3


def _capacity_layer():
    torch.manual_seed(0)
    router = RateRouter(4, 2, 1, capacity_factor=0.3, renormalize=False)
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0, 0] = 4.0
        router.proj.bias.copy_(torch.tensor([0.0, 0.1]))
    experts = [SpikingExpert(4, 8, 4, threshold=0.3) for _ in range(2)]
    return SpikingMoE(router=router, experts=experts, neuron=nn.Identity())


def _capacity_input():
    x = random_spikes((2, PB, PS, 4), p=0.5, seed=4)
    steps = {0.0: [0.0, 0.0], 0.5: [1.0, 0.0], 1.0: [1.0, 1.0]}
    for (b, s), rate in RATE.items():
        x[:, b, s, 0] = torch.tensor(steps[rate])
    return x


def _expert_and_gate(rate):
    logits = (4.0 * rate, 0.1)
    expert = 0 if logits[0] > logits[1] else 1
    return expert, math.exp(logits[expert]) / (math.exp(logits[0]) + math.exp(logits[1]))


def test_sequence_capacity_is_first_come_first_served_in_position_order():
    moe = _capacity_layer()
    rows = _count_rows(moe.experts)
    out = moe(_capacity_input())
    assert out.routing.capacity == 1

    # Oracle: walk positions in order (then batch rows); an expert keeps its first arrivals.
    used, kept = {0: 0, 1: 0}, {}
    for s in range(PS):
        for b in range(PB):
            e, _ = _expert_and_gate(RATE[b, s])
            kept[b, s] = used[e] < 1
            used[e] += 1
    assert (
        kept[1, 0] and not kept[0, 2]
    )  # the earlier token keeps expert 0 despite its smaller gate
    assert _expert_and_gate(RATE[0, 2])[1] > _expert_and_gate(RATE[1, 0])[1]

    got = out.routing.kept[0, :, 0].reshape(PB, PS)
    assert {(b, s): bool(got[b, s]) for b in range(PB) for s in range(PS)} == kept
    assert out.routing.expert_ids[0, :, 0].tolist() == [
        _expert_and_gate(RATE[b, s])[0] for b in range(PB) for s in range(PS)
    ]
    assert rows == {0: 1, 1: 1}
    for (b, s), keep in kept.items():
        assert bool(out.spikes[:, b, s].abs().sum() > 0) == keep, (b, s)


def test_flat_token_input_keeps_the_largest_gates():
    moe = _capacity_layer()
    x = _capacity_input().reshape(2, PB * PS, 4)  # [T, N, D]: no positions, old policy
    out = moe(x)

    # Oracle: per expert, sort by (-gate, token index) and keep the first `capacity`.
    rates = [RATE[b, s] for b in range(PB) for s in range(PS)]
    by_expert = {}
    for n, rate in enumerate(rates):
        e, gate = _expert_and_gate(rate)
        by_expert.setdefault(e, []).append((-gate, n))
    kept = [False] * len(rates)
    for assignments in by_expert.values():
        for _, n in sorted(assignments)[:1]:
            kept[n] = True
    assert kept[2] and not kept[3]  # token (0, 2), the larger gate, now wins expert 0
    assert out.routing.kept[0, :, 0].tolist() == kept
    gates = [_expert_and_gate(r)[1] if keep else 0.0 for r, keep in zip(rates, kept, strict=True)]
    torch.testing.assert_close(out.routing.gates[0, :, 0], torch.tensor(gates))


@pytest.mark.parametrize("router_kind", ["rate", "spiking"])
def test_fine_grained_experts_with_k_8_route_balance_and_respect_capacity(router_kind):
    """32 small experts, top-8, one shared expert, capacity 1.0: the sparse layer equals the
    dense-masked one, no expert exceeds its capacity, and (rate router) aux-loss-free
    balancing evens a skewed load: DeepSeekMoE-style fine-grained routing through the existing
    parts."""
    from spiking_moe.router import SpikingRouter

    E_fine, K_fine, N = 32, 8, 48
    torch.manual_seed(0)
    make = RateRouter if router_kind == "rate" else SpikingRouter
    router = make(D, E_fine, K_fine, capacity_factor=1.0, bias_update_rate=0.05)
    moe = SpikingMoE(
        router=router,
        experts=[SpikingExpert(D, 4, D, threshold=0.5) for _ in range(E_fine)],
        shared_experts=[SpikingExpert(D, 8, D, threshold=0.5)],
    )
    # float64: the dense path runs every expert on all N tokens, the sparse one on its rows,
    # and a GEMM's rounding depends on its row count; float64 leaves no spike near a flip.
    moe.double()
    x = random_spikes((T, N, D), p=0.3, seed=5).double()
    sparse = moe(x)
    capacity = math.ceil(1.0 * N * K_fine / E_fine)
    assert sparse.routing.capacity == capacity
    assert int(sparse.routing.tokens_per_expert.max()) <= capacity
    assert int(sparse.routing.tokens_per_expert.sum() + sparse.routing.dropped) == N * K_fine
    moe.dense = True
    assert torch.equal(moe(x).spikes, sparse.spikes)
    moe.dense = False

    if router_kind == "spiking":
        return  # its saturated counts are equal for every token: nothing for a bias to split

    def imbalance():
        load = moe.router(x).selected_load().float()
        return float(load.max() / load.mean())

    with torch.no_grad():  # skew the router towards the first experts
        router.proj.bias.copy_(torch.linspace(2.0, -2.0, E_fine))
    before = imbalance()
    for _ in range(150):  # +-0.05 per step: room to undo the +-2 skew (+-5 spiking logits)
        router.update_bias(moe.router(x))
    assert before >= 2.5 and imbalance() < before / 2
