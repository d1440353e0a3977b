"""Sample text from a trained language model:
``python experiments/generate.py --checkpoint runs/lm_moe/checkpoint.pt --prompt "def "``.

Options: ``--max-new-tokens N`` (default 200), ``--temperature T`` (default 0.8; 0 takes the most
likely byte), ``--seed S``, ``--device cpu|cuda``. The command is
:func:`spiking_moe.cli.generate_main` (``spiking-moe-generate`` runs it too).
"""

import sys

from spiking_moe.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
