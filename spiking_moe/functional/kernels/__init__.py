r"""Accelerated LIF implementations, chosen by :mod:`spiking_moe.functional.lif`; never call directly.

Every fused path is one autograd node over all ``T`` steps (:class:`FusedLIF`); only the
kernel provider differs. Every provider satisfies :class:`~.protocol.LIFKernel` (the
arguments and the ``[T, U]`` layout, written down once in :mod:`.protocol`), and both
compiled kernels take their surrogate ids from :data:`~.protocol.SURROGATE_IDS`:

* ``"cpp"`` (:mod:`.cpu_fused`): a C++ kernel JIT-compiled on first use, CPU, float32/64;
* ``"torch"`` (:mod:`.cpu_fused`): the same recurrence as vectorised PyTorch ops with the
  loop over ``T`` in Python but no per-step autograd graph; any device and dtype, the fallback;
* ``"triton"`` (:mod:`.triton_lif`): a Triton kernel for CUDA (or the Triton interpreter).

Forward is the recurrence of :mod:`spiking_moe.functional.lif`. Backward is its exact adjoint
(BPTT), with :math:`g_t = g_\alpha(h_t - \theta)` the surrogate derivative,
:math:`r = 0` if ``detach_reset`` else 1, :math:`a_t = \partial L / \partial v_t` the total
adjoint of the post-reset membrane and :math:`m_t = v_t` the optional membrane output:

.. math::

    a_{T-1} &= \bar v_{\text{final}} + \bar m_{T-1}, \qquad
    a_{t-1} = \beta\, \bar h_t + \bar m_{t-1}, \\
    \bar h_t &= \bar s_t\, g_t + a_t\, \partial v_t/\partial h_t, \qquad
    \partial v_t/\partial h_t = \begin{cases} 1 - r\,\theta\, g_t & \text{subtract} \\
                                             (1 - s_t) - r\, h_t\, g_t & \text{zero} \end{cases} \\
    \bar x_t &= \bar h_t, \qquad \bar v_0 = \beta\, \bar h_0, \qquad
    \bar\beta = \textstyle\sum_t \bar h_t\, v_{t-1}, \\
    \bar\theta &= \textstyle\sum_t -\bar s_t\, g_t + a_t\, \partial v_t/\partial\theta
                = \textstyle\sum_t a_t\,(1 - s_t) - \bar h_t,

where :math:`\partial v_t/\partial\theta = -s_t + r\,\theta\, g_t` (subtract) or
:math:`r\, h_t\, g_t` (zero); the closed form on the right holds for both resets, because
:math:`\theta` enters only through :math:`h_t - \theta` and the reset term.

Backward needs only ``h`` (``[T, U]``, the input dtype: 4 bytes per element per step in fp32):
``s_t = H(h_t - \theta)`` and ``v_{t-1}`` are recomputed from it. Parameter gradients come back
per neuron and are summed to the parameters' shapes here.

Shapes (``T`` steps, ``U`` neurons of one step) as in :mod:`.protocol`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..surrogate import Surrogate
from .protocol import SURROGATE_IDS, LIFBackwardArgs, LIFForwardArgs, LIFKernel

__all__ = ["FusedLIF", "FusedConfig", "LIFKernel", "SURROGATE_IDS"]


class FusedConfig(NamedTuple):
    """Static settings of one :class:`FusedLIF` call."""

    provider: LIFKernel
    zero_reset: bool
    surrogate: Surrogate
    detach_reset: bool
    return_membrane: bool


def _per_neuron(value, step_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """beta/threshold as a contiguous ``[U]`` tensor in ``like``'s dtype and device."""
    n = math.prod(step_shape)
    if isinstance(value, torch.Tensor):
        return value.detach().to(like.dtype).expand(step_shape).reshape(n).contiguous()
    return torch.full((n,), float(value), dtype=like.dtype, device=like.device)


def _reduce_to(grad_U: torch.Tensor, step_shape: torch.Size, param) -> torch.Tensor | None:
    if not isinstance(param, torch.Tensor):
        return None
    return grad_U.view(step_shape).sum_to_size(param.shape).to(param.dtype)


class FusedLIF(torch.autograd.Function):
    """One autograd node for :func:`~spiking_moe.functional.lif.lif_multistep`.

    ``apply(x [T, B, ...], v0 [B, ...] | None, beta, threshold, config)`` returns
    ``(spikes [T, B, ...], v_final [B, ...])`` plus ``membrane [T, B, ...]`` when
    ``config.return_membrane``.
    """

    @staticmethod
    def forward(ctx, x, v0, beta, threshold, config: FusedConfig):
        steps, step_shape = x.shape[0], x.shape[1:]
        n = math.prod(step_shape)
        x_TU = x.reshape(steps, n).contiguous()
        beta_U = _per_neuron(beta, step_shape, x)
        theta_U = _per_neuron(threshold, step_shape, x)
        v0_U = None if v0 is None else v0.reshape(n).contiguous()
        # Without a gradient to any input no backward runs: h (kept only for it) need not
        # be written.
        keep_h = any(ctx.needs_input_grad[:4])
        outputs = config.provider.forward(
            LIFForwardArgs(
                x_TU, v0_U, beta_U, theta_U, config.zero_reset, config.return_membrane, keep_h
            )
        )
        spikes_TU, h_TU, v_U = outputs[:3]
        param_grads = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        # Only h is [T, U]; beta/threshold/v0 are the caller's own tensors, not copies.
        ctx.save_for_backward(
            h_TU,
            v0 if param_grads else None,
            beta if isinstance(beta, torch.Tensor) else None,
            threshold if isinstance(threshold, torch.Tensor) else None,
        )
        ctx.beta_value = None if isinstance(beta, torch.Tensor) else float(beta)
        ctx.threshold_value = None if isinstance(threshold, torch.Tensor) else float(threshold)
        ctx.config = config
        ctx.param_grads = param_grads
        ctx.step_shape = step_shape
        ctx.set_materialize_grads(False)
        result = (spikes_TU.view(x.shape), v_U.view(step_shape))
        if config.return_membrane:
            result = result + (outputs[3].view(x.shape),)
        return result

    @staticmethod
    def backward(ctx, grad_spikes, grad_v, grad_membrane=None):
        h_TU, v0, beta, threshold = ctx.saved_tensors
        config: FusedConfig = ctx.config
        step_shape = ctx.step_shape
        steps, n = h_TU.shape

        def flat(g, shape):
            return None if g is None else g.reshape(shape).contiguous().to(h_TU.dtype)

        gs_TU = flat(grad_spikes, (steps, n))
        if gs_TU is None:
            gs_TU = torch.zeros_like(h_TU)
        beta_p = beta if beta is not None else ctx.beta_value
        theta_p = threshold if threshold is not None else ctx.threshold_value
        args = LIFBackwardArgs(
            gs_TU,
            flat(grad_membrane, (steps, n)),
            flat(grad_v, (n,)),
            h_TU,
            _per_neuron(beta_p, step_shape, h_TU),
            _per_neuron(theta_p, step_shape, h_TU),
            None if v0 is None else v0.reshape(n).contiguous().to(h_TU.dtype),
            config.surrogate,
            config.zero_reset,
            config.detach_reset,
            ctx.param_grads,
        )
        gx_TU, gv0_U, gbeta_U, gtheta_U = config.provider.backward(args)
        grad_x = gx_TU.view((steps, *step_shape))
        grad_v0 = gv0_U.view(step_shape) if ctx.needs_input_grad[1] else None
        grad_beta = grad_theta = None
        if ctx.needs_input_grad[2]:
            grad_beta = _reduce_to(gbeta_U, step_shape, beta)
        if ctx.needs_input_grad[3]:
            grad_theta = _reduce_to(gtheta_U, step_shape, threshold)
        return grad_x, grad_v0, grad_beta, grad_theta, None
