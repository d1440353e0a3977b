"""Train one experiment: ``python experiments/train.py --config experiments/configs/default.toml``.

Options: ``--out runs/<name>`` (run folder), ``--resume`` (continue from its checkpoint),
``--device cpu|cuda|cuda:N``. Under ``torchrun --nproc_per_node=N`` it trains with DDP.
The steps (config -> data -> model -> train -> test) are in :func:`spiking_moe.cli.train_main`,
which the ``spiking-moe-train`` command runs too.
"""

import sys

from spiking_moe.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
