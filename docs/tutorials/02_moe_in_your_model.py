"""
A spiking MoE layer inside your own PyTorch model
=================================================

:class:`spiking_moe.moe.SpikingMoE` is an ordinary ``torch.nn.Module``: binary spikes
``[T, B, D]`` in, binary spikes ``[T, B, O]`` out, plus what the router decided and the
auxiliary losses that keep it balanced. This tutorial puts one inside a small hand-written
classifier, trains it for a few dozen steps on sklearn's 8x8 digits encoded as spike trains,
and then opens it up: which experts each token goes to and with which gates, what the router
actually reads, how the load spreads over the experts, how the load-balancing and z-losses
enter your loss, what a capacity limit drops, and the fact that each expert computes only on
the rows routed to it.
"""

# %%
# The data: digits as spike trains
# --------------------------------
#
# sklearn ships the 1,797 digits, so nothing is downloaded. Pixel intensities are scaled to
# [0, 1] and rate-coded by :func:`spiking_moe.encoding.rate`: at each of ``T`` steps, pixel
# ``i`` spikes with probability ``x_i``. Like every tensor of spikes in the package the result
# is time-major, ``[T, B, F]``. We draw fresh spikes for every batch (a form of data
# augmentation), from a seeded ``torch.Generator`` so that the tutorial is reproducible.

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from spiking_moe import ModelOutput, RateRouter, SpikingExpert, SpikingMoE, encoding

torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)

digits = load_digits()
images = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
labels = torch.tensor(digits.target)
order = torch.randperm(len(images), generator=generator)
train_idx, test_idx = order[:1400], order[1400:]

T = 8
x_test = encoding.rate(images[test_idx], T, generator=generator)  # [T, B, F] spikes
y_test = labels[test_idx]
print("test spikes:", tuple(x_test.shape), "values:", x_test.unique().tolist())
print(f"mean firing probability per pixel and step: {x_test.mean().item():.3f}")

# %%
# A model with a MoE layer inside
# -------------------------------
#
# The MoE layer is built from parts you choose: a router (here
# :class:`spiking_moe.router.RateRouter`, ``E = 4`` experts, each token to its top ``k = 2``)
# and ``E`` experts (here :class:`spiking_moe.experts.SpikingExpert`, ``Linear -> LIF ->
# Linear``). Each expert returns synaptic *current*, not spikes: the layer adds the chosen
# experts' currents weighted by their gates and fires one output LIF population on the sum,
# so the gates never touch a spike and what leaves the layer is binary again.
#
# Here the MoE layer reads the pixel spikes directly (so that we can look at what its router
# sees), and a linear readout averages its output current over time into logits. Anything can
# go around the layer: it is called like any module, and its output is a
# :class:`spiking_moe.moe.MoEOutput` named tuple ``(spikes, routing, aux_loss, activity)``.
# Returning a :class:`spiking_moe.models.ModelOutput` from ``forward`` is optional; it is what
# the package's ``Trainer`` and its routing and firing-rate callbacks read, so the model can
# be trained by them unchanged. By default the layer checks on every call that its input is
# binary (one reduction and a host sync); pass ``check_spikes=False`` when the input is spikes
# by construction, as the package's own models do.


class DigitsMoENet(nn.Module):
    """Pixel spikes ``[T, B, 64]`` -> spiking MoE -> linear readout -> logits ``[B, 10]``."""

    def __init__(self, num_experts=4, k=2, expert_hidden=64, width=64, num_classes=10):
        super().__init__()
        self.moe = SpikingMoE(
            router=RateRouter(64, num_experts=num_experts, k=k),
            experts=[SpikingExpert(64, expert_hidden, width, beta=0.9) for _ in range(num_experts)],
        )
        self.readout = nn.Linear(width, num_classes)

    def forward(self, x_TBF):
        out = self.moe(x_TBF)  # MoEOutput: spikes [T, B, width], routing, aux_loss, activity
        logits = self.readout(out.spikes).mean(0)  # mean readout current over time
        return ModelOutput(logits, out.aux_loss, (out.routing,), out.activity.prefixed("moe"))


model = DigitsMoENet()
print(model.moe)

# %%
# The routing decision
# --------------------
#
# A forward pass returns the router's decision as a frozen
# :class:`spiking_moe.router.RoutingInfo`. For the 6 digits below (tokens ``N = 6``), each
# token goes to ``k = 2`` experts (``expert_ids``, best first) with gates that sum to 1
# (``renormalize=True``, the default: the softmax probabilities of the chosen experts,
# renormalised over the ``k``). Every per-token field has a leading window dimension ``W``,
# which is 1 here because the router reads the whole sequence at once (``window=L`` routes
# causally per window of ``L`` steps instead).

model.eval()  # no router noise (the router's noise option applies in training only)
with torch.no_grad():
    routing_init = model(x_test).routing[0]  # all test digits, for later
    routing = model(x_test[:, :6]).routing[0]
print("expert_ids [W, N, K]:", tuple(routing.expert_ids.shape))
for n in range(6):
    ids = routing.expert_ids[0, n].tolist()
    gates = [round(g, 3) for g in routing.gates[0, n].tolist()]
    probs = [round(p, 3) for p in routing.probs[0, n].tolist()]
    print(f"token {n} (digit {y_test[n].item()}): experts {ids}, gates {gates}, probs {probs}")
print("tokens per expert:", routing.tokens_per_expert.tolist())

# %%
# At initialisation the probabilities are nearly uniform and the choice is close to arbitrary;
# training shapes it through the gates (the task loss reaches the router only through the
# gates, since the top-k selection itself has no gradient) and through the balancing loss.
# With ``k = 1`` and ``renormalize=True`` the only gate is always 1, so the task loss cannot
# train the router at all: use ``renormalize=False`` (Switch-style ``gate = p``) there.
#
# What the router sees
# --------------------
#
# :class:`spiking_moe.router.RateRouter` scores a token from its input *rates*: the mean over
# the ``T`` steps of its spikes, :math:`r = \frac{1}{T} \sum_t s_t`, then
# :math:`z = W r + b` and :math:`p = \mathrm{softmax}(z)`; the experts are the top-k of
# ``z + router.expert_bias`` (the balancing bias below, zero so far). We can recompute the
# decision by hand from the router's own ``proj`` layer:

x_few = x_test[:, :6]
rates = x_few.mean(0)  # [N, D]: what the router reads
with torch.no_grad():
    logits = model.moe.router.proj(rates)
    chosen = (logits + model.moe.router.expert_bias).topk(2).indices
print("softmax(W r + b) == routing.probs:", torch.allclose(logits.softmax(-1), routing.probs[0]))
print("top-k of z + bias == expert_ids:", torch.equal(chosen, routing.expert_ids[0]))

# %%
# Here ``r`` is a noisy estimate of the pixel intensities: with ``T = 8`` Bernoulli draws a
# pixel of intensity 0.5 reads as 0.5 only on average. The routing therefore depends on the
# particular spikes drawn, not only on the image. Below: three test digits, their
# intensities, and the rates the router read for one draw of spikes.

fig, axes = plt.subplots(2, 3, figsize=(6, 4.2))
for n in range(3):
    axes[0, n].imshow(images[test_idx[n]].view(8, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[0, n].set_title(f"intensity (digit {y_test[n].item()})", fontsize=9)
    axes[1, n].imshow(rates[n].view(8, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[1, n].set_title(f"router input r, T = {T}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()

# %%
# Training with the auxiliary losses
# ----------------------------------
#
# The routing losses come back in ``out.aux_loss``, already weighted; add it to your task loss.
# It is ``balance_weight * load_balancing_loss + z_loss_weight * z_loss`` (router options,
# defaults ``1e-2`` and ``1e-3``):
#
# * the Switch load-balancing loss :math:`E \sum_e f_e P_e`, with :math:`f_e` the share of
#   the ``N k`` assignments that went to expert ``e`` and :math:`P_e` its mean router
#   probability. It is 1 for perfectly uniform routing and grows as routing concentrates; the
#   gradient flows through :math:`P` (``f`` counts are not differentiable).
# * the router z-loss (ST-MoE) :math:`\mathrm{mean}_n (\log \sum_e e^{z_{ne}})^2`, which keeps
#   the logits small so that the softmax does not saturate.
#
# The router also keeps a balancing bias for the auxiliary-loss-free method (DeepSeek-V3):
# after ``optimizer.step()``, ``router.update_bias(routing)`` raises the selection bias of
# every expert that got fewer assignments than the mean and lowers it for the others, by
# ``bias_update_rate`` (default ``1e-3``). The bias only steers selection, never the gates, so
# it balances the load without a gradient that competes with the task loss. It is optional;
# with several MoE layers, :func:`spiking_moe.moe.update_router_biases` does every layer at
# once. We use both methods here.

router = model.moe.router
model.train()
optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
history = {"loss": [], "lb": [], "z": []}
steps, batch_size = 40, 64
for step in range(steps):
    batch = train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)]
    x = encoding.rate(images[batch], T, generator=generator)
    out = model(x)
    task_loss = F.cross_entropy(out.logits, labels[batch])
    loss = task_loss + out.aux_loss  # the routing losses, already weighted
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    routing = out.routing[0]
    router.update_bias(routing)  # aux-loss-free balancing, after the step
    history["loss"].append(task_loss.item())
    history["lb"].append(routing.load_balancing_loss.item())
    history["z"].append(routing.z_loss.item())
    if step % 10 == 0 or step == steps - 1:
        print(
            f"step {step:2d}: cross-entropy {task_loss.item():.3f}, "
            f"load balancing {routing.load_balancing_loss.item():.3f}, "
            f"z-loss {routing.z_loss.item():.3f}, aux_loss {out.aux_loss.item():.4f}, "
            f"tokens per expert {routing.tokens_per_expert.tolist()}"
        )

expected = (
    router.balance_weight * routing.load_balancing_loss + router.z_loss_weight * routing.z_loss
)
print(
    "aux_loss == balance_weight * lb + z_loss_weight * z:", torch.allclose(out.aux_loss, expected)
)
print("selection bias after training:", [round(b, 4) for b in router.expert_bias.tolist()])

fig, (ax_ce, ax_aux) = plt.subplots(1, 2, figsize=(9, 3))
ax_ce.plot(history["loss"])
ax_ce.set_title("cross-entropy", fontsize=10)
ax_aux.plot(history["lb"], label="load balancing (1 = uniform)")
ax_aux.plot(history["z"], label="z-loss")
ax_aux.set_title("router losses (unweighted)", fontsize=10)
ax_aux.legend(fontsize=8)
for ax in (ax_ce, ax_aux):
    ax.set_xlabel("training step")
fig.tight_layout()
plt.show()

# %%
# Expert load
# -----------
#
# ``routing.tokens_per_expert`` counts the rows each expert computed on in the call. Below, on
# the held-out digits: the load at initialisation and after training, and, after training,
# which experts each digit class uses. Nearly uniform probabilities at initialisation do not
# mean a balanced load: similar inputs give similar logits, so the top-k picks the same experts
# for most tokens. Here training spread the load and made the experts specialise (a class
# concentrates on a few experts; 0.5 in the right panel means every digit of the class uses
# that expert as one of its two). The default balancing weights are gentle, and in this run the
# load-balancing loss drifted back up as the experts specialised: raise ``balance_weight`` or
# ``bias_update_rate`` (router options) if you need a flatter load.
#
# Under ``torch.no_grad()`` the experts' synapses (:class:`spiking_moe.synapses.EventLinear`)
# take the event-driven kernel for sparse enough inputs, which the first such call on a machine
# builds (once, cached).

model.eval()
with torch.no_grad():
    out_test = model(x_test)
routing_test = out_test.routing[0]
accuracy = (out_test.logits.argmax(1) == y_test).float().mean().item()
print(f"test accuracy after {steps} steps: {accuracy:.1%}")
print("tokens per expert, before training:", routing_init.tokens_per_expert.tolist())
print("tokens per expert, after training: ", routing_test.tokens_per_expert.tolist())

E = model.moe.num_experts
class_by_expert = torch.zeros(10, E)  # assignments of each digit class to each expert
class_by_expert.index_put_(
    (y_test.repeat_interleave(routing_test.k), routing_test.expert_ids[0].flatten()),
    torch.ones(routing_test.expert_ids[0].numel()),
    accumulate=True,
)

fig, (ax_load, ax_cls) = plt.subplots(1, 2, figsize=(9.5, 3.4))
width = 0.38
ax_load.bar(torch.arange(E) - width / 2, routing_init.tokens_per_expert, width, label="init")
ax_load.bar(torch.arange(E) + width / 2, routing_test.tokens_per_expert, width, label="trained")
uniform = len(test_idx) * routing_test.k / E
ax_load.axhline(uniform, color="k", ls=":", lw=0.8, label="uniform")
ax_load.set_xticks(range(E))
ax_load.set_xlabel("expert")
ax_load.set_ylabel("tokens routed (k = 2 per digit)")
ax_load.set_title("expert load, test digits", fontsize=10)
ax_load.legend(fontsize=8)
share = class_by_expert / class_by_expert.sum(1, keepdim=True)
im = ax_cls.imshow(share.T, cmap="viridis", vmin=0, vmax=0.5, aspect="auto")
ax_cls.set_xticks(range(10))
ax_cls.set_yticks(range(E))
ax_cls.set_xlabel("digit class")
ax_cls.set_ylabel("expert")
ax_cls.set_title("share of each class's assignments", fontsize=10)
fig.colorbar(im, ax=ax_cls)
fig.tight_layout()
plt.show()

# %%
# Because the router reads sampled rates, the same image can be routed differently from one
# draw of spikes to the next. A quick check on the trained router alone: route the test
# digits under 10 fresh spike draws and count how often the best expert differs from the
# most frequent one.

with torch.no_grad():
    top1 = torch.stack(
        [
            router(encoding.rate(images[test_idx], T, generator=generator)).expert_ids[0, :, 0]
            for _ in range(10)
        ]
    )  # [10 draws, N]
usual = top1.mode(0).values  # each token's most frequent top-1 expert
changed = (top1 != usual).float().mean().item()
print(f"top-1 expert differs from the token's usual one in {changed:.1%} of draws")

# %%
# Capacity limits and drops
# -------------------------
#
# A MoE layer on hardware, or sharded over devices, has a fixed number of slots per expert. With
# ``capacity_factor = c`` each expert takes at most :math:`C = \lceil c N k / E \rceil`
# assignments per call (per window); among the assignments to one expert those with the largest
# gate are kept (ties: earlier tokens first). A dropped assignment gets gate 0 and is not
# computed, the token's other gate is *not* renormalised, and a token that loses every
# assignment receives zero current from the layer. The router's options are attributes, so we
# can change the trained layer's capacity in place:

for factor in (2.0, 1.0, 0.75, 0.5):
    router.capacity_factor = factor
    with torch.no_grad():
        capped = model(x_test)
    info = capped.routing[0]
    accuracy = (capped.logits.argmax(1) == y_test).float().mean().item()
    lost = (~info.kept[0]).all(-1).sum().item()
    print(
        f"capacity_factor {factor}: C = {info.capacity}, tokens per expert "
        f"{info.tokens_per_expert.tolist()}, dropped {int(info.dropped)} of "
        f"{info.expert_ids.numel()} assignments, {lost} tokens lost both, accuracy {accuracy:.1%}"
    )
print("kept [W, N, K], first 5 tokens:", info.kept[0, :5].tolist())
print(
    "gates of the first 5 tokens:", [[round(g, 3) for g in gs] for gs in info.gates[0, :5].tolist()]
)
router.capacity_factor = None  # back to unlimited

# %%
# With ``c >= 1`` only imbalance causes drops (a perfectly balanced layer fits exactly at
# ``c = 1``); ``c < 1`` always drops. The losses are computed on the router's selection before
# drops, so they still see the demand for the overloaded experts. For sequence inputs
# ``[T, B, S, D]`` the layer serves capacity first come, first served in position order
# instead, so that a later position can never evict an earlier one (causality).
#
# Each expert computes only on its own rows
# -----------------------------------------
#
# Routing is sparse in compute, not only in the gates: the layer sorts the assignments by
# expert, gathers each expert's rows into one contiguous slice and calls the expert on that
# slice alone (an expert with no rows is not called); the gated currents are scattered back
# afterwards. A forward hook on each expert shows the rows it received, which equal
# ``tokens_per_expert``. ``model.moe.dense = True`` switches the same layer to the dense
# baseline (every expert on every token, masked by the same gates): the same spikes (up to the
# float summation order, which could flip a membrane sitting exactly at threshold) at ``E / k``
# times the expert work, which is the comparison energy reports make.

rows_seen = {}


def record_rows(expert_id):
    def hook(module, args, output):
        rows_seen[expert_id] = args[0].shape[1]  # input [T, rows, D]

    return hook


handles = [
    expert.register_forward_hook(record_rows(e)) for e, expert in enumerate(model.moe.experts)
]
x_batch = x_test[:, :64]
with torch.no_grad():
    sparse = model.moe(x_batch)
    print("tokens per expert:       ", sparse.routing.tokens_per_expert.tolist())
    print("rows each expert computed:", [rows_seen.get(e, 0) for e in range(E)])
    model.moe.dense = True
    rows_seen.clear()
    dense = model.moe(x_batch)
    print("dense baseline, rows:     ", [rows_seen.get(e, 0) for e in range(E)])
    model.moe.dense = False
for handle in handles:
    handle.remove()
differ = int((sparse.spikes != dense.spikes).sum())
print(f"output spikes that differ, sparse vs dense: {differ} of {sparse.spikes.numel()}")
print(
    "firing rates:",
    {
        name: round(rate, 3)
        for name, rate in zip(sparse.activity.names, sparse.activity.rates().tolist(), strict=True)
    },
)

# %%
# The activity above is what the layer reports for free: the spikes of every neuron
# population (``experts.<e>.net.1`` are the experts' hidden LIF layers, ``neuron`` the output
# LIF), which you can add to the loss as an activity penalty or feed to an energy estimate.
# From here, :class:`spiking_moe.models.SpikingMoEClassifier` is the package's ready-made
# classifier built around the same layer, and the ``energy`` package prices what the sparse
# dispatch saves (``energy.estimate(model, x, dense_model=...)`` against the dense baseline).
