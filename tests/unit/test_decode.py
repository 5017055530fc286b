"""KV-cache decoding against a full recompute, beam search against greedy, padding, sampling filters."""

from __future__ import annotations

import pytest
import torch

from ctxtrain.model import build_model
from ctxtrain.model.config import ModelConfig
from ctxtrain.model.decode import (
    beam_search,
    encdec_step,
    encode,
    filter_logits,
    greedy,
    left_pad,
    lm_step,
    new_cache,
    sample,
)

EOS = 2


def _lm(pos: str = "rope", kv_heads=None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="lm", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                      d_ff=64,
                      pos=pos, mlp="swiglu" if pos == "rope" else "gelu",
                      norm="rmsnorm" if pos == "rope" else "layernorm", init_std=0.2)
    return build_model(cfg).eval()


def _encdec(pos: str = "sinusoidal") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="encdec", vocab_size=97, d_model=32, n_layers=2, n_encoder_layers=2, n_heads=4,
                      d_ff=64,
                      pos=pos, init_std=0.2)
    return build_model(cfg).eval()


@pytest.mark.parametrize("pos,kv_heads", [("rope", None), ("rope", 2), ("sinusoidal", None)])
def test_lm_cached_logits_equal_a_full_recompute_at_every_step(pos, kv_heads):
    model = _lm(pos, kv_heads)
    tokens = torch.randint(3, 97, (3, 12))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
    cache = new_cache(model)
    got = [lm_step(model, tokens[:, :5], cache)]  # a prompt of 5, then one token at a time
    for t in range(5, 12):
        got.append(lm_step(model, tokens[:, t:t + 1], cache))
    assert cache.length == 12 and cache.layers[0].attn.k.shape[1] == 12
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_encoder_decoder_cached_logits_equal_a_full_recompute_at_every_step(pos):
    model = _encdec(pos)
    src = torch.randint(3, 97, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False  # a right-padded source
    tgt = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        full = model(src, tgt, src_mask=src_mask)
    cache = encode(model, src, src_mask)
    got = [encdec_step(model, tgt[:, t:t + 1], cache) for t in range(8)]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    # the cross-attention keys were computed once, at the first step
    assert cache.layers[0].cross.k.shape[1] == 9


def test_a_left_padded_prompt_decodes_as_the_prompt_alone():
    """RoPE: a left-padded row of a batch gets the tokens it gets alone."""
    model = _lm("rope")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_pad(prompts, pad=0)
    batched = greedy(model, ids, max_new=8, eos=EOS, prompt_mask=mask)
    alone = [greedy(model, torch.tensor([p]), max_new=8, eos=EOS)[0] for p in prompts]
    assert batched == alone and all(len(r) > 0 for r in alone)


def test_greedy_follows_the_argmax_of_a_full_recompute():
    model = _lm("rope")
    prompt = torch.tensor([[5, 6, 7]])
    out = greedy(model, prompt, max_new=6, eos=-1)[0]
    seq = prompt[0].tolist()
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_beam_of_one_is_greedy_and_a_wider_beam_scores_at_least_as_well():
    model = _encdec()
    src = torch.randint(3, 97, (3, 7))
    bos = torch.ones(3, 1, dtype=torch.long)
    g = greedy(model, bos, max_new=10, eos=EOS, src=src)
    assert beam_search(model, bos, max_new=10, eos=EOS, beam=1, src=src) == g
    lm = _lm("rope")
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert beam_search(lm, prompt, max_new=7, eos=-1, beam=1) == greedy(lm, prompt, max_new=7, eos=-1)

    def logprob(seq: list[int]) -> float:
        full = torch.cat([prompt[0], torch.tensor(seq, dtype=torch.long)])[None]
        with torch.no_grad():
            lp = torch.log_softmax(lm(full[:, :-1]).float(), -1)[0, 2:]
        return float(lp.gather(-1, full[0, 3:, None]).sum())

    wide = beam_search(lm, prompt[:1], max_new=5, eos=-1, beam=4, length_penalty=0.0)[0]
    narrow = greedy(lm, prompt[:1], max_new=5, eos=-1)[0]
    assert len(wide) == len(narrow) == 5 and logprob(wide) >= logprob(narrow) - 1e-6


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    model = _lm("rope")
    prompt = torch.tensor([[5, 6, 7]])
    a = sample(model, prompt, 8, EOS, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompt, 8, EOS, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert sample(model, prompt, 8, EOS, top_k=1) == greedy(model, prompt, 8, EOS)
