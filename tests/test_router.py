"""Routers: rates, selection, gates, losses, capacity, balancing bias, causal windows."""

import io
import math
import pickle

import pytest
import torch

from spiking_moe.router import RateRouter, SpikingRouter, route

D, E = 6, 4


def _spikes(T, N, p=0.4, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((T, N, d), p), generator=g)


def _set(router, weight, bias):
    with torch.no_grad():
        router.proj.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        router.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def test_rate_router_logits_are_a_linear_map_of_hand_counted_rates():
    router = RateRouter(3, 2, 1, renormalize=False)
    _set(router, [[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]], [0.5, 0.0])
    # token 0 fires [4, 2, 0] times in T=4 steps, token 1 [0, 4, 1]
    x = torch.zeros(4, 2, 3)
    x[:, 0, 0] = 1
    x[:2, 0, 1] = 1
    x[:, 1, 1] = 1
    x[3, 1, 2] = 1
    info = router(x)
    logits = torch.tensor([[[1.0 + 0.5, 2 * 0.5], [0.5, 2.0 - 0.25]]])  # [W=1, N, E]
    torch.testing.assert_close(info.probs, torch.softmax(logits, -1))
    assert info.expert_ids.tolist() == [[[0], [1]]]
    torch.testing.assert_close(info.gates, info.probs.gather(-1, info.expert_ids))


def test_top_k_picks_the_largest_probabilities_and_renormalises_the_gates():
    router = RateRouter(D, 6, 3)
    info = router(_spikes(8, 20))
    order = torch.argsort(info.probs, -1, descending=True)[..., :3]
    assert torch.equal(info.expert_ids, order)
    chosen = info.probs.gather(-1, order)
    torch.testing.assert_close(info.gates, chosen / chosen.sum(-1, keepdim=True))
    assert info.expert_ids.dtype == torch.int64 and info.expert_ids.shape == (1, 20, 3)


def test_losses_match_hand_computation():
    # probs [.75, .25] x3 (expert 0 chosen) and [.25, .75] (expert 1 chosen)
    a = math.log(3.0)
    logits = torch.tensor([[[a, 0.0], [a, 0.0], [0.0, a], [a, 0.0]]])
    info = route(logits, 1, balance_weight=0.5, z_loss_weight=2.0)
    # f = [3/4, 1/4], P = [2.5/4, 1.5/4]; L = 2 * (3/4 * 2.5/4 + 1/4 * 1.5/4) = 1.125
    torch.testing.assert_close(info.load_balancing_loss, torch.tensor(1.125))
    torch.testing.assert_close(info.z_loss, torch.tensor(math.log(4.0) ** 2))
    torch.testing.assert_close(info.aux_loss, torch.tensor(0.5 * 1.125 + 2 * math.log(4.0) ** 2))
    assert info.tokens_per_expert.tolist() == [3, 1] and int(info.dropped) == 0


def test_balanced_routing_has_unit_load_balancing_loss():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(route(logits, 1).load_balancing_loss, torch.tensor(1.0))


def test_capacity_keeps_the_largest_gates_and_breaks_ties_by_token_order():
    p0 = torch.tensor([0.9, 0.6, 0.8, 0.6])
    logits = torch.stack([p0.log(), (1 - p0).log()], -1)[None]  # everyone picks expert 0
    info = route(logits, 1, capacity_factor=1.0, renormalize=False)  # C = ceil(4/2) = 2
    assert info.capacity == 2
    assert info.kept.tolist() == [[[True], [False], [True], [False]]]
    torch.testing.assert_close(info.gates[0, :, 0], torch.tensor([0.9, 0.0, 0.8, 0.0]))
    assert info.tokens_per_expert.tolist() == [2, 0] and int(info.dropped) == 2
    tie = route(logits, 1, capacity_factor=1.5, renormalize=False)  # C = 3
    assert tie.kept[0, :, 0].tolist() == [True, True, True, False]


def test_capacity_bounds_every_expert_per_window():
    router = RateRouter(D, E, 2, window=3, capacity_factor=0.6)
    info = router(_spikes(10, 30))
    C = math.ceil(0.6 * 30 * 2 / E)
    assert info.capacity == C
    for w in range(info.expert_ids.shape[0]):
        kept_ids = info.expert_ids[w][info.kept[w]]
        assert torch.bincount(kept_ids, minlength=E).max() <= C
    assert int(info.tokens_per_expert.sum()) + int(info.dropped) == 4 * 30 * 2
    assert int(info.dropped) > 0


def test_noise_only_in_training():
    router = RateRouter(D, E, 2, noise=1.0)
    x = _spikes(6, 50)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.probs, b.probs)
    router.train()
    torch.manual_seed(0)
    c = router(x)
    assert not torch.allclose(c.probs, a.probs)
    torch.testing.assert_close(c.z_loss, a.z_loss)  # z-loss on the noise-free logits


def test_bias_changes_selection_only():
    router = RateRouter(D, E, 2)
    x = _spikes(6, 10)
    before = router(x)
    router.expert_bias[3] = 10.0
    after = router(x)
    assert (after.expert_ids[..., 0] == 3).all()
    torch.testing.assert_close(after.probs, before.probs)
    chosen = after.probs.gather(-1, after.expert_ids)
    torch.testing.assert_close(after.gates, chosen / chosen.sum(-1, keepdim=True))


def _max_over_mean(info):
    load = info.selected_load().float()
    return float(load.max() / load.mean())


def test_aux_loss_free_bias_balances_a_skewed_input():
    torch.manual_seed(0)
    d, experts = 16, 8
    router = RateRouter(d, experts, 2, bias_update_rate=0.05)
    with torch.no_grad():  # skew: experts 0 and 1 get +3 on every logit
        router.proj.weight.normal_(0.0, 1.0)
        router.proj.bias.zero_()
        router.proj.bias[:2] = 3.0
    x = _spikes(10, 512, p=0.3, seed=1, d=d)
    start = _max_over_mean(router(x))
    assert start >= 3.5, "the input must start skewed"
    for _ in range(200):
        router.update_bias(router(x))
    end = _max_over_mean(router(x))
    assert end <= 1.3, (start, end)
    assert router.expert_bias[:2].max() < 0 < router.expert_bias[2:].max()


def test_update_bias_sums_micro_batches_and_uses_the_sign_of_the_load_error():
    router = RateRouter(D, 2, 1, bias_update_rate=0.5)
    ids_a = torch.tensor([[0], [0], [0]])
    ids_b = torch.tensor([[1], [1]])
    assert route(10.0 * torch.eye(2)[None], 1).expert_ids.tolist() == [[[0], [1]]]

    def info(ids):
        # Large logits on the wanted expert: route() then selects exactly these ids.
        return route(10.0 * torch.nn.functional.one_hot(ids[:, 0], 2).float()[None], 1)

    # loads summed: [3, 2], mean 2.5 -> expert 0 down, expert 1 up
    assert router.update_bias(info(ids_a), info(ids_b)).tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="at least one"):
        router.update_bias()
    with pytest.raises(ValueError, match="experts"):
        RateRouter(D, 3, 1).update_bias(info(ids_a))


@pytest.mark.parametrize("router_cls", [RateRouter, SpikingRouter])
def test_windowed_routing_is_causal(router_cls):
    torch.manual_seed(0)
    L, w = 3, 1
    router = (
        router_cls(D, E, 2, window=L, threshold=0.5)
        if router_cls is SpikingRouter
        else router_cls(D, E, 2, window=L)
    )
    x = _spikes(11, 40, p=0.3, seed=1)  # W = 4 windows, the last one 2 steps long
    changed = x.clone()
    changed[(w + 1) * L :] = 1 - changed[(w + 1) * L :]  # change everything after window w
    a, b = router(x), router(changed)
    assert a.expert_ids.shape == (4, 40, 2) and a.probs.shape == (4, 40, E)
    # Bitwise on any CPU: both calls run the same kernels on the same shapes, and the earlier
    # windows' rows hold the same numbers (a GEMM row does not depend on other rows' values).
    for field in ("expert_ids", "gates", "probs"):
        assert torch.equal(getattr(a, field)[: w + 2], getattr(b, field)[: w + 2])
    assert not torch.equal(a.probs[w + 2 :], b.probs[w + 2 :]), "the change must matter later"


def test_first_window_routes_from_zero_rates():
    router = RateRouter(D, E, 2, window=2)
    info = router(_spikes(6, 5))
    torch.testing.assert_close(info.probs[0], torch.softmax(router.proj.bias, -1).expand(5, E))
    # window 1 is routed from the rates of window 0 (the same sums / 2; the router's product
    # has W times the rows, so its rounding may differ by an ulp, within assert_close's 1.3e-6)
    x = _spikes(6, 5)
    torch.testing.assert_close(info.probs[1], torch.softmax(router.proj(x[:2].mean(0)), -1))


def test_spiking_router_scores_are_hand_counted_spike_counts():
    router = SpikingRouter(3, 4, 2, gain=5.0, beta=1.0, threshold=1.0, renormalize=False)
    _set(router, torch.zeros(4, 3), [1.5, 0.5, 0.0, -1.0])
    # beta = 1, soft reset: bias 1.5 fires every step (5), bias 0.5 fires at t = 2, 4 (2)
    info = router(_spikes(5, 2, d=3))
    logits = 5.0 * torch.tensor([5.0, 2.0, 0.0, 0.0]) / 5
    torch.testing.assert_close(info.probs, torch.softmax(logits, -1).expand(1, 2, 4))
    assert info.expert_ids.tolist() == [[[0, 1], [0, 1]]]


@pytest.mark.parametrize("router_cls", [RateRouter, SpikingRouter])
def test_gradient_reaches_router_weights(router_cls):
    torch.manual_seed(0)
    router = router_cls(D, E, 2)
    info = router(_spikes(8, 16))
    weight = torch.randn(info.gates.shape)
    ((info.gates * weight).sum() + info.aux_loss).backward()
    assert router.proj.weight.grad.abs().sum() > 0
    assert router.proj.bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=4, k=5), "k must be <= num_experts"),
        (dict(num_experts=4, k=0), "k must be an int >= 1"),
        (dict(num_experts=0, k=1), "num_experts must be an int >= 1"),
        (dict(num_experts=4, k=2, capacity_factor=0.0), "capacity_factor"),
        (dict(num_experts=4, k=2, capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=4, k=2, window=0), "window"),
        (dict(num_experts=4, k=2, noise=-0.1), "noise"),
        (dict(num_experts=4, k=2, bias_update_rate=float("nan")), "bias_update_rate"),
    ],
)
@pytest.mark.parametrize("router_cls", [RateRouter, SpikingRouter])
def test_bad_config_is_rejected(router_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        router_cls(D, **kwargs)


def test_bad_input_is_rejected():
    router = RateRouter(D, E, 2)
    with pytest.raises(ValueError, match=r"\[T, N, 6\]"):
        router(torch.zeros(5, D))
    with pytest.raises(ValueError, match=r"\[T, N, 6\]"):
        router(torch.zeros(5, 2, D + 1))
    with pytest.raises(TypeError, match="floating"):
        router(torch.zeros(5, 2, D, dtype=torch.int64))


@pytest.mark.parametrize("router_cls", [RateRouter, SpikingRouter])
def test_state_dict_round_trip_and_pickle(router_cls):
    torch.manual_seed(0)
    router = router_cls(D, E, 2, window=2)
    router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    fresh = router_cls(D, E, 2, window=2)
    fresh.load_state_dict(router.state_dict())
    assert "expert_bias" in router.state_dict()
    x = _spikes(7, 9)
    assert torch.equal(fresh(x).expert_ids, router(x).expert_ids)
    clone = pickle.loads(pickle.dumps(router))
    torch.testing.assert_close(clone(x).probs, router(x).probs)
    buffer = io.BytesIO()
    torch.save(router(x), buffer)  # RoutingInfo itself serialises
    buffer.seek(0)
    info = torch.load(buffer, weights_only=False)
    assert torch.equal(info.expert_ids, router(x).expert_ids)


def test_router_options_assigned_as_attributes_take_effect_and_are_validated():
    """router.bias_update_rate = r (as the benchmarks anneal it) changes the step the bias
    takes, and its args, which a bundle writes; a bad value is refused naming the field."""
    router = RateRouter(6, num_experts=4, k=1)
    routing = router(torch.bernoulli(torch.full((10, 8, 6), 0.3)))
    router.bias_update_rate = 0.25
    assert router.args.bias_update_rate == 0.25
    bias = router.update_bias(routing)
    assert set(bias.abs().unique().tolist()) <= {0.0, 0.25} and bias.abs().max() == 0.25
    with pytest.raises(ValueError, match=r"router\.noise must be >= 0\.0, got -1\.0"):
        router.noise = -1.0
