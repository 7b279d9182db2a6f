#!/usr/bin/env bash
# The main job on the embedded default: prepare -> train -> export -> serve -> evaluate -> report.
# Creates the virtualenv first when needed. Extra args are config overrides (train.max_steps=100).
#   bash scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${CPO_RAY_VENV:-.venv}"
exec "$VENV/bin/cpo-ray" pipeline --config "${CPO_RAY_CONFIG:-configs/tiny-cpu.yaml}" "$@"
