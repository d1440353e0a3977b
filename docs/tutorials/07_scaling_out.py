"""
Scaling out: DDP and expert parallelism with torchrun
=====================================================

``experiments/train.py`` (``spiking-moe-train``) trains data-parallel under ``torchrun``, and
with ``--set train.expert_parallel=P`` it also splits every MoE layer's experts over groups of
``P`` processes, which exchange tokens with all-to-alls (:mod:`spiking_moe.parallel`). This
tutorial explains both as implemented, launches a two-process expert-parallel run on the CPU
(gloo) from Python, checks it against one process on the same batches, and counts what one
MoE layer exchanges and which gradients are reduced where. Everything runs on two CPU cores;
on GPUs the same command uses NCCL.
"""

# %%
# Data parallelism and expert parallelism, as implemented
# -------------------------------------------------------
#
# **Data parallelism** (DDP). Every process holds the whole model. The
# :class:`spiking_moe.data.loader.BatchLoader` of each rank computes the same shuffled order
# and takes every ``world``-th sample from position ``rank``, so ``train.batch_size`` is per
# process and the global batch is ``world x batch_size``. DDP all-reduces (averages) the
# gradients, so every rank takes the same optimizer step; the auxiliary-loss-free router bias
# is updated from the loads of the global batch on every rank; evaluation metrics and energy
# counts are sums over ranks. Only rank 0 writes the run folder (under expert parallelism
# each expert block's first replica also writes its checkpoint shard).
#
# **Expert parallelism** (GShard, DeepSpeed-MoE, torchtitan's layout). The ``world`` processes
# form a ``(world / P) x P`` device mesh, dimensions ``"replicate"`` and ``"expert"``. The
# ``P`` consecutive ranks of a row split each MoE layer's ``E`` experts (rank ``i`` of the row
# holds experts ``[i E/P, (i+1) E/P)``, under their global names); the ``world / P`` ranks of a
# column are replicas of the same experts. Dense parameters (embeddings, attention, routers,
# shared experts, readout) stay on every process under DDP. Per MoE layer and forward pass,
# each process, with its own tokens (:class:`spiking_moe.strategies.ExpertParallelExperts`):
#
# 1. routes globally (any token may pick any of the ``E`` experts) and groups its rows by
#    expert, hence by owner;
# 2. exchanges per-expert row counts (one ``all_to_all_single`` of ``E`` integers: the
#    receivers need them as split sizes);
# 3. sends each token's rows (all ``T`` steps together) to the owners with the autograd-aware
#    ``all_to_all_single``; binary spikes travel as bits, 8 per byte, anything else (the
#    language model's multi-level counts) as floats;
# 4. runs its local experts on the rows each source sent;
# 5. sends the currents back with the reverse all-to-all and combines them with the gates as
#    one process would.
#
# The backward pass runs through both exchanges, so an expert's owner ends up with the sum of
# every source's gradient. DDP ignores the expert parameters
# (:func:`spiking_moe.parallel.expert_parameter_names`), and
# :func:`spiking_moe.parallel.reduce_expert_gradients` divides by ``world`` and sums over the
# replicas, which is the data-parallel mean. Gradient clipping uses the global norm
# (:func:`spiking_moe.parallel.clip_grad_norm_`). The result: losses, gradients and parameters
# equal plain DDP on the same processes, which equals one process averaging the shards' losses
# (up to float rounding, next section).
#
# How the tests launch processes: ``tests/torchrun.py`` runs ``python -m
# torch.distributed.run`` with ``OMP_NUM_THREADS=1``, no GPU, a free port on 127.0.0.1, output
# to a file (a worker stuck in a collective would hold a pipe open) and a timeout. We do the
# same.

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import spiking_moe

# The repository: beside the package in a checkout (sphinx-gallery defines no __file__).
ROOT = Path(spiking_moe.__file__).resolve().parents[1]
workdir = Path(tempfile.mkdtemp())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, log: Path) -> float:
    """Run ``python -m torch.distributed.run`` on this machine; return its wall time."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # two processes on two cores: one thread each
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    start = time.perf_counter()
    with open(log, "w") as output:
        proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=output, stderr=output)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers on SIGTERM
            proc.wait(timeout=60)
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


# %%
# A two-process expert-parallel run
# ---------------------------------
#
# The model is the spiking MoE language model of ``experiments/configs/lm_moe.toml``, shrunk
# to train in seconds: ``d_model`` 32, context 32, 4 routed experts of 32 neurons plus a shared
# one, 40 steps of 8 windows per process. ``train.expert_parallel=2`` with two processes gives
# one row of the mesh: rank 0 holds experts 0 and 1 of each of the two MoE layers, rank 1
# experts 2 and 3, and there are no replicas.
#
# One override is there for the comparison that follows, not for expert parallelism:
# ``model.router.balance_weight=0``. The Switch balancing loss is ``E sum_e f_e P_e``, a
# product of two means over the batch (the fraction of rows sent to expert ``e`` and its mean
# router probability). Each process computes it on its own tokens (GShard's groups), and the
# mean of two shards' products is not the product over the whole batch; so with it on, the
# two-process run still equals plain DDP (tested), but not one process on the global batch.
# Every other term (cross-entropy, z-loss) is a mean over tokens and shards exactly.

CONFIG = ROOT / "experiments" / "configs" / "lm_moe.toml"
small = [
    "data.context=32",
    "data.eval_windows=64",
    "model.hidden_features=32",
    "model.attention.num_heads=2",
    "model.moe.num_experts=4",
    "model.expert.hidden=32",
    "model.moe.shared_hidden=32",
    "model.router.balance_weight=0.0",
    "train.max_steps=40",
    "train.warmup_steps=5",
    "train.log_every=1",
    "train.eval_batch_size=32",
    "train.device='cpu'",
    "train.progress=false",
]
ep_run = workdir / "ep"
ep_log = workdir / "ep.log"
sets = [f"--set={o}" for o in [*small, "train.batch_size=8", "train.expert_parallel=2"]]
seconds = torchrun(
    2,
    str(ROOT / "experiments" / "train.py"),
    f"--config={CONFIG}",
    f"--out={ep_run}",
    *sets,
    log=ep_log,
)
print(f"torchrun, 2 processes: {seconds:.1f} s (start-up, data, 40 steps, evaluation)")
# Rank 0's log (the other ranks log warnings only), timestamps removed:
for line in ep_log.read_text().splitlines():
    if re.search(r"INFO spiking_moe\.(parallel|experiment|training\.(trainer|checkpoint))", line):
        print(line.split(" INFO ", 1)[1])
print("\nrun folder:", sorted(p.name for p in ep_run.iterdir()))

# %%
# No process holds the whole model, so the checkpoint is an index (``checkpoint.pt``: step,
# every rank's RNG state, the layout) plus one shard per expert block
# (``checkpoint.expert<i>of<P>.step<s>.pt``: the dense parameters and that block's experts,
# under global names, with their optimizer state). ``--resume`` continues it exactly with the
# same layout; evaluation, energy reports, export and generation need the whole model, which
# ``spiking-moe-gather`` (:func:`spiking_moe.evaluation.gather_checkpoint`) rebuilds.

from spiking_moe.evaluation import gather_checkpoint, load_language_model

gathered = gather_checkpoint(ep_run / "checkpoint.pt", workdir / "gathered")
ep_model, _ = load_language_model(gathered, device="cpu")
experts = sorted(
    {m.group(0) for n in ep_model.state_dict() if (m := re.match(r".*\.experts\.\d+", n))}
)
print(f"gathered {gathered.name}: {len(experts)} experts:", ", ".join(experts))

# %%
# The same batches in one process
# -------------------------------
#
# One process with ``train.batch_size=16`` sees, at every step, exactly the union of the two
# ranks' batches of 8 (the loader's shards interleave one shuffled order). We train it here, in
# this process, with :func:`spiking_moe.experiment.run_experiment` (what ``spiking-moe-train``
# runs) and compare the logged training loss step by step (under torchrun it is the mean over
# both ranks).

from spiking_moe.config import apply_overrides, load_config
from spiking_moe.experiment import run_experiment

threads = torch.get_num_threads()
torch.set_num_threads(1)  # as each child process had; restored at the end
single_run = workdir / "single"
single = run_experiment(
    apply_overrides(load_config(CONFIG), [*small, "train.batch_size=16"]), single_run
)


def losses(folder: Path) -> dict[int, float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


ep_loss, single_loss = losses(ep_run), losses(single_run)
steps = sorted(ep_loss)
gap = {s: abs(ep_loss[s] - single_loss[s]) for s in steps}
apart = [s for s in steps if gap[s] > 1e-4]
same = [s for s in steps if not apart or s < apart[0]]
print(f"steps 1-{same[-1]}: largest |2 processes - 1 process| = {max(gap[s] for s in same):.1e}")
if apart:
    print(f"from step {apart[0]} on: up to {max(gap[s] for s in apart):.1e}")

# %%
# Up to the step printed, the losses agree to float32 rounding (a unit or two in the last
# place): the runs add the same numbers in different orders (DDP's all-reduce, the
# all-to-all's blocks), nothing else differs. But a spiking network and a top-1 router make
# discrete decisions: once a rounding difference lands on a threshold (a multi-level count
# between two levels, two experts' router scores tied) one token takes another path, and from
# then on the two runs are two nearby trajectories, 1e-4 to 1e-2 apart, which do not
# converge back. That is float arithmetic, not an error in the exchange; the project's tests check the
# exchange in float64, where this does not happen within their steps (``tests/test_parallel.py``,
# ``tests/training/test_expert_parallel.py``: outputs, gradients and parameters of 2 and 4
# processes against one). The exact check that float32 allows is to evaluate the *same*
# weights both ways, which the energy section below does.

import matplotlib.pyplot as plt

fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
top.plot(steps, [single_loss[s] for s in steps], lw=3, alpha=0.4, label="1 process, batch 16")
top.plot(steps, [ep_loss[s] for s in steps], "k--", label="2 processes x 8, experts split")
top.set_ylabel("training loss (nats)")
top.legend()
bottom.semilogy(steps, [max(gap[s], 1e-9) for s in steps], "o", ms=3)
bottom.set_ylabel("|difference| (0 drawn at 1e-9)")
bottom.set_xlabel("optimizer step")
fig.tight_layout()
plt.show()

# %%
# What one MoE layer exchanges
# ----------------------------
#
# Step 2 of the forward pass tells each owner how many rows to expect; those per-expert row
# counts are the routing's ``tokens_per_expert``. We recompute them for the first training
# batch of each rank (the same :class:`spiking_moe.data.loader.BatchLoader` shards the run
# used) with the trained model, and turn them into bytes with the exchange model of
# :mod:`spiking_moe.parallel`. With ``T`` steps per token, width ``D`` in and ``O`` out, a
# process that sends ``R`` rows and receives ``R_in`` moves, per layer and training step,
# ``4 T D R`` bytes of rows out and ``4 T O R_in`` of currents back in the forward pass, and
# the gradients of both the other way in the backward pass (``4 T O R`` and ``4 T D R_in``):
# ``4 T (D + O) (R + R_in)`` bytes in float32. Rows for its
# own experts are copied locally by the collective, so only the off-diagonal entries cross
# the network. Here the rows are multi-level spike counts (0 to 4), so they travel as floats;
# binary LIF spikes would take ``T D / 8`` bytes per row instead of ``4 T D``.

from spiking_moe.data import BatchLoader, build_datasets

config = single.config
data = build_datasets(config.data)
E, P = config.model.moe.num_experts, 2
T, D = config.data.num_steps, config.model.hidden_features
routed = {}  # (layer, source rank) -> rows per expert
with torch.no_grad():
    for rank in range(P):
        loader = BatchLoader(
            data.train, 8, shuffle=True, seed=config.train.seed, rank=rank, world_size=P
        )
        x, _ = next(iter(loader))
        for layer, routing in enumerate(ep_model(x).routing):
            routed[layer, rank] = routing.tokens_per_expert.tolist()

O = D  # the FFN maps d_model to d_model
owner = [e // (E // P) for e in range(E)]  # expert -> the rank that holds it
for layer in range(config.model.num_layers):
    print(f"MoE layer {layer} (rows per expert, rank 0's batch / rank 1's:", end=" ")
    print(" / ".join(str(routed[layer, r]) for r in range(P)) + ")")
    for rank in range(P):
        to = [sum(n for e, n in enumerate(routed[layer, rank]) if owner[e] == o) for o in range(P)]
        sent = sum(to)
        got = [
            sum(n for e, n in enumerate(routed[layer, src]) if owner[e] == rank) for src in range(P)
        ]
        received = sum(got)
        total = 4 * T * (D + O) * (sent + received)
        across = 4 * T * (D + O) * (sent - to[rank] + received - got[rank])
        print(
            f"  rank {rank}: sends {to} rows to ranks 0, 1 (R = {sent}), receives R_in = "
            f"{received}: {total / 1024:.0f} KiB per step, {across / 1024:.0f} KiB to the other rank"
        )

# %%
# Each of a rank's 8 x 32 = 256 tokens has ``k = 1`` routed expert, so every rank sends
# ``R = N k = 256`` rows per layer whatever ``E`` is, but what an owner receives depends on the
# routing. With the balancing loss off in this run, a lopsided layer makes one owner compute
# (and receive) several times what the other does, and the step waits for the busiest: what
# the balancing loss and the router bias (``model.router.bias_update_rate``) are for. The
# volume grows with tokens, ``k``, ``T`` and width, not with the number of experts, and
# against the experts' compute it is ``4 (1 - 1/P) / (3 H)`` bytes per FLOP for expert width
# ``H``, so narrow experts (like these) are the case where the exchange dominates.
# ``experiments/benchmarks/expert_parallel.py`` measures the bytes of every collective to the
# byte and the step time (on the results page's 2-core VM, 2 processes gave 1.39x the tokens per
# second of one at ``H = 512``, the exchange 9% of the step).
#
# Gradients: who reduces what
# ---------------------------
#
# Dense parameters are all-reduced by DDP at every step; each expert's gradient is already
# complete on its owner after the backward all-to-all. With two processes and ``P = 2`` there
# are no replicas, so :func:`spiking_moe.parallel.reduce_expert_gradients` only divides by the
# world size; with 4 processes and ``P = 2`` (two replicas of each half) it also all-reduces
# each expert block's gradients between its two replicas.

expert_params = sum(
    t.numel() for n, t in ep_model.named_parameters() if re.search(r"\.experts\.\d+\.", n)
)
dense_params = sum(t.numel() for t in ep_model.parameters()) - expert_params
print(
    f"dense parameters (DDP all-reduce, every process): {dense_params:,} "
    f"= {4 * dense_params / 1024:.0f} KiB of float32 gradients per step"
)
print(
    f"routed-expert parameters: {expert_params:,}, {expert_params // P:,} per process "
    "(no all-reduce without replicas)"
)

# %%
# Energy under expert parallelism
# -------------------------------
#
# Each process counts the operations of its own tokens: the dense modules on every process,
# each expert on its owner only, for the rows every process sent it, under its global name
# (:func:`spiking_moe.training.model_energy.expert_parallel_counts`). The run's energy report
# (:class:`spiking_moe.training.callbacks.EnergyReportCallback`) gathers and merges them at the
# end of each evaluation (:func:`spiking_moe.training.model_energy.count_operations_parallel`
# does the same for one pass), so it equals the report of one process counting the same model
# on the whole test set; only the per-layer ``calls`` column differs (one call per process,
# and per source for an expert). We check that, and the test bits per byte, on the gathered
# checkpoint: :func:`spiking_moe.evaluation.evaluate_checkpoint` (``spiking-moe-energy-report``)
# evaluates it here, in one process.

import energy
from spiking_moe.evaluation import evaluate_checkpoint

one = evaluate_checkpoint(gathered, "cmos45")
ep_metrics = json.loads((ep_run / "result.json").read_text())["metrics"]
ep_report = energy.EnergyReport.from_json((ep_run / "report.json").read_text())
for key in ("test/bpb", "test/energy/uJ_per_token"):
    print(f"{key:<25} 2 processes {ep_metrics[key]:.7f}   1 process {one.metrics[key]:.7f}")
print("per expert, test set: tokens and energy, 2 processes / 1 process")
for a, b in zip(ep_report.experts, one.report.experts, strict=True):
    print(
        f"  {a.label:<30} {a.tokens:>5} / {b.tokens:>5}   "
        f"{a.energy_pj / 1e6:.4f} / {b.energy_pj / 1e6:.4f} uJ"
    )

# %%
# Going further
# -------------
#
# - More processes on one host: ``torchrun --nproc_per_node=4 experiments/train.py --config
#   experiments/configs/lm_moe.toml --set train.expert_parallel=4``. ``P`` must divide the
#   number of processes and ``model.moe.num_experts``; with more processes than ``P`` the
#   groups are replicas (data parallelism on top).
# - Several hosts: add ``--nnodes``, ``--node_rank``, ``--master_addr`` and a run folder on a
#   file system every host sees; on GPUs the backend is NCCL (not measured by the project: no
#   multi-GPU machine).
# - With a capacity limit the drops are decided per process, on its own tokens, so a run then
#   equals one process only shard by shard.
# - In your own training loop: :func:`spiking_moe.parallel.init_expert_parallel`, then
#   :func:`spiking_moe.parallel.shard_experts`, DDP with
#   :func:`spiking_moe.parallel.expert_parameter_names` ignored, and
#   :func:`spiking_moe.parallel.reduce_expert_gradients` after each backward;
#   :doc:`/guide/expert_parallelism` has the details, checkpoints and measurements.

torch.set_num_threads(threads)
shutil.rmtree(workdir)  # the run folders, checkpoints and logs
