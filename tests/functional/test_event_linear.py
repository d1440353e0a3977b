"""event_linear (C++ kernel, Triton kernel, PyTorch event-driven reference) against F.linear."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spiking_moe.functional import event as event_module
from spiking_moe.functional import event_linear
from spiking_moe.functional.kernels import event_cpu
from spiking_moe.functional.kernels.protocol import EventLinearArgs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=["cpp", "torch"])
def implementation(request):
    """Each event-driven CPU implementation by name (the C++ one skipped where it cannot build)."""
    if request.param == "cpp" and event_cpu.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here (see test_cpp_kernel_builds)")
    return request.param


def needs_cpp():
    if event_cpu.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here (see test_cpp_kernel_builds)")


def spikes(shape, density, seed=0, dtype=torch.float32):
    """Binary tensor with exactly round(density * numel) ones at random places."""
    generator = torch.Generator().manual_seed(seed)
    numel = int(torch.Size(shape).numel())
    flat = torch.zeros(numel, dtype=dtype)
    flat[torch.randperm(numel, generator=generator)[: round(density * numel)]] = 1.0
    return flat.view(shape)


def linear_parts(n_in, n_out, dtype, seed=1, integer=False, with_bias=True):
    generator = torch.Generator().manual_seed(seed)
    if integer:  # small integers: every sum is exact, in any order
        weight = torch.randint(-4, 5, (n_out, n_in), generator=generator).to(dtype)
        bias = torch.randint(-4, 5, (n_out,), generator=generator).to(dtype)
    else:
        weight = torch.randn(n_out, n_in, generator=generator, dtype=dtype)
        bias = torch.randn(n_out, generator=generator, dtype=dtype)
    return weight, bias if with_bias else None


def assert_matches_dense(y, x, weight, bias):
    expected = F.linear(x, weight, bias)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    # Different summation orders: float32 sums of ~1000 unit terms differ by ~1e-5.
    atol = 1e-4 if y.dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=atol)


def test_cpp_kernel_builds():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja: event_linear uses the dense product")
    assert event_cpu.EXTENSION.load() is not None
    assert "generic" in event_cpu.available_isas()
    assert event_module._choose_kernel(torch.zeros(2, 3), "auto", 4) == (
        event_cpu.CPP,
        event_module.auto_dense_above("cpu", 3, 4),
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lead=st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 4), (65,), (130,)]),
    n_in=st.sampled_from([1, 3, 16, 17, 100, 1030]),
    n_out=st.sampled_from([1, 5, 31, 32, 64, 129, 300]),
    density=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    name=st.sampled_from(["auto", "cpp", "torch"]),
)
def test_equals_dense_on_binary_inputs(seed, lead, n_in, n_out, density, dtype, with_bias, name):
    if name == "cpp" and event_cpu.EXTENSION.load() is None:
        return
    x = spikes((*lead, n_in), density, seed, dtype)
    weight, bias = linear_parts(n_in, n_out, dtype, seed + 1, with_bias=with_bias)
    assert_matches_dense(event_linear(x, weight, bias, implementation=name), x, weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_for_small_integer_weights_at_every_density(implementation, dtype, with_bias):
    weight, bias = linear_parts(70, 200, dtype, integer=True, with_bias=with_bias)
    for step in range(11):
        x = spikes((4, 33, 70), step / 10, seed=step, dtype=dtype)
        y = event_linear(x, weight, bias, implementation=implementation)
        assert torch.equal(y, F.linear(x, weight, bias)), step / 10


def test_silent_and_saturated_inputs(implementation):
    weight, bias = linear_parts(40, 130, torch.float64, integer=True)
    silent = torch.zeros(9, 40, dtype=torch.float64)
    y = event_linear(silent, weight, bias, implementation=implementation)
    assert torch.equal(y, bias.expand(9, 130))
    assert torch.equal(
        event_linear(silent, weight, implementation=implementation), silent @ weight.T
    )
    saturated = torch.ones(9, 40, dtype=torch.float64)
    y = event_linear(saturated, weight, bias, implementation=implementation)
    assert torch.equal(y, (weight.sum(1) + bias).expand(9, 130))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_binary_inputs_are_multiplied_in(implementation, dtype):
    # Values other than 1 (graded spikes, negatives, a mix of binary and non-binary rows).
    generator = torch.Generator().manual_seed(3)
    x = spikes((70, 90), 0.1, seed=4, dtype=dtype)
    x[::3] *= torch.randn(x[::3].shape, generator=generator, dtype=dtype)
    x[1::7] *= 2.0
    weight, bias = linear_parts(90, 150, dtype)
    assert_matches_dense(
        event_linear(x, weight, bias, implementation=implementation), x, weight, bias
    )
    weight, bias = linear_parts(90, 150, dtype, integer=True)
    x = spikes((70, 90), 0.3, seed=5, dtype=dtype) * torch.randint(-3, 4, (70, 90)).to(dtype)
    y = event_linear(x, weight, bias, implementation=implementation)
    assert torch.equal(y, F.linear(x, weight, bias))


def test_dense_random_input_equals_dense(implementation):
    x = torch.randn(40, 64, dtype=torch.float64)
    weight, bias = linear_parts(64, 96, torch.float64)
    assert_matches_dense(
        event_linear(x, weight, bias, implementation=implementation), x, weight, bias
    )


def test_batch_layouts_and_non_contiguous_inputs(implementation):
    weight, bias = linear_parts(48, 80, torch.float32)
    x_BTI = spikes((6, 10, 48), 0.1, seed=7)
    layouts = {
        "time-major view": x_BTI.transpose(0, 1),
        "strided features": spikes((6, 10, 96), 0.1, seed=8)[..., ::2],
        "broadcast rows": spikes((1, 48), 0.2, seed=9).expand(12, 48),
        "channels-last-like": spikes((48, 5, 4), 0.2, seed=10).permute(1, 2, 0),
    }
    for label, x in layouts.items():
        assert not x.is_contiguous(), label
        y = event_linear(x, weight, bias, implementation=implementation)
        assert_matches_dense(y, x, weight, bias)


def test_empty_inputs(implementation):
    weight, bias = linear_parts(8, 5, torch.float32)
    for shape in [(0, 8), (3, 0, 8), (0,) + (8,)]:
        x = torch.zeros(shape)
        y = event_linear(x, weight, bias, implementation=implementation)
        assert y.shape == (*shape[:-1], 5)
    # No input features: the bias (or zeros) on every row.
    y = event_linear(torch.zeros(4, 0), torch.zeros(5, 0), bias, implementation=implementation)
    assert torch.equal(y, bias.expand(4, 5))
    # No output features.
    y = event_linear(torch.ones(4, 8), torch.zeros(0, 8), implementation=implementation)
    assert y.shape == (4, 0)


def test_cached_weight_t(implementation):
    x = spikes((20, 30), 0.2, seed=11)
    weight, bias = linear_parts(30, 50, torch.float32)
    cached = weight.t().contiguous()
    y = event_linear(x, weight, bias, weight_t=cached, implementation=implementation)
    assert torch.equal(y, event_linear(x, weight, bias, implementation=implementation))
    # A non-contiguous weight_t is accepted (copied).
    y = event_linear(x, weight, bias, weight_t=weight.t(), implementation=implementation)
    assert_matches_dense(y, x, weight, bias)


def test_gradients_equal_dense_gradients(implementation):
    x = spikes((3, 7, 20), 0.2, seed=12, dtype=torch.float64).requires_grad_()
    weight, bias = linear_parts(20, 30, torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()
    cached = weight.detach().t().contiguous()
    grad_y = torch.randn(3, 7, 30, dtype=torch.float64)
    y = event_linear(x, weight, bias, weight_t=cached, implementation=implementation)
    got = torch.autograd.grad(y, (x, weight, bias), grad_y)
    expected = torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad_y)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_gradcheck(implementation):
    # Linear in x: perturbing a zero entry makes it active, so finite differences apply anywhere.
    x = spikes((5, 6), 0.3, seed=13, dtype=torch.float64).requires_grad_()
    weight, bias = linear_parts(6, 4, torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: event_linear(x, w, b, implementation=implementation), (x, weight, bias)
    )


def test_nan_input_propagates_and_zero_inputs_skip_infinite_weights(implementation):
    weight = torch.ones(3, 4)
    x = torch.tensor([[float("nan"), 0.0, 1.0, 0.0]])
    assert torch.isnan(event_linear(x, weight, implementation=implementation)).all()
    weight[:, 1] = float("inf")  # input 1 is silent: skipped, not 0 * inf = NaN
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(
        event_linear(x, weight, implementation=implementation), torch.full((1, 3), 2.0)
    )


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpp", "torch", "dense"])
def test_bad_input_raises_clear_errors(name):
    if name == "cpp" and event_cpu.EXTENSION.load() is None:
        pytest.skip("no C++ kernel")
    weight, bias = linear_parts(8, 5, torch.float32)
    x = spikes((4, 8), 0.5)
    with pytest.raises(ValueError, match=r"7 input features.*expects 8"):
        event_linear(torch.zeros(4, 7), weight, implementation=name)
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        event_linear(x.long(), weight, implementation=name)
    with pytest.raises(TypeError, match="floating-point.*torch.int32"):
        event_linear(x, weight.int(), implementation=name)
    with pytest.raises(TypeError, match="float64.*float32"):
        event_linear(x.double(), weight, implementation=name)
    with pytest.raises(ValueError, match="2-D"):
        event_linear(x, weight[0], implementation=name)
    with pytest.raises(ValueError, match="scalar"):
        event_linear(torch.tensor(1.0), weight, implementation=name)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(5,\)"):
        event_linear(x, weight, bias[:4], implementation=name)
    with pytest.raises(ValueError, match=r"weight_t has shape \(5, 8\), expected \(8, 5\)"):
        event_linear(x, weight, weight_t=weight, implementation=name)
    with pytest.raises(ValueError, match="bias is torch.float64"):
        event_linear(x, weight, bias.double(), implementation=name)


def test_unknown_or_impossible_implementation_raises():
    weight, _ = linear_parts(8, 5, torch.float32)
    x = spikes((4, 8), 0.5)
    with pytest.raises(ValueError, match="unknown implementation 'sparse'"):
        event_linear(x, weight, implementation="sparse")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match='implementation="triton" cannot run here'):
            event_linear(x, weight, implementation="triton")
    with pytest.raises(RuntimeError, match='implementation="cpp" cannot run here.*float16'):
        event_linear(x.half(), weight.half(), implementation="cpp")
    # "auto" falls back to the dense product instead; the reference runs any dtype.
    y = event_linear(x.half(), weight.half(), implementation="auto")
    assert torch.equal(y, F.linear(x.half(), weight.half()))
    y = event_linear(x.bfloat16(), weight.bfloat16(), implementation="torch")
    torch.testing.assert_close(y, F.linear(x.bfloat16(), weight.bfloat16()))


# ---- the C++ kernel -----------------------------------------------------------------------------


def test_threads_give_bitwise_identical_results():
    needs_cpp()
    x = spikes((300, 257), 0.1, seed=14)  # 5 tiles of 64 rows: split over the threads
    x[5:9] *= 1.5
    weight, bias = linear_parts(257, 333, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = event_linear(x, weight, bias, implementation="cpp")
        torch.set_num_threads(2)
        two = event_linear(x, weight, bias, implementation="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in", [200, 4099])
def test_every_instruction_set_and_the_reference_agree(dtype, n_in):
    # 4099 inputs: split into chunks (one output block's weight slice stays in L2) in every ISA.
    needs_cpp()
    x = spikes((150, n_in), 0.07, seed=15, dtype=dtype)
    x[::4] *= 0.5  # some rows take the multiply loop
    weight, bias = linear_parts(n_in, 301, dtype)  # 301: full blocks and a partial one
    weight_t = weight.t().contiguous()
    results = {
        isa: event_cpu.CPP.forward(EventLinearArgs(x, weight_t, bias, 1.0), isa)
        for isa in event_cpu.available_isas()
    }
    for isa, y in results.items():
        assert torch.equal(y, results["generic"]), isa
    reference = event_linear(x, weight, bias, implementation="torch")
    torch.testing.assert_close(results["generic"], reference, rtol=1e-6, atol=1e-6)
    weight, bias = linear_parts(n_in, 301, dtype, integer=True)
    x = spikes((150, n_in), 0.3, seed=16, dtype=dtype)
    for isa in event_cpu.available_isas():
        y = event_cpu.CPP.forward(EventLinearArgs(x, weight.t().contiguous(), bias, 1.0), isa)
        assert torch.equal(y, F.linear(x, weight, bias)), isa


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_scans_special_values_and_tails(dtype):
    # 37 inputs: whole vector blocks plus a scalar tail for every lane count (2 to 16).
    needs_cpp()
    n_in = 37
    weight, bias = linear_parts(n_in, 40, dtype, integer=True)
    weight_t = weight.t().contiguous()
    x = torch.zeros(2 * n_in + 3, n_in, dtype=dtype)
    for i in range(n_in):
        x[i, i] = 1.0  # one spike, at each position
        x[n_in + i, i] = -0.0  # a negative zero: silent
        x[n_in + i, (i + 5) % n_in] = 1.0
    x[-3, ::3] = 2.0  # graded
    x[-2, 1::2] = 1.0
    x[-2, 30] = float("nan")  # in the tail for 16 lanes, in a vector block for 2 to 8
    x[-1, 7] = float("inf")
    expected = F.linear(x, weight, bias)
    for isa in event_cpu.available_isas():
        y = event_cpu.CPP.forward(EventLinearArgs(x, weight_t, bias, 1.0), isa)
        assert torch.equal(y[:-2], expected[:-2]), isa
        assert torch.isnan(y[-2]).all(), isa
        torch.testing.assert_close(y[-1], expected[-1], equal_nan=True, msg=isa)


def test_very_wide_inputs():
    # 2^19 inputs: tiles shrink to 8 rows (index lists bounded), and many input chunks.
    needs_cpp()
    n_in = 1 << 19
    x = spikes((20, n_in), 0.02, seed=17)
    weight, bias = linear_parts(n_in, 5, torch.float32, integer=True)
    y = event_linear(x, weight, bias, implementation="cpp")
    assert torch.equal(y, F.linear(x, weight, bias))


def test_density_above_max_density_computes_nothing():
    needs_cpp()
    weight, _ = linear_parts(100, 20, torch.float32)
    weight_t = weight.t().contiguous()
    assert (
        event_cpu.CPP.forward(EventLinearArgs(spikes((50, 100), 0.3), weight_t, None, 0.25)) is None
    )
    y = event_cpu.CPP.forward(EventLinearArgs(spikes((50, 100), 0.2), weight_t, None, 0.25))
    assert_matches_dense(y, spikes((50, 100), 0.2), weight, None)
    # Negative zeros are silent; NaNs count.
    x = spikes((50, 100), 0.2)
    x[(spikes((50, 100), 0.5, seed=1) == 1) & (x == 0)] = -0.0
    assert (x.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).sum() > 0.3 * x.numel()
    assert_matches_dense(
        event_cpu.CPP.forward(EventLinearArgs(x, weight_t, None, 0.25)), x, weight, None
    )
    x = torch.full((50, 100), float("nan"))
    assert event_cpu.CPP.forward(EventLinearArgs(x, weight_t, None, 0.99)) is None


def test_auto_is_dense_above_the_threshold_and_event_driven_below(monkeypatch):
    needs_cpp()
    monkeypatch.setenv("SPIKING_MOE_EVENT_DENSITY", "0.25")
    weight, bias = linear_parts(100, 20, torch.float32)
    calls = []
    dense = F.linear
    monkeypatch.setattr(event_module.F, "linear", lambda *args: calls.append(1) or dense(*args))
    event_linear(spikes((50, 100), 0.2), weight, bias)
    assert calls == []
    event_linear(spikes((50, 100), 0.3), weight, bias)
    assert calls == [1]


def test_kernel_rejects_bad_arguments_without_crashing():
    needs_cpp()
    module = event_cpu.EXTENSION.load()
    x = spikes((4, 8), 0.5)
    wt = torch.zeros(8, 5)
    with pytest.raises(RuntimeError, match="contiguous"):
        module.event_linear_forward(x.t(), torch.zeros(4, 5), None, 1.0, "auto")
    with pytest.raises(RuntimeError, match="input features"):
        module.event_linear_forward(x, torch.zeros(7, 5), None, 1.0, "auto")
    with pytest.raises(RuntimeError, match="dtype"):
        module.event_linear_forward(x, wt.double(), None, 1.0, "auto")
    with pytest.raises(RuntimeError, match="bias"):
        module.event_linear_forward(x, wt, torch.zeros(4), 1.0, "auto")
    with pytest.raises(RuntimeError, match="not available"):
        module.event_linear_forward(x, wt, None, 1.0, "avx9000")
    with pytest.raises(RuntimeError):
        module.event_linear_forward(x.long(), wt.long(), None, 1.0, "auto")


def test_hidden_cpp_build_falls_back_to_dense(monkeypatch):
    monkeypatch.setattr(event_cpu.EXTENSION, "outcome", (None, "hidden by the test"))
    x = spikes((10, 16), 0.1)
    weight, bias = linear_parts(16, 8, torch.float32)
    assert event_module._choose_kernel(x, "auto", 8) == (None, 1.0)
    assert torch.equal(event_linear(x, weight, bias), F.linear(x, weight, bias))
    with pytest.raises(RuntimeError, match="hidden by the test"):
        event_linear(x, weight, bias, implementation="cpp")


def test_spiking_moe_no_cpp_disables_the_build():
    script = textwrap.dedent(
        """
        import torch
        from spiking_moe.functional import event_linear
        from spiking_moe.functional.kernels import event_cpu
        x = torch.eye(3)
        assert torch.equal(event_linear(x, 2 * x), 2 * x)
        assert event_cpu.EXTENSION.load() is None
        try:
            event_linear(x, x, implementation="cpp")
        except RuntimeError as error:
            assert "SPIKING_MOE_NO_CPP" in str(error), error
        else:
            raise AssertionError("cpp ran with SPIKING_MOE_NO_CPP=1")
        print("ok")
        """
    )
    env = dict(os.environ, SPIKING_MOE_NO_CPP="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok" in result.stdout


# ---- the Triton kernel --------------------------------------------------------------------------

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from spiking_moe.functional import event, event_linear
    from spiking_moe.functional.kernels import triton_event

    x = torch.zeros(2, 3)
    assert event._choose_kernel(x, "triton", 4)[0] is triton_event.TRITON
    assert event._choose_kernel(x, "auto", 4)[0] is not triton_event.TRITON  # CPU: never Triton
    count = 0
    for dtype in (torch.float32, torch.float64):
        # 300 outputs: three programs of 128, the last masked; 40 inputs at density 1: three
        # chunks of 16 active entries, the last masked; rows with no spikes at density 0.
        for i, (lead, n_in, n_out, density) in enumerate(
            [((5,), 40, 300, 0.2), ((2, 3), 40, 300, 1.0), ((4,), 17, 7, 0.0),
             ((9,), 33, 128, 0.05)]
        ):
            g = torch.Generator().manual_seed(i)
            x = (torch.rand((*lead, n_in), generator=g) < density).to(dtype)
            weight = torch.randint(-4, 5, (n_out, n_in), generator=g).to(dtype)
            bias = torch.randint(-4, 5, (n_out,), generator=g).to(dtype)
            for b in (None, bias):
                y = event_linear(x, weight, b, implementation="triton")
                assert torch.equal(y, F.linear(x, weight, b)), (dtype, i)
                graded = x * torch.randint(-3, 4, x.shape, generator=g).to(dtype)
                y = event_linear(graded, weight, b, implementation="triton")
                assert torch.equal(y, F.linear(graded, weight, b)), (dtype, i)
                count += 1
            w = torch.randn(n_out, n_in, generator=g, dtype=dtype)
            y = event_linear(x.transpose(0, -1).contiguous().transpose(0, -1), w, bias.to(dtype),
                             implementation="triton")
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    y = event_linear(torch.zeros(0, 5), torch.ones(3, 5), implementation="triton")
    assert y.shape == (0, 3)
    print("checked", count)
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_equals_dense_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "checked 16" in result.stdout


def test_triton_module_imports_without_a_gpu():
    from spiking_moe.functional.kernels import triton_event

    reason = triton_event.TRITON.unavailable_reason(torch.zeros(2, 2))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert reason is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.2, 1.0])
def test_triton_kernel_equals_dense_on_cuda(dtype, density):
    from spiking_moe.functional.kernels import triton_event

    x = torch.zeros(2, 3, device="cuda", dtype=dtype)
    assert event_module._choose_kernel(x, "auto", 3)[0] is triton_event.TRITON
    for integer in (True, False):
        x = spikes((3, 70, 257), density, seed=16, dtype=dtype).cuda()
        weight, bias = linear_parts(257, 300, dtype, integer=integer)
        weight, bias = weight.cuda(), bias.cuda()
        y = event_linear(x, weight, bias, implementation="triton")
        if integer:
            assert torch.equal(y, F.linear(x, weight, bias))
        else:
            # cuBLAS may use TF32 for float32; compare with the float64 product.
            expected = F.linear(x.double(), weight.double(), bias.double()).to(dtype)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
