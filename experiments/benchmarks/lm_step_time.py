"""Language-model training step time: spiking MoE LMs against the dense spiking LM and the ANN.

One optimizer step (forward, cross-entropy, backward, AdamW step) of the models that
``experiments/configs/lm_moe.toml`` describes, at equal active parameters: the spiking MoE LM
with ``E`` routed experts (top-k, one shared expert), the dense spiking LM (FFN width
``k * expert_hidden + shared``) and the ANN transformer, dense and routed with the same ``E``
(its twin). Routers are balanced first with the library's aux-loss-free bias (a fresh router
sends most tokens to a few experts, which would flatter the MoE). Median of repeats, every model
in this one process, side by side, one step of each model per round.

    PYTHONPATH=. python experiments/benchmarks/lm_step_time.py                # 2 threads, CPU
    PYTHONPATH=. python experiments/benchmarks/lm_step_time.py --threads 1 --repeats 5
    PYTHONPATH=. python experiments/benchmarks/lm_step_time.py --device cuda  # also tokens/s

Targets: MoE step time <= 1.25x the dense spiking LM's (issue 11); the multi-level spiking LM's
tokens/s within 1.3x of its ANN twin's, dense and routed (issue 22), on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from spiking_moe.config import apply_overrides, load_config
from spiking_moe.factory import build_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_moe.toml"
VOCAB = 256


def models(config, experts: list[int]):
    """``{label: model}``: the MoE LM per ``E``, the dense spiking twin and the dense ANN."""
    out = {}
    for num_experts in experts:
        cfg = apply_overrides(config, [f"model.moe.num_experts={num_experts}"])
        out[f"moe E={num_experts}"] = cfg
    out["dense SNN"] = apply_overrides(config, ["model.kind=dense_snn"])
    out["ANN (dense)"] = apply_overrides(config, ["model.kind=ann", "model.moe.num_experts=1"])
    for num_experts in experts:
        if num_experts > 1:
            ann = ["model.kind=ann", f"model.moe.num_experts={num_experts}"]
            out[f"ANN E={num_experts}"] = apply_overrides(config, ann)
    built = {}
    for label, cfg in out.items():
        torch.manual_seed(0)
        built[label] = build_model(
            cfg.model,
            in_features=VOCAB,
            num_classes=VOCAB,
            num_steps=cfg.data.num_steps,
            context=cfg.data.context,
        )
    return built


def balance(model, ids, steps: int) -> None:
    """Aux-loss-free bias steps on ``ids`` until the routers spread the tokens."""
    routers = [m for m in model.modules() if hasattr(m, "update_bias")]
    if not routers:
        return
    with torch.no_grad():
        for i in range(steps):
            rate = 0.05 * 0.01 ** (i / max(steps - 1, 1))
            routing = model(ids).routing
            for router, info in zip(routers, routing, strict=True):
                router.bias_update_rate = rate
                router.update_bias(info)


def one_step(model, optimizer, ids, targets, device) -> float:
    """Seconds for one forward, loss, backward and AdamW step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1))
    (loss + out.aux_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--experts", default="1,4,8,16")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the config's")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--balance-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(args.config)
    batch = args.batch_size or config.train.batch_size
    context = config.data.context
    generator = torch.Generator().manual_seed(0)
    # Bytes of the stdlib corpus would do as well; timing does not depend on the values.
    ids = torch.randint(0, VOCAB, (batch, context), generator=generator).to(device)
    targets = torch.randint(0, VOCAB, (batch, context), generator=generator).to(device)
    experts = [int(e) for e in args.experts.split(",")]
    print(
        f"# LM step time: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"device {device}, {args.threads} threads, B={batch}, S={context}, T={config.data.num_steps}, "
        f"d_model={config.model.hidden_features}, {config.model.num_layers} blocks, "
        f"k={config.model.moe.k}, median of {args.repeats}"
    )
    runs = {}
    for label, model in models(config, experts).items():
        model = model.to(device)
        balance(model, ids, args.balance_steps)
        runs[label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), [])
    # Interleaved, one step of every model per round, so drifts in machine load hit all alike.
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        for model, optimizer, times in runs.values():
            seconds = one_step(model, optimizer, ids, targets, device)
            if round_ >= 2:
                times.append(seconds)
    medians = {}
    for label, (_, _, times) in runs.items():
        medians[label] = statistics.median(times)
        tokens = batch * context / medians[label]
        print(
            f"| {label} | {1e3 * medians[label]:.1f} ms | min {1e3 * min(times):.1f} ms | "
            f"{tokens:,.0f} tokens/s |"
        )
    dense = medians["dense SNN"]
    for label, median in medians.items():
        if label.startswith("moe"):
            print(f"{label} / dense SNN = {median / dense:.2f}x (target <= 1.25x)")
    print(f"dense SNN / ANN (dense) = {dense / medians['ANN (dense)']:.2f}x (target <= 1.3x)")
    for label, median in medians.items():
        twin = label.replace("moe", "ANN")
        if label.startswith("moe") and twin in medians:
            print(f"{label} / {twin} = {median / medians[twin]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
