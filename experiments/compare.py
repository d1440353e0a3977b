"""The spiking MoE, the dense SNN and the ANN twin of one config at equal precision.

``python experiments/compare.py --config experiments/configs/default.toml``

Trains the three models over seeds (``--seeds 0,1,2``), plus a 4-bit QAT run of each
(``--qat 4``; ``--qat ''`` for none), evaluates each at fp32 and after post-training
quantization to 8 and 4 bits (``--bits 8,4``), and prices every evaluation's counted activity
under ``--profiles cmos45,cmos45_int8``, compute only and with memory traffic. ``--checkpoint
runs/x/checkpoint.pt`` (repeatable) evaluates trained runs instead. Writes and prints
``comparison.md`` (+ ``.json``, ``.png`` and TensorBoard) in ``--out runs/compare_<name>``.
The steps are :func:`spiking_moe.compare.run_comparison`.
"""

import sys

from spiking_moe.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
