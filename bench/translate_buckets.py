"""Length-bucketed translation batches: the encoder-decoder's real target tokens/s with `data.length_buckets`
on and off (the random order of earlier versions), on the full Debian gettext en->fr recipe at the settings of
configs/translate_en_fr.yaml (2 workers x 32 pairs, sources and targets cut at 48 ids).

    ctxtrain prepare --recipe debian-gettext-fr --out data/en_fr_full
    python bench/translate_buckets.py [--data data/en_fr_full] [--steps 150] [--repeats 2]

Each repeat trains both variants for --steps steps from scratch, one after the other (off, then on), and
reads tokens/s (real target tokens, as metrics.jsonl counts them) from every logged record after the first
(start-up and the first steps excluded); the figure is the median over all of them. Also prints the padding
ratio of one epoch in each order (tokens computed, source and decoder input padded to each batch's longest,
over the real ones) from the loader itself, and the ratios on versus off.
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


def epoch_padding(data: str, buckets: bool) -> float:
    """One epoch of the config's 2 ranks, in the order training reads."""
    d, workers = load_config(CONFIG).data, load_config(CONFIG).cluster.workers
    batches = []
    for rank in range(workers):
        batches += list(StreamingLoader(data, batch_size=d.batch_size, rank=rank, world_size=workers,
                                        shuffle_buffer=d.shuffle_buffer, max_src_len=d.max_src_len,
                                        max_tgt_len=d.max_tgt_len, loop=False,
                                        buckets=None if buckets else 0))
    return padding_ratio(batches)


def tokens_per_s(data: str, buckets: bool, steps: int, log_every: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIG), f"--data.path={data}",
               f"--train.run_dir={run}", "--no-resume", "--tracking.enabled=false",
               f"--train.max_steps={steps}", f"--train.log_every={log_every}", "--train.eval_every=0",
               f"--checkpoint.every={steps}", f"--data.length_buckets={str(buckets).lower()}"]
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
    args = ap.parse_args()
    if not (Path(args.data) / "index.json").is_file():
        sys.exit(f"{args.data}: no prepared data; run ctxtrain prepare --recipe debian-gettext-fr --out "
                 f"{args.data}")
    pad = {b: epoch_padding(args.data, b) for b in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for b in (False, True):
            got = tokens_per_s(args.data, b, args.steps, args.log_every)
            rates[b] += got
            print(f"repeat {i + 1}: buckets {'on ' if b else 'off'} {statistics.median(got):8.0f} target "
                  "tokens/s", flush=True)
    med = {b: statistics.median(r) for b, r in rates.items()}
    print(f"\n{'order':<18}{'padding ratio':>14}{'target tokens/s':>17}")
    for b, name in ((False, "random (off)"), (True, "length buckets")):
        print(f"{name:<18}{pad[b]:>14.3f}{med[b]:>17.0f}")
    print(f"buckets / random: padding {pad[True] / pad[False]:.2f}x, tokens/s {med[True] / med[False]:.2f}x")


if __name__ == "__main__":
    main()
