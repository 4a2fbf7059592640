#!/usr/bin/env bash
# Sets up ./.venv with amct-caffe (editable) and its test tools. Safe to run again: it only adds what is missing.
# Torch: when the venv has none, the CPU build torch==2.13.0 is installed explicitly (a bare "torch"
# requirement may resolve to a multi-GB CUDA build); the package itself accepts any torch >= 2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)" >&2
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[test]"
