"""Quantization: per-channel integer weights, the integer-domain LIF rule, PTQ, QAT, state."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from energy import count_operations
from spiking_moe import LIF, ANNClassifier, SpikingMoEClassifier
from spiking_moe.config import ConfigError, TrainConfig
from spiking_moe.data import BatchLoader
from spiking_moe.quantization import (
    FakeQuantLinear,
    QuantizedLinear,
    convert_qat,
    fake_quantize,
    prepare_qat,
    quantize_model,
    quantize_weights,
)
from spiking_moe.training import Callback, Trainer, seed_everything


def _spikes(*shape, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


# --- quantize_weights ------------------------------------------------------------------------


def test_quantize_weights_matches_hand_computation_at_4_bits():
    w = torch.tensor([[0.6, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, -0.6, 0.9]])
    q, s = quantize_weights(w, 4)
    # q_max = 7; row 0: s = 1/7, 0.6*7 = 4.2 -> 4, 0.25*7 = 1.75 -> 2; row 1 (zero): s = 1;
    # row 2: s = 2/7, -0.6*3.5 = -2.1 -> -2, 0.9*3.5 = 3.15 -> 3.
    assert q.dtype == torch.int8
    assert q.tolist() == [[4, -7, 2], [0, 0, 0], [7, -2, 3]]
    torch.testing.assert_close(s, torch.tensor([1 / 7, 1.0, 2 / 7]))


@pytest.mark.parametrize("bits", [8, 4])
def test_each_channel_has_at_most_2_pow_bits_minus_1_values_and_rounds_to_nearest(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 300) * torch.logspace(-3, 1, 16)[:, None]
    q, s = quantize_weights(w, bits)
    q_max = 2 ** (bits - 1) - 1
    for row in q:
        assert len(row.unique()) <= 2**bits - 1
    assert int(q.abs().amax(1).min()) == q_max == int(q.abs().max())  # every row uses the range
    # Round to nearest: the error is at most half a step of the channel.
    err = (w - q.float() * s[:, None]).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("bits", [3, 16, 0, True])
def test_unsupported_bits_raise_naming_the_supported_set(bits):
    model = nn.Sequential(nn.Linear(3, 2), LIF())
    with pytest.raises(ValueError, match=r"bits must be one of \[8, 4\]"):
        quantize_weights(torch.ones(2, 3), bits)
    with pytest.raises(ValueError, match=r"bits must be one of \[8, 4\]"):
        quantize_model(model, bits)
    with pytest.raises(ValueError, match=r"bits must be one of \[8, 4\]"):
        prepare_qat(model, bits)


def test_model_without_linear_raises_no_quantizable_layer():
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize_model(nn.Sequential(nn.ReLU(), LIF()), 8)
    with pytest.raises(ValueError, match="no quantizable layer"):
        prepare_qat(nn.Sequential(LIF()), 4)


def test_ann_calibration_empty_or_missing_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_model(model, 8, calibration=[])
    with pytest.raises(ValueError, match="calibration is required"):
        quantize_model(model, 8)
    with pytest.raises(ValueError, match=r"activation_bits must be one of \[8, 4\]"):
        quantize_model(model, 8, activation_bits=2, calibration=[torch.ones(1, 3)])


def test_train_config_rejects_other_quantize_bits():
    assert TrainConfig(quantize_bits=4).quantize_bits == 4
    with pytest.raises(ConfigError, match=r"train.quantize_bits must be one of \[0, 8, 4\]"):
        TrainConfig(quantize_bits=3)


# --- QuantizedLinear -------------------------------------------------------------------------


def test_quantized_linear_equals_integer_accumulator_then_scale_then_bias():
    torch.manual_seed(0)
    fc = nn.Linear(20, 5)
    layer = QuantizedLinear.from_linear(fc, 4)
    q, s = quantize_weights(fc.weight, 4)
    assert torch.equal(layer.int_weight, q) and layer.int_weight.dtype == torch.int8
    x = _spikes(3, 4, 20)
    acc = x.long() @ q.long().T  # int64: a genuinely integer accumulator
    assert torch.equal(layer(x), acc.float() * s + fc.bias.detach())
    # Graded inputs: the same value as x @ (Q s)^T + b, up to float rounding.
    xg = torch.randn(6, 20)
    torch.testing.assert_close(layer(xg), xg @ (q.float() * s[:, None]).T + fc.bias.detach())
    assert torch.equal(layer.weight, q.float() * s[:, None])


def test_ann_activations_are_calibrated_per_tensor_and_forward_matches_hand_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3), torch.randn(7, 3) * 2]
    quantized = quantize_model(model, 8, activation_bits=4, calibration=batches)
    first, second = quantized[0], quantized[2]
    x_all = torch.cat(batches)
    # The raw input is signed: symmetric grid; the ReLU output is >= 0: unsigned grid.
    assert not first.act_unsigned and second.act_unsigned
    torch.testing.assert_close(first.act_scale, x_all.abs().max() / 7)
    torch.testing.assert_close(second.act_scale, torch.relu(model[0](x_all)).max().detach() / 15)
    # Hooks are gone from both models.
    for m in [*model.modules(), *quantized.modules()]:
        assert not m._forward_pre_hooks

    x = torch.randn(4, 3) * 3  # partly outside the calibrated range: saturates
    codes = torch.round(x / first.act_scale).clamp(-7, 7)
    assert codes.abs().max() == 7
    acc = codes.long() @ first.int_weight.long().T
    expected = acc.float() * (first.act_scale * first.scale) + first.bias.detach()
    assert torch.equal(first(x), expected)


# --- the integer-domain LIF rule -------------------------------------------------------------


def _integer_domain_lif(acc_TBO, bias_int_O, threshold_int_O, beta):
    """A LIF on the raw accumulator, with per-neuron threshold and bias divided by the scale."""
    u = torch.zeros_like(acc_TBO[0])
    out = []
    for acc in acc_TBO:
        u = beta * u + acc + bias_int_O
        spike = (u > threshold_int_O).float()
        u = u - threshold_int_O * spike
        out.append(spike)
    return torch.stack(out)


def test_linear_lif_spikes_equal_an_integer_domain_neuron_with_threshold_over_scale():
    torch.manual_seed(0)
    # Power-of-two scales (row maxima 127 * 2^-k) make every division by a scale exact, so the
    # two computations must agree to the bit.
    exps = torch.tensor([-7.0, -5.0, -6.0, -4.0])
    q_true = torch.randint(-127, 128, (4, 10)).float()
    q_true[:, 0] = 127
    w = q_true * 2.0 ** exps[:, None]
    fc = nn.Linear(10, 4)
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(torch.tensor([0.25, -0.5, 0.125, 1.0]))
    theta, beta = 2.0, 0.75
    lif = LIF(beta=beta, threshold=theta)
    x = _spikes(12, 3, 10, p=0.5, seed=1)

    q, s = quantize_weights(fc.weight, 8)
    assert torch.equal(s, 2.0**exps) and torch.equal(q.float(), q_true)
    float_spikes = lif(F.linear(x, q.float() * s[:, None], fc.bias.detach()))
    quant_spikes = lif(QuantizedLinear.from_linear(fc, 8)(x))

    acc = (x.long() @ q.long().T).float()  # integer accumulator
    bias_int, threshold_int = fc.bias.detach() / s, theta / s  # per neuron
    int_spikes = _integer_domain_lif(acc, bias_int, threshold_int, beta)
    # The same through the package's LIF, which takes the per-neuron threshold as a 1-D tensor.
    lif_int = LIF(beta=beta, threshold=threshold_int)(acc + bias_int)

    assert 0.05 < float(float_spikes.mean()) < 0.95  # not trivially silent or saturated
    assert torch.equal(float_spikes, int_spikes)
    assert torch.equal(quant_spikes, int_spikes)
    assert torch.equal(lif_int, int_spikes)


# --- PTQ of a trained model ------------------------------------------------------------------


def _train_tiny(model, data, steps=30, lr=2e-2):
    loader = BatchLoader(data, 16, shuffle=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, step = [], 0
    while step < steps:
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out.logits, y) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    return losses


def test_ptq_of_trained_snn_reproduces_the_integer_weight_forward_exactly(tiny_snn, two_class_data):
    torch.manual_seed(0)
    model = tiny_snn()
    data = two_class_data()
    _train_tiny(model, data)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_model(model, 8)

    # The original is untouched.
    assert type(model.fc1) is nn.Linear and isinstance(model.fc1.weight, nn.Parameter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(quantized.fc1, QuantizedLinear) and isinstance(quantized.fc2, QuantizedLinear)

    x, y = data.get_batch(torch.arange(40), torch.Generator().manual_seed(3))
    out = quantized(x)
    # Oracle: int64 accumulators, per-channel scale, float bias, the same LIF.
    fc1, fc2 = quantized.fc1, quantized.fc2
    acc1 = x.long() @ fc1.int_weight.long().T
    spikes = model.lif(acc1.float() * fc1.scale + model.fc1.bias.detach())
    acc2 = spikes.long() @ fc2.int_weight.long().T
    logits = (acc2.float() * fc2.scale + model.fc2.bias.detach()).mean(0)
    assert torch.equal(quantized.lif(quantized.fc1(x)), spikes)
    assert out.activity.spikes.item() == spikes.sum().item()
    assert torch.equal(out.logits, logits)
    # 8 bits keeps the trained model's accuracy (within a sample or two).
    acc_float = (model(x).logits.argmax(1) == y).float().mean()
    acc_quant = (out.logits.argmax(1) == y).float().mean()
    assert acc_float > 0.9 and acc_quant >= acc_float - 0.05


# --- state ------------------------------------------------------------------------------------


def test_state_dict_round_trip_through_weights_only_load(tiny_moe):
    quantized = quantize_model(tiny_moe(seed=0).eval(), 4)
    names = {n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    # input layer, readout, router projection, two Linears per expert
    assert {"input_layer", "readout", "layers.0.router.proj", "layers.0.experts.3.net.2"} <= names
    assert not any(type(m) is nn.Linear for m in quantized.modules())

    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["input_layer.int_weight"].dtype == torch.int8
    fresh = quantize_model(tiny_moe(seed=1).eval(), 4)
    assert not torch.equal(fresh.input_layer.int_weight, quantized.input_layer.int_weight)
    fresh.load_state_dict(state)
    x = _spikes(5, 6, 8)
    assert torch.equal(fresh(x).logits, quantized(x).logits)


def test_ann_state_dict_round_trip_keeps_calibration():
    def ann(seed):
        torch.manual_seed(seed)
        return ANNClassifier(8, 2, hidden_features=16, num_experts=None, k=1, expert_hidden=8)

    quantized = quantize_model(ann(0), 8, calibration=[torch.rand(32, 8)])
    fresh = quantize_model(ann(1), 8, calibration=[torch.randn(4, 8)])
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.rand(9, 8)
    assert torch.equal(fresh(x).logits, quantized(x).logits)
    assert bool(fresh.input_layer.act_unsigned)  # calibrated on rand: inputs >= 0


# --- energy -----------------------------------------------------------------------------------


def test_operation_counts_equal_the_float_model_when_spikes_do_not_change(tiny_moe):
    # float64: the float model sums the dequantized weights, the quantized one the integers
    # before the scale; that rounds differently, and in float32 (1e-7) a membrane that close to
    # the threshold could fire in one model and not the other on some CPU; not in float64.
    model = tiny_moe(seed=0).double().eval()
    # Put the float weights on the 8-bit grid first, so the spikes cannot change.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                q, s = quantize_weights(m.weight, 8)
                m.weight.copy_(q.to(s.dtype) * s[:, None])
    quantized = quantize_model(model, 8)
    x = _spikes(6, 10, 8, p=0.5).double()
    ref, out = model(x), quantized(x)
    # Precondition of the claim: same routing and same spikes everywhere.
    assert all(
        torch.equal(a.expert_ids, b.expert_ids)
        for a, b in zip(ref.routing, out.routing, strict=True)
    )
    assert ref.activity.names == out.activity.names
    assert torch.equal(ref.activity.spikes, out.activity.spikes)
    float_counts = count_operations(model, x)
    quant_counts = count_operations(quantized, x)
    assert quant_counts.total("spikes") > 0
    assert float_counts == quant_counts


# --- QAT --------------------------------------------------------------------------------------


def test_fake_quantize_passes_the_gradient_of_the_dequantized_weight_straight_through():
    torch.manual_seed(0)
    fc = nn.Linear(6, 3)
    layer = prepare_qat(nn.Sequential(fc), 4)[0]
    assert isinstance(layer, FakeQuantLinear) and type(fc) is nn.Linear  # copy by default
    x = torch.randn(5, 6)
    target = torch.randn(5, 3)
    F.mse_loss(layer(x), target).backward()

    q, s = quantize_weights(fc.weight, 4)
    w_deq = (q.float() * s[:, None]).requires_grad_()
    F.mse_loss(F.linear(x, w_deq, fc.bias.detach()), target).backward()
    assert layer.weight.grad.abs().sum() > 0
    # The forward values differ by the rounding of another summation order (the integer
    # order below), which the loss gradient carries: a few float32 ulps.
    torch.testing.assert_close(layer.weight.grad, w_deq.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(fake_quantize(fc.weight, 4), w_deq.detach())


@pytest.mark.parametrize("bits", [8, 4])
def test_the_qat_forward_is_the_integer_model_to_the_bit(bits):
    """A QAT layer computes in the integer model's order (accumulator, scale, bias), so a QAT
    model spikes exactly as the model convert_qat gives."""
    torch.manual_seed(0)
    snn = nn.Sequential(nn.Linear(33, 7), LIF(threshold=0.2))
    qat = prepare_qat(snn, bits)
    integer = convert_qat(qat)
    x = (torch.rand(6, 50, 33) < 0.3).float()  # [T, B, F] spikes
    assert torch.equal(qat[0](x), integer[0](x))  # the currents, to the bit
    spikes = qat(x)
    assert spikes.sum() > 0 and torch.equal(spikes, integer(x))


def test_trainer_with_quantize_bits_4_trains_qat_and_converts(
    tiny_moe, two_class_data, train_config
):
    class Losses(Callback):
        def __init__(self):
            self.values = []

        def on_train_step_end(self, trainer, outputs, loss):
            self.values.append(loss.item())

    recorder = Losses()
    model = tiny_moe(seed=0)
    param_ids = {id(p) for p in model.parameters()}
    seed_everything(0)
    trainer = Trainer(
        model,
        BatchLoader(two_class_data(), 16, shuffle=True),
        train_config(max_steps=50, quantize_bits=4),
        callbacks=[recorder],
    )
    assert trainer.model is model and {id(p) for p in model.parameters()} == param_ids
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, FakeQuantLinear) and m.bits == 4 for m in linears)
    trainer.fit()
    losses = recorder.values
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:5]) / 5

    model.eval()
    converted = convert_qat(model)
    assert all(
        isinstance(m, QuantizedLinear) and m.bits == 4
        for m in converted.modules()
        if isinstance(m, nn.Linear)
    )
    x, y = two_class_data(40, seed=2).get_batch(torch.arange(40), torch.Generator().manual_seed(0))
    assert (converted(x).logits.argmax(1) == y).float().mean() > 0.8
    # The integer model computes the QAT model's function. Checked on a copy whose rows are on
    # power-of-two scales (weights q 2^e with max |q| = 7: the scale is 2^e exactly, in any
    # dtype), in float64: the QAT model sums q 2^e, the integer one q then scales, which round
    # differently; in float32 (1e-7) that could flip a spike on some CPU, in float64 the logits
    # stay within 1e-15.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, FakeQuantLinear):
                q, s = quantize_weights(m.weight, 4)
                m.weight.copy_(q.to(s.dtype) * torch.exp2(torch.round(torch.log2(s)))[:, None])
    twin.double()
    x64 = x.double()
    torch.testing.assert_close(convert_qat(twin)(x64).logits, twin(x64).logits, rtol=0, atol=1e-12)


def test_spiking_model_with_an_analog_input_layer_quantizes_only_that_layers_inputs():
    """Calibrated PTQ of a spiking model: the analog input layer gets 8-bit inputs; the layers
    fed spikes and those fed rates (router, count readout: integer counts over T) keep theirs."""
    torch.manual_seed(0)
    model = SpikingMoEClassifier(
        6, 3, hidden_features=16, num_experts=2, k=2, expert_hidden=8, threshold=0.3
    ).eval()
    batches = [torch.randn(5, 32, 6) for _ in range(3)]  # analog current [T, B, F]
    quantized = quantize_model(model, 4, activation_bits=8, calibration=batches)
    assert quantized.input_layer.activation_bits == 8
    by_hand = max(float(x.abs().max()) for x in batches) / 127  # symmetric 8-bit grid
    assert quantized.input_layer.act_scale.item() == pytest.approx(by_hand, rel=1e-6)
    spike_fed = [quantized.readout, *quantized.layers[0].experts[0].net[::2]]
    assert all(m.activation_bits is None for m in spike_fed)
    assert quantized.layers[0].router.proj.activation_bits is None
    # Without calibration the same model is quantized weights only.
    assert quantize_model(model, 4).input_layer.activation_bits is None
