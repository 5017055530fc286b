#!/usr/bin/env bash
# The one prepared script for a lent GPU: bench/longseq.py --gpu (lm_1b against HF and HF + Liger), its table on
# stdout and its JSON under $OUT. The GPU image has torch, transformers and triton but not DeepSpeed or Liger:
#   bash bench/gpu.sh --fetch   # here, before the GPU is lent: wheels of what the image lacks into .whl/
#   bash bench/gpu.sh           # on the GPU machine (the device tool carries .whl/): install them, run the bench
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
  # DeepSpeed ships a source package only: built once here into a pure-Python wheel
  python -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
  python -m pip download -q --no-deps -d .whl liger-kernel hjson ninja py-cpuinfo einops pydantic \
    annotated-types typing-inspection typing-extensions
  for version in 3.10 3.11 3.12; do  # compiled dependencies, for whichever Python the image has
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 -d .whl msgpack pydantic-core psutil
  done
  exit 0
fi
# no network there: what the image lacks comes from .whl/, what it has stays
python -m pip install -q --no-index --find-links .whl deepspeed==0.19.8 liger-kernel
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the image's 9.0a breaks DeepSpeed's op builder
export PYTHONPATH="$PWD/src:$PWD"
OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
export OUT
python bench/longseq.py --gpu --budget-min "${BUDGET_MIN:-11}" --json "$OUT/longseq_gpu_table.json"
