#!/usr/bin/env bash
# The whole test suite: fast unit tests AND the integration tests (Ray cluster, DeepSpeed workers,
# vLLM, Serve, ray job submit). Creates the virtualenv first when needed.
#   bash scripts/test.sh             (extra args go to pytest, e.g. -k loss)
# A plain `.venv/bin/pytest` runs only the fast CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${CPO_RAY_VENV:-.venv}"
export TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check cpo_ray jobs bench tests
"$VENV/bin/ruff" format --check cpo_ray jobs bench tests
# pytest exits 5 when nothing was collected: set -e makes that (like any failure) fail this script.
exec "$VENV/bin/pytest" -m "integration or not integration" -p no:cacheprovider --durations=15 "$@"
