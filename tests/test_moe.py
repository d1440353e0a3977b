"""SpikingMoE: per-token loop oracle, sparsity, gradients, dense path, windows, bad input."""

import pickle

import pytest
import torch
from torch import nn

from spiking_moe import LIF
from spiking_moe.experts import SpikingExpert
from spiking_moe.models import SpikingMoEClassifier
from spiking_moe.moe import (
    MoEOutput,
    SpikingMoE,
    set_dense,
    swapped_strategies,
    update_router_biases,
)
from spiking_moe.router import RateRouter, SpikingRouter, route

T, B, D, E, K = 6, 7, 8, 6, 2


class StubRouter(nn.Module):
    """Fixed learnable logits per token: routing independent of the input."""

    def __init__(self, n, num_experts=E, k=K, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(n, num_experts, generator=g) * 2)
        self.in_features, self.num_experts, self.k, self.window = D, num_experts, k, None

    def forward(self, x_TND):
        return route(self.logits[None], self.k)


# Tests that compare the layer with a loop over tokens or windows, or the sparse path with the
# dense one, compute the experts on other numbers of rows, and a GEMM's rounding depends on its
# row count (and differs between CPUs): in float32 that could flip a spike whose membrane lies
# within 1e-7 of the threshold, in float64 (1e-16) it cannot. Those tests run in float64.


def _spikes(shape, p=0.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=g)


def _experts(n=E, seed=0, **kw):
    torch.manual_seed(seed)
    return [SpikingExpert(D, 16, D, threshold=0.5, **kw) for _ in range(n)]


# The grouped GEMM takes float32 only: its tests put the experts' parameters on a grid of 2^-5
# (|w| < 0.36), so with binary inputs every sum an expert computes (at most 16 terms) is exact in
# float32 in any order: the paths' spikes are equal to the bit. Their gradients (surrogate
# derivatives) are float32 sums of up to n = T x rows = 42 products in two orders, which differ
# by at most about n 2^-24 sum|terms| = 2.5e-6 sum|terms|; _assert_grads_close allows 2^-14 of
# the tensor's largest value (that bound unless an element's terms add up to more than 20 times
# it), while a wrong row, gate or expert errs by a sizeable fraction of it.


def _on_grid(experts):
    with torch.no_grad():
        for expert in experts:
            for p in expert.parameters():
                p.copy_(torch.round(p * 32) / 32)
    return experts


def _assert_grads_close(got, want, msg=None):
    torch.testing.assert_close(got, want, rtol=0, atol=2**-14 * float(want.abs().max()), msg=msg)


def test_output_equals_a_per_token_loop_through_the_chosen_experts():
    moe = SpikingMoE(router=StubRouter(B), experts=_experts(), neuron=LIF(beta=0.8, threshold=0.3))
    moe.double()
    x = _spikes((T, B, D), dtype=torch.float64)
    out = moe(x)
    routing = out.routing
    current = torch.zeros(T, B, D, dtype=torch.float64)
    for n in range(B):
        for j in range(K):
            expert = moe.experts[int(routing.expert_ids[0, n, j])]
            current[:, n] += routing.gates[0, n, j] * expert(x[:, n : n + 1])[:, 0]
    ref = LIF(beta=0.8, threshold=0.3)(current)
    assert ref.sum() > 0, "the oracle must spike"
    assert torch.equal(out.spikes, ref)
    assert isinstance(out, MoEOutput) and out.aux_loss is routing.aux_loss


def test_each_expert_computes_on_exactly_its_routed_tokens():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=_experts())
    rows = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_pre_hook(lambda m, a, e=e: rows.__setitem__(e, a[0].shape[1]))
    out = moe(_spikes((T, 64, D), p=0.3))
    counts = out.routing.tokens_per_expert.tolist()
    assert counts == torch.bincount(out.routing.expert_ids.flatten(), minlength=E).tolist()
    assert {e: c for e, c in enumerate(counts) if c} == rows
    assert sum(rows.values()) == 64 * K


def test_gradients_reach_the_router_and_selected_experts_only():
    moe = SpikingMoE(router=RateRouter(D, 8, K), experts=_experts(8, seed=1))
    x = _spikes((T, 2, D), seed=3)  # 2 tokens x 2 choices: at most 4 of 8 experts chosen
    out = moe(x)
    (out.spikes.sum() + out.aux_loss).backward()
    chosen = set(out.routing.expert_ids.flatten().tolist())
    assert len(chosen) < 8
    assert moe.router.proj.weight.grad.abs().sum() > 0
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in chosen:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None for g in grads), e


@pytest.mark.parametrize("router_cls", [RateRouter, SpikingRouter])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_sparse_and_dense_masked_paths_agree(router_cls, capacity_factor):
    torch.manual_seed(0)
    router = router_cls(D, E, K, capacity_factor=capacity_factor)
    moe = SpikingMoE(router=router, experts=_experts(), neuron=LIF(threshold=0.2)).double()
    x = _spikes((T, 20, D), p=0.3, dtype=torch.float64)
    sparse = moe(x)
    sparse_grads = torch.autograd.grad(
        sparse.spikes.sum(), list(moe.parameters()), allow_unused=True
    )
    moe.dense = True
    dense = moe(x)
    dense_grads = torch.autograd.grad(dense.spikes.sum(), list(moe.parameters()))
    assert sparse.spikes.sum() > 0
    assert torch.equal(sparse.spikes, dense.spikes)
    assert torch.equal(sparse.routing.expert_ids, dense.routing.expert_ids)
    for (name, p), gs, gd in zip(moe.named_parameters(), sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(torch.zeros_like(p) if gs is None else gs, gd, msg=name)


def test_capacity_limits_rows_and_counts_drops():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K, capacity_factor=0.5), experts=_experts())
    rows = []
    for expert in moe.experts:
        expert.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    out = moe(_spikes((T, 40, D), p=0.3))
    capacity = out.routing.capacity
    assert capacity == 7  # ceil(0.5 * 40 * 2 / 6)
    assert max(rows) <= capacity
    assert sum(rows) == 40 * K - int(out.routing.dropped) and int(out.routing.dropped) > 0


def test_sequence_input_routes_every_position_as_a_token():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=_experts())
    x = _spikes((T, 3, 4, D))
    out = moe(x)
    flat = moe(x.reshape(T, 12, D))
    assert out.spikes.shape == (T, 3, 4, D)
    # Bitwise: the same tokens in the same order through the same kernels (no capacity).
    assert torch.equal(out.spikes.reshape(T, 12, D), flat.spikes)
    assert out.routing.expert_ids.shape == (1, 12, K)  # [W=1, N=B*S, K]


def test_windowed_layer_is_causal_in_routing_and_output():
    torch.manual_seed(0)
    L, w = 2, 1
    moe = SpikingMoE(router=RateRouter(D, E, K, window=L), experts=_experts()).double()
    # float64: the later windows' routing changes the experts' row counts for the earlier ones
    x = _spikes((9, 10, D), p=0.3, dtype=torch.float64)  # W = 5 windows, the last one step long
    changed = x.clone()
    changed[(w + 1) * L :] = 1 - changed[(w + 1) * L :]
    a, b = moe(x), moe(changed)
    assert a.routing.expert_ids.shape == (5, 10, K)
    assert torch.equal(a.routing.expert_ids[: w + 2], b.routing.expert_ids[: w + 2])
    assert torch.equal(a.spikes[: (w + 1) * L], b.spikes[: (w + 1) * L])
    assert not torch.equal(a.spikes, b.spikes)
    assert a.routing.tokens_per_expert.sum() == 5 * 10 * K


def test_windowed_layer_equals_per_window_loop():
    torch.manual_seed(0)
    L = 3
    moe = SpikingMoE(
        router=RateRouter(D, E, K, window=L), experts=_experts(), neuron=LIF(threshold=0.2)
    ).double()
    x = _spikes((8, 5, D), p=0.4, dtype=torch.float64)
    out = moe(x)
    ids, gates = out.routing.expert_ids, out.routing.gates
    current = torch.zeros(8, 5, D, dtype=torch.float64)
    for w in range(3):
        steps = slice(w * L, min((w + 1) * L, 8))
        for n in range(5):
            for j in range(K):
                expert = moe.experts[int(ids[w, n, j])]
                current[steps, n] += gates[w, n, j] * expert(x[steps, n : n + 1])[:, 0]
    assert torch.equal(out.spikes, LIF(threshold=0.2).double()(current))


def test_non_binary_input_is_rejected_unless_the_check_is_off():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=_experts())
    x = _spikes((T, B, D))
    x[0, 0, 0] = 0.37
    with pytest.raises(ValueError, match="binary"):
        moe(x)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="binary"):
        moe(x)
    x[0, 0, 0] = 0.37
    moe.check_spikes = False
    assert moe(x).spikes.shape == (T, B, D)


def test_bad_input_and_config_are_rejected():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=_experts())
    with pytest.raises(ValueError, match="3 dims|2 dims"):
        moe(torch.zeros(T, D))
    with pytest.raises(ValueError, match="5 dims"):
        moe(torch.zeros(T, 2, 2, 2, D))
    with pytest.raises(ValueError, match="8 input features"):
        moe(torch.zeros(T, B, D + 1))
    with pytest.raises(TypeError, match="floating"):
        moe(torch.zeros(T, B, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_experts=6 but 5 experts"):
        SpikingMoE(router=RateRouter(D, E, K), experts=_experts(5))
    with pytest.raises(ValueError, match="in_features"):
        SpikingMoE(router=RateRouter(D, 2, 1), experts=[SpikingExpert(D + 1, 4, D)] * 2)
    with pytest.raises(TypeError):
        SpikingMoE(RateRouter(D, E, K), _experts())  # keyword-only


def test_grouped_gemm_layer_equals_the_per_expert_calls():
    torch.manual_seed(0)
    router = RateRouter(D, E, K, capacity_factor=0.8)
    moe = SpikingMoE(router=router, experts=_on_grid(_experts()), grouped_gemm="never")
    x = _spikes((T, 24, D), p=0.3)
    ref = moe(x)
    ref_grads = torch.autograd.grad(ref.spikes.sum(), list(moe.parameters()), allow_unused=True)
    moe.grouped_gemm = "always"
    calls = []
    out = moe(x)
    assert not calls
    grads = torch.autograd.grad(out.spikes.sum(), list(moe.parameters()), allow_unused=True)
    assert ref.spikes.sum() > 0
    assert torch.equal(out.spikes, ref.spikes)
    for (name, p), g, r in zip(moe.named_parameters(), grads, ref_grads, strict=True):
        zeros = torch.zeros_like(p)
        _assert_grads_close(zeros if g is None else g, zeros if r is None else r, msg=name)
    # The grouped path reads the experts' parameters: a hook on an expert module does not see
    # it. A pass that must see every expert's call (the energy counter's) swaps the strategy.
    busiest = int(ref.routing.tokens_per_expert.argmax())
    moe.experts[busiest].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    out = moe(x)
    assert calls == []
    with swapped_strategies(moe, grouped_gemm="never"):
        out = moe(x)
    assert calls == [int(out.routing.tokens_per_expert[busiest])] and calls[0] > 0
    assert moe.grouped_gemm == "always"  # restored
    with pytest.raises(ValueError, match="grouped_gemm"):
        SpikingMoE(router=router, experts=_experts(), grouped_gemm="sometimes")


def test_grouped_gemm_always_names_why_the_experts_cannot_be_grouped():
    torch.manual_seed(0)
    experts = [SpikingExpert(D, 16, D) for _ in range(E - 1)] + [SpikingExpert(D, 32, D)]
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=experts, grouped_gemm="always")
    with pytest.raises(ValueError, match="cannot be grouped: expert 5 has other sizes"):
        moe(_spikes((T, 24, D)))
    moe.grouped_gemm = "auto"  # auto takes the per-expert calls instead, by rule
    assert moe(_spikes((T, 24, D))).spikes.shape == (T, 24, D)


def test_grouped_gemm_layer_gives_unrouted_experts_no_gradient():
    """Tokens routed (k=1) to 3 of 8 experts: on the grouped path the 5 idle experts' parameters
    keep ``grad`` None, as with one call per expert, and everything else matches."""
    n_exp, n_tok = 8, 12
    router = StubRouter(n_tok, num_experts=n_exp, k=1)
    with torch.no_grad():  # only experts 0, 3 and 5 can win
        router.logits.copy_(torch.randn(n_tok, n_exp) - 20)
        for n in range(n_tok):
            router.logits[n, (0, 3, 5)[n % 3]] = 5.0
    x = _spikes((T, n_tok, D), p=0.4)
    results = []
    for mode in ("never", "always"):
        moe = SpikingMoE(router=router, experts=_on_grid(_experts(n_exp)), grouped_gemm=mode)
        router.zero_grad(set_to_none=True)
        out = moe(x)
        assert out.routing.tokens_per_expert.tolist() == [4, 0, 0, 4, 0, 4, 0, 0]
        (out.spikes * torch.linspace(0.5, 1.5, D)).sum().backward()
        grads = {n: p.grad for n, p in moe.named_parameters()}
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    assert torch.equal(got.spikes, ref.spikes) and ref.spikes.sum() > 0
    assert got.activity.names == ref.activity.names
    torch.testing.assert_close(got.activity.spikes, ref.activity.spikes)
    for name, want in ref_grads.items():
        if name.startswith("experts.") and int(name.split(".")[1]) not in (0, 3, 5):
            assert want is None and got_grads[name] is None, name
        else:
            assert want is not None, name
            _assert_grads_close(got_grads[name], want, msg=name)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Whether each call of the experts took the grouped GEMM, in order."""
    import spiking_moe.strategies as strategies

    calls = []
    real = strategies.run_experts_with_activity

    def spy(*args, **kwargs):
        calls.append(kwargs.get("grouped", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "run_experts_with_activity", spy)
    return calls


@pytest.mark.parametrize(("mode", "grouped"), [("auto", False), ("never", False), ("always", True)])
def test_grouped_gemm_mode_choice_on_cpu(grouped_calls, mode, grouped):
    """On CPU "auto" calls each expert when few experts have rows (the grouped path is slower
    there for few of them)."""
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K), experts=_experts(), grouped_gemm=mode)
    moe(_spikes((T, 5, D)))
    assert grouped_calls == [grouped]


def test_auto_takes_the_grouped_path_on_cpu_when_many_experts_have_rows(grouped_calls, monkeypatch):
    import spiking_moe.strategies as strategies

    monkeypatch.setattr(strategies, "CPU_GROUPED_MIN_EXPERTS", 3)
    torch.manual_seed(0)
    many = SpikingMoE(router=RateRouter(D, 8, 2), experts=_on_grid(_experts(8)))
    x = _spikes((T, 64, D))
    busy = int((many.router(x.reshape(T, -1, D)).tokens_per_expert > 0).sum())
    assert busy >= 3  # enough experts received rows for the threshold
    reference = SpikingMoE(router=RateRouter(D, 8, 2), experts=_experts(8), grouped_gemm="never")
    reference.load_state_dict(many.state_dict())
    out = many(x)
    assert grouped_calls[-1] is True
    torch.testing.assert_close(out.spikes, reference(x).spikes)
    monkeypatch.setattr(strategies, "CPU_GROUPED_MIN_EXPERTS", 9)  # more than E: never grouped
    many(x)
    assert grouped_calls[-1] is False


def test_submodule_names_follow_the_contract():
    moe = SpikingMoE(router=RateRouter(D, 2, 1), experts=_experts(2))
    names = {n for n, _ in moe.named_modules()}
    assert {"router", "experts", "experts.0", "experts.1", "neuron"} <= names
    assert "experts.1.net.0.weight" in dict(moe.named_parameters())


def test_set_dense_and_update_router_biases_walk_the_model():
    model = SpikingMoEClassifier(5, 3, hidden_features=D, num_experts=4, num_moe_layers=2)
    assert set_dense(model, True) == 2
    assert all(m.dense for m in model.modules() if isinstance(m, SpikingMoE))
    assert set_dense(nn.Linear(2, 2), True) == 0
    out = model(torch.rand(T, 16, 5))
    update_router_biases(model, out.routing)
    update_router_biases(model, [out.routing, out.routing])  # two micro-batches
    bias = model.layers[0].router.expert_bias
    assert bias.abs().sum() > 0
    with pytest.raises(ValueError, match="2 MoE layers but 1"):
        update_router_biases(model, out.routing[:1])


def test_state_dict_round_trip_and_pickle():
    torch.manual_seed(0)
    make = lambda: SpikingMoE(  # noqa: E731
        router=SpikingRouter(D, E, K, window=2), experts=_experts(seed=1)
    )
    moe = make()
    moe.router.expert_bias.fill_(0.1)
    torch.manual_seed(5)
    fresh = make()
    fresh.load_state_dict(moe.state_dict())
    x = _spikes((T, B, D))
    assert torch.equal(fresh(x).spikes, moe(x).spikes)
    clone = pickle.loads(pickle.dumps(moe))
    assert torch.equal(clone(x).spikes, moe(x).spikes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda_and_matches_cpu():
    torch.manual_seed(0)
    moe = SpikingMoE(router=RateRouter(D, E, K, capacity_factor=1.0), experts=_experts())
    x = _spikes((T, 32, D))
    cpu = moe(x)
    gpu = moe.cuda()(x.cuda())
    assert torch.equal(gpu.routing.expert_ids.cpu(), cpu.routing.expert_ids)
    torch.testing.assert_close(gpu.spikes.cpu(), cpu.spikes)
    gpu.spikes.sum().backward()
    assert moe.router.proj.weight.grad.is_cuda


def test_unknown_dispatch_options_are_named_in_the_error():
    parts = dict(
        router=RateRouter(8, 2, 1), experts=[SpikingExpert(8, 4, 8), SpikingExpert(8, 4, 8)]
    )
    with pytest.raises(
        ValueError,
        match=r"moe\.grouped_gemm must be one of \['auto', 'never', 'always'\], got 'sometimes'",
    ):
        SpikingMoE(**parts, grouped_gemm="sometimes")
    with pytest.raises(
        ValueError, match=r"moe\.spike_exchange must be one of \[.*'bits', 'float'\], got 'bytes'"
    ):
        SpikingMoE(**parts, spike_exchange="bytes")
    layer = SpikingMoE(**parts)
    assert layer.exchanges_bits()  # auto: the input is checked to be spikes
    layer.check_spikes = False
    assert not layer.exchanges_bits()
    layer.spike_exchange = "bits"
    assert layer.exchanges_bits()
