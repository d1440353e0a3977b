"""Export a trained model as a NIR deployment bundle.

``python experiments/export.py --checkpoint runs/default/checkpoint.pt --out runs/default/nir``

Writes one NIR graph per part (input layer, each expert, each MoE layer's router projection
and output neuron, the readout) and ``manifest.json`` (the routing rule, how the parts
connect, the decoding), and prints each part's neurons, synapses and largest fan-in.
``--dt`` sets the time step the NIR time constants are written for (default 1e-4, what
snnTorch's ``import_from_nir`` assumes). Load it back with ``spiking_moe.nir.load_bundle``.
The steps are :func:`spiking_moe.nir.export_bundle`.
"""

import sys

from spiking_moe.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
