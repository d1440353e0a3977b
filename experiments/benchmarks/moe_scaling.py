"""MoE scaling benchmark: forward+backward time of one SpikingMoE layer vs the number of experts.

Fixed tokens (T steps x B tokens x D features) and fixed k, so the work per token is constant:
a truly sparse layer should cost about the same at E=4 and E=64. The dense-masked path (every
expert on every token) at E=16 shows what sparsity saves. Median of repeats, all in one process.

    PYTHONPATH=. python experiments/benchmarks/moe_scaling.py            # the issue's sizes
    PYTHONPATH=. python experiments/benchmarks/moe_scaling.py --repeats 3 --no-write

Targets (issue 4): time(E=64) / time(E=4) <= 1.3, dense-masked(E=16) / sparse(E=16) >= 5.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from spiking_moe import RateRouter, SpikingExpert, SpikingMoE

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## MoE scaling"


def build(num_experts, args, device, x):
    """The layer, with its router balanced on ``x`` so that every expert gets work.

    A freshly initialised router sends similar-rate tokens to the same few experts (at E=64
    only about a dozen get any), which would flatter the large-E timings. Aux-loss-free bias
    steps (the library's own balancing) bring it to the near-uniform load of a trained router.
    """
    torch.manual_seed(0)
    router = RateRouter(args.features, num_experts, args.k)
    experts = [
        SpikingExpert(args.features, args.expert_hidden, args.features) for _ in range(num_experts)
    ]
    moe = SpikingMoE(router=router, experts=experts, grouped_gemm=args.grouped_gemm).to(device)
    x_TND = x.reshape(x.shape[0], -1, x.shape[-1])
    with torch.no_grad():
        for i in range(args.balance_steps):
            # Geometrically shrinking steps, 0.05 -> 0.0005: coarse moves first, then settle.
            router.bias_update_rate = 0.05 * 0.01 ** (i / max(args.balance_steps - 1, 1))
            router.update_bias(router(x_TND))
    return moe


def load_ratio(moe, x) -> float:
    with torch.no_grad():
        load = moe.router(x).tokens_per_expert.float()
    return float(load.max() / load.mean())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(moe, x, device) -> float:
    moe.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    out = moe(x)
    (out.spikes.sum() + out.aux_loss).backward()
    sync(device)
    return time.perf_counter() - start


def time_round_robin(layers, x, repeats, warmup, device) -> dict[str, float]:
    """Median forward+backward time per layer, the layers interleaved repeat by repeat.

    Interleaving exposes every layer to the same background load on a shared machine, so the
    ratios stay meaningful even when absolute times drift.
    """
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(warmup + repeats):
        for name, moe in layers.items():
            elapsed = fwd_bwd(moe, x, device)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{load}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16, help="T")
    p.add_argument("--batch", type=int, default=512, help="B (tokens)")
    p.add_argument("--features", type=int, default=256, help="D")
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--dense-experts", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.2, help="mean input spike probability")
    p.add_argument("--balance-steps", type=int, default=300, help="router bias steps first")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--grouped-gemm",
        choices=["auto", "never", "always"],
        default="auto",
        help="SpikingMoE expert path (auto: grouped GEMM on CUDA only)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # Each token has its own firing rate per feature, uniform in [0, 2 * rate]: tokens differ,
    # as samples of a data set do, and the mean rate is `rate`.
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(1, args.batch, args.features, generator=g) * 2 * args.rate
    x = torch.bernoulli(rates.expand(args.steps, args.batch, args.features), generator=g).to(device)

    layers = {f"sparse, E={E}": build(E, args, device, x) for E in args.experts}
    if args.dense_experts not in args.experts:
        layers[f"sparse, E={args.dense_experts}"] = build(args.dense_experts, args, device, x)
    dense_name = f"dense-masked, E={args.dense_experts}"
    layers[dense_name] = build(args.dense_experts, args, device, x)
    layers[dense_name].dense = True
    medians = time_round_robin(layers, x, args.repeats, args.warmup, device)
    rows = [(name, medians[name], load_ratio(moe, x)) for name, moe in layers.items()]
    for name, median, ratio in rows:
        print(f"{name:20s} {median * 1e3:9.1f} ms  (max/mean expert load {ratio:.2f})")
    sparse = {E: medians[f"sparse, E={E}"] for E in [*args.experts, args.dense_experts]}
    dense = medians[dense_name]

    lo, hi = min(args.experts), max(args.experts)
    scale = sparse[hi] / sparse[lo]
    speedup = dense / sparse[args.dense_experts]
    print(f"time(E={hi}) / time(E={lo}) = {scale:.2f}  (target <= 1.3)")
    print(f"dense-masked / sparse at E={args.dense_experts} = {speedup:.2f}  (target >= 5)")

    if not args.no_write:
        command = "PYTHONPATH=. python experiments/benchmarks/moe_scaling.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        table = "\n".join(f"| {name} | {t * 1e3:.1f} | {r:.2f} |" for name, t, r in rows)
        section = (
            f"{SECTION}\n\n"
            f"One `SpikingMoE` layer (RateRouter, SpikingExpert D -> {args.expert_hidden} -> D), "
            f"forward + backward, T={args.steps}, B={args.batch}, D={args.features}, "
            f"k={args.k}, grouped_gemm={args.grouped_gemm!r}, input spike rate {args.rate}; median of {args.repeats} repeats after "
            f"{args.warmup} warm-up, layers interleaved repeat by repeat. Routers balanced first with {args.balance_steps} "
            f"aux-loss-free bias steps on the same input (a trained router's load).\n\n"
            f"- Machine: {machine(device)}, device `{device}`\n"
            f"- Date: {datetime.date.today().isoformat()}\n"
            f"- Command: `{command.strip()}`\n\n"
            f"| layer | median ms | max/mean expert load |\n| --- | --- | --- |\n{table}\n\n"
            f"- time(E={hi}) / time(E={lo}) = **{scale:.2f}** (target <= 1.3)\n"
            f"- dense-masked / sparse at E={args.dense_experts} = **{speedup:.2f}** "
            f"(target >= 5)\n"
        )
        write_section(section)
        print(f"wrote {SECTION!r} to {RESULTS}")


def write_section(section: str) -> None:
    """Replace (or append) this benchmark's section, leaving other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
