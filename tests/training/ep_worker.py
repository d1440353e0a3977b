"""One rank of the expert-parallel training tests (run by torchrun from
tests/training/test_expert_parallel.py; not a test module).

``python ep_worker.py <out>`` (2 or 4 processes) trains the tiny MoE with
``train.expert_parallel = 2`` (grad accumulation, clipping that acts, bias balancing, an uneven
validation set) and, as the oracle, the same run with plain DDP (``expert_parallel = 1``); the
expert-parallel run again, stopped after step 3 and resumed to the end; then meets the errors
of bad layouts. It saves what this rank saw to ``<out>/rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch

from spiking_moe.data import BatchLoader
from spiking_moe.training import (
    Callback,
    CheckpointLayoutError,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
    Trainer,
    init_distributed,
)
from tests.tiny import in_float64, tiny_moe, train_config, two_class_data

STEPS, STOP_AT = 6, 3


def model(**overrides):
    # k = 2 and a bias step: routing, balancing and both experts of a token cross processes.
    # float64 (in_float64): expert parallelism sums the experts' gradients in another order than
    # DDP, and its evaluation cuts other batches than DDP's and one process's; AdamW would
    # amplify float32 rounding of tiny gradients, and float32 rounding could flip a spike on
    # some CPU. In float64 the runs agree to about 1e-15.
    return in_float64(tiny_moe(num_experts=4, k=2, bias_update_rate=0.05, **overrides))


def config(expert_parallel: int, **overrides):
    base = dict(
        max_steps=STEPS,
        batch_size=8,
        grad_accum_steps=2,
        grad_clip=0.05,  # below the gradient norms: the clip acts (the test checks)
        weight_decay=0.0,
        expert_parallel=expert_parallel,
        eval_batch_size=7,
    )
    base.update(overrides)
    return train_config(**base)


def loaders(rank: int, world: int, val_size: int = 29, val_batch: int = 7):
    # 64 samples: 4 batches of 8 per rank and epoch with 2 processes, 2 steps of 2 batches.
    train = BatchLoader(two_class_data(64), 8, shuffle=True, seed=0, rank=rank, world_size=world)
    # 29 samples in batches of 7: ranks hold 15 and 14, so 3 and 2 batches.
    val = BatchLoader(
        two_class_data(val_size, seed=1, encoding="current"),
        val_batch,
        rank=rank,
        world_size=world,
    )
    return train, val


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_step_end(self, trainer, outputs, loss) -> None:
        if trainer.step == self.step:
            trainer.request_stop()


def callbacks():
    return [RouterBiasBalancing(), FiringRateMonitor(), RoutingMonitor()]


def train(out: Path, rank: int, world: int, expert_parallel: int, *, resume=False, stop=None):
    train_loader, val_loader = loaders(rank, world)
    trainer = Trainer(
        model(),
        train_loader,
        config(expert_parallel),
        out_dir=out,
        val_loader=val_loader,
        callbacks=callbacks() + ([StopAt(stop)] if stop else []),
        resume=resume,
    )
    result = trainer.fit()
    final = trainer.evaluate(val_loader, "final") if not result.interrupted else {}
    trainer.close()
    return trainer, result, final


def error_of(action) -> str:
    try:
        action()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


def run(out: Path, rank: int, world: int) -> dict:
    ep, _, ep_final = train(out / "ep", rank, world, 2)
    ddp, _, ddp_final = train(out / "ddp", rank, world, 1)
    stopped, stopped_result, _ = train(out / "resumed", rank, world, 2, stop=STOP_AT)
    resumed, resumed_result, _ = train(out / "resumed", rank, world, 2, resume=True)
    train_loader, val_loader = loaders(rank, world)
    not_dividing = 4 if world == 2 else 3
    errors = {
        "world": error_of(lambda: Trainer(model(), train_loader, config(not_dividing))),
        "experts": error_of(lambda: Trainer(tiny_moe(num_experts=3, k=1), train_loader, config(2))),
        "layout": error_of(
            lambda: Trainer(model(), train_loader, config(1), out_dir=out / "ep", resume=True)
        ),
        "layout_type": "",
    }
    try:
        Trainer(model(), train_loader, config(1), out_dir=out / "ep", resume=True)
    except CheckpointLayoutError as error:
        errors["layout_type"] = type(error).__name__
    if world == 4:  # the same world, another expert-parallel size
        errors["relayout"] = error_of(
            lambda: Trainer(model(), train_loader, config(4), out_dir=out / "ep", resume=True)
        )
    # An evaluation set of world + 1 samples in batches of 1: rank 0 makes 2 calls, and the
    # others hold 1 sample, which cannot be cut into 2 batches.
    tiny_val = BatchLoader(two_class_data(world + 1, seed=1), 1, rank=rank, world_size=world)
    errors["eval"] = error_of(lambda: ep.evaluate(tiny_val, "tiny"))
    return {
        "ep": ep.model.state_dict(),
        "ep_final": ep_final,
        "ep_metrics": ep.metrics,
        "ddp": ddp.model.state_dict(),
        "ddp_final": ddp_final,
        "stopped_step": stopped_result.step,
        "stopped_interrupted": stopped_result.interrupted,
        "resumed": resumed.model.state_dict(),
        "resumed_step": resumed_result.step,
        "local_experts": list(ep.expert_parallel.local_experts(4)),
        "errors": errors,
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    info = init_distributed("cpu")
    torch.save(run(out, info.rank, info.world_size), out / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()
