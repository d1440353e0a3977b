"""Train one spiking MoE per (number of experts, k) and compare accuracy and energy.

``python experiments/sweep.py --config experiments/configs/default.toml --experts 2,4,8 --k 1,2``

Options: ``--out runs/sweep_<name>`` (one subfolder ``E<E>_k<k>`` per pair), ``--seeds 0,1``
(each pair once per seed; the table shows mean ± std), ``--max-steps N``, ``--set
section.key=value``, ``--device cpu|cuda|cuda:N``. Pairs with k > E are skipped with a note.
Writes and prints ``sweep.md`` (+ ``sweep.json``) and plots ``sweep.png``. The steps are
:func:`spiking_moe.sweep.run_sweep`.
"""

import sys

from spiking_moe.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
