"""The one-pass value counter and the two ways counts are accumulated (ints on the CPU,
device tensors on accelerators) against PyTorch's own expressions."""

import os

import pytest
import torch
from energy_cases import ADDITIVE, THRESHOLD, AnnAttention, SpikingAttention, make_snn, spikes
from torch import nn

import energy
from energy import _native
from spiking_moe import LIF


def torch_counts(x):
    return int(torch.count_nonzero(x.bool())), int(torch.count_nonzero(x == 1))


def test_the_native_counter_is_built_where_a_compiler_is():
    if os.environ.get("SPIKING_MOE_NO_CPP", "") not in ("", "0"):
        pytest.skip("SPIKING_MOE_NO_CPP is set: the PyTorch counter is the one in use")
    assert _native._load() is not None, "value_counts.cpp did not build: counting is slow"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 7, (1 << 16) + 3, 3 * (1 << 16)])  # one and several blocks
def test_native_counts_equal_pytorch_on_special_values(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    x = (torch.rand(numel, generator=g) < 0.3).to(dtype)
    specials = [0.5, float("nan"), -0.0, float("inf"), -1.0, 1.0, 2.0, 1e-30]
    where = torch.randperm(numel, generator=g)[: min(numel, len(specials))]
    for i, value in zip(where.tolist(), specials, strict=False):
        x[i] = value
    assert [int(c) for c in _native.value_counts(x)] == list(torch_counts(x))


def test_native_counts_do_not_round_doubles_to_float():
    # 1 + 1e-12 is 1.0f in single precision: a counter that narrowed doubles would call it a spike.
    x = torch.tensor([1.0 + 1e-12, 1.0, 0.0, 1e-300], dtype=torch.float64)
    assert [int(c) for c in _native.value_counts(x)] == [3, 1]


def test_non_contiguous_empty_and_integer_inputs():
    base = spikes(4, 6, 5, p=0.4)
    view = base.transpose(0, 2)[:, 1:]
    assert not view.is_contiguous()
    assert [int(c) for c in _native.value_counts(view)] == list(torch_counts(view))
    assert [int(c) for c in _native.value_counts(torch.empty(0, 3))] == [0, 0]
    ints = torch.tensor([0, 1, 2, 1])
    assert [int(c) for c in _native.value_counts(ints)] == [3, 2]


class MixedInputs(nn.Module):
    """A layer fed spikes, then current: binary and graded calls of one module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 4)
        self.lif = LIF(beta=0.8, threshold=0.3)

    def forward(self, x):
        return self.lif(self.fc(x)) + self.fc(x * 0.5).sum() * 0


CASES = {
    "conv + linear SNN": (make_snn, lambda: (spikes(6, 10, 1, 5, 5, p=0.4, seed=3),)),
    "spiking attention": (
        SpikingAttention,
        lambda: (spikes(3, 2, 4, 2, p=0.5, seed=1),),
    ),
    "ANN attention with softmax": (AnnAttention, lambda: (torch.randn(3, 2, 4, 2),)),
    "binary and graded calls": (MixedInputs, lambda: (spikes(4, 3, 5, p=0.5),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accelerator_accumulation_gives_the_cpu_counts(case, request):
    make_model, make_inputs = CASES[case]
    model, inputs = make_model(), make_inputs()
    adapters = (THRESHOLD,) if "attention" in case else ()
    host = energy.count_operations(model, *inputs, neuron_adapters=adapters)
    request.getfixturevalue("accelerator_accumulation")
    device = energy.count_operations(model, *inputs, neuron_adapters=adapters)
    assert [layer.name for layer in host.layers] == [layer.name for layer in device.layers]
    for a, b in zip(host.layers, device.layers, strict=True):
        for field in ADDITIVE:
            assert getattr(a, field) == getattr(b, field), (case, a.name, field)
    assert host.total("acs") + host.total("macs") > 0
