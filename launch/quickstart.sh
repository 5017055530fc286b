#!/usr/bin/env bash
# Fresh machine to a trained model: install, prepare the Python stdlib corpus, train lm_tiny on embedded Ray.
#   bash launch/quickstart.sh [--section.field=value ...]     (overrides go to `ctxtrain train`)
# ~2 min to install, ~15 s to prepare, 7-13 min to train on 2 CPU cores (2 Ray workers, ZeRO-3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
# shellcheck disable=SC1091
. "${CTXTRAIN_VENV:-.venv}/bin/activate"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
[ -f data/stdlib/index.json ] || ctxtrain prepare --recipe stdlib --out data/stdlib
ctxtrain train configs/lm_tiny.yaml "$@"
echo "quickstart: done; metrics in runs/lm_tiny/metrics.jsonl, checkpoints in runs/lm_tiny/checkpoints"
