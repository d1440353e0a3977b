"""The language-model block designs (issue 22): the membrane residual with LayerNorm,
multi-level spikes and the attention kinds. Exact causality under each with capacity drops,
the thermometer expansion of spike counts against the integer network (outputs and energy
counts), energy hand counts of a membrane block per attention kind (a brute-force loop over
every computed term is the oracle), a tiny LM that learns and resumes exactly, and the errors
that name a bad option."""

import math

import pytest
import torch
from tiny import assert_causal
from torch import nn
from torch.nn import functional as F

import energy
from spiking_moe import ConfigError, ModelArgs
from spiking_moe.experts import SpikingExpert
from spiking_moe.moe import DenseFFN
from spiking_moe.neurons import MultiSpike, make_neuron, thermometer
from spiking_moe.nir import export_bundle, export_nir
from spiking_moe.transformer import (
    ANNTransformerLM,
    DenseSNNLM,
    SpikingMoELM,
    SpikingTransformerBlock,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V, DM, HEADS, CTX = 32, 16, 2, 8

DESIGNS = {
    # SSA's scaled coincidence counts are small in a tiny untrained model: a low threshold,
    # so its attention fires and a leaky mask would show.
    "membrane_ssa_lif": dict(residual="membrane", attention="ssa", num_steps=2, threshold=0.3),
    "membrane_spiking_softmax_multi": dict(
        residual="membrane", attention="spiking_softmax", neuron_kind="multi", num_steps=1
    ),
    # Membrane dynamics of multi-level neurons over two steps.
    "membrane_real_softmax_multi": dict(
        residual="membrane", attention="real_softmax", neuron_kind="multi", num_steps=2
    ),
    "membrane_ann_multi": dict(
        residual="membrane", attention="ann", neuron_kind="multi", num_steps=1
    ),
    "membrane_ssa_no_norm_multi": dict(
        residual="membrane",
        norm="none",
        neuron_kind="multi",
        levels=2,
        num_steps=1,
        threshold=0.3,
    ),
    # The spike residual with the new attention kinds and neurons (a low threshold, so the
    # tiny models' attention fires and a leaky mask would show).
    "spike_spiking_softmax_multi": dict(
        attention="spiking_softmax", neuron_kind="multi", num_steps=2, threshold=0.3
    ),
    "spike_real_softmax_lif": dict(attention="real_softmax", num_steps=2, threshold=0.3),
}


def _ids(B=3, S=CTX, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _model(design, dense=False):
    torch.manual_seed(0)
    options = dict(DESIGNS[design])
    if dense:
        return DenseSNNLM(V, DM, 2, HEADS, CTX, ffn_hidden=32, **options)
    return SpikingMoELM(
        V, DM, 2, HEADS, CTX, num_experts=4, k=1, expert_hidden=16, shared_experts=1,
        capacity_factor=0.5, **options,
    )  # fmt: skip


# --- causality --------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_no_logit_depends_on_a_later_token_under_any_design(design, dense):
    """float64. A spike residual stays bitwise (what leaves a block is spikes); a membrane
    residual carries expert currents whose GEMM rounding depends on how many rows an expert
    computes (which capacity drops change), so earlier positions may move by float64
    rounding and no more: a leak of the later token moves them by orders of magnitude more
    than 1e-12."""
    model = _model(design, dense).double().eval()
    assert_causal(
        model,
        _ids(),
        exact=DESIGNS[design].get("residual") != "membrane",
        attention_spikes=DESIGNS[design].get("attention") != "ann",
        drops=not dense,
        vocab=V,
    )


# --- multi-level spikes: the binary expansion --------------------------------------------


def test_thermometer_codes_each_count_as_that_many_leading_virtual_spikes():
    counts = torch.tensor([[0.0, 1.0, 3.0], [2.0, 3.0, 0.0]])  # [T=2, 3]
    virtual = thermometer(counts, 3)  # [T * 3, 3]
    assert virtual.shape == (6, 3)
    assert torch.equal(virtual.view(2, 3, 3).sum(1), counts)
    # step 0, neuron 1 (count 1): only the first virtual step spikes
    assert virtual[0:3, 1].tolist() == [1.0, 0.0, 0.0]
    assert virtual[3:6, 0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="integer spike counts"):
        thermometer(torch.tensor([[0.5]]), 3)
    with pytest.raises(ValueError, match="integer spike counts"):
        thermometer(torch.tensor([[4.0]]), 3)


class _CountsInput(nn.Module):
    """An expert reading spike counts up to ``D`` (declared for the energy counter)."""

    def __init__(self, expert, levels):
        super().__init__()
        self.expert, self.energy_spike_levels = expert, levels

    def forward(self, x):
        return self.expert(x)


class _ExpandedExpert(nn.Module):
    """The binary network the integer expert stands for: every synaptic layer runs on the
    ``D`` binary virtual steps of each step's counts (thermometer code) and the next population
    integrates their currents (the bias once per step)."""

    def __init__(self, expert, levels):
        super().__init__()
        first, self.neuron, second = expert.net
        self.levels, self.b1, self.b2 = levels, first.bias, second.bias
        self.first = nn.Linear(first.in_features, first.out_features, bias=False)
        self.second = nn.Linear(second.in_features, second.out_features, bias=False)
        self.first.weight, self.second.weight = first.weight, second.weight

    def _synapses(self, layer, counts_TNI):
        T, D = counts_TNI.shape[0], self.levels
        current = layer(thermometer(counts_TNI, D))  # binary [T * D, N, O]
        return current.view(T, D, *current.shape[1:]).sum(1)

    def forward(self, counts_TNI):
        hidden = self.neuron(self._synapses(self.first, counts_TNI) + self.b1)
        self.hidden_counts = hidden
        return self._synapses(self.second, hidden) + self.b2


def test_the_binary_expansion_reproduces_the_integer_expert_and_its_energy_counts():
    D, T = 3, 2
    torch.manual_seed(0)
    expert = SpikingExpert(6, 10, 5, kind="multi", levels=D, beta=0.5).double().eval()
    counts = torch.randint(0, D + 1, (T, 4, 6), generator=torch.Generator().manual_seed(2))
    counts = counts.double()
    expanded = _ExpandedExpert(expert, D)
    with torch.no_grad():
        integer_out = expert(counts)
        binary_out = expanded(counts)
    hidden = expanded.hidden_counts
    assert hidden.max() > 1, "some neuron must fire more than once in a step"
    torch.testing.assert_close(binary_out, integer_out, rtol=0, atol=1e-12)

    integer = energy.count_operations(_CountsInput(expert, D), counts)
    binary = energy.count_operations(expanded, counts, time_steps=T)
    # The expanded run's synaptic layers see binary spikes: their ACs are its events.
    assert binary.layer("first").binary_calls == 1
    assert integer.layer("expert.net.0").acs == binary.layer("first").acs
    assert integer.layer("expert.net.2").acs == binary.layer("second").acs
    assert integer.layer("expert.net.0").acs == int(counts.sum()) * 10  # hand count
    assert integer.layer("expert.net.2").acs == int(hidden.sum()) * 5
    neuron = integer.layer("expert.net.1")
    assert neuron.neuron_updates == T * D * 4 * 10  # one per virtual step
    assert neuron.spikes == int(thermometer(hidden, D).sum())


def test_multi_level_spikes_count_one_accumulate_per_unit_of_count_by_hand():
    layer = nn.Linear(4, 3)
    counts = torch.tensor([[[2.0, 0.0, 1.0, 4.0]]])  # [T=1, B=1, 4]
    declared = _CountsInput(layer, 4)
    assert energy.count_operations(declared, counts).layer("expert").acs == 7 * 3
    # Undeclared, the same tensor is graded: MACs, not accumulates.
    graded = energy.count_operations(layer, counts).layer("")
    assert (graded.acs, graded.macs) == (0, 4 * 3)


# --- energy hand counts of a membrane block ----------------------------------------------


def _term_cost(a, b, mask, levels):
    """Brute force over every term ``(m, k, n)`` a causal kernel computes: ``(ACs, MACs)``.
    The driving operand is ``a`` when it is spike counts, else ``b`` when it is; a term costs
    its driver's count; with neither, each term is a MAC."""

    def counts(x):
        return bool(((x >= 0) & (x <= levels) & (x == x.round())).all())

    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    driver = "a" if counts(a) else "b" if counts(b) else None
    acs = macs = 0
    for lead in range(a3.shape[0]):
        M, K = a3.shape[1:]
        N = b3.shape[-1]
        for m in range(M):
            for k in range(K):
                for n in range(N):
                    if (mask == "output" and n > m) or (mask == "contraction" and k > m):
                        continue
                    if driver == "a":
                        acs += int(a3[lead, m, k])
                    elif driver == "b":
                        acs += int(b3[lead, k, n])
                    else:
                        macs += 1
    return acs, macs


@pytest.mark.parametrize("attention", ["ssa", "spiking_softmax", "real_softmax", "ann"])
def test_energy_of_a_membrane_block_with_layer_norm_by_hand(attention):
    D, H, hidden, levels, T, B, S = 4, 1, 6, 2, 1, 2, 3
    torch.manual_seed(1)
    expert = SpikingExpert(D, hidden, D, kind="multi", levels=levels, threshold=0.5)
    block = SpikingTransformerBlock(
        D, H, DenseFFN(expert, nn.Identity()), residual="membrane", attention=attention,
        kind="multi", levels=levels, threshold=0.5,
    ).double().eval()  # fmt: skip
    block.energy_spike_levels = levels
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, (args, out))  # the first call; returns None: output kept

        return hook

    for name, module in block.named_modules():
        module.register_forward_hook(record(name))
    x = torch.randn(T, B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = energy.count_operations(block, x)
    numel = T * B * S * D

    def inp(name):
        return seen[name][0][0]

    def total(name):
        return int(seen[name][1].sum()) if not isinstance(seen[name][1], tuple) else None

    expected = {
        "attn_norm": (0, 4 * numel),
        "attn_add": (numel, 0),
        "ffn_norm": (0, 4 * numel),
        "ffn.expert.net.0": (total("ffn_input") * hidden, 0),
        "ffn.expert.net.2": (total("ffn.expert.net.1") * D, 0),
        "ffn_add": (numel, 0),
    }
    if attention == "ann":
        rows = T * B * S
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[f"attn.{proj}"] = (0, rows * D * D)
    else:
        expected["attn.q_proj"] = (total("attn_input") * D, 0)
        for proj in ("k_proj", "v_proj"):
            expected[f"attn.{proj}"] = expected["attn.q_proj"]
        expected["attn.out_proj"] = (total("attn.attn_neuron") * D, 0)
    for product, mask in (("scores", "output"), ("mix", "contraction")):
        a, b = seen[f"attn.{product}"][0]
        expected[f"attn.{product}"] = _term_cost(a, b, mask, levels)
    if attention != "ssa":
        visible = T * B * H * S * (S + 1) // 2
        expected["attn.softmax"] = (0, 3 * visible)
    nonzero = ["ffn_input", "ffn.expert.net.1"]
    if attention != "ann":
        nonzero += ["attn_input", "attn.attn_neuron"]
    assert all(total(name) > 0 for name in nonzero), "every population must fire"
    for name, (acs, macs) in expected.items():
        layer = counts.layer(name)
        assert (layer.acs, layer.macs) == (acs, macs), name
    if attention == "real_softmax":  # real x real products: MACs
        assert counts.layer("attn.scores").macs > 0 and counts.layer("attn.mix").macs > 0
    if attention in ("ssa", "spiking_softmax"):  # a spike operand: accumulates only
        assert counts.layer("attn.scores").macs == 0 and counts.layer("attn.mix").macs == 0
    for neuron in ("ffn_input", "ffn.expert.net.1"):
        layer = counts.layer(neuron)
        assert layer.neuron_updates == seen[neuron][1].numel() * levels
        assert layer.spikes == total(neuron)


# --- learning and resume ------------------------------------------------------------------

BEST = dict(residual="membrane", attention="spiking_softmax", neuron_kind="multi", num_steps=1)


@pytest.mark.slow
def test_a_tiny_lm_of_the_new_design_learns_well_below_its_unigram_entropy():
    import random
    from collections import Counter

    rng = random.Random(0)
    text = " ".join(rng.choice(("spike", "moe", "gate", "token")) for _ in range(1200)) + " "
    freq = Counter(text)
    unigram_bits = -sum(c / len(text) * math.log2(c / len(text)) for c in freq.values())
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    train, held_out = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]
    ctx, g = 16, torch.Generator().manual_seed(0)

    def batch(src, size):
        start = torch.randint(0, len(src) - ctx - 1, (size,), generator=g)
        x = torch.stack([src[s : s + ctx] for s in start])
        return x, torch.stack([src[s + 1 : s + ctx + 1] for s in start])

    torch.manual_seed(0)
    model = SpikingMoELM(256, 32, 1, 2, ctx, num_experts=4, k=1, expert_hidden=32, **BEST)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        x, y = batch(train, 16)
        out = model(x)
        loss = F.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x, y = batch(held_out, 64)
        bits = F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1)).item() / math.log(2)
    assert bits < 0.5 * unigram_bits, (bits, unigram_bits)


def test_resume_of_the_new_design_equals_an_uninterrupted_run(tmp_path):
    from spiking_moe import Trainer
    from spiking_moe.config import TrainConfig
    from spiking_moe.data import BatchLoader, TextDataset
    from spiking_moe.training import Callback, seed_everything

    class Stop(Callback):
        def on_train_step_end(self, trainer, outputs, loss):
            if trainer.step == 4:
                trainer.request_stop()

    data = torch.tensor(list(b"the cat sat on the mat. " * 40), dtype=torch.uint8)
    config = TrainConfig(max_steps=10, batch_size=4, device="cpu", progress=False, lr=3e-3)

    def run(out, callbacks=(), resume=False):
        seed_everything(0)
        torch.manual_seed(0)
        model = SpikingMoELM(256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16, **BEST)
        loader = BatchLoader(TextDataset(data, context=8), 4, shuffle=True, seed=3)
        with Trainer(model, loader, config, out_dir=out, callbacks=callbacks, resume=resume) as t:
            return t, t.fit()

    straight, _ = run(tmp_path / "straight")
    _, stopped = run(tmp_path / "split", [Stop()])
    assert stopped.interrupted and stopped.step == 4
    resumed, result = run(tmp_path / "split", resume=True)
    assert result.step == 10
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# --- options and their errors -------------------------------------------------------------


def test_the_ann_twin_takes_the_same_design_options_and_stays_an_ann():
    torch.manual_seed(0)
    ann = ANNTransformerLM(V, DM, 1, HEADS, CTX, num_experts=4, k=1, expert_hidden=16, **BEST)
    assert not any(isinstance(m, MultiSpike) for m in ann.modules())
    assert ann(_ids()).logits.shape == (3, CTX, V)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(residual="film"), r"model\.block\.residual must be one of"),
        (dict(norm="batch"), r"model\.block\.norm must be one of"),
        (dict(attention="linear"), r"model\.attention\.kind must be one of"),
        (dict(neuron_kind="multi", levels=0), r"model\.neuron\.levels must be >= 1"),
        (dict(attention="ann"), r"model\.attention\.kind 'ann'.*model\.block\.residual"),
        (
            dict(neuron_kind="multi", spike_exchange="bits"),
            r"model\.moe\.spike_exchange 'bits'.*neuron\.kind 'multi'",
        ),
        (dict(neuron_kind="multi", backend="snntorch"), r"kind 'multi' needs backend 'native'"),
    ],
)
def test_bad_design_options_name_the_field(options, match):
    with pytest.raises(ConfigError, match=match):
        ModelArgs().with_options(**options)
    with pytest.raises(ConfigError, match=match):
        SpikingMoELM(V, DM, 1, HEADS, CTX, num_experts=4, **options)


def test_a_config_file_selects_the_design_in_its_tables(tmp_path):
    from spiking_moe.config import load_config

    path = tmp_path / "lm.toml"
    path.write_text(
        '[model]\nkind = "moe"\n[model.block]\nresidual = "membrane"\nnorm = "layer"\n'
        '[model.neuron]\nkind = "multi"\nlevels = 3\n[model.attention]\nkind = "real_softmax"\n'
        '[data]\nname = "text"\n'
    )
    model = load_config(path).model
    assert (model.block.residual, model.neuron.kind, model.neuron.levels) == (
        "membrane",
        "multi",
        3,
    )
    assert model.attention.kind == "real_softmax"
    path.write_text('[model.block]\nresidual = "binary"\n')
    with pytest.raises(ConfigError, match=r"model\.block\.residual must be one of"):
        load_config(path)


def test_nir_export_refuses_multi_level_neurons_by_name(tmp_path):
    from spiking_moe.models import SpikingMoEClassifier

    with pytest.raises(ValueError, match=r"'net\.1' is a multi-level spiking neuron"):
        export_nir(SpikingExpert(4, 8, 4, kind="multi"))
    model = SpikingMoEClassifier(4, 3, neuron_kind="multi", num_experts=2, hidden_features=8)
    with pytest.raises(ValueError, match=r"'input_neuron'.*multi-level spiking neurons"):
        export_bundle(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_membrane_block_refuses_an_ffn_that_fires_and_ann_attention_on_spikes():
    expert = SpikingExpert(8, 16, 8)
    with pytest.raises(ValueError, match="neuron=nn.Identity"):
        SpikingTransformerBlock(8, 2, DenseFFN(expert, make_neuron()), residual="membrane")
    with pytest.raises(ValueError, match="attention kind 'ann'.*residual 'membrane'"):
        SpikingTransformerBlock(8, 2, expert, attention="ann")
