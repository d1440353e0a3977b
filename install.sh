#!/usr/bin/env bash
# Install spiking-moe (editable, with its dev tools) into the current Python environment,
# keeping whatever torch is already there.
#
# Why not plain `pip install -e ".[dev]"`: norse declares torchvision, and an unconstrained
# torchvision resolves to the newest release, which requires the newest torch, so pip would
# replace an installed torch (e.g. a CPU build) with a multi-GB CUDA build. We pin torch to the
# installed version and torchvision to its paired release. With no torch at all we install
# TORCH_SPEC (default torch==2.13.0; set e.g. TORCH_SPEC=torch to take your platform's default).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
read -r TORCH_VERSION TORCH_MINOR < <("$PYTHON" -c \
  "import torch; v = torch.__version__.split('+')[0]; print(v, v.split('.')[1])")
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntorchvision==0.%s.*\n' "$TORCH_VERSION" "$((TORCH_MINOR + 15))" >"$constraints"

# "events": tonic for event datasets (data.event_reader = "tonic"; it pulls librosa), so CI
# tests that path. tonic declares no torch (only its own "torch" extra does); the constraints
# keep the installed torch regardless.
pip_install -c "$constraints" -e ".[dev,events]"
# Optional peers for adapters, tests and benchmarks. SpikingJelly declares torchvision and
# torchaudio (no CPU builds here), so it goes in without its dependencies.
pip_install --no-deps "spikingjelly>=0.0.0.0.14"
pip_install -c "$constraints" "loguru>=0.7"
# Triton ships with CUDA builds of torch; elsewhere its interpreter runs our kernels' tests
# on the CPU (TRITON_INTERPRET=1).
"$PYTHON" -c "import triton" >/dev/null 2>&1 || pip_install -c "$constraints" triton
"$PYTHON" -c "import torch, spiking_moe, energy; print('spiking-moe installed with torch', torch.__version__)"
