"""Re-count a trained model's energy on its test set under any hardware profile.

``python experiments/energy_report.py --checkpoint runs/default/checkpoint.pt --profile loihi``

Options: ``--out DIR`` (default: the checkpoint's folder), ``--device cpu|cuda|cuda:N``,
``--num-batches N`` (test batches to count; default all), ``--set section.key=value`` (changes
the stored config, e.g. a moved ``data.root``). Prints the Markdown report and writes
``report_<profile>.json``/``.md`` and TensorBoard tags ``test_energy_<profile>/...`` into the
folder. The steps are :func:`spiking_moe.evaluation.evaluate_checkpoint`.
"""

import sys

from spiking_moe.cli import energy_report_main

if __name__ == "__main__":
    sys.exit(energy_report_main())
