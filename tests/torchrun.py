"""Launch test workers with torchrun (gloo on CPU): one place for the command, environment,
port and the timeout that stops processes left waiting in a collective."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(log: Path, world: int, *args: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    # Output to a file, not a pipe: workers left waiting in a collective (processes out of
    # step) would hold a pipe open. On a timeout SIGTERM makes torchrun stop its workers.
    with open(log, "w") as output:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=output)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)
            pytest.fail(f"torchrun timed out (processes out of step?): {log.read_text()[-4000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]
