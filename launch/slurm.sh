#!/usr/bin/env bash
# Slurm wrapper: submit cluster/slurm.sbatch (Ray head + workers on the allocation, then ctxtrain train).
#   bash launch/slurm.sh configs/lm_1b.yaml --train.run_dir=/shared/runs/lm_1b      # NODES=4 to change size
set -euo pipefail
cd "$(dirname "$0")/.."
exec sbatch --nodes="${NODES:-2}" cluster/slurm.sbatch "$@"
