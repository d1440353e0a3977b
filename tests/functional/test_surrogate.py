import pickle

import pytest
import snntorch.surrogate as snn_surrogate
import torch
from torch import nn

from spiking_moe.functional.surrogate import (
    SURROGATES,
    Surrogate,
    SurrogateFunction,
    resolve_surrogate,
    spike,
)

NAMES = sorted(SURROGATES)


def _points(n=2001, dtype=torch.float64):
    # Avoid the kinks of triangle/boxcar, where a one-sided derivative is ambiguous.
    x = torch.linspace(-3, 3, n, dtype=dtype)
    return x + 1e-4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("alpha", [None, 0.5, 4.0])
def test_backward_equals_autograd_of_smooth_primitive(name, alpha):
    surrogate = resolve_surrogate(name, alpha)
    x = _points().requires_grad_(True)
    (grad_surrogate,) = torch.autograd.grad(surrogate(x).sum(), x)
    y = _points().requires_grad_(True)
    (grad_primitive,) = torch.autograd.grad(
        surrogate.function.primitive(y, surrogate.alpha).sum(), y
    )
    torch.testing.assert_close(grad_surrogate, grad_primitive, rtol=1e-10, atol=1e-12)
    assert grad_surrogate.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_strict_heaviside(name):
    x = torch.tensor([-1.0, -1e-7, 0.0, 1e-7, 2.0])
    assert spike(x, name).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", NAMES)
def test_surrogate_pickles_and_still_works(name):
    surrogate = resolve_surrogate(name, 3.0)
    clone = pickle.loads(pickle.dumps(surrogate))
    assert clone == surrogate
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(surrogate(x).sum(), x)
    (g2,) = torch.autograd.grad(clone(x).sum(), x)
    assert torch.equal(g1, g2)
    assert pickle.loads(pickle.dumps(surrogate.function)) is surrogate.function


class _Holder(nn.Module):
    """A module that keeps a surrogate the two ways layers do: by name and alpha, and as a class."""

    def __init__(self, name):
        super().__init__()
        self.spike_fn = Surrogate(name, 3.0)
        self.function = SURROGATES[name][0]

    def forward(self, x):
        return self.spike_fn(x) + self.function.apply(x, 0.5)


@pytest.mark.parametrize("name", NAMES)
def test_module_holding_a_surrogate_pickles(name):
    module = _Holder(name)
    clone = pickle.loads(pickle.dumps(module))
    assert clone.spike_fn == module.spike_fn
    assert clone.function is module.function
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(module(x).sum(), x)
    (g2,) = torch.autograd.grad(clone(x).sum(), x)
    assert torch.equal(g1, g2)
    expected = module.function.derivative(x, 3.0) + module.function.derivative(x, 0.5)
    torch.testing.assert_close(g1, expected.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_each_surrogate_shares_the_base_body_and_keeps_its_own_backward(name):
    function = SURROGATES[name][0]
    assert issubclass(function, SurrogateFunction)
    assert function.forward is SurrogateFunction.forward
    assert function.setup_context is SurrogateFunction.setup_context
    backwards = {SURROGATES[n][0].backward for n in NAMES}
    assert len(backwards) == len(NAMES)  # one per subclass, not one overwritten by the last


@pytest.mark.parametrize("name", NAMES)
def test_surrogate_without_alpha_takes_the_table_default(name):
    # Surrogate("atan") had alpha 25 (the dataclass default) while resolve_surrogate("atan")
    # had the table's 2.0: the same name gave two different gradients.
    default = SURROGATES[name][1]
    assert Surrogate(name).alpha == default
    assert Surrogate(name) == resolve_surrogate(name) == Surrogate(name, default)
    assert Surrogate().alpha == SURROGATES["fast_sigmoid"][1]


def test_compiled_surrogates_match_eager_without_graph_breaks():
    surrogates = [Surrogate(name, 2.0) for name in NAMES]

    def loss(x):
        return sum(s(x * 1.5).sum() for s in surrogates)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    (eager_grad,) = torch.autograd.grad(loss(x), x)
    (compiled_grad,) = torch.autograd.grad(compiled(x), x)
    assert eager_grad.abs().max() > 0
    # Same float64 operations in the same order: aot_eager runs the traced ops eagerly.
    assert torch.equal(compiled_grad, eager_grad)


@pytest.mark.parametrize(
    "name, peer",
    [
        ("fast_sigmoid", snn_surrogate.fast_sigmoid),
        ("atan", snn_surrogate.atan),
        ("sigmoid", snn_surrogate.sigmoid),
    ],
)
@pytest.mark.parametrize("alpha", [None, 5.0])
def test_matches_snntorch_surrogate_and_default(name, peer, alpha):
    ours = resolve_surrogate(name, alpha)
    theirs = peer() if alpha is None else peer(alpha)
    x = torch.randn(1000, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sa, sb = ours(xa), theirs(xb)
    assert torch.equal(sa, sb.to(sa.dtype))
    (ga,) = torch.autograd.grad(sa.sum(), xa)
    (gb,) = torch.autograd.grad(sb.sum(), xb)
    torch.testing.assert_close(ga, gb.to(ga.dtype), rtol=1e-12, atol=1e-12)


def test_default_fast_sigmoid_slope_is_25_like_snntorch():
    assert resolve_surrogate("fast_sigmoid").alpha == 25.0
    x = torch.tensor([0.1], requires_grad=True)
    (g,) = torch.autograd.grad(spike(x).sum(), x)
    assert g.item() == pytest.approx(1.0 / (1 + 25 * 0.1) ** 2)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names.*fast_sigmoid"):
        resolve_surrogate("gaussian")
    with pytest.raises(ValueError, match="unknown surrogate"):
        Surrogate("nope", 1.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        resolve_surrogate("atan", alpha)
