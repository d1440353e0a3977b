"""LIF speed, side by side in one process: ours (fused and reference loop) vs snnTorch, Norse and
SpikingJelly, forward and forward+backward, at the sizes of issue 7.

Every implementation runs the same neuron: ``h = beta * v + x``, spike when ``h`` crosses
threshold 1, subtractive reset, beta = 0.9, fast-sigmoid-like surrogate; input ``x`` is
``[T, B, N]`` float32. Mappings: snnTorch ``Leaky(beta, reset_delay=False)`` called per step;
Norse ``LIFBoxCell`` per step with the input scaled by ``1 / (1 - beta)`` (see
``spiking_moe/neurons.py``); SpikingJelly 2.0 ``LIFNode(tau=1/(1-beta), decay_input=False,
v_reset=None, step_mode="m")`` (its own multi-step op; fires on ``h >= threshold``).

Reported per size and implementation: median (and best) wall time, and median CPU time of the
process (less sensitive to other load on a shared machine), of forward (no autograd) and of
forward+backward (gradient of a fixed random weighting of the spikes); achieved GB/s under
the bandwidth model of 12 bytes per element per step forward (read x, write s and h) and 24
forward+backward (+ read grad_s and h, write grad_x); memory saved for backward (bytes of the
distinct tensors autograd keeps, via ``saved_tensors_hooks``; CUDA: also peak allocated); the
machine's copy bandwidth (median ``Tensor.copy_`` of 256 MiB, bytes read + written / time).

Usage::

    PYTHONPATH=. python experiments/benchmarks/lif_speed.py [--json out.json] [--repeats 15]

Shapes: ``T`` time steps, ``B`` batch, ``N`` neurons.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from spiking_moe.functional.lif import lif_multistep

SIZES = [(16, 64, 512), (64, 64, 1024), (128, 32, 2048)]
BETA = 0.9
FWD_BYTES, FWDBWD_BYTES = 12, 24


# ---- implementations: each builds `run(x_TBN) -> spikes_TBN` for one size -------------------


def make_ours(implementation: str):
    def build(device):
        return lambda x: lif_multistep(x, beta=BETA, implementation=implementation).spikes

    return build


def make_ours_compiled(device):
    fn = torch.compile(
        lambda x: lif_multistep(x, beta=BETA, implementation="reference").spikes, dynamic=False
    )
    return fn


def make_snntorch(device):
    import snntorch
    from snntorch import surrogate

    leaky = snntorch.Leaky(
        beta=BETA, spike_grad=surrogate.fast_sigmoid(slope=25), reset_delay=False
    ).to(device)

    def run(x):
        v = torch.zeros_like(x[0])
        spikes = []
        for x_t in x.unbind(0):
            s, v = leaky(x_t, v)
            spikes.append(s)
        return torch.stack(spikes)

    return run


def make_norse(device):
    from norse.torch import LIFBoxCell, LIFBoxParameters
    from norse.torch.functional.lif_box import LIFBoxFeedForwardState
    from norse.torch.functional.reset import reset_subtract

    dt = 1e-3
    params = LIFBoxParameters(
        tau_mem_inv=torch.tensor((1.0 - BETA) / dt, device=device),
        v_leak=torch.tensor(0.0, device=device),
        v_th=torch.tensor(1.0, device=device),
        v_reset=torch.tensor(0.0, device=device),
        method="super",
        alpha=torch.tensor(25.0, device=device),
        reset_method=reset_subtract,
    )
    cell = LIFBoxCell(params, dt=dt)
    scale = 1.0 / (1.0 - BETA)

    def run(x):
        state = LIFBoxFeedForwardState(v=torch.zeros_like(x[0]))
        spikes = []
        for x_t in x.unbind(0):
            s, state = cell(x_t * scale, state)
            spikes.append(s)
        return torch.stack(spikes)

    return run


def make_spikingjelly(device):
    from spikingjelly.activation_based import neuron

    node = neuron.LIFNode(
        tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=1.0, v_reset=None, step_mode="m"
    ).to(device)

    def run(x):
        node.reset()
        return node(x)

    return run


IMPLEMENTATIONS: dict[str, Callable] = {
    "ours (fused, auto)": make_ours("auto"),
    "ours (reference loop)": make_ours("reference"),
    "snnTorch Leaky loop": make_snntorch,
    "Norse LIFBoxCell loop": make_norse,
    "SpikingJelly LIFNode (m)": make_spikingjelly,
}
OURS = "ours (fused, auto)"


# ---- measurement -------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, repeats: int, warmup: int) -> tuple[float, float, float]:
    """Median and best wall time, and median CPU time of this process (all its threads)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), min(times), statistics.median(cpu_times)


def saved_bytes(run, x, grad) -> int:
    """Bytes of the distinct tensors autograd keeps for backward (storage-deduplicated)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(x)
    out.backward(grad)
    x.grad = None
    return sum(storages.values())


def copy_bandwidth(device, repeats: int) -> float:
    src = torch.ones(64 * 1024 * 1024, device=device)  # 256 MiB of float32
    dst = torch.empty_like(src)
    median, _, _ = time_it(lambda: dst.copy_(src), device, repeats, 2)
    return 2 * src.numel() * 4 / median / 1e9


def bench_one(name, build, size, device, repeats, warmup) -> dict:
    steps, batch, neurons = size
    elements = steps * batch * neurons
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(size, generator=gen) * 0.5 + 0.3).to(device)
    grad = torch.randn(size, generator=gen).to(device)
    row = {"implementation": name, "T": steps, "B": batch, "N": neurons}
    try:
        run = build(device)
        with torch.no_grad():
            fwd = time_it(lambda: run(x), device, repeats, warmup)
        x_req = x.clone().requires_grad_(True)

        def fwd_bwd():
            run(x_req).backward(grad)
            x_req.grad = None

        fb = time_it(fwd_bwd, device, repeats, warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fwd_bwd()
            row["peak_MB"] = (torch.cuda.max_memory_allocated(device) - base) / 1e6
        saved = saved_bytes(run, x_req, grad)
    except Exception as error:  # a peer missing or failing on this machine: report, go on
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return row
    row.update(
        fwd_ms=fwd[0] * 1e3,
        fwd_best_ms=fwd[1] * 1e3,
        fwdbwd_ms=fb[0] * 1e3,
        fwdbwd_best_ms=fb[1] * 1e3,
        fwd_cpu_ms=fwd[2] * 1e3,
        fwdbwd_cpu_ms=fb[2] * 1e3,
        fwd_GBps=FWD_BYTES * elements / fwd[0] / 1e9,
        fwdbwd_GBps=FWDBWD_BYTES * elements / fb[0] / 1e9,
        saved_B_per_elem_step=saved / elements,
    )
    return row


def machine_info(device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        info["Model name"] = platform.processor()
    try:
        info["load_average"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_markdown(rows, copy_gbps) -> str:
    lines = []
    ours = {(r["T"], r["B"], r["N"]): r for r in rows if r["implementation"] == OURS}
    for size in sorted({(r["T"], r["B"], r["N"]) for r in rows}, key=lambda s: s[0]):
        lines += [
            f"\n**T={size[0]}, B={size[1]}, N={size[2]}** (copy bandwidth {copy_gbps:.1f} GB/s)\n",
            "| implementation | fwd ms | fwd+bwd ms (best) | fwd+bwd CPU ms "
            "| ours faster by (fwd+bwd) | GB/s fwd+bwd (24 B model) | % of copy BW "
            "| saved B/elem/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = ours.get(size)
        for r in rows:
            if (r["T"], r["B"], r["N"]) != size:
                continue
            if "error" in r:
                lines.append(f"| {r['implementation']} | n/a: {r['error']} |||||||")
                continue
            ratio = r["fwdbwd_ms"] / base["fwdbwd_ms"] if base and "error" not in base else None
            ratio_text = f"{ratio:.1f}x" if ratio else "-"
            lines.append(
                f"| {r['implementation']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} "
                f"({r['fwdbwd_best_ms']:.2f}) | {r['fwdbwd_cpu_ms']:.2f} "
                f"| {ratio_text} "
                f"| {r['fwdbwd_GBps']:.1f} | {100 * r['fwdbwd_GBps'] / copy_gbps:.0f}% "
                f"| {r['saved_B_per_elem_step']:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--sizes", default=None, help="e.g. 16x64x512,64x64x1024 (default: the issue's three)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated substrings of implementation names"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the reference loop"
    )
    parser.add_argument("--json", default=None, help="write machine-readable results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = (
        [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        if args.sizes
        else SIZES
    )
    impls = dict(IMPLEMENTATIONS)
    if args.compile:
        impls["ours (reference loop + torch.compile)"] = make_ours_compiled
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        impls = {n: b for n, b in impls.items() if any(k in n.lower() for k in keys)}
    # Build the fused kernel before timing anything (first use compiles it once).
    lif_multistep(torch.zeros(2, 1, 1, device=device))

    copy_gbps = copy_bandwidth(device, args.repeats)
    rows = []
    for size in sizes:
        for name, build in impls.items():
            row = bench_one(name, build, size, device, args.repeats, args.warmup)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "device": str(device),
        "machine": machine_info(device),
        "copy_bandwidth_GBps": copy_gbps,
        "bytes_model": {"fwd": FWD_BYTES, "fwd_bwd": FWDBWD_BYTES},
        "results": rows,
    }
    print(to_markdown(rows, copy_gbps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
