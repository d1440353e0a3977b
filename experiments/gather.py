"""Gather an expert-parallel run's sharded checkpoint into a single-process one.

``python experiments/gather.py --checkpoint runs/default/checkpoint.pt --out runs/default/gathered``

A run trained with ``--set train.expert_parallel=P`` under ``torchrun`` writes an index
``checkpoint.pt`` and one ``checkpoint.expert<i>of<P>.step<s>.pt`` per expert shard. This
writes ``<out>/checkpoint.pt`` with every expert, the optimizer state in the whole model's
parameter order and ``train.expert_parallel = 1`` (and the run's ``config.json``), which
``energy_report.py``, ``export.py``, ``generate.py`` and a single-process ``--resume-from``
read. The steps are :func:`spiking_moe.evaluation.gather_checkpoint`.
"""

import sys

from spiking_moe.cli import gather_main

if __name__ == "__main__":
    sys.exit(gather_main())
