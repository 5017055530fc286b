"""Does lm_tiny learn? Its held-out perplexity against an interpolated 3-gram model of the same tokens.

    ctxtrain prepare --recipe stdlib --out data/stdlib
    ctxtrain train configs/lm_tiny.yaml --train.run_dir=runs/lm_tiny
    ctxtrain export runs/lm_tiny --out runs/lm_tiny/export
    python bench/lm_vs_ngram.py --data data/stdlib --model runs/lm_tiny/export

Both models are scored on exactly the same target tokens: the val split's stream (documents joined with
EOS, as the loader builds it) cut into non-overlapping windows of data.seq_len + 1; every token of a window
but the first is a target. The Transformer sees the window before each target; the 3-gram sees the two
tokens before it (the window's own, so both start cold at a window's first target).

The 3-gram: P(w | u, v) = l3 c(uvw)/c(uv) + l2 c(vw)/c(v) + l1 c(w)/N + l0 / V, the l's chosen by grid
search on the last 5% of its training tokens (held out from the counts for that search, then counted back
in). Two 3-grams are reported:
- "same tokens": counted on exactly the windows the LM trained on (rebuilt from the run's data cursor and
  seed: the loader's global order does not depend on the world size), the like-for-like comparison;
- "whole train split": counted on every train token, a stronger reference than the LM's budget allows.
Prints the perplexities and the ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ctxtrain.data.loader import StreamingLoader, read_stream_tokens
from ctxtrain.model import ModelConfig, build_model


def stream(data: str, split: str) -> np.ndarray:
    loader = StreamingLoader(data, split=split, shuffle=False)
    return read_stream_tokens(loader, epoch=0).astype(np.int64)


class Trigram:
    """Counts of a token stream; with skip_breaks, -1 marks a break that no n-gram crosses."""

    def __init__(self, tokens: np.ndarray, vocab: int, skip_breaks: bool = False):
        self.V = vocab
        t = tokens
        ok1 = t >= 0
        ok2 = ok1[:-1] & ok1[1:]
        ok3 = ok2[:-1] & ok1[2:]
        self.N = int(ok1.sum())
        self.uni = np.bincount(t[ok1], minlength=vocab).astype(np.float64)
        self.bi_keys, self.bi_counts = np.unique((t[:-1] * vocab + t[1:])[ok2], return_counts=True)
        tri = ((t[:-2] * vocab + t[1:-1]) * vocab + t[2:])[ok3]
        self.tri_keys, self.tri_counts = np.unique(tri, return_counts=True)
        # c(uv) and c(v) as contexts: pairs/tokens followed by a token
        self.ctx2_keys, self.ctx2_counts = np.unique((t[:-2] * vocab + t[1:-1])[ok3], return_counts=True)
        self.ctx1 = np.bincount(t[:-1][ok2], minlength=vocab).astype(np.float64)

    @staticmethod
    def _lookup(keys, counts, query):
        i = np.searchsorted(keys, query)
        i = np.minimum(i, len(keys) - 1)
        return np.where(keys[i] == query, counts[i], 0).astype(np.float64)

    def components(self, u, v, w):
        """(p3, p2, p1) maximum-likelihood estimates for each (u, v, w); 0 where the context is unseen."""
        V = self.V
        c_uvw = self._lookup(self.tri_keys, self.tri_counts, (u * V + v) * V + w)
        c_uv = self._lookup(self.ctx2_keys, self.ctx2_counts, u * V + v)
        c_vw = self._lookup(self.bi_keys, self.bi_counts, v * V + w)
        c_v = self.ctx1[v]
        p3 = np.divide(c_uvw, c_uv, out=np.zeros_like(c_uvw), where=c_uv > 0)
        p2 = np.divide(c_vw, c_v, out=np.zeros_like(c_vw), where=c_v > 0)
        p1 = self.uni[w] / self.N
        return p3, p2, p1

    def nll(self, comps, lambdas) -> float:
        p3, p2, p1 = comps
        l3, l2, l1, l0 = lambdas
        p = l3 * p3 + l2 * p2 + l1 * p1 + l0 / self.V
        return float(-np.log(p).mean())


def window_targets(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of seq_len + 1 (non-overlapping) and, for the 3-gram, (u, v, w) of every target position
    that has two tokens of the same window before it; the LM is scored on the same positions."""
    n = (len(tokens) - 1) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return windows, windows[:, 2:]


def trained_windows(data: str, run_dir: Path) -> np.ndarray:
    """The (seq_len + 1)-token windows the run consumed, in its order, from its newest checkpoint's cursor."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    cursor = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["loader"][0]
    d = cfg["data"]
    loader = StreamingLoader(data, seq_len=d["seq_len"], batch_size=d["batch_size"],
                             seed=cfg["train"]["seed"],
                             shuffle_buffer=d["shuffle_buffer"])
    L = d["seq_len"]
    out = []
    for epoch in range(cursor["epoch"] + 1):
        consumed = (cursor["consumed"] if epoch == cursor["epoch"]
                    else loader.batches_per_epoch() * loader.global_batch)
        if consumed == 0:
            continue
        units = loader.plan(epoch, 0).unit_of(np.arange(consumed))
        tokens = read_stream_tokens(loader, epoch).astype(np.int64)
        out.append(np.stack([tokens[u * L : u * L + L + 1] for u in units]))
    return np.concatenate(out)


def fit_lambdas(train: np.ndarray, vocab: int) -> tuple[float, float, float, float]:
    cut = int(len(train) * 0.95)
    model = Trigram(train[:cut], vocab)
    held = train[cut:]
    ok = (held[:-2] >= 0) & (held[1:-1] >= 0) & (held[2:] >= 0)
    comps = model.components(held[:-2][ok], held[1:-1][ok], held[2:][ok])
    grid = [x / 20 for x in range(1, 20)]
    best = None
    for l3, l2 in itertools.product(grid, grid):
        rest = 1.0 - l3 - l2
        if rest <= 0.02:
            continue
        lambdas = (l3, l2, rest * 0.9, rest * 0.1)
        nll = model.nll(comps, lambdas)
        if best is None or nll < best[0]:
            best = (nll, lambdas)
    return best[1]


@torch.no_grad()
def lm_nll(model_dir: Path, windows: np.ndarray, batch: int = 16) -> float:
    cfg_json = json.loads((model_dir / "config.json").read_text())
    cfg = ModelConfig(**cfg_json["ctxtrain_model"])
    model = build_model(cfg).eval()
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embed.weight"]
    model.load_state_dict(state)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i : i + batch])
        logits = model(w[:, :-1])[:, 1:]  # targets from position 2 on, as the 3-gram
        targets = w[:, 2:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                   reduction="sum").item()
        count += targets.numel()
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shards made by ctxtrain prepare")
    p.add_argument("--run", help="the LM's run directory (for the windows it trained on)")
    p.add_argument("--model", help="its `ctxtrain export` directory")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)

    vocab = json.loads((Path(args.data) / "index.json").read_text())["vocab_size"]
    val = stream(args.data, "val")
    windows, targets = window_targets(val, args.seq_len)
    u, v, w = windows[:, :-2].ravel(), windows[:, 1:-1].ravel(), targets.ravel()
    print(f"data: {args.data}: val {len(val):,} tokens; scored {w.size:,} val targets in {len(windows)} "
          f"windows of {args.seq_len + 1}")
    ppl = {}
    if args.run:
        seen = trained_windows(args.data, Path(args.run))
        sep = np.full((len(seen), 1), -1, dtype=np.int64)
        flat = np.concatenate([seen, sep], axis=1).ravel()
        model = Trigram(flat, vocab)
        lambdas = fit_lambdas(flat, vocab)
        ppl["3-gram, same tokens"] = math.exp(model.nll(model.components(u, v, w), lambdas))
        print(f"3-gram on the LM's {seen.shape[0]:,} training windows ({seen.size:,} tokens), lambdas "
              f"{tuple(round(x, 3) for x in lambdas)}: val ppl {ppl['3-gram, same tokens']:.2f}")
    train = stream(args.data, "train")
    model = Trigram(train, vocab)
    lambdas = fit_lambdas(train, vocab)
    ppl["3-gram, whole train split"] = math.exp(model.nll(model.components(u, v, w), lambdas))
    print(f"3-gram on the whole train split ({len(train):,} tokens), lambdas "
          f"{tuple(round(x, 3) for x in lambdas)}: val ppl {ppl['3-gram, whole train split']:.2f}")
    if args.model:
        lm = math.exp(lm_nll(Path(args.model), windows))
        print(f"lm ({args.model}): val ppl {lm:.2f}")
        for name, value in ppl.items():
            print(f"ratio lm / {name}: {lm / value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
