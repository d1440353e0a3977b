"""Which LIF path runs: a named implementation that cannot run raises, "auto" falls back."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from spiking_moe.functional import lif as lif_module
from spiking_moe.functional.kernels import cpu_fused, triton_lif
from spiking_moe.functional.lif import lif_multistep

HAS_TRITON = importlib.util.find_spec("triton") is not None
EXPLICIT = ["fused", "triton"]
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)


def explicit_error(implementation: str, reason: str) -> str:
    """A regex for the error: names the implementation, gives the reason, suggests "auto"."""
    return rf'implementation="{implementation}" cannot run .*{reason}.*implementation="auto"'


def inputs(dtype=torch.float32):
    x = torch.rand(8, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x * 1.5).to(dtype)


def assert_same_run(a, b):
    assert torch.equal(a.spikes, b.spikes) and a.spikes.dtype == b.spikes.dtype
    assert torch.equal(a.v, b.v)
    assert torch.equal(a.membrane, b.membrane)


@pytest.mark.parametrize("implementation", EXPLICIT)
@HALF
def test_explicit_fused_paths_refuse_half_precision(implementation, dtype):
    x = inputs(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=explicit_error(implementation, f"{name} not supported")):
        lif_multistep(x, implementation=implementation)
    with pytest.raises(ValueError, match=r"\(float32, float64\)"):
        lif_multistep(x, implementation=implementation)


@pytest.mark.parametrize("implementation", EXPLICIT)
def test_explicit_fused_paths_refuse_arguments_on_different_devices(implementation):
    # The meta device stands in for a second device on a CPU-only machine.
    beta = torch.full((5,), 0.9, device="meta")
    with pytest.raises(
        ValueError, match=explicit_error(implementation, "different devices .*beta on meta")
    ):
        lif_multistep(inputs(), beta=beta, implementation=implementation)


@pytest.mark.parametrize("implementation", EXPLICIT)
@pytest.mark.parametrize("name", ["beta", "threshold"])
def test_explicit_fused_paths_refuse_parameters_that_promote_beyond_x(implementation, name):
    wide = torch.full((5,), 0.9, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=explicit_error(implementation, f"{name} .*promotes beyond x's dtype")
    ):
        lif_multistep(inputs(), **{name: wide}, implementation=implementation)


@pytest.mark.parametrize("implementation", EXPLICIT)
def test_explicit_fused_paths_refuse_v0_in_another_dtype(implementation):
    v0 = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=explicit_error(implementation, "v0 has dtype")):
        lif_multistep(inputs(), v0, implementation=implementation)


def test_explicit_triton_without_triton_is_an_environment_error(monkeypatch):
    monkeypatch.setattr(triton_lif, "triton", None)
    monkeypatch.setattr(triton_lif, "_IMPORT_ERROR", "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=explicit_error("triton", "triton is not importable")):
        lif_multistep(inputs(), implementation="triton")
    # "auto" on CPU never needed Triton.
    assert lif_module._choose_provider(inputs(), None, 0.9, 1.0, "auto") in (
        cpu_fused.CPP,
        cpu_fused.TORCH,
    )


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_explicit_triton_on_a_cpu_tensor_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        RuntimeError, match=explicit_error("triton", "needs a CUDA tensor.*TRITON_INTERPRET=1")
    ):
        lif_multistep(inputs(), implementation="triton")


def test_explicit_fused_without_the_cpp_build_runs_the_pytorch_provider(monkeypatch):
    # The PyTorch provider is a fused path too: asking for "fused" is satisfied, not an error.
    monkeypatch.setattr(cpu_fused.EXTENSION, "outcome", (None, "hidden by the test"))
    x = inputs()
    assert lif_module._choose_provider(x, None, 0.9, 1.0, "fused") is cpu_fused.TORCH
    fused = lif_multistep(x, implementation="fused", return_membrane=True)
    reference = lif_multistep(x, implementation="reference", return_membrane=True)
    assert torch.equal(fused.spikes, reference.spikes) and fused.spikes.sum() > 0


@HALF
def test_auto_runs_half_precision_on_the_reference_loop(dtype, caplog):
    x = inputs(dtype)
    with caplog.at_level(logging.DEBUG, logger=lif_module.__name__):
        assert lif_module._choose_provider(x, None, 0.9, 1.0, "auto") is None
    assert any(
        "reference loop" in r.getMessage() and str(dtype) in r.getMessage() for r in caplog.records
    )
    auto = lif_multistep(x, beta=0.9, return_membrane=True)
    reference = lif_multistep(x, beta=0.9, implementation="reference", return_membrane=True)
    assert auto.spikes.dtype == dtype and auto.spikes.sum() > 0
    assert_same_run(auto, reference)


def test_auto_runs_promoting_parameters_on_the_reference_loop():
    x = inputs()
    beta = torch.full((5,), 0.9, dtype=torch.float64)
    assert lif_module._choose_provider(x, None, beta, 1.0, "auto") is None
    auto = lif_multistep(x, beta=beta, return_membrane=True)
    reference = lif_multistep(x, beta=beta, implementation="reference", return_membrane=True)
    assert auto.spikes.dtype == torch.float64  # the loop's promoted dtype, as before
    assert_same_run(auto, reference)


def test_auto_sends_arguments_on_different_devices_to_the_reference_loop():
    beta = torch.full((5,), 0.9, device="meta")
    assert lif_module._choose_provider(inputs(), None, beta, 1.0, "auto") is None


def test_unknown_implementation_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid.*'auto'"):
        lif_multistep(inputs(), implementation="cuda")
