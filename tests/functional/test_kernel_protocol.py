"""Every kernel provider meets its protocol, and both compiled LIF kernels use one surrogate table."""

from __future__ import annotations

import importlib.util
import inspect
import re
from types import MappingProxyType, SimpleNamespace

import pytest
import torch

from spiking_moe.functional import event
from spiking_moe.functional.kernels import (
    SURROGATE_IDS,
    LIFKernel,
    cpu_fused,
    event_cpu,
    protocol,
    triton_event,
    triton_lif,
)
from spiking_moe.functional.kernels.jit import stable_source
from spiking_moe.functional.surrogate import SURROGATES

HAS_TRITON = importlib.util.find_spec("triton") is not None
PROVIDERS = {"cpp": cpu_fused.CPP, "torch": cpu_fused.TORCH, "triton": triton_lif.TRITON}
EVENT_PROVIDERS = {"cpp": event_cpu.CPP, "torch": event.TORCH, "triton": triton_event.TRITON}
CPP_SOURCE = cpu_fused.EXTENSION.source.read_text()


def public_methods(protocol_class) -> list[str]:
    """The methods a protocol asks for, its own and those of the protocols it extends."""
    return sorted(
        {
            name
            for cls in protocol_class.__mro__
            if cls is not object
            for name, value in vars(cls).items()
            if inspect.isfunction(value) and not name.startswith("_")
        }
    )


def signature_drift(provider, protocol_class=LIFKernel) -> list[str]:
    """Every method whose signature (names, order, kinds, defaults, annotations) differs from
    the protocol's, with both signatures; empty when the provider conforms. Extra trailing
    parameters with defaults (the C++ event kernel's ``isa``) still conform."""
    drift = []
    for method in public_methods(protocol_class):
        expected = inspect.signature(getattr(protocol_class, method), eval_str=True)
        expected = expected.replace(parameters=list(expected.parameters.values())[1:])  # self
        implemented = getattr(provider, method, None)
        actual = None if implemented is None else inspect.signature(implemented, eval_str=True)
        if actual is not None:
            extra = list(actual.parameters.values())[len(expected.parameters) :]
            if all(p.default is not inspect.Parameter.empty for p in extra):
                actual = actual.replace(
                    parameters=list(actual.parameters.values())[: len(expected.parameters)]
                )
        if actual != expected:
            drift.append(f"{method}: {actual} != {expected}")
    return drift


def test_protocols_name_their_kernel_methods():
    assert public_methods(LIFKernel) == ["backward", "forward", "unavailable_reason"]
    assert public_methods(protocol.EventKernel) == ["forward", "unavailable_reason"]


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider_is_a_lif_kernel(name):
    provider = PROVIDERS[name]
    assert isinstance(provider, LIFKernel)
    assert provider.name == name


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider_signatures_equal_the_protocol(name):
    assert signature_drift(PROVIDERS[name]) == []


@pytest.mark.parametrize("name", sorted(EVENT_PROVIDERS))
def test_event_provider_meets_the_event_protocol(name):
    provider = EVENT_PROVIDERS[name]
    assert isinstance(provider, protocol.EventKernel)
    assert provider.name == name
    assert signature_drift(provider, protocol.EventKernel) == []


def test_a_drifted_signature_is_detected():
    class Drifted:
        name = "drifted"

        def unavailable_reason(self, x: torch.Tensor) -> str | None:
            return None

        # The arguments one by one instead of the protocol's one bundle.
        def forward(self, x_TU, v0_U, beta_U, theta_U, zero_reset, return_membrane):
            raise NotImplementedError

        def backward(self, args: protocol.LIFForwardArgs):  # the wrong bundle
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
def test_unavailable_reason_is_none_or_a_sentence(name, x):
    reason = PROVIDERS[name].unavailable_reason(x)
    assert reason is None or (isinstance(reason, str) and reason)


def test_cpp_provider_says_why_it_cannot_run(monkeypatch):
    assert "CPU tensor" in cpu_fused.CPP.unavailable_reason(torch.zeros(2, 3, device="meta"))
    half = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert "bfloat16 not supported" in cpu_fused.CPP.unavailable_reason(half)
    monkeypatch.setenv("SPIKING_MOE_NO_CPP", "1")
    monkeypatch.setattr(cpu_fused.EXTENSION, "outcome", None)
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
    if cpu_fused.EXTENSION.load() is None:
        pytest.skip("the C++ kernel cannot be built here")
    assert cpu_fused.EXTENSION.load().surrogate_ids() == dict(SURROGATE_IDS)


def test_compiled_cpp_kernel_refuses_an_unknown_surrogate_id():
    module = cpu_fused.EXTENSION.load()
    if module is None:
        pytest.skip("the C++ kernel cannot be built here")
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
    extension = cpu_fused.EXTENSION
    assert extension.cflags == cpu_fused._cflags()  # what the build is given
    name, _ = stable_source(extension.source, extension.prefix, cpu_fused._cflags())
    renumbered = MappingProxyType({n: len(SURROGATE_IDS) - i for n, i in SURROGATE_IDS.items()})
    monkeypatch.setattr(cpu_fused, "SURROGATE_IDS", renumbered)
    other, _ = stable_source(extension.source, extension.prefix, cpu_fused._cflags())
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
