"""The probes: loss-by-position buckets recombine to the window's loss, the passkey prompt puts the key where
it is asked to (checked on the token ids), the scorer's exact match, and an untrained model scores at
chance."""

from __future__ import annotations

import pytest
import torch

from ctxtrain.data.tokenizer import load_tokenizer
from ctxtrain.model import build_model
from ctxtrain.model.config import ModelConfig
from ctxtrain.probes import (
    CHANCE,
    INTRO,
    NEEDLE,
    QUESTION,
    Filler,
    ProbeError,
    answer_forced,
    answer_greedy,
    buckets,
    loss_by_position,
    passkey,
    passkey_prompt,
)


@pytest.fixture(scope="module")
def tok(one_shard_lm):
    return load_tokenizer(one_shard_lm / "tokenizer.json")


def small_lm(vocab: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="lm", vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, **kw)
    return build_model(cfg).eval()


def test_buckets_are_log_spaced_and_cover_the_window():
    assert buckets(10) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert buckets(1) == [(0, 1)]


def test_position_buckets_recombine_to_the_windows_loss():
    model = small_lm(97)
    windows = [torch.randint(0, 97, (3, 65), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = loss_by_position(model, windows)
    with torch.no_grad():
        total = sum(float(model(w[:, :-1], w[:, 1:])) * w[:, 1:].numel() for w in windows)
    assert result.mean == pytest.approx(total / sum(w[:, 1:].numel() for w in windows), rel=1e-5)
    assert sum(result.tokens) == 2 * 3 * 64 and len(result.loss) == 7
    # the summaries
    result.loss = [5.0, 4.0, 3.5, 3.495, 3.2, 3.195, 3.19]
    assert result.context_gain == pytest.approx(5.0 - 3.19)
    assert result.effective_context == 16  # the bucket [8, 16) is the last to fall by more than 0.01


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_the_prompt_puts_the_key_at_its_depth(tok, depth):
    filler = Filler(tok)
    p = passkey_prompt(tok, 300, depth, "48213", filler)
    intro, needle = tok.encode(INTRO).ids, tok.encode(NEEDLE.format(key="48213")).ids
    question = tok.encode(QUESTION).ids
    assert len(p.ids) == 300
    assert p.ids[:len(intro)] == intro and p.ids[-len(question):] == question
    assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
    room = 300 - len(intro) - len(needle) - len(question)
    assert p.needle_at - len(intro) == round(depth * room)
    assert tok.decode(p.answer).strip() == "48213"


def test_bad_settings_are_named(tok):
    with pytest.raises(ProbeError, match=r"must lie in \[0, 1\]"):
        passkey_prompt(tok, 300, 1.5, "12345", Filler(tok))
    with pytest.raises(ProbeError, match="take"):
        passkey_prompt(tok, 20, 0.5, "12345", Filler(tok))
    with pytest.raises(ProbeError, match="filler corpus holds 50 tokens"):
        passkey_prompt(tok, 300, 0.5, "12345", Filler(tok, list(range(50))))


def test_exact_match_scoring_and_both_scorers_agree(tok):
    """The key's own tokens count as right, a one-digit error as wrong; greedy decoding and teacher-forced
    argmax give the same verdicts."""
    from ctxtrain.probes import is_correct

    p = passkey_prompt(tok, 200, 0.5, "48213", Filler(tok))
    assert is_correct(p.answer, p)
    wrong = tok.encode(" 48219").ids
    assert wrong != p.answer and not is_correct(wrong, p)
    # both scorings give the same verdicts: on the model's own continuation as the key (right), on it with
    # one token changed (wrong), on the real key
    from dataclasses import replace

    model = small_lm(tok.get_vocab_size())
    device, vocab = torch.device("cpu"), tok.get_vocab_size()
    for depth in (0.0, 1.0):
        q = passkey_prompt(tok, 120, depth, "77777", Filler(tok))
        own = replace(q, answer=answer_greedy(model, q, device))
        assert is_correct(answer_greedy(model, own, device), own)
        assert answer_forced(model, own, device) == own.answer
        for j in range(len(own.answer)):
            bad = replace(own, answer=own.answer[:j] + [(own.answer[j] + 1) % vocab] + own.answer[j + 1:])
            assert not is_correct(answer_greedy(model, bad, device), bad)
            assert not is_correct(answer_forced(model, bad, device), bad)
        assert is_correct(answer_greedy(model, q, device), q) == is_correct(answer_forced(model, q, device),
                                                                            q)


def test_an_untrained_lm_tiny_scores_at_chance(tok):
    from ctxtrain.config import load_config
    from tests.conftest import CONFIGS

    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / "lm_tiny.yaml").model).eval()
    _, result = passkey(model, tok, [128], [0.0, 0.5, 1.0], 22, torch.device("cpu"))  # 66 prompts
    accuracy = sum(result.accuracy[0]) / 3
    assert accuracy <= CHANCE + 0.10
    assert result.effective_length == 0
