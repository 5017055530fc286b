#!/usr/bin/env bash
# The loader against a plain tar read on the stdlib shards, over the settings in the README's table.
#   bash bench/data_loader.sh [SHARDS]      (default data/stdlib; made by: ctxtrain prepare --recipe stdlib --out data/stdlib)
set -euo pipefail
shards=${1:-data/stdlib}
for workers in 0 1 2; do
  for shape in "256 8" "2048 8" "8192 1" "8192 2" "32768 1"; do
    read -r seq batch <<< "$shape"
    set -- "$seq" "$batch"
    echo "== seq_len $1, batch $2, workers $workers"
    ctxtrain data bench "$shards" --seq-len "$1" --batch-size "$2" --workers "$workers"
  done
done
