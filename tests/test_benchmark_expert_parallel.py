"""The expert-parallel benchmark (experiments/benchmarks/expert_parallel.py) in its tiny
configuration: it runs in 1 and 2 gloo processes, and the all-to-all bytes it measures equal
the exchange model of spiking_moe.parallel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "expert_parallel.py"


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["float", "bits"])
def test_quick_run_measures_the_bytes_the_exchange_model_predicts(tmp_path, exchange):
    out = tmp_path / "expert_parallel.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--exchange", exchange, "--json", str(out)],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    one, two = report["rows"]
    assert (one["world"], two["world"]) == (1, 2)
    for row in (one, two):
        assert row["tokens_per_s_total"] > 0 and row["step_ms"] > 0
        assert row["tokens_per_s_total"] == pytest.approx(
            row["world"] * row["tokens_per_s_per_process"]
        )
    # One process: nothing is exchanged.
    assert one["tokens_bytes_mean"] == one["metadata_bytes_mean"] == 0
    # Two processes: every rank's measured bytes equal the exchange model exactly, the part for
    # the other process too. Per own row: its T D spikes out (float32, or bits: T D / 8 bytes)
    # and its current's gradient (4 T D bytes, O = D); per received row: its current back and
    # its gradient back (4 T D each). Floats: 4 T (D + O) (R + R_in).
    config = report["config"]
    T, D = config["steps"], config["features"]
    row_out = 4 * T * D if exchange == "float" else T * D // 8
    assert T * D % 8 == 0
    assert two["measured_equals_exact_every_rank"]
    assert two["sum_measured_equals_sum_formula"]
    for rank in two["per_rank"]:
        R, R_in, mine = rank["rows_sent"], rank["rows_received"], rank["rows_local"]
        assert R == config["batch"] * config["k"]  # no capacity limit: no drops
        sent, received = row_out + 4 * T * D, 8 * T * D
        assert rank["tokens_bytes"] == R * sent + R_in * received
        assert rank["tokens_bytes_to_others"] == (R - mine) * sent + (R_in - mine) * received
        assert rank["tokens_bytes_forward"] == R * row_out + R_in * 4 * T * D
        assert rank["tokens_bytes_backward"] == (R + R_in) * 4 * T * D
        assert 0 < rank["tokens_bytes_to_others"] < rank["tokens_bytes"]
        assert 0 < rank["metadata_bytes"] < rank["tokens_bytes"] / 100
        assert rank["all_reduce_bytes"] > 0  # the dense gradients' all-reduce
    assert 0 < two["local_fraction"] < 1
    assert two["exchange_ms"] > 0


def test_nccl_without_enough_gpus_is_a_clear_error(capsys):
    import torch

    spec = importlib.util.spec_from_file_location("expert_parallel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cuda", "--worlds", str(found + 1)])
    assert f"NCCL needs one GPU per process; found {found}" in capsys.readouterr().err
