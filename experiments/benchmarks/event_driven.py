"""Event-driven vs dense synaptic product of one layer, side by side in one process.

One ``Linear(1024, 1024)`` with bias, float32, applied to ``R = T * B = 1024`` rows of binary
input at exact spike rates (by default 1, 2, 5, 10, 20 and 50%: ``round(rate * R * I)`` ones
at random places). Forward only, under ``torch.no_grad()``. Per rate, every implementation runs
once per repeat, in an order that cycles through all permutations (drift, load and the cache
state each one leaves behind spread evenly). Reported: medians (and minima), the ratio dense /
event-driven of the medians, and the break-even rate, interpolated linearly between the two
rates where the ratio crosses 1.

Implementations: ``dense`` is ``F.linear(x, weight, bias)`` (MKL/oneDNN on CPU, cuBLAS on
CUDA); ``event`` is ``event_linear(..., implementation="cpp")`` on CPU or ``"triton"`` on CUDA,
with the transposed weight cached as a layer would cache it; ``auto`` is
``event_linear(..., implementation="auto")`` with the same cache (event-driven below the
threshold ``auto_dense_above`` calibrates for this machine and shape, dense above; it pays one
pass over ``x`` to count the spikes).

Usage::

    PYTHONPATH=. python experiments/benchmarks/event_driven.py [--threads 2] [--repeats 31]
        [--rates 0.01,0.02,0.05,0.1,0.2,0.5] [--device cpu|cuda] [--json out.json]

With ``--checkpoint runs/default/checkpoint.pt`` (a trained run: the Quickstart's) it then times
the whole test-set evaluation of that model, every :class:`~spiking_moe.EventLinear` on its
``"auto"`` path against the same model with them set to ``"dense"``, alternating, and checks that
the predictions are identical; the firing rate is the model's own, on the test set. Then one
training step (forward and backward) with ``EventLinear(train_events=True)`` against the default
dense forward.

Shapes: ``R`` rows, ``I`` input features, ``O`` output features.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from spiking_moe.functional.event import auto_dense_above, event_linear

ROWS = IN_FEATURES = OUT_FEATURES = 1024
RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def exact_spikes(rows: int, n_in: int, rate: float, generator, device) -> torch.Tensor:
    """``[R, I]`` float32 with exactly ``round(rate * R * I)`` ones at random places."""
    numel = rows * n_in
    flat = torch.zeros(numel)
    flat[torch.randperm(numel, generator=generator)[: round(rate * numel)]] = 1.0
    return flat.view(rows, n_in).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_rate(rate, weight_OI, bias_O, weight_t_IO, event_name, repeats, warmup, generator):
    device = weight_OI.device
    x_RI = exact_spikes(ROWS, weight_OI.shape[1], rate, generator, device)
    runs = {
        "dense": lambda: F.linear(x_RI, weight_OI, bias_O),
        "event": lambda: event_linear(
            x_RI, weight_OI, bias_O, weight_t=weight_t_IO, implementation=event_name
        ),
        "auto": lambda: event_linear(x_RI, weight_OI, bias_O, weight_t=weight_t_IO),
    }
    dense = runs["dense"]()
    error = max((run() - dense).abs().max().item() for run in runs.values())
    for _ in range(warmup):
        for run in runs.values():
            run()
    sync(device)
    orders = list(itertools.permutations(runs))
    times = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in orders[repeat % len(orders)]:
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "rate": rate,
        "measured_rate": x_RI.count_nonzero().item() / x_RI.numel(),
        "median_ms": {name: 1e3 * m for name, m in medians.items()},
        "min_ms": {name: 1e3 * min(t) for name, t in times.items()},
        "dense_over_event": medians["dense"] / medians["event"],
        "dense_over_auto": medians["dense"] / medians["auto"],
        "max_abs_error": error,
    }


def break_even(rows) -> float | None:
    """Rate where dense / event crosses 1 (linear interpolation), or None if it never does."""
    for a, b in zip(rows, rows[1:], strict=False):
        ra, rb = a["dense_over_event"], b["dense_over_event"]
        if ra >= 1.0 > rb:
            return a["rate"] + (ra - 1.0) * (b["rate"] - a["rate"]) / (ra - rb)
    return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        info["Model name"] = platform.processor()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        from spiking_moe.functional.kernels import event_cpu

        isas = event_cpu.available_isas()
        info["event_isa"] = isas[-1] if isas else "none (C++ kernel unavailable)"
    return info


def to_markdown(rows, info) -> str:
    lines = [
        f"Linear({IN_FEATURES}, {OUT_FEATURES}), {ROWS} rows, float32, bias, forward in no_grad; "
        f"{info['device']}, {info['threads']} threads; auto goes dense above "
        f"{auto_dense_above(torch.device(info['device']).type, IN_FEATURES, OUT_FEATURES):.1%} "
        "(calibrated on this machine)",
        "",
        "| spike rate | dense ms | event ms | auto ms | dense / event | dense / auto |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        m = r["median_ms"]
        lines.append(
            f"| {r['rate']:.0%} | {m['dense']:.3f} | {m['event']:.3f} | {m['auto']:.3f} "
            f"| {r['dense_over_event']:.2f}x | {r['dense_over_auto']:.2f}x |"
        )
    rate = break_even(rows)
    lines.append("")
    if rate is not None:
        lines.append(f"Break-even spike rate (dense / event = 1): {rate:.1%}")
    elif rows and rows[-1]["dense_over_event"] >= 1.0:
        lines.append(f"Break-even spike rate: above {rows[-1]['rate']:.0%} (event always faster)")
    else:
        lines.append("Break-even spike rate: below the lowest rate measured (dense always faster)")
    return "\n".join(lines)


def _set_implementation(model, name: str) -> None:
    from spiking_moe import EventLinear

    for module in model.modules():
        if isinstance(module, EventLinear):
            module.implementation = name


def bench_model(checkpoint: str, repeats: int, device: torch.device) -> dict:
    """The whole test-set evaluation of a trained run, dense vs event-driven, alternating."""
    from spiking_moe import EventLinear
    from spiking_moe.data import build_datasets
    from spiking_moe.experiment import build_loaders, load_trained_model

    model, config = load_trained_model(checkpoint)
    model = model.to(device)
    _, _, test_loader = build_loaders(config, build_datasets(config.data))
    batches = [(x.to(device), y) for x, y in test_loader]  # encoding noise drawn once
    layers = sum(isinstance(m, EventLinear) for m in model.modules())

    def evaluate(name: str):
        _set_implementation(model, name)
        sync(device)
        start = time.perf_counter()
        outputs = [model(x) for x, _ in batches]
        sync(device)
        return time.perf_counter() - start, outputs

    times: dict[str, list[float]] = {"dense": [], "auto": []}
    with torch.no_grad():
        _, dense_out = evaluate("dense")  # warm-up (and the kernel build)
        _, event_out = evaluate("auto")
        for i in range(repeats):
            for name in ("dense", "auto") if i % 2 == 0 else ("auto", "dense"):
                times[name].append(evaluate(name)[0])
    predictions_equal = all(
        torch.equal(d.logits.argmax(-1), e.logits.argmax(-1))
        for d, e in zip(dense_out, event_out, strict=True)
    )
    spikes = sum(float(o.activity.spikes.sum()) for o in event_out)
    updates = sum(float(o.activity.updates.sum()) for o in event_out)
    correct = sum(
        int((o.logits.argmax(-1) == y.to(device)).sum())
        for o, (_, y) in zip(event_out, batches, strict=True)
    )
    samples = sum(len(y) for _, y in batches)
    dense_ms = 1000 * statistics.median(times["dense"])
    event_ms = 1000 * statistics.median(times["auto"])
    return {
        "samples": samples,
        "event_linear_layers": layers,
        "firing_rate": spikes / updates if updates else 0.0,
        "accuracy": correct / samples,
        "predictions_identical": predictions_equal,
        "max_abs_logit_difference": max(
            float((d.logits - e.logits).abs().max())
            for d, e in zip(dense_out, event_out, strict=True)
        ),
        "dense_ms": dense_ms,
        "event_ms": event_ms,
        "ratio": dense_ms / event_ms,
        "repeats": repeats,
    }


def bench_train_step(checkpoint: str, repeats: int, device: torch.device) -> dict:
    """One training step (forward, cross-entropy, backward) on a training batch of the run,
    every ``EventLinear`` with ``train_events`` off (dense forward) vs on (event-driven forward;
    backward is the dense product's either way), alternating. The optimiser is left out: it
    costs the same on both sides."""
    from spiking_moe import EventLinear
    from spiking_moe.data import build_datasets
    from spiking_moe.experiment import build_loaders, load_trained_model

    model, config = load_trained_model(checkpoint)
    model = model.to(device).train()
    train_loader, _, _ = build_loaders(config, build_datasets(config.data))
    x, y = (t.to(device) for t in next(iter(train_loader)))
    layers = [m for m in model.modules() if isinstance(m, EventLinear)]

    def step(train_events: bool) -> float:
        for layer in layers:
            layer.train_events = train_events
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x).logits, y).backward()
        sync(device)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)  # warm-up
    for i in range(repeats):
        for flag in (False, True) if i % 2 == 0 else (True, False):
            times[flag].append(step(flag))
    dense_ms, event_ms = (1000 * statistics.median(times[f]) for f in (False, True))
    return {
        "batch_shape": list(x.shape),
        "dense_ms": dense_ms,
        "event_ms": event_ms,
        "ratio": dense_ms / event_ms,
        "repeats": repeats,
    }


def train_markdown(result: dict) -> str:
    return (
        f"Training step (forward + backward, batch {tuple(result['batch_shape'])}), medians of "
        f"{result['repeats']} alternating repeats: dense forward {result['dense_ms']:.1f} ms, "
        f"event-driven forward (`train_events=True`) {result['event_ms']:.1f} ms, "
        f"dense / event {result['ratio']:.2f}x"
    )


def model_markdown(result: dict, checkpoint: str) -> str:
    return "\n".join(
        [
            f"Whole test-set evaluation of `{checkpoint}` ({result['samples']} samples, "
            f"{result['event_linear_layers']} EventLinear layers, firing rate "
            f"{result['firing_rate']:.1%}, accuracy {result['accuracy']:.2%}), medians of "
            f"{result['repeats']} alternating repeats:",
            "",
            "| dense ms | event-driven (auto) ms | dense / event | identical predictions | "
            "max logit difference |",
            "| ---: | ---: | ---: | --- | ---: |",
            f"| {result['dense_ms']:.1f} | {result['event_ms']:.1f} | {result['ratio']:.2f}x | "
            f"{result['predictions_identical']} | {result['max_abs_logit_difference']:.2g} |",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--rates",
        default=",".join(str(r) for r in RATES),
        help="comma-separated spike rates in (0, 1], increasing",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write machine-readable results here")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="also time this run's whole test-set evaluation, dense vs event-driven",
    )
    parser.add_argument("--model-repeats", type=int, default=7)
    parser.add_argument("--skip-layer", action="store_true", help="only the whole-model part")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if not rates or any(not 0.0 < r <= 1.0 for r in rates) or rates != sorted(rates):
        parser.error(f"--rates must be increasing values in (0, 1], got {args.rates}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    event_name = "triton" if device.type == "cuda" else "cpp"

    generator = torch.Generator().manual_seed(args.seed)
    weight_OI = (torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) / 32).to(device)
    bias_O = torch.randn(OUT_FEATURES, generator=generator).to(device)
    weight_t_IO = weight_OI.t().contiguous()
    info = machine_info(device)
    rows = []
    with torch.no_grad():
        for rate in [] if args.skip_layer else rates:
            row = bench_rate(
                rate,
                weight_OI,
                bias_O,
                weight_t_IO,
                event_name,
                args.repeats,
                args.warmup,
                generator,
            )
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    if rows:
        print(to_markdown(rows, info))
    model_result = None
    if args.checkpoint:
        model_result = bench_model(args.checkpoint, args.model_repeats, device)
        print(model_markdown(model_result, args.checkpoint))
        model_result["train_step"] = bench_train_step(args.checkpoint, args.model_repeats, device)
        print(train_markdown(model_result["train_step"]))
    if args.json:
        result = {
            "machine": info,
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
            "repeats": args.repeats,
            "rows": rows,
            "break_even_rate": break_even(rows) if rows else None,
            "model": model_result,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
