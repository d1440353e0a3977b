"""Every fused LIF provider meets one protocol, and both compiled kernels use one surrogate table."""

from __future__ import annotations

import importlib.util
import inspect
import re
from types import MappingProxyType, SimpleNamespace

import pytest
import torch

from spiking_moe.functional.kernels import SURROGATE_IDS, LIFKernel, cpu_fused, protocol, triton_lif
from spiking_moe.functional.surrogate import SURROGATES

HAS_TRITON = importlib.util.find_spec("triton") is not None
PROVIDERS = {"cpp": cpu_fused.CPP, "torch": cpu_fused.TORCH, "triton": triton_lif.TRITON}
PROTOCOL_METHODS = sorted(
    name
    for name, value in vars(LIFKernel).items()
    if inspect.isfunction(value) and not name.startswith("_")
)
CPP_SOURCE = cpu_fused._SOURCE.read_text()


def signature_drift(provider) -> list[str]:
    """Every method whose signature (names, order, kinds, defaults, annotations) differs from
    LIFKernel's, with both signatures; empty when the provider conforms."""
    drift = []
    for method in PROTOCOL_METHODS:
        expected = inspect.signature(getattr(LIFKernel, method), eval_str=True)
        expected = expected.replace(parameters=list(expected.parameters.values())[1:])  # self
        implemented = getattr(provider, method, None)
        actual = None if implemented is None else inspect.signature(implemented, eval_str=True)
        if actual != expected:
            drift.append(f"{method}: {actual} != {expected}")
    return drift


def test_protocol_names_the_four_kernel_methods():
    assert PROTOCOL_METHODS == ["backward", "forward", "supports", "unavailable_reason"]


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider_is_a_lif_kernel(name):
    provider = PROVIDERS[name]
    assert isinstance(provider, LIFKernel)
    assert provider.name == name


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider_signatures_equal_the_protocol(name):
    assert signature_drift(PROVIDERS[name]) == []


def test_a_drifted_signature_is_detected():
    class Drifted:
        name = "drifted"

        def unavailable_reason(self, x: torch.Tensor) -> str | None:
            return None

        def supports(self, x: torch.Tensor) -> bool:
            return True

        # Arguments swapped: exactly the slip the protocol exists to catch.
        def forward(self, x_TN, beta_N, v0_N, theta_N, zero_reset, return_membrane):
            raise NotImplementedError

        def backward(self, *args):
            raise NotImplementedError

    drift = signature_drift(Drifted())
    assert [line.split(":")[0] for line in drift] == ["backward", "forward"]


@pytest.mark.parametrize("name", sorted(PROVIDERS))
@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(2, 3),
        torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.float16),
        torch.zeros(2, 3, device="meta"),
    ],
    ids=["cpu-float32", "cpu-float64", "cpu-float16", "meta-float32"],
)
def test_supports_is_the_absence_of_a_reason(name, x):
    provider = PROVIDERS[name]
    reason = provider.unavailable_reason(x)
    assert reason is None or (isinstance(reason, str) and reason)
    assert provider.supports(x) is (reason is None)


def test_cpp_provider_says_why_it_cannot_run(monkeypatch):
    assert "CPU tensor" in cpu_fused.CPP.unavailable_reason(torch.zeros(2, 3, device="meta"))
    half = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert "bfloat16 not supported" in cpu_fused.CPP.unavailable_reason(half)
    monkeypatch.setenv("SPIKING_MOE_NO_CPP", "1")
    monkeypatch.delitem(cpu_fused._state, "module", raising=False)
    monkeypatch.delitem(cpu_fused._state, "reason", raising=False)
    assert "SPIKING_MOE_NO_CPP" in cpu_fused.CPP.unavailable_reason(torch.zeros(2, 3))


def test_torch_provider_runs_everywhere():
    for x in (torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, device="meta")):
        assert cpu_fused.TORCH.unavailable_reason(x) is None


# ---- one surrogate-id table ------------------------------------------------------------------


def test_every_surrogate_has_exactly_one_kernel_id():
    assert set(SURROGATE_IDS) == set(SURROGATES)
    ids = list(SURROGATE_IDS.values())
    assert all(isinstance(i, int) and i >= 0 for i in ids)
    assert len(set(ids)) == len(ids)


def test_surrogate_table_is_shared_and_read_only():
    assert cpu_fused.SURROGATE_IDS is protocol.SURROGATE_IDS is SURROGATE_IDS
    assert triton_lif.SURROGATE_IDS is SURROGATE_IDS
    with pytest.raises(TypeError):
        SURROGATE_IDS["atan"] = 7


def test_cpp_compile_flags_carry_the_table():
    defines = cpu_fused.surrogate_defines()
    parsed = dict(re.fullmatch(r"-D(\w+)=(\d+)", flag).groups() for flag in defines)
    assert parsed == {cpu_fused.surrogate_macro(n): str(i) for n, i in SURROGATE_IDS.items()}
    assert set(defines) <= set(cpu_fused._cflags())
    # The flags that make spikes bit-exact with the reference loop are still there.
    assert "-ffp-contract=off" in cpu_fused._cflags()


def _cpp_enum() -> dict[str, str]:
    body = re.search(r"enum SurrogateId\s*:\s*int\s*\{(.*?)\};", CPP_SOURCE, re.S).group(1)
    return dict(re.findall(r"(\w+)\s*=\s*([^,\s]+)", body))


def test_cpp_enum_takes_every_value_from_a_table_macro():
    enum = _cpp_enum()
    # No literal numbers: a hand-edited id would fail here.
    assert all(re.fullmatch(r"SPIKING_MOE_SURROGATE_[A-Z_]+", value) for value in enum.values())
    assert set(enum.values()) == {cpu_fused.surrogate_macro(name) for name in SURROGATE_IDS}


def test_cpp_source_names_each_enumerator_after_its_macro():
    # surrogate_ids() in the C++ source pairs a table name with an enumerator; that enumerator
    # must be the one defined by the same name's macro, and each must have a dispatch case.
    enum = _cpp_enum()
    pairs = dict(re.findall(r'\{"(\w+)",\s*(k\w+)\}', CPP_SOURCE))
    assert set(pairs) == set(SURROGATE_IDS)
    for name, enumerator in pairs.items():
        assert enum[enumerator] == cpu_fused.surrogate_macro(name)
        assert re.search(rf"case {enumerator}:\s*run\(", CPP_SOURCE), enumerator


def test_compiled_cpp_kernel_reports_the_table_ids():
    if not cpu_fused.cpp_available():
        pytest.skip("the C++ kernel cannot be built here")
    assert cpu_fused.load_cpp_extension().surrogate_ids() == dict(SURROGATE_IDS)


def test_compiled_cpp_kernel_refuses_an_unknown_surrogate_id():
    if not cpu_fused.cpp_available():
        pytest.skip("the C++ kernel cannot be built here")
    module = cpu_fused.load_cpp_extension()
    h = torch.rand(3, 4)
    params = torch.full((4,), 0.9), torch.ones(4)
    unknown = max(SURROGATE_IDS.values()) + 1
    with pytest.raises(RuntimeError, match=f"unknown surrogate id {unknown}"):
        module.lif_backward(h, None, None, h, *params, None, unknown, 1.0, False, False, False)


def test_loading_a_cpp_kernel_built_with_other_ids_fails_loudly():
    renumbered = {name: sid + 1 for name, sid in SURROGATE_IDS.items()}
    stale = SimpleNamespace(surrogate_ids=lambda: renumbered)
    with pytest.raises(RuntimeError, match="surrogate ids"):
        cpu_fused._check_surrogate_ids(stale)
    cpu_fused._check_surrogate_ids(SimpleNamespace(surrogate_ids=lambda: dict(SURROGATE_IDS)))


def test_cpp_build_folder_changes_with_the_surrogate_table(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name, _ = cpu_fused._stable_source()
    renumbered = MappingProxyType({n: len(SURROGATE_IDS) - i for n, i in SURROGATE_IDS.items()})
    monkeypatch.setattr(cpu_fused, "SURROGATE_IDS", renumbered)
    other, _ = cpu_fused._stable_source()
    assert other != name
    assert f"-D{cpu_fused.surrogate_macro('atan')}={renumbered['atan']}" in cpu_fused._cflags()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_constants_equal_the_table():
    for name, sid in SURROGATE_IDS.items():
        constant = getattr(triton_lif, f"_{name.upper()}")
        assert constant.value == sid, name


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_surrogate_branches_compare_against_the_table_constants():
    source = inspect.getsource(triton_lif._surrogate_grad.fn)
    compared = re.findall(r"SURROGATE == (\w+)", source)
    assert not [c for c in compared if c.isdigit()]  # a literal id would bypass the table
    assert set(compared) == {f"_{name.upper()}" for name in SURROGATE_IDS}
