import math

import pytest
import torch

from spiking_moe import encoding


def test_rate_code_mean_matches_probability_within_binomial_bound():
    probs = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
    num_steps, batch = 400, 50
    x = probs.expand(batch, -1)
    g = torch.Generator().manual_seed(123)
    spikes = encoding.rate(x, num_steps, generator=g)
    assert spikes.shape == (num_steps, batch, 6)
    n = num_steps * batch
    observed = spikes.mean(dim=(0, 1))
    for p, p_hat in zip(probs.tolist(), observed.tolist(), strict=True):
        bound = 5 * math.sqrt(p * (1 - p) / n) + 1e-12  # 5 sigma
        assert abs(p_hat - p) <= bound, (p, p_hat, bound)


def test_rate_code_is_reproducible_with_a_seeded_generator():
    x = torch.rand(8, 10)
    a = encoding.rate(x, 20, generator=torch.Generator().manual_seed(7))
    b = encoding.rate(x, 20, generator=torch.Generator().manual_seed(7))
    c = encoding.rate(x, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_latency_linear_spike_times_by_hand():
    x = torch.tensor([[1.0, 0.75, 0.5, 0.0]])
    spikes = encoding.latency(x, 5)
    assert spikes.shape == (5, 1, 4)
    # t = round((1 - x) * 4): 0, 1, 2, never (below threshold)
    assert spikes[:, 0].argmax(0).tolist()[:3] == [0, 1, 2]
    assert spikes.sum(0).flatten().tolist() == [1.0, 1.0, 1.0, 0.0]


def test_latency_log_mode_fires_once_and_stronger_earlier():
    x = torch.tensor([[0.9, 0.3, 0.05]])
    spikes = encoding.latency(x, 50, mode="log", tau=100.0)
    assert spikes.sum(0).flatten().tolist() == [1.0, 1.0, 1.0]
    times = spikes[:, 0].argmax(0).tolist()
    assert times[0] < times[1] < times[2]
    expected = [min(round(100.0 * math.log(v / (v - 0.01))), 49) for v in (0.9, 0.3, 0.05)]
    assert times == expected


def test_direct_repeats_current_without_copy():
    x = torch.randn(3, 4)
    out = encoding.direct(x, 6)
    assert out.shape == (6, 3, 4)
    assert all(torch.equal(out[t], x) for t in range(6))
    assert out.data_ptr() == x.data_ptr()


def test_delta_on_and_off_spikes_by_hand():
    x = torch.tensor([0.0, 0.5, 0.55, 0.2, 0.2]).view(5, 1, 1)
    on = encoding.delta(x, threshold=0.1)
    assert on.flatten().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    both = encoding.delta(x, threshold=0.1, off_spikes=True)
    assert both.shape == (5, 1, 1, 2)
    assert both[..., 1].flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: encoding.rate(torch.tensor([1.5]), 4), ValueError, r"\[0, 1\]"),
        (lambda: encoding.rate(torch.tensor([1, 0]), 4), TypeError, "floating-point"),
        (lambda: encoding.rate(torch.tensor([float("nan")]), 4), ValueError, "NaN"),
        (lambda: encoding.rate(torch.tensor([0.5]), 0), ValueError, "num_steps"),
        (
            lambda: encoding.latency(torch.tensor([0.5]), 4, mode="exp"),
            ValueError,
            "unknown latency mode",
        ),
        (lambda: encoding.delta(torch.tensor([0.5]), 0.1), ValueError, "time-major"),
        (lambda: encoding.delta(torch.zeros(3, 2), -1.0), ValueError, "threshold"),
        (lambda: encoding.direct(torch.zeros(3), 2.5), ValueError, "num_steps"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
