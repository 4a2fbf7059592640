#!/usr/bin/env bash
# Sets everything up and runs the test suite: lint (ruff), the type check (mypy, configured in pyproject.toml),
# then pytest (with the reference-Caffe cross-checks when the sibling shared/tools/reference-caffe is present;
# they are skipped where the sibling shared/ folder does not exist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p .cache
REF_INSTALL=../shared/tools/reference-caffe/install.sh
if [ -f "$REF_INSTALL" ] && [ -z "${AMCT_REF_CAFFE_PYTHON:-}" ]; then
  if [ ! -x .cache/ref-caffe/bin/python ]; then
    echo "test: installing the reference Caffe into .cache/ref-caffe" >&2
    bash "$REF_INSTALL" "$PWD/.cache/ref-caffe" >.cache-ref-install.log 2>&1 || {
      cat .cache-ref-install.log >&2; echo "test: reference Caffe install failed" >&2; exit 1; }
    rm -f .cache-ref-install.log
  fi
  export AMCT_REF_CAFFE_PYTHON=$PWD/.cache/ref-caffe/bin/python
fi
.venv/bin/ruff check src tests scripts benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
