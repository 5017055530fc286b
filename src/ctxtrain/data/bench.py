"""`ctxtrain data bench SHARDS`: the loader against a plain sequential tar read of the same shards.

    ctxtrain data bench data/stdlib --seq-len 2048 --batch-size 8 --workers 1

The plain read is Python's tarfile over the train shards in index order, decoding every token array
with numpy (no shuffling, no packing, one process). The loader reads the same shards as one rank:
seeded shard order, block shuffle, packing into windows, DataLoader workers (started once, as in
training). Both read the data `epochs` times and count the tokens they deliver; the loader's rate over
the plain rate is the ratio. Each side runs `repeats` times, the best kept.
"""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np

from ctxtrain.data.loader import Dataset, StreamingLoader


def plain_read(path: str, epochs: int) -> tuple[int, float]:
    """(tokens, seconds) of sequential tarfile + numpy reads of every train shard, `epochs` times."""
    ds = Dataset(path)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(epochs):
        for shard in ds.shards("train"):
            with tarfile.open(shard.local()) as tar:
                for member in tar:
                    tokens += np.load(io.BytesIO(tar.extractfile(member).read())).size
    return tokens, time.perf_counter() - t0


def loader_read(path: str, seq_len: int, batch_size: int, workers: int, epochs: int) -> tuple[int, float,
                                                                                              float]:
    """(tokens, seconds, start-up seconds) of `epochs` epochs through the StreamingLoader as one rank.

    Tokens and seconds count from the first batch on: the workers' start-up (a fork and a first shard
    open, once per run in training) is returned separately rather than charged to a 100 ms epoch.
    """
    loader = StreamingLoader(path, seq_len=seq_len, batch_size=batch_size, num_workers=workers, seed=0)
    t0 = time.perf_counter()
    tokens, batches, first = 0, epochs * loader.batches_per_epoch(), None
    for i, batch in enumerate(loader, 1):
        if first is None:
            first = time.perf_counter()
        else:
            tokens += int(batch["n_tokens"])
        if i == batches:
            break
    return tokens, time.perf_counter() - first, first - t0


def run_bench(path: str, seq_len: int, batch_size: int, workers: int, epochs: int = 3,
              repeats: int = 3) -> dict:
    # a missing or truncated shard: one line, before timing
    Dataset(path).usable_shards("train", skip_corrupt=False)
    plain = max((plain_read(path, epochs) for _ in range(repeats)), key=lambda r: r[0] / r[1])
    loaded = max((loader_read(path, seq_len, batch_size, workers, epochs) for _ in range(repeats)),
                 key=lambda r: r[0] / r[1])
    plain_rate, loader_rate = plain[0] / plain[1], loaded[0] / loaded[1]
    return {
        "loader_startup_s": loaded[2],
        "plain_tokens": plain[0], "plain_tokens_per_s": plain_rate,
        "loader_tokens": loaded[0], "loader_tokens_per_s": loader_rate,
        "ratio": loader_rate / plain_rate,
        "seq_len": seq_len, "batch_size": batch_size, "workers": workers, "epochs": epochs,
    }


def format_bench(r: dict) -> str:
    return (
        f"plain tar read : {r['plain_tokens_per_s'] / 1e6:8.1f} M tokens/s ({r['plain_tokens']:,} tokens)\n"
        f"loader         : {r['loader_tokens_per_s'] / 1e6:8.1f} M tokens/s ({r['loader_tokens']:,} tokens; "
        f"seq_len {r['seq_len']}, batch {r['batch_size']}, {r['workers']} workers, {r['epochs']} epochs; "
        f"first batch after {r['loader_startup_s'] * 1e3:.0f} ms)\n"
        f"ratio loader/plain: {r['ratio']:.2f}"
    )
