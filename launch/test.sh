#!/usr/bin/env bash
# Install with the test extras, lint (ruff) and run the whole test suite (what CI runs).
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh dev
# shellcheck disable=SC1091
. "${CTXTRAIN_VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
# DeepSpeed's CPU accelerator only where there is no CUDA device (on a GPU machine DeepSpeed finds CUDA itself)
if ! python -c "from ctxtrain.devices import cuda_available; raise SystemExit(not cuda_available())"; then
  export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
# Lint first (pyproject.toml's [tool.ruff]: the 110-column limit, pyflakes, sorted imports): seconds, not minutes
if ! ruff check --quiet src tests bench; then
  echo "test.sh: ruff check found the problems above (ruff check --fix src tests bench mends most)" >&2
  exit 1
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests; that is a broken suite, not a pass" >&2
  exit 1
fi
exit "$rc"
