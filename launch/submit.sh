#!/usr/bin/env bash
# Submit a training job to a Ray cluster and follow its logs.
#   RAY_API_SERVER_ADDRESS=http://HEAD:8265 bash launch/submit.sh configs/lm_1b.yaml --train.run_dir=/shared/runs/x
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f "${CTXTRAIN_VENV:-.venv}/bin/activate" ] && . "${CTXTRAIN_VENV:-.venv}/bin/activate"
job=$(ctxtrain submit "$@")
echo "submitted $job; ctxtrain status $job | ctxtrain stop $job"
exec ctxtrain logs "$job" --follow
