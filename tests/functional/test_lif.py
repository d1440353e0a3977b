import pytest
import torch

from spiking_moe.functional.lif import lif_multistep, lif_step


def test_hand_computed_five_step_trace_subtract():
    # beta=0.5, theta=1, x = 0.6, 0.6, 0.6, 1.5, 0:
    # h: 0.6, 0.9, 1.05 (fire), 0.025+1.5=1.525 (fire), 0.2625
    x = torch.tensor([0.6, 0.6, 0.6, 1.5, 0.0], dtype=torch.float64).view(5, 1)
    out = lif_multistep(x, beta=0.5, threshold=1.0, reset="subtract", return_membrane=True)
    assert out.spikes.flatten().tolist() == [0, 0, 1, 1, 0]
    expected_v = torch.tensor([0.6, 0.9, 0.05, 0.525, 0.2625], dtype=torch.float64)
    torch.testing.assert_close(out.membrane.flatten(), expected_v)
    torch.testing.assert_close(out.v.flatten(), expected_v[-1:])


def test_hand_computed_five_step_trace_zero():
    # Same input, hard reset: h: 0.6, 0.9, 1.05 (fire -> 0), 1.5 (fire -> 0), 0
    x = torch.tensor([0.6, 0.6, 0.6, 1.5, 0.0], dtype=torch.float64).view(5, 1)
    out = lif_multistep(x, beta=0.5, threshold=1.0, reset="zero", return_membrane=True)
    assert out.spikes.flatten().tolist() == [0, 0, 1, 1, 0]
    torch.testing.assert_close(
        out.membrane.flatten(), torch.tensor([0.6, 0.9, 0.0, 0.0, 0.0], dtype=torch.float64)
    )


def test_multistep_equals_repeated_step_with_initial_state():
    torch.manual_seed(0)
    x = torch.randn(20, 3, 7)
    v0 = torch.rand(3, 7)
    beta = torch.rand(7)
    threshold = torch.rand(7) + 0.5
    out = lif_multistep(x, v0, beta=beta, threshold=threshold, return_membrane=True)
    v = v0
    for t in range(20):
        s, v = lif_step(x[t], v, beta=beta, threshold=threshold)
        assert torch.equal(s, out.spikes[t])
        assert torch.equal(v, out.membrane[t])
    assert torch.equal(v, out.v)


def test_threshold_crossing_is_strict():
    out = lif_multistep(torch.tensor([[1.0], [0.0]]), beta=0.0, threshold=1.0)
    assert out.spikes.flatten().tolist() == [0.0, 0.0]


def test_detach_reset_removes_reset_gradient_only():
    torch.manual_seed(1)
    x = (torch.rand(10, 4, 5, dtype=torch.float64) * 1.5).requires_grad_(True)
    plain = lif_multistep(x, beta=0.8, surrogate="sigmoid", alpha=2.0)
    (g_plain,) = torch.autograd.grad(plain.spikes.sum(), x)
    detached = lif_multistep(x, beta=0.8, surrogate="sigmoid", alpha=2.0, detach_reset=True)
    (g_detached,) = torch.autograd.grad(detached.spikes.sum(), x)
    assert torch.equal(plain.spikes, detached.spikes)
    assert not torch.allclose(g_plain, g_detached)
    # Last step: no later reset to flow through, so the gradients agree there.
    torch.testing.assert_close(g_plain[-1], g_detached[-1])


def test_gradients_reach_beta_and_threshold():
    x = torch.rand(12, 2, 3) * 1.2
    beta = torch.full((3,), 0.7, requires_grad=True)
    threshold = torch.tensor(1.0, requires_grad=True)
    out = lif_multistep(x, beta=beta, threshold=threshold, return_membrane=True)
    out.membrane.sum().backward()
    assert beta.grad is not None and beta.grad.abs().sum() > 0
    assert threshold.grad is not None and threshold.grad.abs() > 0


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.randn(5), {}, ValueError, "at least 2 dims"),
        (torch.ones(5, 2, dtype=torch.int64), {}, TypeError, "floating-point"),
        (torch.tensor([[float("nan")], [0.0]]), {}, ValueError, "NaN"),
        (torch.randn(5, 2), {"beta": 1.5}, ValueError, "beta"),
        (torch.randn(5, 2), {"beta": -0.1}, ValueError, "beta"),
        (torch.randn(5, 2), {"threshold": 0.0}, ValueError, "threshold"),
        (torch.randn(5, 2), {"threshold": -1.0}, ValueError, "threshold"),
        (torch.randn(5, 2), {"reset": "none"}, ValueError, "unknown reset"),
        (torch.randn(5, 2), {"surrogate": "gauss"}, ValueError, "valid names"),
        (torch.randn(5, 2), {"implementation": "cuda"}, ValueError, "unknown implementation"),
        (torch.randn(5, 2, 3), {"beta": torch.rand(4)}, ValueError, "does not broadcast"),
        (torch.randn(5, 2, 3), {"v0": torch.zeros(3, 2)}, ValueError, "v0 has shape"),
    ],
)
def test_bad_input_names_the_problem(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        lif_multistep(x, **kwargs)


def test_lif_step_rejects_mismatched_state():
    with pytest.raises(ValueError, match="state v has shape"):
        lif_step(torch.zeros(2, 3), torch.zeros(3, 2))
