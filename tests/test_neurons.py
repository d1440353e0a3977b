"""LIF module tests, with snnTorch and Norse called directly as numerical oracles."""

import pickle

import pytest
import snntorch
import snntorch.surrogate as snn_surrogate
import torch
from norse.torch import LIFBoxCell, LIFBoxParameters
from norse.torch.functional.lif_box import LIFBoxFeedForwardState
from norse.torch.functional.reset import reset_subtract, reset_value

from spiking_moe import LIF

T, B, N = 50, 8, 16


def _inputs(seed, dtype=torch.float32):
    # beta <= 0.9, theta = 1, x < 1 keeps h < 2*theta: the range where snnTorch's
    # reset_delay=False agrees with our soft reset at every step.
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, B, N, generator=g, dtype=dtype) * 1.5 - 0.5


def _betas(per_neuron, seed=0):
    if per_neuron:
        return torch.rand(N, generator=torch.Generator().manual_seed(seed)) * 0.9
    return torch.tensor(0.85)


def _snntorch_run(x, beta, reset, learn_beta=False, slope=25):
    leaky = snntorch.Leaky(
        beta=beta,
        threshold=1.0,
        spike_grad=snn_surrogate.fast_sigmoid(slope=slope),
        reset_mechanism=reset,
        reset_delay=False,
        learn_beta=learn_beta,
    )
    mem = torch.zeros_like(x[0])
    spikes, mems = [], []
    for t in range(x.shape[0]):
        s, mem = leaky(x[t], mem)
        spikes.append(s)
        mems.append(mem)
    return torch.stack(spikes), torch.stack(mems), leaky


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("per_neuron", [False, True])
def test_spikes_and_membrane_equal_snntorch_leaky(reset, per_neuron):
    x = _inputs(1)
    beta = _betas(per_neuron)
    spikes_ref, mem_ref, _ = _snntorch_run(x, beta.clone(), reset)
    out = LIF(beta=beta, reset=reset).run(x, return_membrane=True)
    assert spikes_ref.sum() > 50, "the test input must make the neurons fire"
    assert torch.equal(out.spikes, spikes_ref)
    torch.testing.assert_close(out.membrane, mem_ref, rtol=0, atol=1e-6)


def test_snntorch_soft_reset_diverges_above_twice_threshold():
    # Documented limit of the correspondence: at h >= 2*theta snnTorch decides the spike
    # on h - theta (its carried membrane is still above threshold), we on h.
    # After h = 2.5 the carried membrane is 1.5 > theta; next h = 0.75 + 0.5 = 1.25 fires
    # here, while snnTorch tests 1.25 - 1 and stays silent.
    x = torch.tensor([2.5, 0.5, 0.5]).view(3, 1, 1)
    spikes_ref, _, _ = _snntorch_run(x, torch.tensor(0.5), "subtract")
    ours = LIF(beta=0.5)(x)
    assert ours.flatten().tolist() == [1.0, 1.0, 0.0]
    assert not torch.equal(ours, spikes_ref)


def test_snntorch_default_reset_delay_is_not_our_equation():
    x = _inputs(2)
    leaky = snntorch.Leaky(beta=0.85, spike_grad=snn_surrogate.fast_sigmoid(slope=25))
    mem = torch.zeros_like(x[0])
    spikes = []
    for t in range(T):
        s, mem = leaky(x[t], mem)
        spikes.append(s)
    assert not torch.equal(torch.stack(spikes), LIF(beta=0.85)(x))


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("per_neuron", [False, True])
def test_gradients_wrt_input_and_beta_equal_snntorch(reset, per_neuron):
    x = _inputs(3, torch.float64)
    beta = _betas(per_neuron, seed=3).double()
    x_ref = x.clone().requires_grad_(True)
    spikes_ref, mem_ref, leaky = _snntorch_run(x_ref, beta.clone(), reset, learn_beta=True)
    loss_ref = spikes_ref.sum() + 0.1 * mem_ref.pow(2).sum()
    loss_ref.backward()

    x_ours = x.clone().requires_grad_(True)
    lif = LIF(beta=beta, reset=reset, learn_beta=True, surrogate="fast_sigmoid", alpha=25.0)
    out = lif.run(x_ours, return_membrane=True)
    (out.spikes.sum() + 0.1 * out.membrane.pow(2).sum()).backward()

    assert x_ref.grad.abs().sum() > 0 and leaky.beta.grad.abs().sum() > 0
    # snnTorch's surrogates return float32 spikes ((x > 0).float()), so its gradients are
    # float32-accurate even in a float64 graph.
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        lif.beta.grad, leaky.beta.grad.reshape(lif.beta.shape), rtol=1e-5, atol=1e-5
    )


def _norse_run(x, beta, reset):
    dt = 1e-3
    params = LIFBoxParameters(
        tau_mem_inv=(1 - beta) / dt,
        v_leak=torch.tensor(0.0, dtype=x.dtype),
        v_th=torch.tensor(1.0, dtype=x.dtype),
        v_reset=torch.tensor(0.0, dtype=x.dtype),
        method="super",
        alpha=torch.tensor(1.0),
        reset_method=reset_subtract if reset == "subtract" else reset_value,
    )
    cell = LIFBoxCell(params, dt=dt)
    state = LIFBoxFeedForwardState(v=torch.zeros_like(x[0]))
    spikes, mems = [], []
    for t in range(x.shape[0]):
        s, state = cell(x[t] / (1 - beta), state)
        spikes.append(s)
        mems.append(state.v)
    return torch.stack(spikes), torch.stack(mems)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("per_neuron", [False, True])
def test_spikes_and_membrane_equal_norse_lif_box(reset, per_neuron):
    # float64 so that Norse's rescaled update rounds far below the threshold margins.
    x = _inputs(4, torch.float64) * 2  # Norse has no 2*theta limit: use larger inputs too
    beta = _betas(per_neuron, seed=4).double()
    spikes_ref, mem_ref = _norse_run(x, beta, reset)
    out = LIF(beta=beta, reset=reset).double().run(x, return_membrane=True)
    assert spikes_ref.sum() > 50
    assert torch.equal(out.spikes, spikes_ref)
    torch.testing.assert_close(out.membrane, mem_ref, rtol=1e-9, atol=1e-9)


def test_gradient_equals_norse_superspike_at_alpha_one():
    x = _inputs(5, torch.float64)
    x_ref = x.clone().requires_grad_(True)
    spikes_ref, mem_ref = _norse_run(x_ref, torch.tensor(0.8, dtype=torch.float64), "zero")
    (spikes_ref.sum() + mem_ref.sum()).backward()
    x_ours = x.clone().requires_grad_(True)
    beta = torch.tensor(0.8, dtype=torch.float64)
    out = LIF(beta=beta, reset="zero", alpha=1.0).run(x_ours, return_membrane=True)
    (out.spikes.sum() + out.membrane.sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["snntorch", "norse"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_backends_compute_the_same_layer(backend, reset):
    x = _inputs(6, torch.float64)
    native = LIF(beta=0.8, reset=reset).double().run(x, return_membrane=True)
    peer = LIF(beta=0.8, reset=reset, backend=backend).double().run(x, return_membrane=True)
    assert torch.equal(native.spikes, peer.spikes)
    torch.testing.assert_close(native.membrane, peer.membrane, rtol=1e-9, atol=1e-9)


def test_snntorch_backend_leaves_no_instances_behind():
    before = len(getattr(snntorch.SpikingNeuron, "instances", []))
    LIF(backend="snntorch")(torch.rand(3, 2, 4))
    assert len(getattr(snntorch.SpikingNeuron, "instances", [])) == before


def test_forward_returns_binary_spikes_of_input_shape_and_dtype():
    x = torch.randn(7, 3, 4, 5, dtype=torch.float64) * 2
    s = LIF()(x)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert set(s.unique().tolist()) <= {0.0, 1.0}


def test_constants_are_buffers_or_parameters_and_follow_to_and_state_dict():
    fixed = LIF(beta=0.7, threshold=0.5)
    assert set(fixed.state_dict()) == {"beta", "threshold"}
    assert list(fixed.parameters()) == []
    learned = LIF(beta=torch.full((4,), 0.7), learn_beta=True, learn_threshold=True)
    assert {n for n, _ in learned.named_parameters()} == {"beta", "threshold"}
    assert learned.double().beta.dtype == torch.float64
    restored = LIF(beta=torch.zeros(4), learn_beta=True, learn_threshold=True)
    restored.load_state_dict(learned.state_dict())
    assert torch.equal(restored.beta, learned.beta)


@pytest.mark.parametrize("backend", ["native", "snntorch", "norse"])
def test_module_pickles(backend):
    lif = LIF(beta=0.6, surrogate="fast_sigmoid", backend=backend, learn_beta=True)
    clone = pickle.loads(pickle.dumps(lif))
    x = torch.rand(5, 2, 3) * 2
    assert torch.equal(clone(x), lif(x))


def test_no_state_survives_between_calls():
    lif = LIF(beta=0.9)
    x = torch.rand(10, 2, 3) * 1.5
    assert torch.equal(lif(x), lif(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 1.2}, r"neuron\.beta must be <= 1\.0, got 1\.2"),
        ({"beta": -0.5}, r"neuron\.beta must be >= 0\.0, got -0\.5"),
        ({"beta": torch.tensor([0.5, 2.0])}, r"neuron\.beta\[1\] must be <= 1\.0, got 2\.0"),
        ({"beta": float("nan")}, r"neuron\.beta must be finite"),
        ({"threshold": 0.0}, r"neuron\.threshold must be > 0"),
        ({"threshold": -2.0}, r"neuron\.threshold must be > 0"),
        ({"reset": "none"}, r"neuron\.reset must be one of \['subtract', 'zero'\]"),
        ({"surrogate": "gauss"}, r"neuron\.surrogate must be one of \[.*'fast_sigmoid'"),
        ({"backend": "spikingjelly"}, r"neuron\.backend must be one of \['native'"),
        ({"backend": "norse", "surrogate": "atan"}, "supports surrogate 'fast_sigmoid'"),
        ({"backend": "norse", "beta": 1.0}, "beta < 1"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LIF(**kwargs)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(4), ValueError, r"at least 2 dims \[T, B, \.\.\.\]"),
        (torch.ones(4, 2, dtype=torch.int32), TypeError, "floating-point"),
        (torch.tensor([[0.1], [float("nan")]]), ValueError, "NaN"),
    ],
)
@pytest.mark.parametrize("backend", ["native", "snntorch", "norse"])
def test_bad_input_is_named(x, error, match, backend):
    with pytest.raises(error, match=match):
        LIF(backend=backend)(x)


# --- multi-level spiking neurons ----------------------------------------------------------


def _multi_level_loop(x, beta, theta, levels, reset):
    """The multi-level neuron written out: a plain loop, the spike as clamp plus a detached
    rounding correction (the textbook straight-through estimator)."""
    v = torch.zeros_like(x[0])
    out = []
    for x_t in x:
        h = beta * v + x_t
        clamped = (h / theta).clamp(0, levels)
        s = clamped + (clamped.round() - clamped).detach()
        v = h - theta * s if reset == "subtract" else h * (s == 0)
        out.append(s)
    return torch.stack(out), v


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_multi_level_neuron_matches_a_plain_loop_in_values_and_gradients(reset):
    from spiking_moe import MultiSpike

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 4, 10, generator=g, dtype=torch.float64) * 5 - 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    neuron = MultiSpike(levels=3, beta=0.6, threshold=0.8, reset=reset).double()
    out = neuron.run(x)
    # the module's own constants (stored in float32, then widened)
    ref_spikes, ref_v = _multi_level_loop(x_ref, neuron.beta, neuron.threshold, 3, reset)
    assert torch.equal(out.spikes, ref_spikes) and torch.equal(out.v, ref_v)
    assert set(out.spikes.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert torch.equal(neuron(x.detach()), out.spikes)  # forward skips the last reset only
    weights = torch.rand(out.spikes.shape, generator=g, dtype=torch.float64)
    (out.spikes * weights).sum().backward()
    (ref_spikes * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert neuron.spike_levels == 3


def test_a_nan_input_reaches_the_multi_level_spikes_instead_of_vanishing():
    from spiking_moe import MultiSpike

    spikes = MultiSpike()(torch.tensor([[[float("nan"), 1.2]]]))
    assert torch.isnan(spikes[0, 0, 0]) and spikes[0, 0, 1] == 1


def test_repr_shows_the_constants_as_given():
    """A float32 buffer holding 0.9 prints as 0.9 (its shortest float32 decimal), not as the
    float64 expansion 0.8999999761581421; per-neuron constants print their count."""
    assert "beta=0.9, threshold=1.5," in repr(LIF(beta=0.9, threshold=1.5))
    assert "beta=[3 values]" in repr(LIF(beta=torch.full((3,), 0.9)))
