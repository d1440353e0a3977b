"""NIR export, import and deployment bundles (:mod:`spiking_moe.nir`), with snnTorch's
``import_from_nir``, Norse's ``from_nir``/``to_nir`` and hand computations as the oracles."""

import contextlib
import io
import json
import re

import nir
import norse.torch as norse
import numpy as np
import pytest
import snntorch
import torch
from snntorch.import_nir import import_from_nir
from torch import nn

from spiking_moe import LIF, DenseSNNClassifier, SpikingMoEClassifier
from spiking_moe.cli import export_main, train_main
from spiking_moe.experiment import build_datasets, build_loaders, load_trained_model
from spiking_moe.experts import SpikingExpert
from spiking_moe.models import ANNClassifier
from spiking_moe.moe import SpikingMoE
from spiking_moe.nir import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    LeakyIntegrator,
    NIRModule,
    export_bundle,
    export_nir,
    import_nir,
    load_bundle,
    summarize_graph,
)
from spiking_moe.router import RateRouter

# ----------------------------------------------------------------------------- helpers


def _spikes(shape, seed, p=0.5):
    """Random binary input ``[T, B, F]`` from its own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(shape, p), generator=g)


def _snntorch_run(graph, x):
    """snnTorch's reading of ``graph`` run step by step (a fresh network: it keeps state)."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its rewrites and warnings
        net = import_from_nir(graph)
    try:
        return _run_steps(net, x)
    finally:
        instances = getattr(snntorch.SpikingNeuron, "instances", None)
        if isinstance(instances, list):
            mine = [m for m in net.modules() if isinstance(m, snntorch.SpikingNeuron)]
            instances[:] = [i for i in instances if not any(i is m for m in mine)]


def _norse_run(graph, x, dt, ignore_warnings=True):
    """Norse's reading of ``graph`` run step by step; ``ignore_warnings=False`` lets Norse warn
    about ``r != 1`` (the default export)."""
    return _run_steps(norse.from_nir(graph, dt=dt, ignore_warnings=ignore_warnings), x)


def _run_steps(net, x):
    """Run a peer library's stateful network over ``x``'s time steps, stacking its outputs."""
    state, outs = None, []
    with torch.no_grad():
        for x_t in x:
            out, state = net(x_t, state)
            outs.append(out)
    return torch.stack(outs)


def _hand_lif(current_TBN, beta, threshold, reset="zero"):
    """Our LIF written out: ``h = beta v + I``, spike if ``h > threshold``, then reset."""
    v = torch.zeros_like(current_TBN[0])
    spikes = []
    for current in current_TBN:
        h = beta * v + current
        s = (h > threshold).to(h.dtype)
        v = h * (1 - s) if reset == "zero" else h - s * threshold
        spikes.append(s)
    return torch.stack(spikes)


@contextlib.contextmanager
def _lif_outputs(model):
    """Record the spikes of every LIF of ``model`` (module order) while the block runs."""
    seen = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
        for m in model.modules()
        if isinstance(m, LIF)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _last_block_current(model, x):
    """Per-step readout current of a count-readout classifier, from its own layers."""
    with _lif_outputs(model.layers[-1].neuron) as seen, torch.no_grad():
        logits = model(x).logits
    (spikes_TBH,) = seen
    assert spikes_TBH.sum() > 0, "the last block must fire"
    return model.readout(spikes_TBH).detach(), logits


def _lif(n, **overrides):
    """A NIR LIF with snnTorch's conventions for beta 0.8, threshold 0.5, dt 1e-4."""
    tau = np.full(n, 1e-4 / 0.2)
    fields = dict(
        tau=tau,
        r=tau / 1e-4,
        v_leak=np.zeros(n),
        v_threshold=np.full(n, 0.5),
        v_reset=np.zeros(n),
    )
    fields.update(overrides)
    return nir.LIF(**fields)


def _io(n_in, n_out):
    return (
        nir.Input(input_type={"input": np.array([n_in])}),
        nir.Output(output_type={"output": np.array([n_out])}),
    )


def _affine(out_f, in_f, seed=0):
    rng = np.random.default_rng(seed)
    return nir.Affine(
        weight=rng.uniform(-0.6, 0.6, (out_f, in_f)).astype(np.float32),
        bias=rng.uniform(-0.1, 0.1, out_f).astype(np.float32),
    )


def _dense_classifier(**kwargs):
    """A small dense classifier (8 inputs, 3 classes, 12 hidden units, experts of 6), in eval."""
    return DenseSNNClassifier(8, 3, hidden_features=12, k=2, expert_hidden=6, **kwargs).eval()


# ----------------------------------------------------------------------------- 1. mapping


def test_export_writes_the_documented_lif_parameters():
    torch.manual_seed(0)
    linear, lif = nn.Linear(6, 4), LIF(beta=0.75, threshold=0.6, reset="zero")
    dt = 1e-3
    graph = export_nir(nn.Sequential(linear, lif), dt=dt)

    assert list(graph.nodes) == ["input", "0", "1", "output"]
    assert graph.edges == [("input", "0"), ("0", "1"), ("1", "output")]
    assert isinstance(graph.nodes["0"], nir.Affine) and isinstance(graph.nodes["1"], nir.LIF)
    assert graph.metadata["dt"] == dt
    np.testing.assert_array_equal(graph.nodes["0"].weight, linear.weight.detach().numpy())
    np.testing.assert_array_equal(graph.nodes["0"].bias, linear.bias.detach().numpy())
    node = graph.nodes["1"]
    tau = dt / (1 - 0.75)
    np.testing.assert_allclose(node.tau, np.full(4, tau), rtol=1e-12)
    np.testing.assert_allclose(node.r, np.full(4, tau / dt), rtol=1e-12)
    np.testing.assert_allclose(node.v_threshold, np.full(4, 0.6), rtol=1e-6)
    np.testing.assert_array_equal(node.v_leak, np.zeros(4))
    np.testing.assert_array_equal(node.v_reset, np.zeros(4))
    assert node.metadata["spiking_moe"]["reset"] == "zero"

    unit = export_nir(nn.Sequential(linear, lif), dt=dt, unit_resistance=True).nodes["1"]
    np.testing.assert_array_equal(unit.r, np.ones(4))
    np.testing.assert_allclose(unit.tau, np.full(4, tau), rtol=1e-12)
    np.testing.assert_allclose(unit.v_threshold, np.full(4, 0.6 * 0.25), rtol=1e-6)

    # A bias-free Linear is NIR's Linear.
    bare = export_nir(nn.Sequential(nn.Linear(6, 4, bias=False), lif), dt=dt)
    assert type(bare.nodes["0"]) is nir.Linear


def test_export_of_a_non_leaky_neuron_is_an_if_with_r_one_over_dt():
    lif = LIF(beta=1.0, threshold=0.7, reset="zero")
    graph = export_nir(nn.Sequential(nn.Linear(5, 3), lif), dt=2e-3)
    node = graph.nodes["1"]
    assert type(node) is nir.IF
    np.testing.assert_allclose(node.r, np.full(3, 1 / 2e-3))
    np.testing.assert_allclose(node.v_threshold, np.full(3, 0.7), rtol=1e-6)
    np.testing.assert_array_equal(node.v_reset, np.zeros(3))


def test_export_of_per_neuron_parameters_writes_per_neuron_arrays():
    beta = torch.tensor([0.5, 0.6, 0.7, 0.8])
    threshold = torch.tensor([0.2, 0.4, 0.6, 0.8])
    lif = LIF(beta=beta, threshold=threshold, reset="zero")
    dt = 1e-4
    node = export_nir(nn.Sequential(nn.Linear(3, 4), lif), dt=dt).nodes["1"]
    beta64 = beta.double().numpy()
    np.testing.assert_allclose(node.tau, dt / (1 - beta64), rtol=1e-12)
    np.testing.assert_allclose(node.r, 1 / (1 - beta64), rtol=1e-12)
    np.testing.assert_allclose(node.v_threshold, threshold.double().numpy(), rtol=1e-12)
    # A LIF first in the chain needs its size.
    alone = export_nir(lif, features=4, dt=dt)
    assert list(alone.nodes) == ["input", "node", "output"]
    np.testing.assert_allclose(alone.nodes["node"].tau, dt / (1 - beta64), rtol=1e-12)


def test_export_refuses_beta_one_and_below_one_in_one_layer():
    lif = LIF(beta=torch.tensor([1.0, 0.9, 0.8]), reset="zero")
    with pytest.raises(ValueError, match="mixes beta = 1"):
        export_nir(nn.Sequential(nn.Linear(2, 3), lif))


# ----------------------------------------------------------------------------- 2. peers


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_spiking_expert_graph_runs_the_same_in_snntorch_and_norse(num_layers, seed, one_thread):
    torch.manual_seed(seed)
    expert = SpikingExpert(8, 12, 5, num_layers=num_layers, beta=0.8, threshold=0.5, reset="zero")
    x = _spikes((10, 4, 8), seed)
    with torch.no_grad():
        run = expert.run(x)
    assert run.activity.spikes.sum() > 10, "the hidden layers must fire"

    snn = _snntorch_run(export_nir(expert), x)
    torch.testing.assert_close(snn, run.current, rtol=0, atol=1e-6)

    unit = _norse_run(export_nir(expert, unit_resistance=True), x, dt=1e-4)
    torch.testing.assert_close(unit, run.current, rtol=0, atol=1e-6)

    # Norse ignores r: with the default r = tau / dt its neurons see (1 - beta) times the
    # input, which is why unit_resistance exists.
    wrong = _norse_run(export_nir(expert), x, dt=1e-4, ignore_warnings=False)
    assert (wrong - run.current).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 3])
def test_linear_lif_spikes_equal_snntorch_and_norse_exactly(seed, one_thread):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 10),
        LIF(beta=0.7, threshold=0.4, reset="zero"),
        nn.Linear(10, 6),
        LIF(beta=0.9, threshold=0.3, reset="zero"),
    )
    x = _spikes((12, 5, 8), seed)
    with _lif_outputs(model) as seen, torch.no_grad():
        ours = model(x)
    assert all(s.sum() > 0 for s in seen), "every layer must fire"
    assert torch.equal(_snntorch_run(export_nir(model), x), ours)
    assert torch.equal(_norse_run(export_nir(model, unit_resistance=True), x, 1e-4), ours)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_classifier_graph_per_step_outputs_equal_snntorch_and_norse(seed, one_thread):
    torch.manual_seed(seed)
    model = _dense_classifier(readout="count", beta=0.8, threshold=0.5, reset="zero")
    x = _spikes((9, 4, 8), seed)
    current, logits = _last_block_current(model, x)
    graph = export_nir(model)
    assert graph.metadata["decode"].startswith("logits = mean over time steps")
    for peer in (
        _snntorch_run(graph, x),
        _norse_run(export_nir(model, unit_resistance=True), x, dt=1e-4),
    ):
        torch.testing.assert_close(peer, current, rtol=0, atol=1e-6)
        torch.testing.assert_close(peer.mean(0), logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 3. resets


def test_subtract_reset_is_refused_or_exported_as_zero_and_restored(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10), LIF(beta=0.9, threshold=0.3, reset="subtract"))
    with pytest.raises(ValueError, match="subtract"):
        export_nir(model)

    graph = export_nir(model, subtract_reset="zero")
    node = graph.nodes["1"]
    np.testing.assert_array_equal(node.v_reset, np.zeros(10))
    assert node.metadata["spiking_moe"]["reset"] == "subtract"

    zero_twin = nn.Sequential(model[0], LIF(beta=0.9, threshold=0.3, reset="zero"))
    for seed in (0, 1):
        x = _spikes((12, 4, 8), seed, p=0.7)
        with torch.no_grad():
            subtract, zero = model(x), zero_twin(x)
        assert zero.sum() > 0
        assert not torch.equal(subtract, zero), "the input must tell the resets apart"
        # Other NIR readers simulate the zero reset ...
        assert torch.equal(_snntorch_run(graph, x), zero)
        # ... and our import restores the subtractive one.
        imported = import_nir(graph)
        assert imported.layers["1"].reset == "subtract"
        with torch.no_grad():
            assert torch.equal(imported(x), subtract)


# ----------------------------------------------------------------------------- 4. import


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norse_to_nir_graph_imports_with_the_norse_dialect(seed, one_thread):
    torch.manual_seed(seed)
    cells = [
        norse.LIFBoxCell(
            norse.LIFBoxParameters(
                tau_mem_inv=torch.full((n,), inv),
                v_th=torch.full((n,), th),
                v_leak=torch.zeros(n),
                v_reset=torch.zeros(n),
            )
        )
        for n, inv, th in ((6, 100.0, 0.03), (5, 200.0, 0.02))
    ]
    seq = norse.SequentialState(nn.Linear(8, 6), cells[0], nn.Linear(6, 5), cells[1])
    graph = norse.to_nir(seq, torch.zeros(1, 8), dt=1e-3)
    x = _spikes((12, 4, 8), seed)
    state, outs = None, []
    with torch.no_grad():
        for x_t in x:
            out, state = seq(x_t, state)
            outs.append(out)
    reference = torch.stack(outs)
    assert reference.sum() > 5, "the Norse network must fire"

    ours = import_nir(graph, dt=1e-3, dialect="norse")
    assert isinstance(ours, NIRModule) and ours.in_features == 8 and ours.out_features == 5
    with torch.no_grad():
        assert torch.equal(ours(x), reference)
    # Read as plain NIR, Norse's batch-of-one input type is refused.
    with pytest.raises(ValueError, match=r"'input': only flat \(1-D\).*\[1, 8\]"):
        import_nir(graph, dt=1e-3)


@pytest.mark.parametrize(("beta", "threshold", "seed"), [(0.8, 0.5, 0), (0.6, 0.3, 1)])
def test_hand_graph_with_snntorch_conventions_matches_snntorch_leaky(beta, threshold, seed):
    dt = 1e-4
    tau = np.full(7, dt / (1 - beta))
    lif = nir.LIF(
        tau=tau,
        r=tau / dt,
        v_leak=np.zeros(7),
        v_threshold=np.full(7, threshold),
        v_reset=np.zeros(7),
    )
    inp, out = _io(9, 7)
    fc = _affine(7, 9, seed)
    graph = nir.NIRGraph(
        nodes={"input": inp, "fc": fc, "lif": lif, "output": out},
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")],
    )
    x = _spikes((11, 5, 9), seed)
    linear = nn.Linear(9, 7)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(fc.weight))
        linear.bias.copy_(torch.from_numpy(fc.bias))
        current = linear(x)
    leaky = snntorch.Leaky(
        beta=beta, threshold=threshold, reset_mechanism="zero", reset_delay=False
    )
    mem, spikes = torch.zeros_like(current[0]), []
    with torch.no_grad():
        for cur in current:
            spk, mem = leaky(cur, mem)
            spikes.append(spk)
    snntorch.SpikingNeuron.instances.remove(leaky)
    reference = torch.stack(spikes)
    assert reference.sum() > 10

    with pytest.raises(ValueError, match="dt"):
        import_nir(graph)  # a hand graph states no time step
    module = import_nir(graph, dt=dt)
    with torch.no_grad():
        assert torch.equal(module(x), reference)
    assert torch.equal(_snntorch_run(graph, x), reference)
    assert torch.equal(_hand_lif(current, beta, threshold), reference)


def test_file_written_by_nir_imports_like_the_graph_in_memory(tmp_path, one_thread):
    torch.manual_seed(2)
    expert = SpikingExpert(8, 10, 4, num_layers=2, beta=0.85, threshold=0.4)  # subtract
    graph = export_nir(expert, dt=1e-3, subtract_reset="zero")
    path = tmp_path / "expert.nir"
    nir.write(str(path), graph)
    x = _spikes((8, 3, 8), 5)
    with torch.no_grad():
        reference = expert(x)
        in_memory = import_nir(graph)(x)
        from_read = import_nir(nir.read(str(path)))(x)
        from_path = import_nir(path)(x)
        from_str = import_nir(str(path))(x)
    assert torch.equal(in_memory, reference)
    for other in (from_read, from_path, from_str):
        assert torch.equal(other, in_memory)
    assert import_nir(path).metadata["dt"] == pytest.approx(1e-3)


def test_a_node_with_two_inputs_sums_them():
    a = nir.Linear(weight=_affine(5, 8, seed=1).weight)
    b = _affine(5, 8, seed=2)
    inp, out = _io(8, 5)
    graph = nir.NIRGraph(
        nodes={
            "input": inp,
            "a": a,
            "b": b,
            "lif": _lif(5),
            "output": out,
            "current": nir.Output(output_type={"output": np.array([5])}),
        },
        edges=[
            ("input", "a"),
            ("input", "b"),
            ("a", "lif"),
            ("b", "lif"),
            ("lif", "output"),
            ("b", "current"),
        ],
    )
    module = import_nir(graph, dt=1e-4)
    assert module.inputs["lif"] == ["a", "b"]
    x = _spikes((10, 4, 8), 4)
    with torch.no_grad():
        outs = module(x)
    assert set(outs) == {"output", "current"}
    current_b = x @ torch.from_numpy(b.weight).T + torch.from_numpy(b.bias)
    current = x @ torch.from_numpy(a.weight).T + current_b
    torch.testing.assert_close(outs["current"], current_b, rtol=0, atol=1e-6)
    expected = _hand_lif(current, 0.8, 0.5)
    assert expected.sum() > 10
    assert torch.equal(outs["output"], expected)
    # Only one of the two currents does not make the same spikes.
    assert not torch.equal(_hand_lif(current_b, 0.8, 0.5), expected)


# ----------------------------------------------------------------------------- 5. round trip


def _assert_round_trip(module, x, **export_kwargs):
    graph = export_nir(module, **export_kwargs)
    imported = import_nir(graph)
    with torch.no_grad():
        ours, theirs = module(x), imported(x)
    assert torch.equal(theirs, ours)
    return imported


@pytest.mark.parametrize("reset", ["zero", "subtract"])
def test_round_trip_of_an_expert_and_a_sequential_is_exact(reset, one_thread):
    torch.manual_seed(0)
    expert = SpikingExpert(8, 12, 6, num_layers=2, beta=0.8, threshold=0.4, reset=reset)
    seq = nn.Sequential(
        nn.Linear(8, 10),
        LIF(beta=0.7, threshold=0.4, reset=reset),
        nn.Linear(10, 6),
        LIF(beta=0.95, threshold=0.3, reset=reset),
    )
    for seed, unit in ((0, False), (1, True)):
        x = _spikes((10, 4, 8), seed)
        with torch.no_grad():
            assert expert.run(x).activity.spikes.sum() > 0
            assert seq(x).sum() > 0
        kwargs = dict(subtract_reset="zero", unit_resistance=unit)
        imported = _assert_round_trip(expert, x, **kwargs)
        lifs = [m for m in imported.modules() if isinstance(m, LIF)]
        assert [m.reset for m in lifs] == [reset, reset]
        assert torch.equal(lifs[0].beta, expert.net[1].beta)
        assert torch.equal(lifs[0].threshold, expert.net[1].threshold)
        _assert_round_trip(seq, x, **kwargs)


def test_round_trip_of_per_neuron_and_non_leaky_neurons_is_exact(one_thread):
    torch.manual_seed(1)
    beta = torch.linspace(0.55, 0.95, 10)
    threshold = torch.linspace(0.2, 0.6, 10)
    seq = nn.Sequential(
        nn.Linear(8, 10),
        LIF(beta=beta, threshold=threshold, reset="zero"),
        nn.Linear(10, 6),
        LIF(beta=1.0, threshold=0.7, reset="subtract"),
    )
    x = _spikes((9, 4, 8), 3)
    with torch.no_grad():
        assert seq(x).sum() > 0
    imported = _assert_round_trip(seq, x, subtract_reset="zero")
    first, second = (m for m in imported.modules() if isinstance(m, LIF))
    assert torch.equal(first.beta, beta) and torch.equal(first.threshold, threshold)
    assert float(second.beta) == 1.0 and second.reset == "subtract"

    # Without our metadata, the NIR parameters alone give the same values to float rounding.
    graph = export_nir(seq, subtract_reset="zero")
    for node in graph.nodes.values():
        node.metadata.pop("spiking_moe", None)
    plain = [m for m in import_nir(graph).modules() if isinstance(m, LIF)]
    torch.testing.assert_close(plain[0].beta, beta, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain[0].threshold, threshold, rtol=1e-6, atol=0)
    assert plain[1].reset == "zero"  # the true reset lived in the metadata


@pytest.mark.parametrize(
    ("readout", "beta"), [("membrane", 0.8), ("membrane", 1.0), ("count", 0.8)]
)
def test_round_trip_of_a_dense_classifier_gives_its_logits(readout, beta, one_thread):
    torch.manual_seed(4)
    model = _dense_classifier(readout=readout, beta=beta, threshold=0.5, expert_layers=2)
    graph = export_nir(model, subtract_reset="zero")
    imported = import_nir(graph)
    integrators = [m for m in imported.modules() if isinstance(m, LeakyIntegrator)]
    assert len(integrators) == (readout == "membrane")
    if readout == "membrane":
        last = graph.nodes[list(graph.nodes)[-2]]
        assert type(last) is (nir.I if beta == 1.0 else nir.LI)
    for seed in (0, 1):
        x = _spikes((7, 5, 8), seed)
        with _lif_outputs(model) as seen, torch.no_grad():
            logits = model(x).logits
        assert seen[-1].sum() > 0, "the last block must fire"
        with _lif_outputs(imported) as seen_imported, torch.no_grad():
            out = imported(x)
        assert out.shape == (7, 5, 3)
        assert len(seen_imported) == len(seen)
        for a, b in zip(seen_imported, seen, strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(out.mean(0), logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 6. bundles

MOE_VARIANTS = {
    "rate": dict(router="rate"),
    "spiking": dict(router="spiking", expert_layers=2),
    "capacity_window": dict(router="rate", capacity_factor=1.0, window=3, num_moe_layers=2),
}


def _compare_models(original, loaded, x):
    with _lif_outputs(original) as seen_a, torch.no_grad():
        a = original(x)
    with _lif_outputs(loaded) as seen_b, torch.no_grad():
        b = loaded(x)
    assert torch.equal(a.logits, b.logits)
    assert a.activity.names == b.activity.names
    assert torch.equal(a.activity.spikes, b.activity.spikes)
    assert a.activity.spikes.sum() > 0
    assert len(seen_a) == len(seen_b) > 0
    for s, t in zip(seen_a, seen_b, strict=True):
        assert torch.equal(s, t)
    assert len(a.routing) == len(b.routing)
    for r, q in zip(a.routing, b.routing, strict=True):
        assert torch.equal(r.expert_ids, q.expert_ids)
        assert torch.equal(r.gates, q.gates)
        assert torch.equal(r.kept, q.kept)
        assert torch.equal(r.tokens_per_expert, q.tokens_per_expert)
    return a


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_bundle_loads_to_the_same_logits_routing_and_spikes(variant, tmp_path, one_thread):
    torch.manual_seed(0)
    kwargs = MOE_VARIANTS[variant]
    model = SpikingMoEClassifier(
        10, 3, hidden_features=16, num_experts=4, k=2, expert_hidden=8, threshold=0.5, **kwargs
    ).eval()
    assert model.input_neuron.reset == "subtract"
    biases = []
    with torch.no_grad():
        for l, layer in enumerate(model.layers):
            bias = torch.tensor([0.3, -0.2, 0.1, -0.05]) * (l + 1)
            layer.router.expert_bias.copy_(bias)
            biases.append(bias)
    folder = tmp_path / "bundle"
    summaries = export_bundle(model, folder, dt=1e-3)
    loaded = load_bundle(folder)
    assert not loaded.training
    for layer, bias in zip(loaded.layers, biases, strict=True):
        assert torch.equal(layer.router.expert_bias, bias)
        assert layer.router.k == 2 and layer.router.window == model.layers[0].router.window
    dropped = 0
    for seed in (0, 1):
        out = _compare_models(model, loaded, _spikes((8, 5, 10), seed))
        dropped += sum(int(r.dropped) for r in out.routing)
    if variant == "capacity_window":
        assert dropped > 0, "capacity must drop something for the comparison to cover it"

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert manifest["dt"] == 1e-3
    names = [p["name"] for p in manifest["parts"]]
    assert names == [s.name for s in summaries]
    assert names[0] == "input" and names[-1] == "readout"
    for l in range(len(model.layers)):
        expected = [f"layers.{l}.router", *[f"layers.{l}.experts.{e}" for e in range(4)]]
        assert names[names.index(f"layers.{l}.router") :][:5] == expected
        assert f"layers.{l}.neuron" in names
    for part, summary in zip(manifest["parts"], summaries, strict=True):
        assert (folder / part["file"]).is_file()
        assert nir.read(str(folder / part["file"])).metadata["part"] == part["name"]
        assert (part["neurons"], part["synapses"], part["max_fan_in"]) == (
            summary.neurons,
            summary.synapses,
            summary.max_fan_in,
        )
    # The model is its args as written: the routing settings are there, once.
    assert manifest["model"]["class"] == "SpikingMoEClassifier"
    assert manifest["model"]["args"] == model.args.to_dict()
    args = manifest["model"]["args"]
    assert args["moe"]["k"] == 2 and args["moe"]["num_experts"] == 4
    assert args["router"]["kind"] == kwargs["router"]
    assert args["router"].get("capacity_factor") == kwargs.get("capacity_factor")
    assert args["router"].get("window") == kwargs.get("window")
    routing = manifest["routing"]
    assert len(routing) == len(model.layers)
    for rule, bias in zip(routing, biases, strict=True):
        np.testing.assert_allclose(rule["expert_bias"], bias.numpy(), rtol=0, atol=0)
    # Hand counts: the router part has E spiking neurons for a spiking router, none else.
    by_name = {s.name: s for s in summaries}
    router = by_name["layers.0.router"]
    assert router.neurons == (4 if kwargs["router"] == "spiking" else 0)
    assert (router.synapses, router.max_fan_in) == (16 * 4, 16)
    expert = by_name["layers.0.experts.0"]
    layers = kwargs.get("expert_layers", 1)
    assert expert.neurons == 8 * layers
    assert expert.synapses == 16 * 8 + (layers - 1) * 8 * 8 + 8 * 16
    assert by_name["layers.0.neuron"] == type(expert)("layers.0.neuron", 16, 0, 0)


def test_dense_bundle_with_pruned_weights_counts_synapses_and_loads_exactly(tmp_path, one_thread):
    torch.manual_seed(1)
    model = _dense_classifier(threshold=0.5, learn_beta=True, learn_threshold=True)
    with torch.no_grad():
        model.input_neuron.beta.fill_(0.7)
        model.input_neuron.threshold.fill_(0.4)
        weight = model.input_layer.weight
        weight[:, :3] = 0  # every unit loses 3 inputs ...
        weight[2, 3:7] = 0  # ... and unit 2 four more
        model.readout.weight[0, :5] = 0
    folder = tmp_path / "dense"
    summaries = {s.name: s for s in export_bundle(model, folder)}
    assert list(summaries) == ["input", "layers.0.expert", "layers.0.neuron", "readout"]
    assert summaries["input"].neurons == 12
    assert summaries["input"].synapses == 12 * 8 - 12 * 3 - 4
    assert summaries["input"].max_fan_in == 5
    assert summaries["readout"].synapses == 3 * 12 - 5
    assert summaries["readout"].max_fan_in == 12
    assert summaries["readout"].neurons == 0
    assert summaries["layers.0.expert"].neurons == 12

    loaded = load_bundle(folder)
    assert isinstance(loaded.input_neuron.beta, nn.Parameter)
    assert float(loaded.input_neuron.beta.detach()) == pytest.approx(0.7)
    assert loaded.input_neuron.reset == "subtract"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["routing"] == []
    assert manifest["decode"]["readout"] == "count"
    for seed in (0, 1, 2):
        _compare_models(model, loaded, _spikes((6, 4, 8), seed))


def test_summarize_graph_counts_by_hand():
    weight = np.ones((4, 6), np.float32)
    weight[0, :4] = 0
    weight[1, :] = 0
    inp, out = _io(6, 4)
    graph = nir.NIRGraph(
        nodes={"input": inp, "fc": nir.Linear(weight=weight), "lif": _lif(4), "output": out},
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")],
    )
    summary = summarize_graph(graph, "hand")
    assert summary.name == "hand"
    assert (summary.neurons, summary.synapses, summary.max_fan_in) == (4, 2 + 0 + 6 + 6, 6)
    # A population given scalar parameters (which the importer accepts) still has 4 neurons:
    # the outputs of the weights that feed it, not 1.
    scalar = {"tau": 0.01, "r": 10.0, "v_leak": 0.0, "v_threshold": 1.0, "v_reset": 0.0}
    shared = nir.LIF(**{key: np.array(value) for key, value in scalar.items()})
    graph.nodes["lif"] = shared
    assert summarize_graph(graph).neurons == 4


def test_dense_bundle_with_per_neuron_beta_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _dense_classifier(threshold=0.5, beta=torch.linspace(0.6, 0.9, 12))
    export_bundle(model, tmp_path / "b")
    _compare_models(model, load_bundle(tmp_path / "b"), _spikes((6, 4, 8), 0))


# ----------------------------------------------------------------------------- 7. bad input


def _chain(node, n_in=8, n_out=5):
    inp, out = _io(n_in, n_out)
    return nir.NIRGraph(
        nodes={"input": inp, "fc": _affine(n_out, n_in), "bad": node, "output": out},
        edges=[("input", "fc"), ("fc", "bad"), ("bad", "output")],
    )


@pytest.mark.parametrize(
    ("node", "kind"),
    [
        (nir.Threshold(threshold=np.full(5, 0.5)), "Threshold"),
        (
            nir.CubaLIF(
                tau_syn=np.full(5, 1e-3),
                tau_mem=np.full(5, 1e-3),
                r=np.ones(5),
                v_leak=np.zeros(5),
                v_threshold=np.ones(5),
            ),
            "CubaLIF",
        ),
    ],
)
def test_import_names_an_unsupported_node_and_its_type(node, kind):
    with pytest.raises(ValueError, match=rf"'bad' is a NIR {kind}"):
        import_nir(_chain(node), dt=1e-4)


def test_import_names_an_unsupported_conv_node():
    conv = nir.Conv1d(
        input_shape=8,
        weight=np.ones((2, 1, 3)),
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=np.zeros(2),
    )
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([1, 8])}),
            "conv": conv,
            "output": nir.Output(output_type={"output": np.array([2, 6])}),
        },
        edges=[("input", "conv"), ("conv", "output")],
    )
    with pytest.raises(ValueError, match=r"'conv' is a NIR Conv1d"):
        import_nir(graph, dt=1e-4)


def _fc_lif(n_in, fc_shape, n_lif, *, recurrent=False):
    """``input -> fc -> lif -> output`` (``fc`` of ``(out, in)`` = ``fc_shape``), unchecked."""
    inp, out = _io(n_in, n_lif)
    edges = [("input", "fc"), ("fc", "lif"), ("lif", "output")]
    return nir.NIRGraph(
        nodes={"input": inp, "fc": _affine(*fc_shape), "lif": _lif(n_lif), "output": out},
        edges=edges + ([("lif", "fc")] if recurrent else []),
        type_check=False,
    )


@pytest.mark.parametrize(
    ("graph", "match"),
    [
        # Mismatched sizes along an edge: both ends named.
        (_fc_lif(8, (5, 8), 4), r"'fc' -> 'lif'.*4 neurons.*gives 5"),
        (_fc_lif(8, (5, 6), 5), r"'input' -> 'fc'.*takes 6 inputs"),
        # A cycle (a recurrent LIF).
        (_fc_lif(5, (5, 5), 5, recurrent=True), "cycle"),
    ],
    ids=["neurons", "weights", "cycle"],
)
def test_import_rejects_a_bad_graph_naming_where(graph, match):
    with pytest.raises(ValueError, match=match):
        import_nir(graph, dt=1e-4)


@pytest.mark.parametrize(
    ("node", "kwargs", "match"),
    [
        (_lif(5), {}, r"dt"),  # a hand graph states no time step
        (_lif(5), {"dt": 0.0}, r"dt must be > 0"),
        (_lif(5), {"dt": 1e-4, "dialect": "snntorch"}, r"unknown dialect 'snntorch'"),
        (_lif(5, v_leak=np.full(5, 0.1)), {"dt": 1e-4}, r"'bad': v_leak must be 0"),
        # The integrator's reader shares the LIF's leak check.
        (
            nir.LI(tau=np.full(5, 5e-4), r=np.full(5, 5.0), v_leak=np.full(5, 0.1)),
            {"dt": 1e-4},
            r"'bad': v_leak must be 0",
        ),
        (_lif(5, v_reset=np.full(5, 0.1)), {"dt": 1e-4}, r"'bad': v_reset must be 0"),
    ],
    ids=["no-dt", "dt-zero", "dialect", "lif-v-leak", "li-v-leak", "v-reset"],
)
def test_import_rejects_bad_arguments_and_parameters(node, kwargs, match):
    with pytest.raises(ValueError, match=match):
        import_nir(_chain(node), **kwargs)


def test_import_checks_the_input_width_at_run_time():
    good = import_nir(_chain(_lif(5)), dt=1e-4)
    assert isinstance(good, NIRModule)
    with pytest.raises(ValueError, match="8 features"):
        good(torch.zeros(3, 2, 7))


def test_export_refuses_modules_without_a_nir_mapping():
    torch.manual_seed(0)
    moe = SpikingMoEClassifier(8, 3, hidden_features=12, num_experts=4, k=2, expert_hidden=6)
    with pytest.raises(ValueError, match="export_bundle"):
        export_nir(moe)
    layer = moe.layers[0]
    assert isinstance(layer, SpikingMoE)
    with pytest.raises(ValueError, match="export_bundle"):
        export_nir(nn.Sequential(nn.Linear(4, 12), layer))
    with pytest.raises(ValueError, match=r"ReLU"):
        export_nir(nn.Sequential(nn.Linear(4, 5), nn.ReLU()))
    ann = ANNClassifier(8, 3, hidden_features=12, num_experts=None, k=2, expert_hidden=6)
    with pytest.raises(ValueError, match=r"ANNClassifier"):
        export_nir(ann)
    with pytest.raises(ValueError, match=r"ANNClassifier"):
        export_bundle(ann, "/nonexistent/never/written")
    with pytest.raises(ValueError, match="features="):
        export_nir(LIF(reset="zero"))
    with pytest.raises(ValueError, match="dt"):
        export_nir(nn.Linear(3, 2), dt=0)
    # A router's projection (a bundle part) is a plain Linear: exportable on its own.
    assert list(export_nir(RateRouter(12, 4, 2).proj).nodes) == ["input", "node", "output"]


def test_bundle_errors_name_the_file_or_the_version(tmp_path):
    torch.manual_seed(0)
    model = _dense_classifier()
    folder = tmp_path / "bundle"
    export_bundle(model, folder)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_bundle(model, folder)

    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    (folder / "readout.nir").rename(folder / "moved.nir")
    with pytest.raises(FileNotFoundError, match=r"readout\.nir"):
        load_bundle(folder)
    (folder / "moved.nir").rename(folder / "readout.nir")
    load_bundle(folder)

    newer = dict(manifest, format_version=BUNDLE_FORMAT_VERSION + 1)
    manifest_path.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="format 3; this spiking_moe reads format 2: upgrade"):
        load_bundle(folder)
    older = dict(manifest, format_version=1)
    manifest_path.write_text(json.dumps(older))
    with pytest.raises(ValueError, match="format 1; this spiking_moe reads format 2: export it"):
        load_bundle(folder)
    manifest_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_bundle(folder)
    with pytest.raises(FileNotFoundError, match="no bundle manifest"):
        load_bundle(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- 8. CLI

TINY = (
    '[data]\nname = "digits"\nnum_steps = 4\n'
    '[model]\nkind = "{kind}"\nhidden_features = 32\nnum_experts = 4\nk = 2\nexpert_hidden = 16\n'
    'threshold = 0.5\nreadout = "membrane"\n'
    "[train]\nmax_steps = {steps}\nbatch_size = 64\nlr = 1e-2\nlog_every = 5\nprogress = false\n"
)


def _train(tmp_path, kind, steps):
    config = tmp_path / f"tiny_{kind}.toml"
    config.write_text(TINY.format(kind=kind, steps=steps))
    out = tmp_path / kind
    assert train_main(["--config", str(config), "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.mark.slow
def test_export_cli_writes_a_bundle_equal_to_the_checkpoint(tmp_path, capsys, caplog, one_thread):
    checkpoint = _train(tmp_path, "moe", steps=4)
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    argv = ["--checkpoint", str(checkpoint), "--out", str(bundle), "--dt", "1e-3"]
    assert export_main(argv) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w.]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", printed, re.M)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["dt"] == 1e-3
    assert [row[0] for row in rows] == [p["name"] for p in manifest["parts"]]
    for row, part in zip(rows, manifest["parts"], strict=True):
        counts = tuple(int(v.replace(",", "")) for v in row[1:])
        assert counts == (part["neurons"], part["synapses"], part["max_fan_in"])
    assert rows[0][1] == "32"  # the input population

    model, config = load_trained_model(checkpoint)
    loaded = load_bundle(bundle)
    _, _, test_loader = build_loaders(config, build_datasets(config.data))
    batches = 0
    for x, _ in test_loader:
        _compare_models(model, loaded, x)
        batches += 1
        if batches == 2:
            break
    assert batches == 2

    caplog.clear()
    assert export_main(argv) == 2  # the bundle exists
    assert "exists" in caplog.text

    caplog.clear()
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    assert export_main(["--checkpoint", str(missing), "--out", str(tmp_path / "b2")]) == 2
    assert str(missing) in caplog.text
    assert not (tmp_path / "b2").exists()

    ann = _train(tmp_path, "ann", steps=1)
    caplog.clear()
    assert export_main(["--checkpoint", str(ann), "--out", str(tmp_path / "b3")]) == 2
    assert "ANNClassifier" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "b3").exists() and not (tmp_path / ".b3.partial").exists()


def test_language_model_dense_parts_export_token_table_and_readout():
    """An LM's token table is a Linear on one-hot inputs; its readout a plain Affine."""
    from spiking_moe import SpikingMoELM

    torch.manual_seed(0)
    lm = SpikingMoELM(32, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=8)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    one_hot = torch.nn.functional.one_hot(ids, 32).float()  # [B, S, V]
    table = import_nir(export_nir(lm.token_embedding))
    assert torch.equal(table(one_hot), lm.token_embedding(ids))
    x = (torch.rand(4, 2, 16) < 0.4).float()
    readout = import_nir(export_nir(lm.readout))
    assert torch.equal(readout(x), lm.readout(x))
    with pytest.raises(ValueError, match="SpikingMoE"):
        export_nir(lm.blocks[0].ffn)


def test_import_refuses_node_names_that_would_share_a_module():
    """Module names cannot hold dots, so "a.b" becomes "a_b": a graph with both names would
    have two nodes computed by one module. The importer names them instead."""
    inp, out = _io(4, 3)
    graph = nir.NIRGraph(
        nodes={"input": inp, "a.b": _affine(5, 4, 0), "a_b": _affine(3, 5, 1), "output": out},
        edges=[("input", "a.b"), ("a.b", "a_b"), ("a_b", "output")],
    )
    with pytest.raises(ValueError, match=r"\['a\.b', 'a_b'\].*'a_b'"):
        import_nir(graph, dt=1e-3)
    graph.nodes["a_c"] = graph.nodes.pop("a_b")  # distinct once the dot is replaced: imports
    graph.edges[:] = [("input", "a.b"), ("a.b", "a_c"), ("a_c", "output")]
    assert import_nir(graph, dt=1e-3)(torch.ones(2, 1, 4)).shape == (2, 1, 3)


def test_failed_bundle_export_leaves_nothing_behind(tmp_path):
    """A bad time step is only found while the parts are written: the staging folder goes too,
    so nothing that looks like a (partial) bundle stays on disk."""
    torch.manual_seed(0)
    model = _dense_classifier()
    folder = tmp_path / "bundle"
    with pytest.raises(ValueError, match="dt"):
        export_bundle(model, folder, dt=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    export_bundle(model, folder)  # and the folder is still free for a good export
    assert (folder / MANIFEST_NAME).is_file()
