"""experiments/lm_ffn_ablation.py swaps exactly the populations it names (its table in docs/results.md
rests on that)."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from spiking_moe import SpikingMoELM
from spiking_moe.neurons import MultiSpike

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "lm_ffn_ablation.py"
spec = importlib.util.spec_from_file_location("lm_ffn_ablation", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

DESIGN = dict(residual="membrane", norm="layer", neuron_kind="multi", levels=4, attention="ann")


def _lm():
    torch.manual_seed(0)
    return SpikingMoELM(
        256, 16, 2, 2, 8, num_steps=1, num_experts=4, k=1, expert_hidden=16, shared_experts=1,
        **DESIGN,
    )  # fmt: skip


def _populations(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n.count(".") <= 5}


def test_each_variant_replaces_only_its_populations():
    before = _populations(_lm())
    for variant, (where, _) in ablation.SWAPS.items():
        if variant == "router_real":  # wraps the input population (the last test)
            continue
        after = _populations(ablation.swap(_lm(), variant))
        for name, kind in before.items():
            if kind != "MultiSpike" or name not in after:
                continue
            assert (after[name] != "MultiSpike") == where(name), (variant, name)
    hidden = ablation.swap(_lm(), "hidden_relu")
    assert isinstance(hidden.blocks[0].ffn.experts[0].net[1], nn.ReLU)
    assert isinstance(hidden.blocks[0].ffn_input, MultiSpike)


def test_fine_and_signed_inputs_are_what_they_say():
    x = torch.tensor([[[-2.6, -0.2, 0.1, 0.2, 1.0, 3.9, 9.0]]])
    fine = ablation.FineSpike(4)(x)
    assert torch.equal(fine, torch.tensor([[[0.0, 0.0, 0.0, 0.25, 1.0, 4.0, 4.0]]]))
    signed = ablation.SignedSpike(4)(x)
    assert torch.equal(signed, torch.tensor([[[-3.0, 0.0, 0.0, 0.0, 1.0, 4.0, 4.0]]]))


def test_router_real_routes_on_the_layer_norm_output_and_only_patches_its_model():
    model = ablation.swap(_lm(), "router_real").eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    normed = []
    model.blocks[0].ffn_norm.register_forward_hook(lambda m, a, out: normed.append(out))
    out = model(ids)
    moe = model.blocks[0].ffn
    expected = moe.router(normed[0].reshape(1, -1, normed[0].shape[-1]))
    assert torch.equal(out.routing[0].expert_ids, expected.expert_ids)
    assert isinstance(model.blocks[0].ffn_input.neuron, MultiSpike)
    spikes = model.blocks[0].ffn_input.neuron(normed[0])
    assert not torch.equal(spikes, normed[0])  # the experts' input differs from the router's
    untouched = _lm()
    assert "_route" not in vars(untouched.blocks[0].ffn)
