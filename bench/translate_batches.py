"""Translation batches with little padding: the encoder-decoder's real target tokens/s with each micro-batch
padded to its longest pair (random order, as ctxtrain did before), with `data.length_buckets` (pairs of about
one length a micro-batch) and with `data.pack_pairs` (the random order's pairs packed into rows), on the full
Debian gettext en->fr recipe at the settings of configs/translate_en_fr.yaml (2 workers x 32 pairs, sources
and targets cut at 48 ids).

    ctxtrain prepare --recipe debian-gettext-fr --out data/en_fr_full
    python bench/translate_batches.py [--data data/en_fr_full] [--steps 150] [--repeats 2] [--pack 128]

Each repeat trains every variant for --steps steps from scratch, one after the other, and reads tokens/s (real
target tokens, as metrics.jsonl counts them) from every logged record after the first (start-up and the first
steps excluded); the figure is the median over all of them. Also prints the padding ratio of one epoch in each
layout (tokens computed, source and decoder input as batched, over the real ones) from the loader itself, and
each variant's ratios to the padded random order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ctxtrain.config import load_config
from ctxtrain.data.loader import StreamingLoader, padding_ratio

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "translate_en_fr.yaml"


def epoch_padding(data: str, variant: dict) -> float:
    """One epoch of the config's 2 ranks, as training reads it."""
    d, workers = load_config(CONFIG).data, load_config(CONFIG).cluster.workers
    batches = []
    for rank in range(workers):
        batches += list(StreamingLoader(data, batch_size=d.batch_size, rank=rank, world_size=workers,
                                        shuffle_buffer=d.shuffle_buffer, max_src_len=d.max_src_len,
                                        max_tgt_len=d.max_tgt_len, loop=False,
                                        buckets=None if variant["buckets"] else 0, pack=variant["pack"]))
    return padding_ratio(batches)


def tokens_per_s(data: str, variant: dict, steps: int, log_every: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIG), f"--data.path={data}",
               f"--train.run_dir={run}", "--no-resume", "--tracking.enabled=false",
               f"--train.max_steps={steps}", f"--train.log_every={log_every}", "--train.eval_every=0",
               f"--checkpoint.every={steps}", f"--data.length_buckets={str(variant['buckets']).lower()}",
               f"--data.pack_pairs={variant['pack']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/en_fr_full")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pack", type=int, default=128, help="data.pack_pairs of the packed variant")
    args = ap.parse_args()
    if not (Path(args.data) / "index.json").is_file():
        sys.exit(f"{args.data}: no prepared data; run ctxtrain prepare --recipe debian-gettext-fr --out "
                 f"{args.data}")
    variants = {"random, padded": {"buckets": False, "pack": 0},
                "length buckets": {"buckets": True, "pack": 0},
                f"packed ({args.pack})": {"buckets": False, "pack": args.pack}}
    pad = {name: epoch_padding(args.data, v) for name, v in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, v in variants.items():
            got = tokens_per_s(args.data, v, args.steps, args.log_every)
            rates[name] += got
            print(f"repeat {i + 1}: {name:<16} {statistics.median(got):8.0f} target tokens/s", flush=True)
    med = {name: statistics.median(r) for name, r in rates.items()}
    base = next(iter(variants))
    print(f"\n{'batches':<18}{'padding ratio':>14}{'target tokens/s':>17}{'x random':>10}")
    for name in variants:
        print(f"{name:<18}{pad[name]:>14.3f}{med[name]:>17.0f}{med[name] / med[base]:>9.2f}x")


if __name__ == "__main__":
    main()
