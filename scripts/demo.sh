#!/usr/bin/env bash
# Sets everything up and runs the main job: `amct-caffe demo` on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/amct-caffe demo "$@"
