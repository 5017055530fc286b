"""Incremental decoding with a KV cache: greedy, beam search and sampling, for both model kinds (torch only).

The models' training forward recomputes every position. Decoding runs the same forward with a `Cache`
(`ctxtrain.model.transformer`): each attention keeps the keys and values of the positions already seen, a step
feeds only the new tokens, whose queries attend over the cached keys plus their own, so one new token costs
O(current length) instead of a full recompute. For the encoder-decoder the encoder runs once, and each decoder
layer also caches the cross-attention keys/values of the encoder's output (computed at the first step, reused
by every later one). One implementation of the model's maths serves training and decoding; positions continue
after the cache (RoPE angles and sinusoidal tables at `cache.length`).

Batches: an LM prompt batch is left-padded with a key mask, so the rows end together and their next tokens
share a position (with RoPE, attention scores depend only on relative positions, so a left-padded row gives
the same logits as the row alone); translation sources are right-padded with `src_mask`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ctxtrain.model.transformer import Cache, DecoderLM, EncoderDecoder


def new_cache(model) -> Cache:
    """An empty cache for a decoder-only LM (the encoder-decoder's comes from `encode`)."""
    return model.new_cache()


@torch.no_grad()
def lm_step(model: DecoderLM, tokens: torch.Tensor, cache: Cache,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) new token ids (mask: False for left padding) -> (B, T, V) logits; the cache grows by T."""
    return model(tokens, mask=mask, cache=cache)


@torch.no_grad()
def encode(model: EncoderDecoder, src: torch.Tensor, src_mask: Optional[torch.Tensor]) -> Cache:
    """Run the encoder once; the returned cache carries its output for every decoder step."""
    return model.new_cache(model.encode(src, src_mask), src_mask)


@torch.no_grad()
def encdec_step(model: EncoderDecoder, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """(B, T) new target ids -> (B, T, V) logits; the decoder's self-attention cache grows by T."""
    return model.lm_head(model.decode(tokens, cache.memory, cache.memory_mask, cache=cache))


# ---------------------------------------------------------------------------------------------------------
# Search


def _step(model, tokens: torch.Tensor, cache: Cache, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(model, DecoderLM):
        return lm_step(model, tokens, cache, mask)
    return encdec_step(model, tokens, cache)


def _start(model, prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], src: Optional[torch.Tensor],
           src_mask: Optional[torch.Tensor]) -> tuple[Cache, torch.Tensor]:
    """The cache after the prompt (LM) or the encoder and BOS (encoder-decoder), and the first logits (B,
    V)."""
    if isinstance(model, DecoderLM):
        cache = new_cache(model)
        return cache, lm_step(model, prompt, cache, prompt_mask)[:, -1]
    cache = encode(model, src, src_mask)
    return cache, encdec_step(model, prompt, cache)[:, -1]


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, max_new: int, eos: int, prompt_mask: Optional[torch.Tensor] = None,
           src: Optional[torch.Tensor] = None, src_mask: Optional[torch.Tensor] = None) -> list[list[int]]:
    """The most likely next token at each step, until <eos> (not included) or max_new tokens, per row.
    LM: prompt (B, P), left-padded with prompt_mask; encoder-decoder: prompt = (B, 1) BOS, src (B, S)."""
    return _decode(model, prompt, prompt_mask, src, src_mask, max_new, eos, lambda logits: logits.argmax(-1))


def _decode(model, prompt, prompt_mask, src, src_mask, max_new: int, eos: int, pick) -> list[list[int]]:
    """One token per row per step, chosen by pick(logits (B, V)) -> (B,), until <eos> or max_new."""
    model.eval()
    cache, logits = _start(model, prompt, prompt_mask, src, src_mask)
    B = prompt.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for i in range(max_new):
        nxt = pick(logits)
        for b in range(B):
            if not done[b] and int(nxt[b]) != eos:
                out[b].append(int(nxt[b]))
        done |= nxt == eos
        if bool(done.all()) or i == max_new - 1:
            break
        logits = _step(model, nxt[:, None], cache)[:, -1]
    return out


@torch.no_grad()
def sample(model: DecoderLM, prompt: torch.Tensor, max_new: int, eos: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
           prompt_mask: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Sampling from the LM: temperature, then top-k (0: off), then nucleus top-p (1.0: off)."""
    if temperature <= 0:
        return greedy(model, prompt, max_new, eos, prompt_mask)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return _decode(model, prompt, prompt_mask, None, None, max_new, eos, draw)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the k most likely tokens and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # the tokens after the set reached top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def beam_search(model, prompt: torch.Tensor, max_new: int, eos: int, beam: int, length_penalty: float = 1.0,
                prompt_mask: Optional[torch.Tensor] = None, src: Optional[torch.Tensor] = None,
                src_mask: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Beam search per row: `beam` hypotheses, scored by log-probability / length**length_penalty (as fairseq
    and Hugging Face). A hypothesis ends at <eos> (ranked among the beams); a row stops once it has `beam`
    finished hypotheses (Hugging Face's early_stopping=True), and its best one is returned (without <eos>);
    rows that reach max_new also compete with their live beams. With beam=1 this is greedy search."""
    model.eval()
    B = prompt.shape[0]
    cache, logits = _start(model, prompt, prompt_mask, src, src_mask)
    # every row's cache repeated beam times: rows b*beam .. b*beam+beam-1
    cache.select(torch.arange(B, device=prompt.device).repeat_interleave(beam))
    logp = torch.log_softmax(logits.float(), -1).repeat_interleave(beam, 0)  # (B*beam, V)
    V = logp.shape[-1]
    scores = torch.full((B, beam), float("-inf"), device=prompt.device)
    scores[:, 0] = 0.0  # the beams start identical: only the first counts at step 1
    seqs: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    row_done = [False] * B

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    for t in range(max_new):
        total = (scores[:, :, None] + logp.view(B, beam, V)).view(B, beam * V)
        top, idx = total.topk(2 * beam, dim=-1)  # enough to refill the beams after some end at <eos>
        new_scores = torch.full((B, beam), float("-inf"), device=prompt.device)
        parents = torch.zeros(B, beam, dtype=torch.long, device=prompt.device)
        tokens = torch.full((B, beam), eos, dtype=torch.long, device=prompt.device)
        new_seqs: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(B)]
        for b in range(B):
            if row_done[b]:
                continue
            k = 0
            for rank, (score, flat) in enumerate(zip(top[b].tolist(), idx[b].tolist())):
                parent, token = divmod(flat, V)
                if score == float("-inf"):
                    break
                if token == eos:
                    if rank < beam:  # an ending counts when it ranks among the beams (as Hugging Face does)
                        finished[b].append((norm(score, len(seqs[b][parent])), seqs[b][parent]))
                    continue
                new_scores[b, k], parents[b, k], tokens[b, k] = score, parent, token
                new_seqs[b][k] = seqs[b][parent] + [token]
                k += 1
                if k == beam:
                    break
            row_done[b] = len(finished[b]) >= beam  # early stop: `beam` finished hypotheses
        scores, seqs = new_scores, new_seqs
        if all(row_done) or t == max_new - 1:
            break
        rows = (torch.arange(B, device=prompt.device)[:, None] * beam + parents).view(-1)
        cache.select(rows)
        logp = torch.log_softmax(_step(model, tokens.view(-1, 1), cache)[:, -1].float(), -1)
    out = []
    for b in range(B):
        live = [] if row_done[b] else [(norm(float(scores[b, j]), len(seqs[b][j])), seqs[b][j])
                                       for j in range(beam) if scores[b, j] > float("-inf")]
        candidates = finished[b] + live
        out.append(max(candidates, key=lambda c: c[0])[1] if candidates else [])
    return out


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (B, P) left-padded ids and their mask (True: a real token)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids, mask
