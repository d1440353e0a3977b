"""One rank of the DDP tests (run by torchrun from tests/training/test_distributed.py; not a
test module).

``python ddp_worker.py <out> <model>`` trains the tiny model (``tiny``) or the tiny MoE with
auxiliary-loss-free bias balancing (``moe``) on a deterministic dataset sharded by rank and
saves this rank's final parameters, buffers and evaluation metrics to ``<out>/rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch

from spiking_moe.data import BatchLoader
from spiking_moe.training import RouterBiasBalancing, Trainer, init_distributed, seed_everything
from tests.tiny import TinySNN, in_float64, tiny_moe, train_config, two_class_data


def build(kind: str):
    if kind == "tiny":
        return in_float64(TinySNN(dropout=0.0)), []
    # No Switch loss: it is not a mean over tokens, so shards would see a different loss.
    model = tiny_moe(bias_update_rate=0.05, balance_weight=0.0)
    return in_float64(model), [RouterBiasBalancing()]


def run(out: Path, kind: str, rank: int, world_size: int, batch_size: int):
    seed_everything(rank)  # different inits per rank: DDP must broadcast rank 0's
    model, callbacks = build(kind)
    if rank:
        for p in model.parameters():
            torch.nn.init.normal_(p)
    data = two_class_data(96, encoding="current")
    train = BatchLoader(data, batch_size, shuffle=True, seed=0, rank=rank, world_size=world_size)
    val = BatchLoader(two_class_data(30, seed=1), 7, rank=rank, world_size=world_size)
    config = train_config(max_steps=12, batch_size=batch_size, weight_decay=0.0)
    trainer = Trainer(model, train, config, out_dir=out, val_loader=val, callbacks=callbacks)
    result = trainer.fit()
    trainer.close()
    return trainer, result


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    info = init_distributed("cpu")
    assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
    trainer, result = run(out, kind, info.rank, info.world_size, batch_size=8)
    torch.save(
        {"state": trainer.model.state_dict(), "metrics": result.metrics, "step": result.step},
        out / f"rank{info.rank}.pt",
    )
    torch.distributed.destroy_process_group()
