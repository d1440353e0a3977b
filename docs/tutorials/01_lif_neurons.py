"""
LIF neurons and surrogate gradients
===================================

Every spiking layer of ``spiking_moe`` is built from one neuron, the discrete-time leaky
integrate-and-fire (LIF) neuron of :class:`spiking_moe.neurons.LIF`. This tutorial runs it on
small inputs and looks at what it computes: the membrane and its spikes, the two reset modes,
the surrogate functions that make the Heaviside step trainable, a gradient flowing through
spikes, and the time-major ``[T, B, ...]`` layout. It ends by running the same input through
snnTorch's ``snn.Leaky`` and Norse's ``LIFBoxCell`` with the documented parameter mapping and
checking that the spikes are the same, so that you can move a model or a result between the
three libraries.
"""

# %%
# The model
# ---------
#
# Per time step ``t`` the neuron charges, fires and resets:
#
# .. math::
#
#     h_t = \beta\, v_{t-1} + x_t, \qquad s_t = H(h_t - \theta), \qquad
#     v_t = \begin{cases} h_t - \theta\, s_t & \text{reset="subtract"} \\
#                         h_t\,(1 - s_t) & \text{reset="zero"} \end{cases}
#
# with decay ``beta`` (:math:`\beta`), threshold ``threshold`` (:math:`\theta`), input current
# ``x`` and :math:`H(0) = 0` (a membrane exactly at threshold does not fire, as in snnTorch and
# Norse). ``h`` is the membrane *before* the reset, the value compared with the threshold;
# ``v`` the membrane after it, the state carried to the next step. The pure functions are
# :func:`spiking_moe.functional.lif.lif_step` (one step) and
# :func:`spiking_moe.functional.lif.lif_multistep` (a sequence); the module
# :class:`spiking_moe.neurons.LIF` wraps the latter and keeps ``beta`` and ``threshold`` as
# buffers (or parameters, with ``learn_beta=True`` / ``learn_threshold=True``).
#
# We drive one neuron with a step of current, 0.3 from step 5 to step 29. ``LIF.run`` returns
# the spikes, the final membrane and, with ``return_membrane=True``, the post-reset trace
# ``v``; we recover ``h`` from it with the first equation.

import matplotlib.pyplot as plt
import snntorch
import snntorch.surrogate
import torch
from norse.torch import LIFBoxCell, LIFBoxParameters
from norse.torch.functional.lif_box import LIFBoxFeedForwardState
from norse.torch.functional.reset import reset_subtract, reset_value

from spiking_moe import LIF, Surrogate
from spiking_moe.functional import SURROGATES, lif_multistep, lif_step

torch.manual_seed(0)

T = 40
beta, theta = 0.9, 1.0
x = torch.zeros(T, 1, 1)  # [T, B, N]: 40 steps, one sample, one neuron
x[5:30] = 0.3

lif = LIF(beta=beta, threshold=theta, reset="subtract")
out = lif.run(x, return_membrane=True)
v = out.membrane[:, 0, 0]  # post-reset membrane v_t
v_before = torch.cat([torch.zeros(1), v[:-1]])  # v_{t-1}, v_{-1} = 0
h = beta * v_before + x[:, 0, 0]  # pre-reset membrane h_t
spike_times = out.spikes[:, 0, 0].nonzero().flatten().tolist()
print(lif)
print("spike times:", spike_times)
print("final membrane:", out.v.flatten().tolist())

fig, (ax_in, ax_v) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True, height_ratios=[1, 2])
ax_in.step(range(T), x[:, 0, 0], where="mid", color="tab:gray")
ax_in.set_ylabel("input x")
ax_v.plot(h, "o-", ms=3, label="h (before reset)")
ax_v.plot(v, "s--", ms=3, alpha=0.7, label="v (after reset)")
ax_v.axhline(theta, color="k", lw=0.8, ls=":", label="threshold")
for t in spike_times:
    ax_v.axvline(t, color="tab:red", lw=0.8, alpha=0.5)
ax_v.set_xlabel("time step")
ax_v.set_ylabel("membrane")
ax_v.legend(loc="upper right", fontsize=8)
ax_v.set_title("LIF, beta = 0.9, threshold = 1 (red: spikes)", fontsize=10)
fig.tight_layout()
plt.show()

# %%
# The membrane charges towards the fixed point :math:`x / (1 - \beta) = 3`, crosses the
# threshold every few steps, and decays back to zero once the input stops. With a constant
# input ``x`` the neuron fires only if :math:`x / (1 - \beta) > \theta`: below that the leak
# wins, whatever the duration (here any ``x`` of 0.1 or less stays silent).
#
# Reset modes: subtract vs zero
# -----------------------------
#
# The two resets differ in what happens to the overshoot :math:`h_t - \theta` at a spike.
# ``"subtract"`` (soft reset) keeps it, so no input charge is lost and, for
# :math:`\beta \to 1`, the firing rate approaches :math:`x / \theta`: the neuron is a good
# rate coder. ``"zero"`` (hard reset) discards it: every spike restarts the neuron from the same
# state, so under a constant input it fires with a period of a whole number of steps. Same
# input, both resets:

x_const = torch.full((T, 1, 1), 0.7)
runs = {
    reset: LIF(beta=beta, reset=reset).run(x_const, return_membrane=True)
    for reset in ("subtract", "zero")
}
for reset, run in runs.items():
    print(f"{reset:>8}: {int(run.spikes.sum())} spikes in {T} steps")

# Rate against constant input (an f-I curve): one call, 241 neurons with different inputs.
currents = torch.linspace(0.0, 1.2, 241)
T_long = 400
rates = {
    reset: LIF(beta=beta, reset=reset)(currents.expand(T_long, 1, -1)).mean(0)[0]
    for reset in ("subtract", "zero")
}

fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, (reset, run) in zip(axes[:2], runs.items(), strict=True):
    ax.plot(run.membrane[:, 0, 0], "o-", ms=3)
    ax.axhline(theta, color="k", lw=0.8, ls=":")
    for t in run.spikes[:, 0, 0].nonzero().flatten().tolist():
        ax.axvline(t, color="tab:red", lw=0.6, alpha=0.4)
    ax.set_title(f'reset="{reset}": {int(run.spikes.sum())} spikes', fontsize=10)
    ax.set_xlabel("time step")
    ax.set_ylabel("v (after reset)")
for reset, rate in rates.items():
    axes[2].plot(currents, rate, label=f'"{reset}"')
axes[2].plot(currents, (currents / theta).clamp(max=1), "k:", lw=0.8, label="x / threshold")
axes[2].set_xlabel("constant input x")
axes[2].set_ylabel("spikes per step")
axes[2].set_title("rate vs input (beta = 0.9)", fontsize=10)
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# Both curves start at the same point (:math:`x = (1 - \beta)\theta = 0.1`). Above it the
# subtractive reset tracks :math:`x / \theta` closely (minus what the leak takes), while the
# reset to zero gives a staircase of rates :math:`1/n` (one spike every ``n`` steps): a coarse
# code for the rate-coded inputs and small ``T`` of this package. The package's models use
# ``"subtract"`` by default; ``"zero"`` is what NIR's LIF node expresses, and what you need to
# export a model to neuromorphic hardware through NIR without changing its spikes.
#
# Surrogate functions and their derivatives
# -----------------------------------------
#
# :math:`H` has zero derivative everywhere except at 0, so backpropagation through spikes
# needs a stand-in. Every surrogate computes the same Heaviside step in the forward pass; in
# the backward pass it replaces :math:`dH/du` (with :math:`u = h - \theta`) by the derivative
# of a smooth function. :class:`spiking_moe.functional.surrogate.Surrogate` names one with its
# sharpness ``alpha``; :data:`spiking_moe.functional.surrogate.SURROGATES` lists the names and
# their default ``alpha``. The ``primitive`` of each (the smooth function whose derivative is
# used) is there for plots like this one.

u = torch.linspace(-1.0, 1.0, 801)
fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(10, 3.5))
ax_p.step(u, (u > 0).float(), where="post", color="k", lw=1.5, label="H(u) (forward)")
for name, (_, default_alpha) in SURROGATES.items():
    surrogate = Surrogate(name)
    label = f"{name} (alpha={default_alpha:g})"
    ax_p.plot(u, surrogate.function.primitive(u, surrogate.alpha), label=label)
    ax_d.plot(u, surrogate.derivative(u), label=label)
ax_p.set_title("smooth primitive", fontsize=10)
ax_d.set_title("surrogate derivative (used in backward)", fontsize=10)
for ax in (ax_p, ax_d):
    ax.set_xlabel("u = h - threshold")
ax_d.set_yscale("log")
ax_d.set_ylim(1e-3, 10)
ax_p.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %%
# The defaults differ in two ways. Width: ``fast_sigmoid`` with ``alpha = 25`` (snnTorch's
# default slope) falls to 1/4 of its peak at :math:`|u| = 0.04`, so only neurons very close to
# threshold get a gradient, while ``atan`` with ``alpha = 2`` is wide (note the log scale).
# Scale: four of them integrate to 1, like the step they replace, but ``fast_sigmoid``
# (SuperSpike) has peak 1 and integrates to :math:`2/\alpha` (its primitive, the flat blue curve,
# rises by only 0.08), so switching surrogates also rescales every gradient, which acts like a
# change of learning rate:

for name in SURROGATES:
    surrogate = Surrogate(name)
    area = surrogate.function.primitive(torch.tensor([-1e4, 1e4]), surrogate.alpha).diff()
    print(f"{name:>12}: area under the derivative = {area.item():.3f}")

# %%
# Whatever the shape, autograd returns exactly ``grad * derivative(u)``:

u_probe = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5], requires_grad=True)
for name in SURROGATES:
    surrogate = Surrogate(name)
    u_probe.grad = None
    spikes = surrogate(u_probe)
    spikes.sum().backward()
    assert torch.allclose(u_probe.grad, surrogate.derivative(u_probe.detach()))
    print(
        f"{name:>12}: spikes {spikes.tolist()}  grad {[round(g, 4) for g in u_probe.grad.tolist()]}"
    )

# %%
# Pick the surrogate per layer with ``LIF(surrogate="atan", alpha=2.0)``, or pass a
# ``Surrogate`` object. Its width matters more than its shape: too narrow and few neurons get
# a gradient, too wide and the gradient stops reflecting whether a spike would actually flip.
#
# A gradient through spikes
# -------------------------
#
# With the surrogate in place, a loss on spikes has a gradient with respect to the input, to
# ``beta`` and ``threshold`` (when learnable) and to everything upstream. The gradient of the
# spike count with respect to each step's input is not local to that step: it flows back
# through the membrane (factor :math:`\beta` per step) and through the reset term
# :math:`-\theta s_t`. ``detach_reset=True`` cuts the second path (Zenke & Vogels 2021).

x_grad = (torch.rand(T, 1, 1) * 0.6).requires_grad_()
lif_learn = LIF(beta=beta, learn_beta=True)
spikes = lif_learn(x_grad)
spikes.sum().backward()
print("spikes:", int(spikes.sum()), "| d(count)/d(beta):", round(lif_learn.beta.grad.item(), 3))
print("d(count)/dx_t, first 10 steps:", [round(g, 3) for g in x_grad.grad[:10, 0, 0].tolist()])

# Without the reset path, and with the plain reference loop instead of the fused C++ kernel:
for options in ({"detach_reset": True}, {"implementation": "reference"}):
    x_other = x_grad.detach().clone().requires_grad_()
    LIF(beta=beta, **options)(x_other).sum().backward()
    difference = (x_grad.grad - x_other.grad).abs().max().item()
    print(f"{options}: max |gradient difference| {difference:.2g}")

# %%
# Detaching the reset changes the gradient itself (it is a different estimator, not an
# approximation of the same one), while the reference loop agrees with the fused kernel to
# float rounding. The multi-step LIF runs all ``T`` steps as one autograd node (the fused
# kernel) and saves only the membrane for the backward pass; ``implementation="reference"`` is
# the plain loop every fast path is tested against.
#
# As a minimal training loop, learn the gain ``w`` of a random input so that the neuron emits
# exactly 15 spikes in 50 steps. The loss is a function of a spike count, an integer, so without
# the surrogate its gradient would be zero:

x_fixed = torch.rand(50, 1, 1)
w = torch.tensor(0.2, requires_grad=True)
optimizer = torch.optim.SGD([w], lr=5e-4)
lif = LIF(beta=beta)
for step in range(30):
    count = lif(w * x_fixed).sum()
    loss = (count - 15.0) ** 2
    optimizer.zero_grad()
    loss.backward()
    print(f"step {step:2d}: w = {w.item():.3f}, spikes = {int(count)}, dL/dw = {w.grad.item():.1f}")
    if loss == 0:
        break
    optimizer.step()

# %%
# Time-major tensors: ``[T, B, ...]``
# -----------------------------------
#
# Every tensor of spikes or currents in the package is time-major: time first, then batch,
# then any neuron dimensions (``[T, B, N]``, ``[T, B, C, H, W]``, ``[T, B, S, D]`` for a
# sequence). A synaptic layer (``nn.Linear``, ``nn.Conv2d`` on folded ``T B``) treats time as
# just more batch, and only the neuron steps through time, so a whole sequence is one call.
# This is the layout Norse and SpikingJelly's multi-step mode use; snnTorch's neurons take one
# step per call, looped over in Python, which is what the fused kernel avoids. A batch-first
# tensor ``[B, T, ...]`` needs ``x.transpose(0, 1)``.
#
# ``LIF`` keeps no state between calls (``forward`` starts from a zero membrane). To process a
# long sequence in chunks, carry the final membrane ``v`` into the next call as ``v0``; the
# result is the same as one call over the whole sequence:

x_seq = torch.rand(60, 4, 3, 8, 8) * 0.5  # [T, B, C, H, W]
lif = LIF(beta=beta)
whole = lif.run(x_seq)
first = lif.run(x_seq[:25])
second = lif.run(x_seq[25:], first.v)
print("shape in / out:", tuple(x_seq.shape), tuple(whole.spikes.shape))
print("chunked == whole:", torch.equal(torch.cat([first.spikes, second.spikes]), whole.spikes))

# The same neuron one step at a time, with the pure function (state passed explicitly):
v = None
steps = []
for x_t in x_seq.unbind(0):
    s_t, v = lif_step(x_t, v, beta=beta, threshold=theta)
    steps.append(s_t)
print("lif_step loop == lif_multistep:", torch.equal(torch.stack(steps), whole.spikes))

# Per-neuron constants: one beta per neuron of the last dimension.
betas = torch.linspace(0.5, 0.95, 8)
per_neuron = lif_multistep(x_seq, beta=betas, threshold=theta).spikes
print("spikes per step, by beta:", [round(r, 3) for r in per_neuron.mean((0, 1, 2, 3)).tolist()])

# %%
# Mapping onto snnTorch and Norse
# -------------------------------
#
# The same neuron, with the mapping the tests check (``tests/test_neurons.py``):
#
# .. list-table::
#    :header-rows: 1
#
#    * - ``spiking_moe.LIF``
#      - snnTorch ``snn.Leaky``
#      - Norse ``LIFBoxCell``
#    * - ``beta``
#      - ``beta``
#      - ``1 - dt * tau_mem_inv``
#    * - input ``x``
#      - ``input_``
#      - ``x / (1 - beta)``
#    * - ``threshold``
#      - ``threshold``
#      - ``v_th`` (with ``v_leak = 0``)
#    * - ``reset="subtract"``
#      - ``reset_mechanism="subtract", reset_delay=False``; equal while
#        ``h < 2 * threshold``
#      - ``reset_method=reset_subtract``
#    * - ``reset="zero"``
#      - ``reset_mechanism="zero", reset_delay=False``; always equal
#      - ``reset_method=reset_value``, ``v_reset = 0``
#    * - ``surrogate="fast_sigmoid", alpha=k``
#      - ``spike_grad=surrogate.fast_sigmoid(slope=k)``
#      - ``method="super"`` (Norse 1.1 ignores ``alpha``: slope 1)
#
# Two things to know. Norse integrates a continuous-time equation with forward Euler,
# :math:`v \leftarrow v + dt\,\tau_{mem}^{-1} (v_{leak} - v + i)`, so
# :math:`\beta = 1 - dt / \tau_{mem}` exactly (not :math:`e^{-dt/\tau_{mem}}`, the usual
# exact-decay convention), and its input is scaled by :math:`dt / \tau_{mem} = 1 - \beta`: to
# give it our current you divide by :math:`1 - \beta` (so ``beta = 1``, a non-leaky IF neuron,
# has no Norse equivalent here). With ``dt = 1 ms``, ``beta = 0.9`` is ``tau_mem = 10 ms``.
# Norse's plain ``LIFCell`` is a different model (a current-based synapse with its own
# ``tau_syn`` in front of the membrane); ``LIFBoxCell`` is the one without it. And snnTorch's
# default ``reset_delay=True`` applies the reset one step late and undecayed, which is not this
# equation: pass ``reset_delay=False``.
#
# We run the three on the same random input (some negative current included), in float64 so
# that Norse's rescaling ``x / (1 - beta)`` and ``dt * tau_mem_inv`` round far below any
# threshold margin (a float32 ``beta`` would itself be 0.85 rounded to float32), and compare
# spikes, membranes and gradients. The input stays below
# ``2 * threshold`` (see the caveat below).

T, B, N = 50, 8, 16
beta = torch.tensor(0.85, dtype=torch.float64)  # a float64 tensor: LIF keeps its dtype
theta, slope = 1.0, 25.0
x = (torch.rand(T, B, N, dtype=torch.float64) * 1.5 - 0.5).requires_grad_()


def run_ours(x, beta, reset, alpha=slope):
    lif = LIF(beta=beta, threshold=theta, reset=reset, surrogate="fast_sigmoid", alpha=alpha)
    out = lif.run(x, return_membrane=True)
    return out.spikes, out.membrane


def run_snntorch(x, beta, reset, reset_delay=False):
    leaky = snntorch.Leaky(
        beta=beta,
        threshold=theta,
        spike_grad=snntorch.surrogate.fast_sigmoid(slope=slope),
        reset_mechanism=reset,
        reset_delay=reset_delay,
    )
    mem = torch.zeros_like(x[0])
    spikes, membrane = [], []
    for x_t in x.unbind(0):  # one step per call, looped over in Python
        s, mem = leaky(x_t, mem)
        spikes.append(s)
        membrane.append(mem)
    return torch.stack(spikes).to(x.dtype), torch.stack(membrane)


def run_norse(x, beta, reset, dt=1e-3):
    zero = torch.zeros((), dtype=x.dtype)
    params = LIFBoxParameters(
        tau_mem_inv=(1 - beta) / dt,
        v_leak=zero,
        v_th=zero + theta,
        v_reset=zero,
        method="super",
        alpha=torch.tensor(1.0),
        reset_method=reset_subtract if reset == "subtract" else reset_value,
    )
    cell = LIFBoxCell(params, dt=dt)
    state = LIFBoxFeedForwardState(v=torch.zeros_like(x[0]))
    spikes, membrane = [], []
    for x_t in x.unbind(0):
        s, state = cell(x_t / (1 - beta), state)  # the input rescaling
        spikes.append(s)
        membrane.append(state.v)
    return torch.stack(spikes), torch.stack(membrane)


def input_grad(spikes):
    return torch.autograd.grad(spikes.sum(), x)[0]  # d(spike count) / dx


for reset in ("subtract", "zero"):
    ours_s, ours_v = run_ours(x, beta, reset)
    for peer, run in (("snnTorch Leaky", run_snntorch), ("Norse LIFBoxCell", run_norse)):
        peer_s, peer_v = run(x, beta, reset)
        print(
            f"{reset:>8} vs {peer:<16}: {int(ours_s.sum())} spikes, "
            f"spikes equal: {torch.equal(ours_s, peer_s)}, "
            f"max |membrane diff|: {(ours_v - peer_v).abs().max().item():.1e}"
        )
    # Gradients: snnTorch at the same slope; Norse only at alpha = 1 (its SuperSpike slope).
    vs_snntorch = input_grad(ours_s) - input_grad(run_snntorch(x, beta, reset)[0])
    ours_alpha1 = run_ours(x, beta, reset, alpha=1.0)[0]
    vs_norse = input_grad(ours_alpha1) - input_grad(run_norse(x, beta, reset)[0])
    print(
        f"{'':>8}    max |gradient diff|: vs snnTorch (alpha = slope = {slope:g}) "
        f"{vs_snntorch.abs().max().item():.1e}, vs Norse (alpha = 1) "
        f"{vs_norse.abs().max().item():.1e}"
    )

# %%
# Spikes are identical and membranes equal to float rounding, for both resets, and with the same
# surrogate the gradients agree too. (snnTorch computes its surrogate in float32, hence the
# 1e-8 differences. Norse's SuperSpike backward uses slope 1 whatever ``alpha`` you give it, so
# its gradients equal ours only for ``alpha=1``.)
#
# ``LIF(backend="snntorch")`` and ``LIF(backend="norse")`` do this translation for you: the same
# layer, computed by the peer library (slower, useful as an oracle):

x_plain = x.detach()
for backend in ("snntorch", "norse"):
    peer = LIF(beta=beta, backend=backend)(x_plain)
    print(
        f"backend={backend!r} equals native:",
        torch.equal(peer, run_ours(x_plain, beta, "subtract")[0]),
    )

# %%
# Where the mappings stop
# ~~~~~~~~~~~~~~~~~~~~~~~
#
# With ``reset_delay=False`` snnTorch decides each spike on
# :math:`h_t - \theta\, H(v_{t-1} - \theta)`, which equals our :math:`h_t` only while the
# carried membrane is below threshold. The soft reset leaves :math:`v_t = h_t - \theta \ge
# \theta` when :math:`h_t \ge 2\theta`, so the subtractive mapping holds exactly while
# :math:`h_t < 2\theta` (the zero reset always matches). One overshoot is enough to see it,
# and snnTorch's default ``reset_delay=True`` differs on ordinary inputs:

half = torch.tensor(0.5, dtype=torch.float64)
overshoot = torch.tensor([2.5, 0.5, 0.5], dtype=torch.float64).view(3, 1, 1)
print("beta 0.5, input [2.5, 0.5, 0.5]")
print("  ours    :", run_ours(overshoot, half, "subtract")[0].flatten().tolist())
print("  snnTorch:", run_snntorch(overshoot, half, "subtract")[0].flatten().tolist())
delayed, _ = run_snntorch(x_plain, beta, "subtract", reset_delay=True)
differ = int((delayed != run_ours(x_plain, beta, "subtract")[0]).sum())
print(f"snnTorch with reset_delay=True: {differ} of {delayed.numel()} spikes differ from ours")

# %%
# After :math:`h_0 = 2.5` our neuron keeps :math:`v_0 = 1.5` and fires again at
# :math:`h_1 = 0.75 + 0.5 = 1.25`; snnTorch tests :math:`1.25 - 1` and stays silent. Keep
# inputs in that range (or use ``reset="zero"``) when you need bit-equal spikes with snnTorch.
# Norse has no such limit. For moving trained models between tools, the package also writes
# and reads NIR graphs (:mod:`spiking_moe.nir`), where the same ``beta`` becomes
# ``tau = dt / (1 - beta)``.
