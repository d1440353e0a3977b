"""Expert-parallel benchmark: tokens/s and all-to-all bytes per step of one SpikingMoE layer
whose experts are split over 1, 2 and 4 processes (:mod:`spiking_moe.parallel`).

One training step without the optimizer: forward, loss, backward (the input requires a
gradient, as it would inside a network, so the rows' gradients travel back too),
``reduce_expert_gradients`` and one flat all-reduce of the dense (router, output neuron)
gradients, which is what DDP would do. Weak scaling: every process has the same number of
tokens ``B`` (a token: one column of the ``[T, B, D]`` input, all ``T`` steps), the global
batch is ``B P``; tokens/s are reported per process and in total. World size 1 is the plain
single-process layer holding every expert (no process group, no exchange). One torch thread
per process. The step time is the slowest process's (each step starts after a barrier),
median of the repeats after warm-up.

Bytes are measured, not computed: one extra (untimed) step runs under a dispatch mode that
sees every collective the layer issues, forward and backward, and adds up what each process
hands to the all-to-alls: in total and for *other* processes (the rows for its own experts
are copied locally by the collective). They are compared with the exchange model of
:mod:`spiking_moe.parallel`: per process ``R (r + 4 T O) + R_in 4 T (D + O)`` bytes (``R``
rows this process dispatches, ``R_in`` rows its experts receive, ``r`` the bytes of one row on
its way out: ``T D / 8`` as bits, the default for spikes, ``4 T D`` with ``--exchange float``,
which makes it ``4 T (D + O) (R + R_in)``, ``8 R T (D + O)`` when balanced). The same
all-to-alls are then replayed alone, without compute, to time the exchange by itself.

    PYTHONPATH=. python experiments/benchmarks/expert_parallel.py              # gloo, 1 2 4
    PYTHONPATH=. python experiments/benchmarks/expert_parallel.py --quick --json out.json
    PYTHONPATH=. python experiments/benchmarks/expert_parallel.py --device cuda  # NCCL

``--device cuda`` uses NCCL and needs one GPU per process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from spiking_moe import RateRouter, SpikingExpert, SpikingMoE
from spiking_moe.parallel import (
    expert_parameter_names,
    init_expert_parallel,
    reduce_expert_gradients,
    shard_experts,
)

QUICK = dict(
    features=32,
    hidden=32,
    experts=4,
    steps=4,
    batch=32,
    worlds=[1, 2],
    repeats=2,
    warmup=1,
    balance_steps=10,
)


# ----------------------------------------------------------------------------- the layer


def global_input(args, device) -> torch.Tensor:
    """``[T, B * max(worlds), D]`` spikes; process ``r`` of any world takes columns
    ``[r B, (r + 1) B)``, so rank 0 sees the same tokens at every world size. Each token has
    its own firing rate per feature, uniform in ``[0, 2 rate]``."""
    g = torch.Generator().manual_seed(0)
    n = args.batch * max(args.worlds)
    rates = torch.rand(1, n, args.features, generator=g) * 2 * args.rate
    x = torch.bernoulli(rates.expand(args.steps, n, args.features), generator=g)
    return x.to(device)


def build_layer(args, x_global: torch.Tensor) -> SpikingMoE:
    """The layer (seed 0), its router balanced on the largest global batch with the library's
    aux-loss-free bias steps (a fresh router would send most tokens to a few experts, and so to
    a few processes); identical at every world size."""
    torch.manual_seed(0)
    D = args.features
    router = RateRouter(D, args.experts, args.k)
    experts = [SpikingExpert(D, args.hidden, D) for _ in range(args.experts)]
    layer = SpikingMoE(router=router, experts=experts, spike_exchange=args.exchange).to(
        x_global.device
    )
    with torch.no_grad():
        for i in range(args.balance_steps):
            router.bias_update_rate = 0.05 * 0.01 ** (i / max(args.balance_steps - 1, 1))
            router.update_bias(router(x_global))
    router.bias_update_rate = 0.0
    return layer


# ----------------------------------------------------------------------------- measuring bytes


class CollectiveCounter(TorchDispatchMode):
    """Records every collective seen by the dispatcher (forward and autograd backward).

    All-to-alls (the functional, autograd-aware one and ``dist.all_to_all_single``): bytes this
    process hands to the collective, and the part of them addressed to other processes (its
    own split, ``rank``, stays local). Tensors of two or more dimensions are the token
    exchange (rows out, currents back, and their gradients); one-dimensional ones are
    metadata (per-expert counts, activity). All-reduces: payload bytes.
    """

    def __init__(self, rank: int, size: int):
        super().__init__()
        self.rank, self.size = rank, size
        self.phase = "forward"
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "_c10d_functional.all_to_all_single.default":
            x, out_splits, in_splits = args[0], list(args[1]), list(args[2])
            self._a2a(x, out_splits, in_splits)
        elif name == "c10d.alltoall_base_.default":
            out, x, out_splits, in_splits = args[0], args[1], list(args[3]), list(args[4])
            if not in_splits:  # equal splits
                in_splits = [x.shape[0] // self.size] * self.size
                out_splits = [out.shape[0] // self.size] * self.size
            self._a2a(x, out_splits, in_splits)
        elif name.startswith("c10d.allreduce_"):
            payload = sum(t.numel() * t.element_size() for t in args[0])
            self.calls.append(dict(op="all_reduce", phase=self.phase, bytes=payload))
        return func(*args, **(kwargs or {}))

    def _a2a(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        assert len(in_splits) == self.size, (in_splits, self.size)
        row = (x.numel() // x.shape[0] if x.shape[0] else 0) * x.element_size()
        self.calls.append(
            dict(
                op="all_to_all",
                phase=self.phase,
                kind="tokens" if x.dim() >= 2 else "metadata",
                shape=list(x.shape),
                dtype=str(x.dtype).removeprefix("torch."),
                out_splits=out_splits,
                in_splits=in_splits,
                bytes=sum(in_splits) * row,
                to_others=(sum(in_splits) - in_splits[self.rank]) * row,
            )
        )

    def total(self, key: str, **match) -> int:
        return sum(
            c[key]
            for c in self.calls
            if key in c and all(c.get(name) == value for name, value in match.items())
        )


# ----------------------------------------------------------------------------- one process


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(layer, x, ep, dense, counter=None) -> None:
    """Forward, loss, backward, expert-gradient reduction, dense all-reduce (DDP's job)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = layer(x)
    if counter is not None:
        counter.phase = "backward"
    (out.spikes.sum() + out.aux_loss).backward()
    if ep is None:
        return
    if counter is not None:
        counter.phase = "reduce"
    reduce_expert_gradients(layer, ep)
    grads = [p.grad for p in dense if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= ep.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def slowest(times: list[float], device, distributed: bool) -> list[float]:
    """Per-repeat maximum over the processes (a step ends when its slowest process does)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def worker(rank: int, world: int, folder: str, args) -> None:
    try:
        result = run_process(rank, world, args)
    except Exception as error:  # report it instead of hanging the other processes
        import traceback

        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_process(rank: int, world: int, args) -> dict:
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    distributed = world > 1
    if distributed:
        dist.init_process_group(
            args.backend,
            init_method=f"file://{Path(args.store_folder, f'store{world}')}",
            rank=rank,
            world_size=world,
        )
    x_global = global_input(args, device)
    layer = build_layer(args, x_global)
    ep = None
    if distributed:
        ep = init_expert_parallel(world)
        shard_experts(layer, ep)
    expert_names = set(expert_parameter_names(layer))
    dense = [p for name, p in layer.named_parameters() if name not in expert_names]
    x = x_global[:, rank * args.batch : (rank + 1) * args.batch].clone().requires_grad_()
    T, B, D = x.shape
    O, H, E = D, args.hidden, args.experts

    # The counted step (untimed): the dispatch mode costs Python time on every op.
    with torch.no_grad():
        load_E = layer.router(x.detach()).tokens_per_expert.to(torch.int64)
    counter = CollectiveCounter(ep.rank if ep else 0, ep.size if ep else 1)
    with counter:
        train_step(layer, x, ep, dense, counter)
    # Rows per (source, expert) of every process: what this process receives from each one.
    loads_PE = load_E.reshape(1, E)
    if distributed:
        gathered = [torch.empty_like(load_E) for _ in range(world)]
        dist.all_gather(gathered, load_E)
        loads_PE = torch.stack(gathered)
    per = E // world
    R = int(load_E.sum())
    R_in = int(loads_PE[:, rank * per : (rank + 1) * per].sum())
    R_self = int(load_E[rank * per : (rank + 1) * per].sum())
    element = 4  # float32 currents and gradients (and rows, unless they travel as bits)
    # Bytes of one row on its way out: its T D spikes as bits or as float32.
    row_out = -(-T * D // 8) if args.exchange != "float" else element * T * D
    # Per own row: it goes out (spikes) and, in backward, its current's gradient goes out; per
    # received row: its current goes back and, in backward, the row's gradient goes back.
    per_sent = row_out + element * T * O
    per_received = element * T * (D + O)

    steps = []
    for i in range(args.warmup + args.repeats):
        if distributed:
            dist.barrier()
        sync(device)
        start = time.perf_counter()
        train_step(layer, x, ep, dense)
        sync(device)
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
    steps = slowest(steps, device, distributed)

    # The same all-to-alls alone (same sizes and splits, no compute): the exchange's own time.
    exchange = []
    replay = [c for c in counter.calls if c["op"] == "all_to_all"]
    if distributed:
        tensors = []
        for c in replay:
            dtype = getattr(torch, c["dtype"])
            inp = torch.zeros(c["shape"], dtype=dtype, device=device)
            out = torch.empty([sum(c["out_splits"]), *c["shape"][1:]], dtype=dtype, device=device)
            tensors.append((out, inp, c))
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            for out, inp, c in tensors:
                dist.all_to_all_single(out, inp, c["out_splits"], c["in_splits"], group=ep.group)
            sync(device)
            if i >= args.warmup:
                exchange.append(time.perf_counter() - start)
        exchange = slowest(exchange, device, distributed)

    return {
        "rank": rank,
        "world": world,
        "tokens": B,
        "step_s": steps,
        "exchange_s": exchange,
        "rows_sent": R,
        "rows_received": R_in,
        "rows_local": R_self,
        "tokens_bytes": counter.total("bytes", op="all_to_all", kind="tokens"),
        "tokens_bytes_to_others": counter.total("to_others", op="all_to_all", kind="tokens"),
        "tokens_bytes_forward": counter.total(
            "bytes", op="all_to_all", kind="tokens", phase="forward"
        ),
        "tokens_bytes_backward": counter.total(
            "bytes", op="all_to_all", kind="tokens", phase="backward"
        ),
        "metadata_bytes": counter.total("bytes", op="all_to_all", kind="metadata"),
        "all_reduce_bytes": counter.total("bytes", op="all_reduce"),
        "predicted_formula": R * (per_sent + per_received) if distributed else 0,
        "predicted_exact": R * per_sent + R_in * per_received if distributed else 0,
        "predicted_exact_to_others": (
            (R - R_self) * per_sent + (R_in - R_self) * per_received if distributed else 0
        ),
        "expert_flops": 6 * (R_in if distributed else R) * T * H * (D + O),
        "collectives": counter.calls,
    }


# ----------------------------------------------------------------------------- the job


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_world(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        args.store_folder = folder
        mp.spawn(worker, args=(world, folder, args), nprocs=world, join=True)
        results = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    for result in results:
        if "error" in result:
            raise RuntimeError(f"world {world}: {result['error']}\n{result['trace']}")
    return results


def summarize(results: list[dict], baseline: float | None) -> dict:
    world, B = results[0]["world"], results[0]["tokens"]
    step = statistics.median(results[0]["step_s"])  # identical on every rank (max-reduced)
    total = world * B / step

    def mean(key):
        return statistics.mean(r[key] for r in results)

    def ratio(a, b):
        return a / b if b else None

    row = {
        "world": world,
        "tokens_per_process": B,
        "step_ms": 1e3 * step,
        "step_ms_min": 1e3 * min(results[0]["step_s"]),
        "tokens_per_s_per_process": B / step,
        "tokens_per_s_total": total,
        "speedup_total": ratio(total, baseline),  # None without a 1-process run
        "exchange_ms": 1e3 * statistics.median(results[0]["exchange_s"])
        if results[0]["exchange_s"]
        else 0.0,
    }
    for key in (
        "tokens_bytes",
        "tokens_bytes_to_others",
        "tokens_bytes_forward",
        "tokens_bytes_backward",
        "predicted_formula",
        "predicted_exact",
        "predicted_exact_to_others",
        "metadata_bytes",
        "all_reduce_bytes",
        "expert_flops",
        "rows_sent",
        "rows_received",
        "rows_local",
    ):
        row[f"{key}_mean"] = mean(key)
    row["sum_measured_equals_sum_formula"] = sum(r["tokens_bytes"] for r in results) == sum(
        r["predicted_formula"] for r in results
    )
    row["measured_equals_exact_every_rank"] = all(
        r["tokens_bytes"] == r["predicted_exact"]
        and r["tokens_bytes_to_others"] == r["predicted_exact_to_others"]
        for r in results
    )
    row["local_fraction"] = (
        1 - ratio(row["tokens_bytes_to_others_mean"], row["tokens_bytes_mean"])
        if row["tokens_bytes_mean"]
        else 1.0
    )
    row["bytes_per_flop"] = ratio(row["tokens_bytes_to_others_mean"], row["expert_flops_mean"])
    row["per_rank"] = [{k: v for k, v in r.items() if k != "collectives"} for r in results]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| processes | step ms (median) | tokens/s per process | tokens/s total | speedup (total) "
        "| a2a MB/step/process measured (to others) | predicted (balanced) MB | local fraction "
        "| exchange alone ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = "n/a" if r["speedup_total"] is None else f"{r['speedup_total']:.2f}x"
        lines.append(
            f"| {r['world']} | {r['step_ms']:.1f} | {r['tokens_per_s_per_process']:,.0f} "
            f"| {r['tokens_per_s_total']:,.0f} | {speedup} "
            f"| {r['tokens_bytes_mean'] / 1e6:.2f} ({r['tokens_bytes_to_others_mean'] / 1e6:.2f}) "
            f"| {r['predicted_formula_mean'] / 1e6:.2f} | {r['local_fraction']:.2f} "
            f"| {r['exchange_ms']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=256, help="D (= O)")
    p.add_argument("--hidden", type=int, default=512, help="expert hidden width H")
    p.add_argument("--experts", type=int, default=16, help="E")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="T")
    p.add_argument("--batch", type=int, default=512, help="B, tokens per process")
    p.add_argument("--rate", type=float, default=0.2, help="mean input spike probability")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--balance-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="cpu: gloo")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 and 2 processes (a smoke test)"
    )
    p.add_argument(
        "--exchange",
        choices=["auto", "bits", "float"],
        default="auto",
        help="how rows travel (SpikingMoE spike_exchange; auto: bits, the input is checked spikes)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cpu" and args.backend == "nccl":
        p.error("NCCL runs on GPUs: use --device cuda, or --backend gloo on the CPU")
    if args.device == "cuda" and args.backend == "gloo":
        p.error("gloo has no CUDA all-to-all: use --backend nccl with --device cuda")
    if args.device == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < max(args.worlds):
            p.error(f"NCCL needs one GPU per process; found {found} for {max(args.worlds)}")
    for world in args.worlds:
        if world < 1 or args.experts % world:
            p.error(f"{args.experts} experts cannot be split over {world} processes")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_before = load_average()
    rows, baseline = [], None
    for world in sorted(args.worlds):
        row = summarize(run_world(world, args), baseline)
        if world == 1:
            baseline = row["tokens_per_s_total"]
            row["speedup_total"] = 1.0
        rows.append(row)
        print(
            f"P={world}: step {row['step_ms']:.1f} ms, {row['tokens_per_s_total']:,.0f} tokens/s "
            f"total, a2a {row['tokens_bytes_mean'] / 1e6:.2f} MB/step/process "
            f"(predicted {row['predicted_formula_mean'] / 1e6:.2f}), exchange alone "
            f"{row['exchange_ms']:.1f} ms",
            flush=True,
        )
    command = "PYTHONPATH=. python experiments/benchmarks/expert_parallel.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    config = {k: v for k, v in vars(args).items() if k not in ("json", "store_folder", "quick")}
    report = {
        "machine": machine(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "config": config,
        "rows": rows,
    }
    print(
        f"\n{report['machine']}, {args.backend} on {args.device}, {args.threads} thread(s) per "
        f"process, load average {load_before} -> {report['load_average_after']}\n"
        f"T={args.steps}, B={args.batch} tokens per process, D=O={args.features}, "
        f"H={args.hidden}, E={args.experts}, k={args.k}; median of {args.repeats} after "
        f"{args.warmup} warm-up\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
