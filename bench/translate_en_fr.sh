#!/usr/bin/env bash
# The README's translation result: the encoder-decoder on the full Debian gettext en->fr recipe, its training
# wall time on this machine, then sacreBLEU BLEU/chrF on every held-out pair next to the copy-source baseline.
#   bash bench/translate_en_fr.sh [DATA] [RUN_DIR] [overrides...]
#   (defaults data/en_fr_full, runs/translate_en_fr; a quick smoke run: ... --train.max_steps=4)
set -euo pipefail
data=${1:-data/en_fr_full}
run=${2:-runs/translate_en_fr}
shift $(( $# < 2 ? $# : 2 ))
[ -f "$data/index.json" ] || ctxtrain prepare --recipe debian-gettext-fr --out "$data" --no-progress
start=$(date +%s)
ctxtrain train configs/translate_en_fr.yaml --data.path="$data" --train.run_dir="$run" --no-resume \
  --tracking.enabled=false "$@"
echo "training wall time: $(( $(date +%s) - start )) s on $(nproc --all) CPU cores"
ctxtrain eval "$run" --split val
ctxtrain eval "$run" --split val --beam 4
