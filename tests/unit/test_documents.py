"""Documents kept apart in a packed window (data.doc_mask, data.doc_positions): attention within each document
without a [T, T] mask, the loss of a window equal to its documents' run one by one, positions restarting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxtrain.data.loader import _pack_rows, collate_lm, collate_pairs, padding_ratio, to_torch
from ctxtrain.model import build_model
from ctxtrain.model.config import ModelConfig
from ctxtrain.model.transformer import (
    IGNORE_INDEX,
    attention_core,
    document_attention,
    flex_documents,
    lm_targets,
    pair_positions,
)

EOS = 1


def dense_reference(q, k, v, docs):
    """The [T, T] mask that document_attention never builds: same document and not in the future."""
    T = q.shape[1]
    same = docs[:, :, None] == docs[:, None, :]  # (B, T, T)
    mask = (same & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def random_docs(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(B):
        lengths, left = [], T
        while left:
            n = min(left, int(torch.randint(1, 12, (1,), generator=gen)))
            lengths.append(n)
            left -= n
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_document_attention_equals_the_dense_mask_without_building_it(kv):
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 3, 40, 4, 8
    q = torch.randn(B, T, H, D, generator=gen)
    k, v = torch.randn(B, T, kv, D, generator=gen), torch.randn(B, T, kv, D, generator=gen)
    docs = random_docs(B, T, gen)
    want = dense_reference(q, k, v, docs)
    torch.testing.assert_close(document_attention(q, k, v, docs), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_core(q, k, v, causal=True, docs=docs), want, rtol=1e-5, atol=1e-6)
    # FlexAttention's document mask (the GPU path), in its eager reference on this CPU
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    torch.testing.assert_close(flex_documents(q, k, v, docs, compiled=False), want, rtol=1e-5, atol=1e-6)
    # and so are the gradients (the documents' pieces of q, k, v get theirs back in place)
    weights = torch.randn(want.shape, generator=gen)
    grads = []
    for attend in (document_attention, dense_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (attend(*leaves, docs) * weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # one document is plain causal attention
    one = torch.zeros(B, T, dtype=torch.long)
    torch.testing.assert_close(document_attention(q, k, v, one), attention_core(q, k, v, causal=True),
                               rtol=1e-5, atol=1e-6)


def test_collate_gives_document_ids_and_positions():
    w1, p1 = np.array([5, 6, EOS, 7, 8, 9, EOS, 4]), np.array([3, 4, 1])
    w2, p2 = np.array([3, 3, 3, 3, 3, 3, 3, 3]), np.array([8])
    b = collate_lm([(w1, p1), (w2, p2)], np.array([0, 1]), "positions")
    np.testing.assert_array_equal(b["docs"], [[0, 0, 0, 1, 1, 1, 1, 2], [0] * 8])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))])
    assert "positions" not in collate_lm([(w1, p1)], np.array([0]), "ids")
    assert set(collate_lm([w1], np.array([0]))) == {"tokens", "unit"}
    inputs, targets = lm_targets(torch.from_numpy(b["tokens"]), torch.from_numpy(b["docs"]))
    # the prediction of a document's first token from the EOS before it is not trained
    assert targets[0].tolist() == [6, EOS, IGNORE_INDEX, 8, 9, EOS, IGNORE_INDEX]
    assert targets[1].tolist() == [3] * 7


def packed_window(gen: torch.Generator, lengths: list[int], vocab: int):
    """Documents of these lengths (ids + EOS) packed into one window; the last one cut."""
    docs = [torch.cat([torch.randint(2, vocab, (n - 1,), generator=gen),
                       torch.tensor([EOS])]) for n in lengths]
    tokens = torch.cat(docs)[None]  # (1, L+1)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, tokens, ids, positions


@pytest.mark.parametrize("pos, kv", [("rope", 2), ("sinusoidal", 4)], ids=["rope-gqa", "sinusoidal"])
@torch.no_grad()
def test_packed_loss_is_the_token_weighted_mean_of_its_documents_alone(pos, kv):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="lm", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv, d_ff=64,
                      pos=pos, norm="rmsnorm", mlp="swiglu", dropout=0.0)
    model = build_model(cfg).double()
    gen = torch.Generator().manual_seed(1)
    docs, tokens, ids, positions = packed_window(gen, [7, 1, 23, 2, 30], cfg.vocab_size)
    inputs, targets = lm_targets(tokens, ids)
    packed = model(inputs, targets, docs=ids[:, :-1], positions=positions[:, :-1])
    total = sum(float(model(d[None, :-1], d[None, 1:])) * (len(d) - 1) for d in docs if len(d) > 1)
    count = sum(len(d) - 1 for d in docs)
    assert count == int((targets != IGNORE_INDEX).sum())
    assert float(packed) == pytest.approx(total / count, rel=1e-5)
    # Without the mask the documents see each other: the last document's logits differ (the test can tell)
    last = slice(-29, None)  # its inputs: all but its EOS, the last target
    masked = model(inputs, docs=ids[:, :-1], positions=positions[:, :-1])[:, last]
    torch.testing.assert_close(masked, model(docs[-1][None, :-1]), rtol=1e-7, atol=1e-9)
    assert not torch.allclose(model(inputs)[:, last], masked, rtol=1e-3, atol=1e-4)
    # Positions left running (doc_mask without doc_positions): each document at its offset in the window
    if pos == "rope":  # relative positions: the same losses
        assert float(model(inputs, targets, docs=ids[:, :-1])) == pytest.approx(total / count, rel=1e-5)


def test_a_slice_gets_the_angles_of_its_place_in_the_whole_window():
    """Sequence parallelism: a rank's slice passes the window's length, so that `dynamic` scaling (which grows
    with the sequence) gives the slice the angles the unsplit window has there."""
    cfg = ModelConfig(kind="lm", vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, pos="rope",
                      rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position": 16},
                      max_position=64)
    rotary = build_model(cfg).rotary
    cpu = torch.device("cpu")
    whole_cos, whole_sin = rotary(40, cpu, torch.float32)
    cos, sin = rotary(20, cpu, torch.float32, 20, extent=40)
    torch.testing.assert_close((cos, sin), (whole_cos[20:], whole_sin[20:]))
    assert not torch.allclose(rotary(20, cpu, torch.float32, 0, extent=40)[0], rotary(20, cpu,
                                                                                      torch.float32)[0])


# ---------------------------------------------------------------------------------------------------------
# Translation pairs packed into rows (data.pack_pairs)

SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "lang_tag": 3}


def random_pairs(n: int, gen: torch.Generator, longest: int = 30) -> list[tuple[np.ndarray, np.ndarray]]:
    """n pairs of (source, target) ids of 1..longest tokens each (ids past the special ones)."""
    def ids():
        return torch.randint(4, 200, (int(torch.randint(1, longest + 1, (1,), generator=gen)),),
                             generator=gen).numpy()
    return [(ids(), ids()) for _ in range(n)]


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_packed_pairs_have_the_loss_and_gradients_of_the_padded_batch(pos):
    """The same 24 pairs as one padded row each and packed into rows of 64 ids a side (every pair attends to
    its own source and its own earlier targets only, at positions of its own): the same loss and the same
    gradients, with far fewer tokens computed."""
    gen = torch.Generator().manual_seed(0)
    pairs = random_pairs(24, gen)
    units = np.arange(len(pairs))
    padded = collate_pairs(pairs, units, SPECIAL, 32, 32)
    packed = collate_pairs(pairs, units, SPECIAL, 32, 32, pack=64)
    assert packed["src"].shape[1] <= 64 and packed["tgt"].shape[1] <= 64
    assert padding_ratio([packed]) < padding_ratio([padded]) and packed["src"].shape[0] < len(pairs)
    assert sorted(packed["targets"][packed["targets"] != IGNORE_INDEX].tolist()) == \
        sorted(padded["targets"][padded["targets"] != IGNORE_INDEX].tolist())
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="encdec", vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                    pos=pos, dropout=0.0))
    results = []
    for batch in (padded, packed):
        b = to_torch(batch)
        model.zero_grad()
        loss = model(b["src"], b["tgt"], b["src_mask"], b["tgt_mask"], b["targets"],
                     src_docs=b.get("src_docs"), tgt_docs=b.get("tgt_docs"))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_pairs_pack_first_fit_in_order_within_the_row_length():
    rows = _pack_rows([(10, 10), (30, 5), (20, 20), (5, 20), (40, 40)], 40)
    assert rows == [[0, 1], [2, 3], [4]]
    assert pair_positions(torch.tensor([[0, 0, 0, 1, 1, -1, -1]])).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
