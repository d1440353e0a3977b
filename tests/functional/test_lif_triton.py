"""The Triton LIF kernel against the reference loop: on CUDA, and through Triton's interpreter.

The interpreter must be chosen before Triton compiles the kernels (``TRITON_INTERPRET=1`` at
import), so the CPU check runs in a fresh subprocess.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lif_cases import SURROGATE_NAMES, assert_same, make_case, run_case

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import itertools, torch
    from lif_cases import SURROGATE_NAMES, assert_same, make_case, run_case
    from spiking_moe.functional import lif
    from spiking_moe.functional.kernels import triton_lif

    x = torch.zeros(2, 3)
    assert lif._choose_provider(x, None, 0.9, 1.0, "triton") is triton_lif.TRITON
    assert lif._choose_provider(x, None, 0.9, 1.0, "auto") is not triton_lif.TRITON  # CPU
    count = 0
    grid = itertools.product(
        SURROGATE_NAMES, ["subtract", "zero"], [torch.float32, torch.float64]
    )
    for i, (surrogate, reset, dtype) in enumerate(grid):
        learn, detach, membrane, v0 = i % 2 == 0, i % 3 == 0, i % 4 < 2, i % 5 < 3
        # 300 neurons: two programs of 256, the second one masked.
        case = make_case(i, 12, (3, 100), dtype, learn, True, v0)
        kwargs = dict(reset=reset, surrogate=surrogate, alpha=None if i % 2 else 1.7,
                      detach_reset=detach, return_membrane=membrane)
        assert_same(run_case("reference", case, learn, **kwargs),
                    run_case("triton", case, learn, **kwargs))
        count += 1
    print("checked", count)
    """
)


# The kernel must take its surrogate ids from SURROGATE_IDS alone: renumber the table before
# the Triton module reads it, and every surrogate must still match the reference loop.
RENUMBERED_TABLE_SCRIPT = textwrap.dedent(
    """
    import types, torch
    from lif_cases import SURROGATE_NAMES, assert_same, make_case, run_case
    from spiking_moe.functional.kernels import protocol

    old = dict(protocol.SURROGATE_IDS)
    renumbered = {name: 10 + len(old) - sid for name, sid in old.items()}
    assert not set(renumbered.values()) & set(old.values())
    protocol.SURROGATE_IDS = types.MappingProxyType(renumbered)
    from spiking_moe.functional.kernels import triton_lif

    assert triton_lif.SURROGATE_IDS is protocol.SURROGATE_IDS
    count = 0
    for i, surrogate in enumerate(SURROGATE_NAMES):
        case = make_case(i, 10, (2, 40), torch.float32, True, True, True)
        kwargs = dict(surrogate=surrogate, return_membrane=True)
        assert_same(run_case("reference", case, True, **kwargs),
                    run_case("triton", case, True, **kwargs))
        count += 1
    print("checked", count)
    """
)


def run_in_interpreter(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_equals_reference_in_the_interpreter():
    result = run_in_interpreter(INTERPRETER_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "checked 20" in result.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_follows_a_renumbered_surrogate_table():
    result = run_in_interpreter(RENUMBERED_TABLE_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"checked {len(SURROGATE_NAMES)}" in result.stdout


def test_triton_module_imports_without_a_gpu():
    # Importing must never fail on a CPU-only machine; it only reports why it cannot run.
    from spiking_moe.functional.kernels import triton_lif

    reason = triton_lif.unavailable_reason(torch.zeros(2, 2))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert reason is not None and "CUDA" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_triton_kernel_equals_reference_on_cuda(reset, surrogate):
    from spiking_moe.functional import lif
    from spiking_moe.functional.kernels import triton_lif

    x = torch.zeros(2, 3, device="cuda")
    assert lif._choose_provider(x, None, 0.9, 1.0, "auto") is triton_lif.TRITON
    for i, (dtype, learn, detach, membrane, v0) in enumerate(
        itertools.product([torch.float32, torch.float64], *[[False, True]] * 4)
    ):
        case = make_case(i, 30, (4, 700), dtype, learn, learn, v0, device="cuda")
        kwargs = dict(
            reset=reset, surrogate=surrogate, detach_reset=detach, return_membrane=membrane
        )
        assert_same(
            run_case("reference", case, learn, **kwargs),
            run_case("auto", case, learn, **kwargs),
        )
