"""Attention: MatMul masks against loops, spiking self-attention against a loop reference of
the module docstring's formula, exact causality, and the softmax twin against PyTorch's SDPA."""

import math

import pytest
import torch
from tiny import random_spikes
from torch import nn

from spiking_moe.attention import MatMul, SoftmaxAttention, SpikingSelfAttention

T, B, S, D, H = 3, 2, 5, 8, 2
C = D // H


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- MatMul -----------------------------------------------------------------------------


def _assert_float32_sum(value, terms):
    """``value``: a float32 kernel's sum of ``terms`` (exact float64 products of float32
    numbers). Rounding the products and the sum, in whatever order the kernel adds, is within
    ``len(terms) * eps32 * sum|terms|`` of the exact sum (eps32 = 2^-23); a term too many or
    too few is not, unless it is that small."""
    bound = len(terms) * torch.finfo(torch.float32).eps * sum(abs(t) for t in terms)
    assert abs(value - sum(terms)) <= bound, (value, sum(terms), bound)


def test_matmul_without_mask_is_the_full_product():
    a, b = _randn(2, 4, 3, seed=1), _randn(2, 3, 5, seed=2)
    out = MatMul()(a, b)
    for z in range(2):
        for m in range(4):
            for n in range(5):
                terms = [float(a[z, m, k]) * float(b[z, k, n]) for k in range(3)]
                _assert_float32_sum(out[z, m, n].item(), terms)


def test_output_mask_keeps_only_columns_up_to_the_row_and_zeroes_the_rest_exactly():
    M, K = 5, 3
    a, b = _randn(2, M, K, seed=1), _randn(2, K, M, seed=2)
    out = MatMul("output")(a, b)
    for z in range(2):
        for m in range(M):
            for n in range(M):
                if n <= m:
                    terms = [float(a[z, m, k]) * float(b[z, k, n]) for k in range(K)]
                    _assert_float32_sum(out[z, m, n].item(), terms)
                else:
                    assert out[z, m, n].item() == 0.0, (z, m, n)


def test_contraction_mask_sums_only_over_k_up_to_the_row():
    M, N = 4, 3
    a, b = _randn(3, M, M, seed=3), _randn(3, M, N, seed=4)
    out = MatMul("contraction")(a, b)
    for z in range(3):
        for m in range(M):
            for n in range(N):
                terms = [float(a[z, m, k]) * float(b[z, k, n]) for k in range(m + 1)]
                _assert_float32_sum(out[z, m, n].item(), terms)


def test_contraction_row_does_not_depend_on_masked_entries_of_a_or_later_rows_of_b():
    a, b = _randn(4, 4, seed=5), _randn(4, 2, seed=6)
    out = MatMul("contraction")(a, b)
    a2, b2 = a.clone(), b.clone()
    a2[0, 1:] = 1e6  # masked terms of row 0
    b2[3] = -7.0  # only row 3 may see b[3]
    out2 = MatMul("contraction")(a2, b2)
    # Bitwise on any CPU: the same kernel and shapes, and the masked terms are exact zeros
    # (0 * b adds nothing to a partial sum).
    assert torch.equal(out[:3], out2[:3])
    assert not torch.equal(out[3], out2[3])


def test_masked_entries_stay_exactly_zero_even_when_they_would_be_non_finite():
    # The docstring promises the masked terms are never part of the result: a non-finite
    # value in a masked position must not leak (0 * inf is NaN when masking by multiplying).
    a = torch.tensor([[1.0, float("inf")], [1.0, 2.0]])
    out = MatMul("contraction")(a, torch.ones(2, 1))
    assert out[0, 0].item() == 1.0, "a[0, 1] is masked for row 0 but leaked into it"
    scores = MatMul("output")(
        torch.tensor([[1.0], [float("inf")]]), torch.tensor([[1.0, float("inf")]])
    )
    assert scores[0, 1].item() == 0.0


def test_matmul_rejects_unknown_masks_and_non_square_shapes():
    with pytest.raises(ValueError, match="unknown matmul_mask 'upper'"):
        MatMul("upper")
    with pytest.raises(ValueError, match=r"output mask needs square scores, got \(3, 4\)"):
        MatMul("output")(torch.ones(3, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"contraction mask needs a square a .*\(3, 4\)"):
        MatMul("contraction")(torch.ones(3, 4), torch.ones(4, 2))


# --- SpikingSelfAttention ---------------------------------------------------------------


def _ssa_reference(attn, x):
    """The module docstring's formula with explicit loops over t, b, h, i, j (float64)."""
    Tn, Bn, Sn, Dn = x.shape
    Hn = attn.num_heads
    Cn = Dn // Hn
    q = attn.q_neuron(attn.q_proj(x))
    k = attn.k_neuron(attn.k_proj(x))
    v = attn.v_neuron(attn.v_proj(x))
    y = torch.zeros_like(x)
    for t in range(Tn):
        for b in range(Bn):
            for h in range(Hn):
                cols = slice(h * Cn, (h + 1) * Cn)
                for i in range(Sn):
                    keys = range(i + 1) if attn.causal else range(Sn)
                    # sigma / (number of keys the row sees), computed once per row
                    scale = 1.0 / (math.sqrt(Cn) * len(keys))
                    acc = torch.zeros(Cn, dtype=x.dtype)
                    for j in keys:
                        a_ij = float((q[t, b, i, cols] * k[t, b, j, cols]).sum())
                        acc += a_ij * v[t, b, j, cols]
                    y[t, b, i, cols] = acc * scale
    spikes = attn.attn_neuron(y)
    return attn.out_proj(spikes), (q, k, v, y, spikes)


@pytest.mark.parametrize("causal", [True, False])
def test_spiking_self_attention_equals_a_loop_over_the_docstring_formula(causal):
    torch.manual_seed(0)
    attn = SpikingSelfAttention(D, H, causal=causal, threshold=0.4).double()
    x = random_spikes((T, B, S, D), seed=1).double()
    drive = {}
    attn.attn_neuron.register_forward_pre_hook(lambda m, args: drive.setdefault("y", args[0]))
    out = attn(x)
    with torch.no_grad():
        ref, (q, k, v, y, spikes) = _ssa_reference(attn, x)
    for name, s in (("q", q), ("k", k), ("v", v), ("attn", spikes)):
        assert 0 < s.sum() < s.numel(), f"{name} spikes must be neither silent nor saturated"
    torch.testing.assert_close(drive["y"], y, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.current, ref, rtol=1e-12, atol=1e-12)
    assert out.current.shape == (T, B, S, D)
    assert out.activity.names == ("q_neuron", "k_neuron", "v_neuron", "attn_neuron")
    assert out.activity.spikes.tolist() == [float(s.sum()) for s in (q, k, v, spikes)]


def test_changing_position_j_leaves_earlier_positions_unchanged_at_every_step():
    torch.manual_seed(0)
    attn = SpikingSelfAttention(D, H, threshold=0.2)
    x = random_spikes((T, B, S, D), seed=2)
    base = attn(x)
    assert base.activity.spikes[-1] > 0, "the attention neurons must fire"
    later_changed = 0
    for j in range(S):
        changed = x.clone()
        changed[:, :, j] = 1 - changed[:, :, j]
        out = attn(changed).current
        # Bitwise on any CPU: every product has the same shapes in both passes, and the masked
        # terms that carry position j are exact zeros (MatMul's masks), so earlier rows are the
        # same sums of the same numbers in the same order.
        assert torch.equal(out[:, :, :j], base.current[:, :, :j]), j
        later_changed += not torch.equal(out[:, :, j:], base.current[:, :, j:])
    assert later_changed >= S - 1  # the test is sensitive: later positions do see position j


def test_non_causal_attention_sees_later_positions():
    torch.manual_seed(0)
    attn = SpikingSelfAttention(D, H, causal=False, threshold=0.2)
    x = random_spikes((T, B, S, D), seed=2)
    changed = x.clone()
    changed[:, :, S - 1] = 1 - changed[:, :, S - 1]
    assert not torch.equal(attn(x).current[:, :, : S - 1], attn(changed).current[:, :, : S - 1])


def test_spiking_self_attention_rejects_bad_shapes_and_head_counts():
    attn = SpikingSelfAttention(D, H)
    with pytest.raises(ValueError, match=r"\[T, B, S, 8\], got shape \(3, 5, 8\)"):
        attn(torch.zeros(T, S, D))
    with pytest.raises(ValueError, match=r"got shape \(3, 2, 5, 6\)"):
        attn(torch.zeros(T, B, S, 6))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SpikingSelfAttention(10, 3)
    with pytest.raises(ValueError, match=r"attention\.num_heads must be >= 1, got 0"):
        SpikingSelfAttention(8, 0)


# --- SoftmaxAttention -------------------------------------------------------------------


def test_softmax_attention_equals_pytorch_scaled_dot_product_attention():
    # float64: SDPA's kernel sums and normalises in another order than the module's products
    # and softmax; in float64 the two agree to about 1e-15 on these O(1) values.
    torch.manual_seed(0)
    attn = SoftmaxAttention(D, H).double()
    x = _randn(B, S, D, seed=3, dtype=torch.float64)

    def heads(t):
        return t.view(B, S, H, C).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.out_proj(mixed.transpose(1, 2).reshape(B, S, D))
    torch.testing.assert_close(attn(x), ref, rtol=1e-12, atol=1e-12)

    full = SoftmaxAttention(D, H, causal=False).double()
    full.load_state_dict(attn.state_dict())
    mixed = nn.functional.scaled_dot_product_attention(q, k, v)
    ref = attn.out_proj(mixed.transpose(1, 2).reshape(B, S, D))
    torch.testing.assert_close(full(x), ref, rtol=1e-12, atol=1e-12)


def test_softmax_attention_is_exactly_causal_and_rejects_bad_shapes():
    torch.manual_seed(0)
    attn = SoftmaxAttention(D, H)
    x = _randn(B, S, D, seed=4)
    changed = x.clone()
    changed[:, 3] += 5.0
    # Bitwise: masked scores are -inf, their weights exact zeros (as in SpikingSelfAttention).
    assert torch.equal(attn(x)[:, :3], attn(changed)[:, :3])
    assert not torch.equal(attn(x)[:, 3:], attn(changed)[:, 3:])
    with pytest.raises(ValueError, match=r"\[B, S, 8\], got \(2, 5, 4\)"):
        attn(torch.zeros(B, S, 4))
