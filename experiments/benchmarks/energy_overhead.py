"""Benchmark: energy.count_operations vs a plain forward on the same model and batch.

Model: a realistic SNN, three Linear(512, 512) + LIF layers and a Linear(512, 10) readout,
T=16, B=128, rate-coded input (p=0.2). Both sides run under ``torch.no_grad``; the counting
side includes everything ``count_operations`` does (hooks, NaN checks, the one final host
sync). Reports the median over repeats (the machine is shared, so medians, not means) and the
ratio counting / plain (and of the minima, the least noisy estimate on a busy machine).

Usage::

    PYTHONPATH=. python experiments/benchmarks/energy_overhead.py [--device cuda] [--repeats 15]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import energy
from spiking_moe import LIF


def build(width: int, depth: int) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), LIF(beta=0.9, threshold=0.5)]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--time-steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build(args.width, args.depth).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.time_steps, args.batch, args.width, generator=g) < 0.2).float()
    x = x.to(args.device)

    def plain():
        with torch.no_grad():
            model(x)

    def counting():
        energy.count_operations(model, x)

    for fn in (plain, counting):  # warm-up
        timed(fn, args.device)
    plain_s, count_s = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        plain_s.append(timed(plain, args.device))
        count_s.append(timed(counting, args.device))
    p, c = statistics.median(plain_s), statistics.median(count_s)
    pmin, cmin = min(plain_s), min(count_s)
    counts = energy.count_operations(model, x)
    print(
        f"device={args.device} threads={torch.get_num_threads()} "
        f"model={args.depth}x(Linear({args.width},{args.width})+LIF)+Linear({args.width},10) "
        f"T={args.time_steps} B={args.batch} repeats={args.repeats}"
    )
    print(f"plain forward    median {p * 1e3:8.2f} ms  min {pmin * 1e3:8.2f} ms")
    print(f"count_operations median {c * 1e3:8.2f} ms  min {cmin * 1e3:8.2f} ms")
    print(f"overhead ratio   median {c / p:.3f}x  min {cmin / pmin:.3f}x")
    print(
        f"ACs={counts.total('acs'):,} MACs={counts.total('macs'):,} "
        f"firing rate={counts.firing_rate:.3f}"
    )


if __name__ == "__main__":
    main()
