"""Train one experiment: ``python experiments/train.py --config experiments/configs/default.toml``.

Options: ``--out runs/<name>`` (run folder), ``--resume`` (continue from its checkpoint),
``--resume-from FILE`` (e.g. ``checkpoint.prev.pt``), ``--seeds 0,1,2`` (one run per seed and a
mean ± std summary), ``--set section.key=value`` (repeatable), ``--device cpu|cuda|cuda:N``.
Under ``torchrun --nproc_per_node=N`` it trains with DDP; add ``--set train.expert_parallel=P``
(``P`` dividing ``N`` and ``model.moe.num_experts``) to split each MoE layer's experts over groups of
``P`` processes (a sharded checkpoint: ``experiments/gather.py`` makes it a single-process one).
The command is
:func:`spiking_moe.cli.train_main` (``spiking-moe-train`` runs it too); its steps (config ->
data -> model -> train -> test) are :func:`spiking_moe.experiment.run_experiment`.
"""

import sys

from spiking_moe.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
