"""The fused one-node LIF (C++ kernel and its PyTorch fallback) against the reference loop."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lif_cases import SURROGATE_NAMES, assert_same, make_case, run_case

from spiking_moe import LIF
from spiking_moe.functional import lif as lif_module
from spiking_moe.functional.kernels import cpu_fused
from spiking_moe.functional.lif import lif_multistep


@pytest.fixture(params=["cpp", "torch"])
def provider(request, monkeypatch):
    """Run the test on the C++ kernel and on the PyTorch fallback (by hiding the C++ build)."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_fused.EXTENSION, "outcome", (None, "hidden by the test"))
    elif cpu_fused.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here (see test_cpp_kernel_builds)")
    return request.param


def test_cpp_kernel_builds():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja: the fused path uses its PyTorch fallback")
    assert cpu_fused.EXTENSION.load() is not None
    x = torch.zeros(3, 2)
    assert lif_module._choose_provider(x, None, 0.9, 1.0, "auto") is cpu_fused.CPP


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 9),
    step_shape=st.sampled_from([(3, 5), (2, 2, 4), (1, 1), (4, 1100)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    reset=st.sampled_from(["subtract", "zero"]),
    surrogate=st.sampled_from(SURROGATE_NAMES),
    alpha=st.sampled_from([None, 0.7, 3.0]),
    detach_reset=st.booleans(),
    learn=st.booleans(),
    per_neuron=st.booleans(),
    with_v0=st.booleans(),
    return_membrane=st.booleans(),
)
def test_fused_equals_reference_loop(
    provider,
    seed,
    steps,
    step_shape,
    dtype,
    reset,
    surrogate,
    alpha,
    detach_reset,
    learn,
    per_neuron,
    with_v0,
    return_membrane,
):
    case = make_case(seed, steps, step_shape, dtype, learn, per_neuron, with_v0)
    kwargs = dict(
        reset=reset,
        surrogate=surrogate,
        alpha=alpha,
        detach_reset=detach_reset,
        return_membrane=return_membrane,
    )
    reference = run_case("reference", case, learn, **kwargs)
    if reference[0].spikes.sum() == 0 or (reference[0].spikes == 1).all():
        return  # too few steps to both fire and stay silent; nothing to tell apart
    assert_same(reference, run_case("fused", case, learn, **kwargs))


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_fused_equals_reference_every_surrogate_long_sequence(provider, reset, surrogate):
    # 40 steps with learnable per-neuron parameters and v0: every adjoint term is exercised.
    case = make_case(7, 40, (3, 6), torch.float64, True, True, True)
    kwargs = dict(reset=reset, surrogate=surrogate, return_membrane=True)
    assert_same(
        run_case("reference", case, True, **kwargs), run_case("fused", case, True, **kwargs)
    )


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_gradcheck_membrane_path_against_finite_differences(provider, reset):
    # The spike path's gradient is a surrogate, not the derivative of the forward, so finite
    # differences cannot check it (that path is checked against the reference loop above).
    # The membrane path with detach_reset=True is the true derivative of the forward away from
    # threshold crossings: gradcheck checks x, v0, beta and threshold gradients there.
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 2, 3, generator=gen, dtype=torch.float64) * 1.6 - 0.2).requires_grad_()
    v0 = (torch.rand(2, 3, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()
    beta = (torch.rand(3, generator=gen, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    threshold = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def membrane_path(x, v0, beta, threshold):
        out = lif_multistep(
            x,
            v0,
            beta=beta,
            threshold=threshold,
            reset=reset,
            detach_reset=True,
            return_membrane=True,
            implementation="fused",
        )
        assert out.spikes.sum() > 0  # resets happen, so their gradient terms are exercised
        return out.membrane, out.v

    assert torch.autograd.gradcheck(membrane_path, (x, v0, beta, threshold), eps=1e-6, atol=1e-7)


def test_saved_for_backward_is_at_most_4_bytes_per_element_per_step(provider):
    steps, batch, neurons = 16, 8, 64
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def saved_bytes(module, x):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(t.numel() * t.element_size() for t in saved)

    x = torch.randn(steps, batch, neurons).requires_grad_()
    elements = steps * batch * neurons
    # Default LIF: only h ([T, B, N] fp32) plus the two 0-dim constants.
    assert saved_bytes(LIF(), x) <= 4 * elements + 8
    # Learnable per-neuron constants add parameter-sized tensors, not per-step ones.
    learnable = LIF(beta=torch.full((neurons,), 0.9), learn_beta=True, learn_threshold=True)
    assert saved_bytes(learnable, x) <= 4 * elements + 4 * batch * neurons
    # The reference loop's per-step graph keeps v, h - theta and s per step here: the bound
    # is not trivially met.
    learnable_ref = LIF(
        beta=torch.full((neurons,), 0.9),
        learn_beta=True,
        learn_threshold=True,
        implementation="reference",
    )
    assert saved_bytes(learnable_ref, x) > 8 * elements


def test_lif_module_uses_the_fused_node_by_default():
    spikes = LIF()(torch.rand(5, 2, 3, requires_grad=True))
    assert type(spikes.grad_fn).__name__ == "FusedLIFBackward"
    spikes_ref = LIF(implementation="reference")(torch.rand(5, 2, 3, requires_grad=True))
    assert type(spikes_ref.grad_fn).__name__ != "FusedLIFBackward"


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(cpu_fused.EXTENSION, "outcome", None)
    monkeypatch.delenv("SPIKING_MOE_NO_CPP", raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_fused.__name__):
        x = torch.rand(8, 2, 5) * 1.5
        assert lif_module._choose_provider(x, None, 0.9, 1.0, "auto") is cpu_fused.TORCH
        out = lif_multistep(x)
        lif_multistep(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    assert torch.equal(out.spikes, lif_multistep(x, implementation="reference").spikes)


def test_env_var_disables_the_cpp_build(monkeypatch):
    monkeypatch.setenv("SPIKING_MOE_NO_CPP", "1")
    monkeypatch.setattr(cpu_fused.EXTENSION, "outcome", None)
    assert cpu_fused.EXTENSION.load() is None


def test_fused_raises_on_nan_and_passes_inf_like_the_reference():
    x = torch.rand(6, 2, 3)
    x[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lif_multistep(x, implementation="fused")
    x[2, 1, 0] = float("inf")
    for reset in ("subtract", "zero"):
        fused = lif_multistep(x, reset=reset, implementation="fused", return_membrane=True)
        ref = lif_multistep(x, reset=reset, implementation="reference", return_membrane=True)
        assert torch.equal(fused.spikes, ref.spikes)
        torch.testing.assert_close(fused.membrane, ref.membrane, equal_nan=True)


def test_half_precision_runs_the_reference_loop():
    # PyTorch rounds a Python-float beta times a bfloat16 tensor in float32, a tensor beta in
    # bfloat16; only the loop itself reproduces both exactly, so half precision stays there.
    x = (torch.rand(10, 3, 4) * 1.5).to(torch.bfloat16)
    assert lif_module._choose_provider(x, None, 0.9, 1.0, "auto") is None
    assert lif_multistep(x).spikes.dtype == torch.bfloat16


def test_recycled_output_buffers_are_fully_overwritten_and_can_be_released():
    """Freed outputs of 4 MiB or more return to the C++ kernel's cache and are reused; a reused
    buffer must not leak the previous call's values into the next result."""
    if cpu_fused.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here (see test_cpp_kernel_builds)")
    module = cpu_fused.EXTENSION.load()
    cpu_fused.empty_cache()
    g = torch.Generator().manual_seed(0)
    big = (6, 2, 1 << 18)  # 12 MiB per fp32 output
    first = lif_multistep(torch.rand(big, generator=g) * 3, beta=0.9, implementation="fused")
    assert first.spikes.sum() > 0
    del first
    # Spikes came back to the cache; h, kept only for backward, was never written (no input
    # needs a gradient here).
    assert 12 * 2**20 <= module.cached_bytes() < 2 * 12 * 2**20
    trained = lif_multistep(
        (torch.rand(big, generator=g) * 3).requires_grad_(), beta=0.9, implementation="fused"
    )
    trained.spikes.sum().backward()
    del trained
    assert module.cached_bytes() >= 2 * 12 * 2**20  # with a gradient, h was written too
    x = torch.rand(big, generator=g) * 0.5  # weaker input: reused memory holds more spikes
    reused = lif_multistep(x, beta=0.9, implementation="fused", return_membrane=True)
    reference = lif_multistep(x, beta=0.9, implementation="reference", return_membrane=True)
    assert torch.equal(reused.spikes, reference.spikes)
    torch.testing.assert_close(reused.membrane, reference.membrane)
    del reused
    assert cpu_fused.empty_cache() > 0 and module.cached_bytes() == 0
