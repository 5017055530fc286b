"""How much of its context a model uses: the loss by position in the window, and passkey retrieval.

Each probe is a function of (model, tokenizer or windows, settings) -> numbers (torch on the model side only):

- **Loss by position** (`loss_by_position`): the next-token loss of held-out windows averaged in log-spaced
  buckets of positions ([0, 1), [1, 2), [2, 4), ... up to the window's length). While more context helps, the
  loss keeps falling towards the end of the window. Summaries: the context gain (first bucket's loss minus the
  last's) and the effective context (the end of the last bucket whose loss is below the previous bucket's by
  more than `eps` nats).
- **Passkey retrieval** (`passkey`), in the standard form of Mohtashami & Jaggi (2023) as LongLoRA and others
  run it: an instruction, filler, the needle " The pass key is 12345. Remember it. 12345 is the pass key." (a
  random 5-digit key) at a depth in [0, 1] of the filler, more filler, and the question " What is the pass
  key? The pass key is". The filler is the classic repeated sentences, or held-out text of the run's corpus.
  Scored by exact match of the key's tokens, decoded greedily through the KV cache (`scoring="greedy"`) or by
  the argmax at each of the key's positions in one teacher-forced forward pass (`scoring="forced"`: what runs
  where a cache of the whole prompt does not fit; both agree where both run). Over a grid of lengths x depths
  with a fixed seed; the effective length is the longest length at which every depth scores >= 90%. Chance: a
  model that guesses a uniformly random 5-digit key is right 1 time in 90,000 (0.001%).

A new RULER-style task is another function returning the same kind of grid (`PasskeyResult`'s shape).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
         "quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
CHANCE = 1 / 90_000  # a uniformly random 5-digit key
PASS = 0.9  # the accuracy every depth must reach at the effective length


class ProbeError(ValueError):
    """A setting the probe cannot honour (a length the model cannot position, a depth outside [0, 1], filler
    too short); the CLI turns it into one line."""


# ---------------------------------------------------------------------------------------------------------
# Loss by position


def buckets(length: int) -> list[tuple[int, int]]:
    """Log-spaced position buckets [0, 1), [1, 2), [2, 4), ... covering 0..length-1."""
    edges, e = [0], 1
    while e < length:
        edges.append(e)
        e *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def token_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """Next-token losses (B, L) of windows (B, L + 1), in float32 (the model's `token_scores`: the [L, V]
    logits never exist whole)."""
    return model(windows[:, :-1], windows[:, 1:], scores=True)[..., 0]


@dataclass
class PositionLoss:
    """The loss of each bucket of positions and its token count; the window's loss is their token-weighted
    mean."""

    buckets: list[tuple[int, int]]
    loss: list[float]
    tokens: list[int]
    eps: float = 0.01

    @property
    def mean(self) -> float:
        return sum(loss * n for loss, n in zip(self.loss, self.tokens)) / max(1, sum(self.tokens))

    @property
    def context_gain(self) -> float:
        """How much lower the loss is at the end of the window than at its start (nats)."""
        return self.loss[0] - self.loss[-1]

    @property
    def effective_context(self) -> int:
        """The end of the last bucket whose loss is below the previous bucket's by more than eps (1: context
        never helped)."""
        effective = self.buckets[0][1]
        for i in range(1, len(self.loss)):
            if self.loss[i - 1] - self.loss[i] > self.eps:
                effective = self.buckets[i][1]
        return effective

    def to_dict(self) -> dict:
        return {"buckets": [list(b) for b in self.buckets], "loss": self.loss, "tokens": self.tokens,
                "mean": self.mean, "context_gain": self.context_gain,
                "effective_context": self.effective_context, "eps": self.eps}


class PositionSums:
    """Running sums and counts of token losses in the buckets of one window length, from any share of the
    positions (a rank's slice under sequence parallelism, a rank's windows): they add up across ranks
    (`merge`), and `result` is the PositionLoss."""

    def __init__(self, length: int):
        self.spans = buckets(length)
        self.sums, self.counts = [0.0] * len(self.spans), [0] * len(self.spans)

    def add(self, losses: torch.Tensor, offset: int = 0) -> None:
        """losses (B, T) of positions offset..offset + T (those past the last bucket are left out)."""
        for i, (a, b) in enumerate(self.spans):
            part = losses[:, max(a - offset, 0):max(b - offset, 0)]
            self.sums[i] += float(part.double().sum())
            self.counts[i] += part.numel()

    @staticmethod
    def merge(parts: list["PositionSums"]) -> "PositionSums":
        out = parts[0]
        for p in parts[1:]:
            out.sums = [a + b for a, b in zip(out.sums, p.sums)]
            out.counts = [a + b for a, b in zip(out.counts, p.counts)]
        return out

    def result(self, eps: float = 0.01) -> PositionLoss:
        if not all(self.counts):
            raise ProbeError("no window to score: the split holds no window of this length; pass a shorter "
                             "length")
        return PositionLoss(self.spans, [s / n for s, n in zip(self.sums, self.counts)], self.counts, eps)


def position_sums(model, windows: Iterable[torch.Tensor], length: int) -> PositionSums:
    """The bucket sums of batches of windows (B, length + 1) on a plain model."""
    sums = PositionSums(length)
    for batch in windows:
        sums.add(token_losses(model, batch))
    return sums


def loss_by_position(model, windows: Iterable[torch.Tensor], eps: float = 0.01) -> PositionLoss:
    """The loss by position bucket over batches of windows (B, L + 1), all of one length."""
    windows = iter(windows)
    first = next(windows, None)
    if first is None:
        raise ProbeError("no window to score: the split holds no window of this length; pass a shorter "
                         "length")
    return position_sums(model, [first, *windows], first.shape[1] - 1).result(eps)


# ---------------------------------------------------------------------------------------------------------
# Passkey retrieval


@dataclass
class PasskeyPrompt:
    """A prompt of exactly `length` tokens and the key's tokens that should follow it."""

    ids: list[int]
    key: str
    answer: list[int]  # the key's tokens, as they follow "The pass key is"
    needle_at: int  # the needle's first token in ids
    depth: float


class Filler:
    """Token ids to fill a prompt with: the classic sentences repeated, or a corpus's held-out text (its
    tokens in order, never repeated: `ProbeError` when it is shorter than a prompt needs)."""

    def __init__(self, tokenizer, corpus: Optional[list[int]] = None):
        self.unit = tokenizer.encode(FILLER).ids
        self.corpus = corpus

    def take(self, n: int, offset: int = 0) -> list[int]:
        if self.corpus is None:
            reps = -(-n // len(self.unit))
            return (self.unit * reps)[:n]
        if offset + n > len(self.corpus):
            raise ProbeError(f"the filler corpus holds {len(self.corpus):,} tokens, fewer than the "
                             f"{offset + n:,} this prompt needs; pass shorter --lengths or more held-out "
                             "text")
        return self.corpus[offset:offset + n]


def passkey_prompt(tokenizer, length: int, depth: float, key: str, filler: Filler) -> PasskeyPrompt:
    """Instruction + filler + needle at `depth` of the filler + filler + question: `length` tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ProbeError(f"depth {depth}: the needle's place in the filler must lie in [0, 1] (0: right "
                         "after the instruction, 1: right before the question)")
    intro, needle = tokenizer.encode(INTRO).ids, tokenizer.encode(NEEDLE.format(key=key)).ids
    question, answer = tokenizer.encode(QUESTION).ids, tokenizer.encode(" " + key).ids
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ProbeError(f"length {length}: the instruction, needle and question alone take "
                         f"{length - room} tokens; pass lengths of at least {length - room}")
    before = round(depth * room)
    body = filler.take(room)
    ids = intro + body[:before] + needle + body[before:] + question
    return PasskeyPrompt(ids, key, answer, len(intro) + before, depth)


@torch.no_grad()
def answer_greedy(model, prompt: PasskeyPrompt, device: torch.device) -> list[int]:
    """The key's worth of tokens decoded greedily after the prompt, through the KV cache."""
    cache = model.new_cache()
    tokens = torch.tensor([prompt.ids], device=device)
    out = []
    for _ in range(len(prompt.answer)):
        hidden = model.hidden_states(tokens, cache=cache)
        nxt = model.lm_head(hidden[:, -1]).argmax(-1)
        out.append(int(nxt))
        tokens = nxt[:, None]
    return out


@torch.no_grad()
def answer_forced(model, prompt: PasskeyPrompt, device: torch.device) -> list[int]:
    """The argmax at each of the key's positions in one forward pass over prompt + key (teacher forcing): the
    key's tokens where the model's argmax is right, -1 where it is not."""
    tokens = torch.tensor([prompt.ids + prompt.answer], device=device)
    hits = model(tokens[:, :-1], tokens[:, 1:], scores=True)[0, len(prompt.ids) - 1:, 1]
    return [t if hit else -1 for t, hit in zip(prompt.answer, hits.tolist())]


def is_correct(tokens: list[int], prompt: PasskeyPrompt) -> bool:
    """Exact match: every token of the key (one wrong digit is a wrong answer)."""
    return list(tokens) == prompt.answer


@dataclass
class PasskeyResult:
    """Accuracy over a grid of lengths x depths, and how it was scored."""

    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]  # [length][depth]
    samples: int
    scoring: str
    filler: str
    chance: float = CHANCE
    answers: list[dict] = field(default_factory=list)

    @property
    def effective_length(self) -> int:
        """The longest length at which every depth scores >= 90% (0: none)."""
        passing = [n for n, row in zip(self.lengths, self.accuracy) if min(row) >= PASS]
        return max(passing, default=0)

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "accuracy": self.accuracy,
                "samples": self.samples, "scoring": self.scoring, "filler": self.filler,
                "chance": self.chance,
                "effective_length": self.effective_length, "pass": PASS}


def keys(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randint(10_000, 99_999)) for _ in range(n)]


def passkey(model, tokenizer, lengths: list[int], depths: list[float], samples: int, device: torch.device,
            filler: Optional[Filler] = None, scoring: str = "greedy", seed: int = 0,
            share: tuple[int, int] = (0, 1)) -> tuple[list[tuple[int, int, bool]], PasskeyResult]:
    """Score `samples` keys at every (length, depth). share=(rank, world): this rank scores cells i with i %
    world == rank (the loop splits the grid across ranks); returns its (length index, depth index, correct)
    triples and the result of those it scored (the caller gathers the triples and calls `tally`)."""
    filler = filler or Filler(tokenizer)
    answer = answer_greedy if scoring == "greedy" else answer_forced
    triples = []
    for i, (li, di, key) in enumerate(grid(lengths, depths, samples, seed)):
        if i % share[1] != share[0]:
            continue
        prompt = passkey_prompt(tokenizer, lengths[li], depths[di], key, filler)
        triples.append((li, di, is_correct(answer(model, prompt, device), prompt)))
    return triples, tally(triples, lengths, depths, samples, scoring,
                          "corpus" if filler.corpus else "sentences")


def grid(lengths: list[int], depths: list[float], samples: int, seed: int):
    """Every (length index, depth index, key) cell of the passkey grid; the keys drawn with `seed`."""
    drawn = keys(seed, samples)
    for li in range(len(lengths)):
        for di in range(len(depths)):
            for key in drawn:
                yield li, di, key


def tally(triples: list[tuple[int, int, bool]], lengths: list[int], depths: list[float], samples: int,
          scoring: str, filler: str) -> PasskeyResult:
    right = [[0] * len(depths) for _ in lengths]
    seen = [[0] * len(depths) for _ in lengths]
    for li, di, ok in triples:
        right[li][di] += int(ok)
        seen[li][di] += 1
    accuracy = [[r / n if n else math.nan for r, n in zip(rr, nn)] for rr, nn in zip(right, seen)]
    return PasskeyResult(lengths, depths, accuracy, samples, scoring, filler)


# ---------------------------------------------------------------------------------------------------------
# Limits


def longest_position(cfg) -> Optional[int]:
    """The longest sequence the model can position without extrapolating: model.max_position when set (a
    pretrained or extended model), else None (RoPE and sinusoids compute any position; past the training
    length is the extrapolation these probes measure)."""
    return cfg.max_position


# ---------------------------------------------------------------------------------------------------------
# Records and tables


def flat_metrics(losses: dict[int, PositionLoss], result: PasskeyResult) -> dict:
    """The probes as the scalars of one metrics.jsonl record (W&B and TensorBoard plot each):
    probe/loss/L{length}/{bucket start}, probe/context_gain/L{length}, probe/effective_context/L{length},
    probe/passkey/L{length}/d{depth} and probe/passkey_effective_length."""
    out: dict = {}
    for n, lp in losses.items():
        for (a, _), loss in zip(lp.buckets, lp.loss):
            out[f"probe/loss/L{n}/{a}"] = loss
        out[f"probe/context_gain/L{n}"] = lp.context_gain
        out[f"probe/effective_context/L{n}"] = lp.effective_context
    for n, row in zip(result.lengths, result.accuracy):
        for d, acc in zip(result.depths, row):
            out[f"probe/passkey/L{n}/d{d:g}"] = acc
    out["probe/passkey_effective_length"] = result.effective_length
    return out


# ---------------------------------------------------------------------------------------------------------
# Tables


def format_tables(result: dict) -> str:
    """The probes' numbers as the text tables `ctxtrain probe` prints."""
    lines = []
    for n, lp in result.get("loss_by_position", {}).items():
        lines.append(f"loss by position, {int(n):,}-token windows ({sum(lp['tokens']):,} targets): "
                     f"mean {lp['mean']:.4f}, context gain {lp['context_gain']:.3f} nats, effective context "
                     f"{lp['effective_context']:,} tokens (eps {lp['eps']:g})")
        for (a, b), loss, count in zip(lp["buckets"], lp["loss"], lp["tokens"]):
            lines.append(f"  positions {a:>8,}-{b - 1:<8,} loss {loss:7.4f}  ({count:,} targets)")
    pk = result["passkey"]
    lines.append(f"passkey retrieval, {pk['samples']} keys a cell, {pk['scoring']} scoring, filler "
                 f"{pk['filler']}; chance {pk['chance']:.4%}; effective length {pk['effective_length']:,} "
                 f"(every depth >= {pk['pass']:.0%})")
    lines.append("  length \\ depth " + "".join(f"{d:>7.2f}" for d in pk["depths"]))
    for n, row in zip(pk["lengths"], pk["accuracy"]):
        lines.append(f"  {n:>14,} " + "".join(f"{a:>7.0%}" for a in row))
    return "\n".join(lines)
