"""`import energy` stays light: no SNN framework, no spiking_moe, no TensorBoard."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["spiking_moe", "snntorch", "norse", "spikingjelly", "tensorboard", "torchvision"]


def test_import_energy_pulls_in_no_framework():
    code = (
        "import sys, energy, energy.tensorboard, energy.counting, energy.counts, energy.rules, "
        "energy.adapters, energy.report, energy.profiles\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_counting_a_model_does_not_import_frameworks_either():
    code = (
        "import sys, torch, energy\n"
        "energy.estimate(torch.nn.Linear(3, 2), torch.ones(2, 1, 3), profile='loihi')\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
