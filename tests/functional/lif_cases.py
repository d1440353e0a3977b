"""Shared oracle comparison for the fused LIF tests: run one case through two implementations.

Shapes: ``T`` time steps, ``B`` batch, ``D`` neurons.
"""

from __future__ import annotations

import torch

from spiking_moe.functional.lif import lif_multistep

SURROGATE_NAMES = ("fast_sigmoid", "atan", "sigmoid", "triangle", "boxcar")


def make_case(seed, steps, step_shape, dtype, learn, per_neuron, with_v0, device="cpu"):
    """Random inputs around threshold so that both spikes and silences occur."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=dtype).to(device)

    x = rand(steps, *step_shape) * 1.6 - 0.3
    param_shape = step_shape[-1:] if per_neuron else ()
    beta = rand(*param_shape) * 0.9 + 0.05 if (learn or per_neuron) else 0.8
    threshold = rand(*param_shape) + 0.5 if (learn or per_neuron) else 1.0
    v0 = rand(*step_shape) - 0.5 if with_v0 else None
    weights = [rand(steps, *step_shape) - 0.5, rand(*step_shape) - 0.5, rand(steps, *step_shape)]
    return x, v0, beta, threshold, weights


def run_case(implementation, case, learn, **kwargs):
    """Outputs and gradients (x, v0, beta, threshold) of a random linear loss on every output."""
    x, v0, beta, threshold, (w_s, w_v, w_m) = case
    x = x.clone().requires_grad_(True)
    v0 = None if v0 is None else v0.clone().requires_grad_(True)
    if learn:
        beta = beta.clone().requires_grad_(True)
        threshold = threshold.clone().requires_grad_(True)
    out = lif_multistep(
        x, v0, beta=beta, threshold=threshold, implementation=implementation, **kwargs
    )
    loss = (out.spikes * w_s).sum() + (out.v * w_v).sum()
    if out.membrane is not None:
        loss = loss + (out.membrane * w_m).sum()
    inputs = [
        t for t in (x, v0, beta, threshold) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    grads = torch.autograd.grad(loss, inputs)
    return out, grads


def assert_same(reference, other):
    (out_r, grads_r), (out_o, grads_o) = reference, other
    assert torch.equal(out_r.spikes, out_o.spikes)
    assert out_r.spikes.sum() > 0 and (out_r.spikes == 0).any()  # the case is not trivial
    torch.testing.assert_close(out_o.v, out_r.v)
    if out_r.membrane is not None:
        torch.testing.assert_close(out_o.membrane, out_r.membrane)
    assert len(grads_r) == len(grads_o)
    for g_r, g_o in zip(grads_r, grads_o, strict=True):
        assert g_r.shape == g_o.shape and g_r.dtype == g_o.dtype
        torch.testing.assert_close(g_o, g_r, rtol=1e-4, atol=1e-5)
