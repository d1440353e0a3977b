"""The same evaluation, run twice in two fresh processes, gives the same logits and energy
counts to the bit with every "auto" choice on: the LIF kernel, the event-driven synapses'
density threshold (measured once per machine and kept: the second process reads it) and the
grouped expert GEMM (decided by a rule on the busy experts)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from spiking_moe.functional.kernels import calibration
from spiking_moe.strategies import CPU_GROUPED_MIN_EXPERTS

ROOT = Path(__file__).resolve().parent


def _run(out: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    env.pop("SPIKING_MOE_EVENT_DENSITY", None)
    worker = ROOT / "determinism_worker.py"
    done = subprocess.run(
        [sys.executable, str(worker), str(out), str(cache)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_fresh_processes_evaluate_to_the_same_bits(tmp_path):
    first = _run(tmp_path / "first.pt", tmp_path)
    assert (tmp_path / calibration.FILE_NAME).is_file(), "auto measured and kept a threshold"
    second = _run(tmp_path / "second.pt", tmp_path)
    assert first["classifier"]["busy"][0] >= CPU_GROUPED_MIN_EXPERTS, "grouped GEMM not taken"
    for name in ("classifier", "lm"):
        a, b = first[name], second[name]
        assert torch.equal(a["logits"], b["logits"]), name
        assert a["busy"] == b["busy"]
        assert a["counts"] == b["counts"] and a["dense"] == b["dense"], name
        assert any(layer["acs"] for layer in a["counts"])  # something was counted
