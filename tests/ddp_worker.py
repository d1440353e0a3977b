"""One rank of the DDP test (run by torchrun from tests/test_ddp.py; not a test module).

Trains the tiny model on a deterministic ("sequence") dataset sharded by rank and saves this
rank's final parameters and evaluation metrics to <out>/rank<r>.pt.
"""

import sys
from pathlib import Path

import torch
from torch import nn

from spiking_moe import LIF
from spiking_moe.config import TrainConfig
from spiking_moe.data import BatchLoader, InMemoryDataset
from spiking_moe.training import Trainer, init_distributed, seed_everything


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.lif = LIF(beta=0.8, threshold=0.5)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x_TBF):
        return self.fc2(self.lif(self.fc1(x_TBF))).mean(0)


def dataset(n: int = 96) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 5, 4, generator=g) * 0.3 + (2 * y - 1).view(n, 1, 1) * torch.tensor(
        [1.0, -1.0, 0.5, 0.0]
    )
    return InMemoryDataset(x, y, encoding="sequence", num_steps=5, num_classes=2)


def config(batch_size: int) -> TrainConfig:
    return TrainConfig(
        max_steps=12,
        batch_size=batch_size,
        lr=2e-2,
        log_every=1,
        device="cpu",
        progress=False,
        weight_decay=0.0,
    )


def run(out: Path, rank: int, world_size: int, batch_size: int):
    seed_everything(rank)  # different inits per rank: DDP must broadcast rank 0's
    train = BatchLoader(
        dataset(), batch_size, shuffle=True, seed=0, rank=rank, world_size=world_size
    )
    val = BatchLoader(dataset(30), 7, rank=rank, world_size=world_size)
    trainer = Trainer(Tiny(), train, config(batch_size), out_dir=out, val_loader=val)
    result = trainer.fit()
    trainer.close()
    return trainer, result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    info = init_distributed("cpu")
    assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
    trainer, result = run(out, info.rank, info.world_size, batch_size=8)
    torch.save(
        {"params": trainer.model.state_dict(), "metrics": result.metrics, "step": result.step},
        out / f"rank{info.rank}.pt",
    )
    torch.distributed.destroy_process_group()
