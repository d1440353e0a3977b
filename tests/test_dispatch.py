"""dispatch / run_experts / combine against a plain per-token loop, with stub experts."""

import re

import pytest
import torch
from torch import nn

from spiking_moe.dispatch import (
    combine,
    dense_masked,
    dispatch,
    grouped_supported,
    grouped_unsupported_reason,
    run_experts,
    run_experts_grouped,
    run_experts_with_activity,
)
from spiking_moe.experts import MLPExpert, SpikingExpert

T, N, D, O, E, K = 5, 9, 6, 4, 5, 2

# The stub-expert tests run in float64: the loop calls an expert on one token at a time, the
# sparse path on all of its rows at once, the dense path on every token, and a GEMM's rounding
# depends on its row count (and differs between CPUs); in float64 it stays near 1e-16, far
# inside assert_close's float64 tolerance (1e-7), which any wrong row or gate exceeds.


class StubExpert(nn.Module):
    """Nonlinear in x and in time (a running sum), so a wrong row or step shows up."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(D, O, generator=g, dtype=torch.float64))

    def forward(self, x_TND):
        return torch.tanh(x_TND @ self.weight).cumsum(0)


def _routing(seed, n=N, e=E, k=K):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    gates = torch.rand(n, k, generator=g, dtype=torch.float64).requires_grad_()
    return ids, gates


def _spikes(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    p = torch.full((T, n, D), 0.4, dtype=torch.float64)
    return torch.bernoulli(p, generator=g).requires_grad_()


def _loop(experts, x, ids, gates, kept=None):
    rows = []
    for n in range(x.shape[1]):
        y = 0
        for j in range(ids.shape[1]):
            if kept is None or kept[n, j]:
                y = y + gates[n, j] * experts[int(ids[n, j])](x[:, n : n + 1])[:, 0]
        rows.append(y if torch.is_tensor(y) else torch.zeros(T, O, dtype=x.dtype))
    return torch.stack(rows, 1)


def _sparse(experts, x, ids, gates, kept=None):
    grouped, plan = dispatch(x, ids, gates, len(experts), kept_NK=kept)
    return combine(run_experts(experts, grouped, plan), plan)


def _grads(out, tensors, seed=7):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight).sum(), tensors, allow_unused=True)


def test_sparse_equals_per_token_loop_values_and_gradients():
    experts = nn.ModuleList(StubExpert(e) for e in range(E))
    ids, gates = _routing(0)
    x = _spikes(1)
    leaves = [x, gates, *experts.parameters()]
    ref = _loop(experts, x, ids, gates)
    out = _sparse(experts, x, ids, gates)
    torch.testing.assert_close(out, ref)
    for got, want in zip(_grads(out, leaves), _grads(ref, leaves), strict=True):
        assert want is not None and want.abs().sum() > 0
        torch.testing.assert_close(got, want)


def test_each_expert_receives_exactly_its_rows_and_empty_experts_are_not_called():
    experts = nn.ModuleList(StubExpert(e) for e in range(E))
    ids = torch.tensor([[0, 2], [2, 0], [3, 0], [0, 2], [2, 3], [3, 0], [0, 2], [2, 0], [0, 3]])
    gates = torch.rand(N, K)
    seen = {}
    for e, expert in enumerate(experts):
        expert.register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, []).append(a[0]))
    grouped, plan = dispatch(_spikes(2), ids, gates, E)
    run_experts(experts, grouped, plan)
    # hand count: expert 0 in 8 tokens, 1 in none, 2 in 6, 3 in 4, 4 in none
    assert plan.splits == (8, 0, 6, 4, 0)
    assert plan.tokens_per_expert.tolist() == [8, 0, 6, 4, 0]
    assert sorted(seen) == [0, 2, 3]
    assert {e: [x.shape[1] for x in xs] for e, xs in seen.items()} == {0: [8], 2: [6], 3: [4]}
    assert sum(plan.splits) == grouped.shape[1] == N * K
    # Inside an expert the tokens keep their order, and the rows are those tokens' spikes.
    tokens_of_0 = [n for n in range(N) if 0 in ids[n].tolist()]
    assert plan.token_index[:8].tolist() == tokens_of_0
    assert torch.equal(seen[0][0], _spikes(2)[:, tokens_of_0].detach())


def test_sparse_equals_dense_masked_values_and_gradients():
    experts = nn.ModuleList(StubExpert(e) for e in range(E))
    ids, gates = _routing(3)
    x = _spikes(4)
    out = _sparse(experts, x, ids, gates)
    dense = dense_masked(experts, x, ids, gates, E)
    torch.testing.assert_close(out, dense)
    leaves = [x, gates, *experts.parameters()]
    for got, want in zip(_grads(out, leaves), _grads(dense, leaves), strict=True):
        # An expert nobody chose has no gradient on the sparse path, zeros on the dense one.
        torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want)


def test_dropped_assignments_are_not_computed_and_contribute_nothing():
    experts = nn.ModuleList(StubExpert(e) for e in range(E))
    ids, gates = _routing(5)
    kept = torch.ones(N, K, dtype=torch.bool)
    kept[0] = False  # token 0 loses both experts
    kept[3, 1] = False
    grouped, plan = dispatch(_spikes(6), ids, gates, E, kept_NK=kept)
    assert grouped.shape[1] == N * K - 3
    assert 0 not in plan.token_index.tolist()
    out = combine(run_experts(experts, grouped, plan), plan)
    ref = _loop(experts, _spikes(6), ids, gates, kept)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[:, 0], torch.zeros(T, O))


def test_all_dropped_gives_zero_current_of_the_right_shape():
    experts = nn.ModuleList(StubExpert(e) for e in range(E))
    ids, gates = _routing(8)
    grouped, plan = dispatch(_spikes(9), ids, gates, E, kept_NK=torch.zeros(N, K, dtype=bool))
    out = combine(run_experts(experts, grouped, plan), plan)
    assert torch.equal(out, torch.zeros(T, N, O))


@pytest.mark.parametrize(
    "ids, gates, match",
    [
        (torch.tensor([[0, 5]] * N), torch.rand(N, K), "outside"),
        (torch.tensor([[-1, 0]] * N), torch.rand(N, K), "outside"),
        (torch.zeros(N + 1, K, dtype=torch.int64), torch.rand(N + 1, K), "tokens"),
        (torch.zeros(N, K, dtype=torch.int32), torch.rand(N, K), "int64"),
        (torch.zeros(N, K, dtype=torch.int64), torch.rand(N, K + 1), "gates shape"),
    ],
)
def test_bad_routing_is_rejected(ids, gates, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dispatch(_spikes(0), ids, gates, E)


def test_wrong_expert_count_and_rank_are_rejected():
    ids, gates = _routing(0)
    grouped, plan = dispatch(_spikes(0), ids, gates, E)
    with pytest.raises(ValueError, match="5 experts"):
        run_experts([StubExpert(0)] * 3, grouped, plan)
    with pytest.raises(ValueError, match=r"\[T, N, D\]"):
        dispatch(_spikes(0)[0], ids, gates, E)
    with pytest.raises(ValueError, match="expert output"):
        combine(torch.zeros(T, 3, O), plan)


GD = 8  # _grouped_mm wants rows of a multiple of 16 bytes

# The grouped GEMM takes float32 only, and it sums in another order than the per-expert calls.
# Its forward is made exact instead: binary input and parameters on a grid of 2^-5 (|w| < 0.36)
# keep every sum of the three layers exact in float32 in any order (at most 12 terms; an
# MLPExpert's output, the widest, is below 2^6 with 15 fractional bits), so no hidden spike can
# flip and the outputs compare with torch.equal. Gradients pass through surrogate derivatives and
# random loss weights: float32 sums of up to n = R T = 90 products in two orders, which differ
# by at most about n 2^-24 sum|terms| = 5e-6 sum|terms|. _assert_grads_close allows 2^-14 of the
# tensor's largest value: that bound unless an element's terms add up to more than 10 times it,
# while a wrong row, gate or per-expert constant errs by a sizeable fraction of it.


def _on_grid(experts):
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.round(p * 32) / 32)
    return experts


def _assert_grads_close(got, want, msg=None):
    torch.testing.assert_close(got, want, rtol=0, atol=2**-14 * float(want.abs().max()), msg=msg)


def _grouped_case(cls, **kw):
    torch.manual_seed(0)
    experts = _on_grid(nn.ModuleList(cls(GD, 12, 8, num_layers=2, **kw) for _ in range(E)))
    ids = torch.tensor([[0, 2], [2, 0], [3, 0], [0, 2], [2, 3], [3, 0], [0, 2], [2, 0], [0, 3]])
    return experts, ids  # experts 1 and 4 get no rows


@pytest.mark.parametrize("cls", [SpikingExpert, MLPExpert])
def test_grouped_gemm_path_equals_the_per_expert_loop(cls):
    kw = dict(beta=0.7, threshold=0.4) if cls is SpikingExpert else {}
    experts, ids = _grouped_case(cls, **kw)
    if cls is SpikingExpert:  # per-expert constants must follow each expert's rows
        for e, expert in enumerate(experts):
            expert.net[1].beta.fill_(0.5 + 0.1 * e)
            expert.net[3].threshold.fill_(0.3 + 0.05 * e)
    assert grouped_supported(experts)
    gates = torch.rand(N, K, requires_grad=True)
    x = torch.bernoulli(torch.full((T, N, GD), 0.5)).requires_grad_()
    leaves = [x, gates, *experts.parameters()]
    grouped, plan = dispatch(x, ids, gates, E)
    ref = combine(run_experts(experts, grouped, plan), plan)
    grouped, plan = dispatch(x, ids, gates, E)  # its own graph: each backward frees its own
    out = combine(run_experts_grouped(experts, grouped, plan), plan)
    assert torch.equal(out, ref)
    for got, want in zip(_grads(out, leaves), _grads(ref, leaves), strict=True):
        if want is None:  # experts 1 and 4 got no rows: no gradient, not a zero one
            assert got is None
        else:
            _assert_grads_close(got, want)


@pytest.mark.parametrize("cls", [SpikingExpert, MLPExpert])
def test_grouped_gemm_stacks_only_routed_experts_idle_ones_get_no_gradient(cls):
    """E=8, k=1, every token on experts 1, 4 or 6: the five idle experts are left out of the
    grouped GEMM, so their parameters get no gradient (None, as on the per-expert path), while
    outputs, activity and the routed experts' gradients equal the per-expert path's."""
    n_tok, n_exp = 10, 8
    torch.manual_seed(1)
    experts = _on_grid(nn.ModuleList(cls(GD, 12, 8, num_layers=2) for _ in range(n_exp)))
    if cls is SpikingExpert:
        for e, expert in enumerate(experts):
            expert.net[1].beta.fill_(0.5 + 0.05 * e)
            expert.net[3].threshold.fill_(0.3 + 0.05 * e)
    assert grouped_supported(experts)
    ids = torch.tensor([6, 1, 4, 4, 6, 1, 1, 6, 4, 6]).view(n_tok, 1)
    gates = torch.rand(n_tok, 1)
    x_ref = torch.bernoulli(torch.full((T, n_tok, GD), 0.5)).requires_grad_()
    x_grp = x_ref.detach().clone().requires_grad_()
    g_ref, g_grp = (gates.clone().requires_grad_() for _ in range(2))
    weight = torch.randn(T, n_tok, 8)
    results = []
    for x, g, grouped in ((x_ref, g_ref, False), (x_grp, g_grp, True)):
        experts.zero_grad(set_to_none=True)
        rows, plan = dispatch(x, ids, g, n_exp)
        assert plan.splits == (0, 3, 0, 0, 3, 0, 4, 0)
        out = run_experts_with_activity(experts, rows, plan, grouped=grouped)
        y = combine(out.current, plan)
        (y * weight).sum().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in experts.parameters()]
        results.append((y.detach(), out.activity, grads))
    (y_ref, act_ref, grads_ref), (y_grp, act_grp, grads_grp) = results
    assert torch.equal(y_grp, y_ref)
    _assert_grads_close(x_grp.grad, x_ref.grad)
    _assert_grads_close(g_grp.grad, g_ref.grad)
    assert act_grp.names == act_ref.names  # every expert, idle ones too, in the same order
    if cls is SpikingExpert:
        assert len(act_ref.names) == 2 * n_exp
        torch.testing.assert_close(act_grp.spikes, act_ref.spikes.to(act_grp.spikes.dtype))
        torch.testing.assert_close(act_grp.updates, act_ref.updates.to(act_grp.updates.dtype))
        assert act_ref.spikes.sum() > 0
    names = [name for name, _ in experts.named_parameters()]
    for name, got, want in zip(names, grads_grp, grads_ref, strict=True):
        expert = int(name.split(".")[0])
        if expert in (1, 4, 6):
            assert want is not None and got is not None, name
            _assert_grads_close(got, want, msg=name)
        else:
            assert want is None and got is None, name


@pytest.mark.parametrize("cls", [SpikingExpert, MLPExpert])
def test_grouped_gemm_backward_takes_an_expanded_gradient(cls):
    """``out.sum().backward()`` hands ``_grouped_mm`` an expanded (stride 0) gradient."""
    experts, ids = _grouped_case(cls)
    x = torch.bernoulli(torch.full((T, N, GD), 0.5))
    rows, plan = dispatch(x, ids, torch.rand(N, K), E)
    run_experts_grouped(experts, rows, plan).sum().backward()
    got = [p.grad for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    run_experts(experts, rows, plan).sum().backward()
    for g, p in zip(got, experts.parameters(), strict=True):
        if p.grad is None:
            assert g is None
        else:
            _assert_grads_close(g, p.grad)


def test_grouped_gemm_with_every_assignment_dropped_matches_the_per_expert_path():
    experts, ids = _grouped_case(SpikingExpert)
    x = torch.bernoulli(torch.full((T, N, GD), 0.5))
    rows, plan = dispatch(x, ids, torch.rand(N, K), E, kept_NK=torch.zeros(N, K, dtype=bool))
    ref = run_experts_with_activity(experts, rows, plan)
    out = run_experts_with_activity(experts, rows, plan, grouped=True)
    assert out.current.shape == ref.current.shape == (T, 0, 8)
    assert out.activity.names == ref.activity.names
    assert out.activity.spikes.sum() == 0


def test_grouped_gemm_is_refused_when_it_could_not_be_exact():
    experts, _ = _grouped_case(SpikingExpert)
    refusals = [
        ([StubExpert(0), StubExpert(1)], "StubExpert is not a SpikingExpert"),
        (
            [*experts[:2], SpikingExpert(D, 12, 8, num_layers=2)],
            "expert 2 has other sizes",
        ),
        ([*experts[:2], SpikingExpert(GD, 12, 8, num_layers=1)], "expert 2 has 1 layers"),
        (
            [*experts[:2], SpikingExpert(GD, 12, 8, num_layers=2, reset="zero")],
            "differ in reset",
        ),
        (
            [*experts[:2], SpikingExpert(GD, 12, 8, num_layers=2, beta=torch.full((12,), 0.9))],
            "expert 2 has per-neuron beta",
        ),
        ([SpikingExpert(6, 12, 8)], r"sizes \(6, 12, 8\) in torch.float32"),  # 24-byte rows
    ]
    for group, reason in refusals:
        assert not grouped_supported(group)
        assert re.search(reason, grouped_unsupported_reason(group))
    assert grouped_supported(experts) and grouped_unsupported_reason(experts) is None
    # 8 features of 2 bytes are 16: fine in half precision; _grouped_mm has no float64.
    assert grouped_supported([SpikingExpert(8, 16, 8)], torch.float16)
    assert "not torch.float64" in grouped_unsupported_reason(experts, torch.float64)
