"""The memory levers change memory and time, not the maths: each checkpoint policy, the chunked LM head + loss
and the chunked MLP give the plain model's loss and gradients (fp32, 1e-5), for the LM and the
encoder-decoder; and each does what it is for (offload packs one input per block, selective does not recompute
attention, no [tokens, vocab] or [tokens, d_ff] tensor exists when chunked)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctxtrain.config import MemoryConfig
from ctxtrain.engine.memory import SDPA_KERNELS, apply_levers
from ctxtrain.model import IGNORE_INDEX, DecoderLM, EncoderDecoder, ModelConfig

LM = ModelConfig(vocab_size=512, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64)
SEED = ModelConfig(kind="encdec", vocab_size=300, d_model=32, n_layers=2, n_encoder_layers=2, n_heads=4,
                   d_ff=80,
                   mlp="gelu", norm="layernorm", pos="sinusoidal", bias=True, embed_scale=True,
                   tie_embeddings=True)
CPU = torch.device("cpu")


def lm_batch():
    g = torch.Generator().manual_seed(1)
    return {"tokens": torch.randint(0, LM.vocab_size, (2, 41), generator=g)}


def seed_batch():
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, SEED.vocab_size, (3, 17), generator=g)
    tgt = torch.randint(3, SEED.vocab_size, (3, 13), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 11:] = False
    tgt_mask = torch.ones_like(tgt, dtype=torch.bool)
    tgt_mask[2, 7:] = False
    targets = torch.roll(tgt, -1, dims=1).masked_fill(~tgt_mask, IGNORE_INDEX)
    return {"src": src, "tgt": tgt, "src_mask": src_mask, "tgt_mask": tgt_mask, "targets": targets}


def loss_of(model, batch):
    if "tokens" in batch:
        t = batch["tokens"]
        return model(t[:, :-1], t[:, 1:])
    return model(batch["src"], batch["tgt"], src_mask=batch["src_mask"], tgt_mask=batch["tgt_mask"],
                 targets=batch["targets"])


def loss_and_grads(model, batch, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    (scale * loss).backward()  # a scaled loss, as DeepSpeed's gradient accumulation makes it
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, what):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0, msg=f"{what}: loss")
    assert ga.keys() == gb.keys()
    # Some gradients are zero up to rounding (a key bias: softmax ignores a shift); measure those against 1e-4
    # of the largest gradient rather than against their own noise.
    floor = 1e-4 * max(g.norm() for g in gb.values())
    for name in ga:
        rel = (ga[name] - gb[name]).norm() / torch.maximum(gb[name].norm(), floor)
        assert rel < 1e-5, f"{what}: gradient of {name} differs by {rel:.2e} (relative)"


def build(cfg):
    torch.manual_seed(0)
    return DecoderLM(cfg) if cfg.kind == "lm" else EncoderDecoder(cfg)


CASES = [("lm", LM, lm_batch), ("encdec", SEED, seed_batch)]
COMBOS = [(policy, loss_chunk, mlp_chunk)
          for policy, loss_chunk, mlp_chunk in itertools.product(("none", "full", "selective", "offload"),
                                                                 (None, 16), (None, 12))]


@pytest.mark.parametrize("kind,cfg,make_batch", CASES, ids=[c[0] for c in CASES])
def test_every_lever_combination_gives_the_plain_loss_and_gradients(kind, cfg, make_batch):
    plain = build(cfg)
    batch = make_batch()
    reference = loss_and_grads(plain, batch, scale=0.5)
    for policy, loss_chunk, mlp_chunk in COMBOS:
        model = copy.deepcopy(plain)
        apply_levers(model, MemoryConfig(checkpoint=policy, loss_chunk=loss_chunk, mlp_chunk=mlp_chunk), CPU)
        assert_same(loss_and_grads(model, batch, scale=0.5), reference, f"{kind} {policy} "
                                                                        f"loss_chunk={loss_chunk} "
                    f"mlp_chunk={mlp_chunk}")
        assert model.state_dict().keys() == plain.state_dict().keys()


def test_levers_leave_evaluation_and_logits_unchanged():
    plain = build(LM).eval()
    model = copy.deepcopy(plain)
    apply_levers(model, MemoryConfig(checkpoint="selective", loss_chunk=7, mlp_chunk=5), CPU)
    batch = lm_batch()["tokens"]
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, {"tokens": batch}), loss_of(plain, {"tokens": batch}),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(model(batch), plain(batch), rtol=1e-6, atol=1e-6)


def test_tied_weights_stay_tied_and_get_both_gradients():
    plain = build(SEED)
    model = copy.deepcopy(plain)
    apply_levers(model, MemoryConfig(loss_chunk=8), CPU)
    assert model.lm_head.weight is model.src_tok_embed.weight
    assert_same(loss_and_grads(model, seed_batch()), loss_and_grads(plain, seed_batch()), "tied")


@pytest.mark.parametrize("kind,cfg,make_batch", CASES, ids=[c[0] for c in CASES])
def test_offload_packs_each_block_input_once(kind, cfg, make_batch):
    model = build(cfg)
    levers = apply_levers(model, MemoryConfig(checkpoint="offload"), CPU)
    blocks = cfg.n_layers + (cfg.encoder_layers if kind == "encdec" else 0)
    assert levers.checkpointed_blocks == blocks
    loss_of(model, make_batch()).backward()
    assert levers.offload.packed == blocks
    with torch.no_grad():  # evaluation keeps nothing for a backward pass
        loss_of(model, make_batch())
    assert levers.offload.packed == blocks


class OpLog(TorchDispatchMode):
    """Every ATen op that runs, with the shapes of its outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func, [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]))
        return out


def ops_in_backward(policy):
    model = build(LM)
    apply_levers(model, MemoryConfig(checkpoint=policy), CPU)
    loss = loss_of(model, lm_batch())
    with OpLog() as log:
        loss.backward()
    return [func for func, _ in log.ops]


def test_selective_keeps_attention_and_full_recomputes_it():
    attention_in_backward = {p: sum(f in SDPA_KERNELS for f in ops_in_backward(p)) for p in ("full",
                                                                                             "selective")}
    assert attention_in_backward == {"full": LM.n_layers, "selective": 0}


def largest_shapes(memory, cfg=LM):
    model = build(cfg)
    apply_levers(model, memory, CPU)
    with OpLog() as log:
        loss_of(model, lm_batch()).backward()
    return [shape for _, shapes in log.ops for shape in shapes]


def test_chunked_loss_never_forms_the_whole_logits():
    tokens = 2 * 40
    vocab_sized = [s for s in largest_shapes(MemoryConfig()) if s and s[-1] == LM.vocab_size and len(s) > 1]
    assert max(torch.Size(s).numel() for s in vocab_sized) >= tokens * LM.vocab_size  # plain: all at once
    # the head's weight and its transpose
    weights = {(LM.vocab_size, LM.d_model), (LM.d_model, LM.vocab_size)}
    vocab_sized = [s for s in largest_shapes(MemoryConfig(loss_chunk=16)) if s and s[-1] == LM.vocab_size
                   and len(s) > 1 and s not in weights]
    assert vocab_sized and max(torch.Size(s).numel() for s in vocab_sized) <= 16 * LM.vocab_size


def test_chunked_mlp_never_forms_the_whole_hidden_layer():
    def widest(memory):
        weights = {(LM.d_ff, LM.d_model), (LM.d_model, LM.d_ff)}
        shapes = [s for s in largest_shapes(memory) if s and s[-1] == LM.d_ff and len(s) > 1
                  and s not in weights]
        return max(torch.Size(s).numel() for s in shapes)

    assert widest(MemoryConfig()) >= 2 * 40 * LM.d_ff
    assert widest(MemoryConfig(mlp_chunk=12)) <= 12 * LM.d_ff
