#!/usr/bin/env bash
# Install ctxtrain into ./.venv (created if missing). Idempotent; quickstart.sh and test.sh call it.
#   bash launch/install.sh          # the package
#   bash launch/install.sh dev      # + test dependencies, and Chromium/shellcheck for the report and script tests
# torch is installed first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build onto CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CTXTRAIN_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.5"            # CUDA build on a GPU machine
  else
    # On machines whose pip has no local CPU build, point CTXTRAIN_TORCH_INDEX at
    # https://download.pytorch.org/whl/cpu to avoid the CUDA wheels.
    python -m pip install -q "torch==${CTXTRAIN_TORCH:-2.13.0}" ${CTXTRAIN_TORCH_INDEX:+--index-url "$CTXTRAIN_TORCH_INDEX"}
  fi
fi

if [ "${1:-}" = "dev" ]; then
  python -m pip install -q -e ".[dev]"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=""
    command -v chromium >/dev/null 2>&1 || need="$need chromium"
    command -v shellcheck >/dev/null 2>&1 || need="$need shellcheck"
    if [ -n "$need" ]; then
      # shellcheck disable=SC2086  # $need is a list of package names
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >/dev/null \
        || echo "install.sh: could not apt-get install$need; the tests that need it will be skipped" >&2
    fi
  fi
else
  python -m pip install -q -e .
fi
python -c "import ctxtrain, torch; print(f'ctxtrain {ctxtrain.__version__} with torch {torch.__version__} in $VENV')"
