"""`import energy` stays light: no SNN framework, no spiking_moe, no TensorBoard."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["spiking_moe", "snntorch", "norse", "spikingjelly", "tensorboard", "torchvision"]


def heavy_modules_after(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that then prints the HEAVY modules it imported."""
    code += f"\nprint([m for m in {HEAVY!r} if m in sys.modules])\n"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )


def test_import_energy_pulls_in_no_framework():
    loaded = heavy_modules_after(
        "import sys, energy, energy.tensorboard, energy.counting, energy.counts, energy.rules, "
        "energy.adapters, energy.report, energy.profiles"
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_counting_a_model_does_not_import_frameworks_either():
    loaded = heavy_modules_after(
        "import sys, torch, energy\n"
        "energy.estimate(torch.nn.Linear(3, 2), torch.ones(2, 1, 3), profile='loihi')"
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
