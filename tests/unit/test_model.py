"""The seed's Transformer: shapes, causality, padding, parity with Hugging Face Llama and
torch.nn.Transformer, and the parameter count of every config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctxtrain.config import load_config
from ctxtrain.model import DecoderLM, EncoderDecoder, ModelConfig, lm_train_flops_per_token, param_count
from ctxtrain.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from ctxtrain.model.transformer import build_model, embed
from tests.conftest import CONFIGS
from tests.helpers import load_shipped

TINY_LM = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
TINY_SEED = ModelConfig(kind="encdec", vocab_size=101, d_model=32, n_layers=2, n_encoder_layers=3, n_heads=4,
                        d_ff=64, mlp="gelu", norm="layernorm", pos="sinusoidal", bias=True, embed_scale=True)


def test_lm_shapes_and_loss():
    torch.manual_seed(0)
    model = DecoderLM(TINY_LM)
    tokens = torch.randint(0, 97, (3, 11))
    assert model(tokens).shape == (3, 11, 97)
    assert model.hidden_states(tokens).shape == (3, 11, 32)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_encdec_shapes():
    torch.manual_seed(0)
    model = EncoderDecoder(TINY_SEED)
    src, tgt = torch.randint(0, 101, (2, 13)), torch.randint(0, 101, (2, 7))
    assert model.encode(src).shape == (2, 13, 32)
    assert model(src, tgt).shape == (2, 7, 101)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_lm_is_causal(pos):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**TINY_LM.__dict__, "pos": pos})).eval()
    tokens = torch.randint(0, 97, (2, 12))
    changed = tokens.clone()
    t = 6
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_encoder_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = EncoderDecoder(TINY_SEED).eval()
    src = torch.randint(1, 101, (1, 9))
    padded = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).bool()
    plain = model.encode(src)
    with_pad = model.encode(padded, mask)
    torch.testing.assert_close(with_pad[:, :9], plain, rtol=1e-5, atol=1e-5)
    # ... and the decoder sees the same memory through the padding mask.
    tgt = torch.randint(0, 101, (1, 6))
    torch.testing.assert_close(model(padded, tgt, src_mask=mask), model(src, tgt), rtol=1e-5, atol=1e-5)
    # Without the mask, padding leaks in: the mask is what does the work.
    assert not torch.allclose(model.encode(padded)[:, :9], plain, atol=1e-4)


def test_lm_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=211, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96,
                      rope_theta=5e5)
    torch.manual_seed(0)
    ours = DecoderLM(cfg).eval()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
        # And back: Llama weights loaded into ours give the same logits.
        again = DecoderLM(cfg).eval()
        again.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
        torch.testing.assert_close(again(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def _copy_attention(ours, mha: nn.MultiheadAttention):
    mha.in_proj_weight.data.copy_(torch.cat([ours.wq.weight, ours.wk.weight, ours.wv.weight]))
    mha.in_proj_bias.data.copy_(torch.cat([ours.wq.bias, ours.wk.bias, ours.wv.bias]))
    mha.out_proj.weight.data.copy_(ours.wo.weight)
    mha.out_proj.bias.data.copy_(ours.wo.bias)


def _copy_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm):
    theirs.load_state_dict(ours.state_dict())


def _copy_mlp(ours, layer):
    layer.linear1.load_state_dict(ours.up.state_dict())
    layer.linear2.load_state_dict(ours.down.state_dict())


def test_encdec_matches_torch_transformer():
    cfg = TINY_SEED
    torch.manual_seed(0)
    ours = EncoderDecoder(cfg).eval()
    ref = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=3, num_decoder_layers=2, dim_feedforward=64,
                         dropout=0.0, activation="gelu", batch_first=True, norm_first=True).eval()
    for block, layer in zip(ours.encoder, ref.encoder.layers):
        _copy_attention(block.attn, layer.self_attn)
        _copy_mlp(block.mlp, layer)
        _copy_norm(block.attn_norm, layer.norm1)
        _copy_norm(block.mlp_norm, layer.norm2)
    for block, layer in zip(ours.decoder, ref.decoder.layers):
        _copy_attention(block.attn, layer.self_attn)
        _copy_attention(block.cross, layer.multihead_attn)
        _copy_mlp(block.mlp, layer)
        _copy_norm(block.attn_norm, layer.norm1)
        _copy_norm(block.cross_norm, layer.norm2)
        _copy_norm(block.mlp_norm, layer.norm3)
    _copy_norm(ours.encoder_norm, ref.encoder.norm)
    _copy_norm(ours.decoder_norm, ref.decoder.norm)

    src, tgt = torch.randint(1, 101, (2, 10)), torch.randint(1, 101, (2, 8))
    src_mask = torch.ones(2, 10, dtype=torch.bool)
    src_mask[1, 7:] = False
    tgt_mask = torch.ones(2, 8, dtype=torch.bool)
    tgt_mask[1, 6:] = False
    with torch.no_grad():
        x_src, x_tgt = embed(ours.src_tok_embed, src, cfg), embed(ours.target_table, tgt, cfg)
        expected = ref(x_src, x_tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(8),
                       src_key_padding_mask=~src_mask, tgt_key_padding_mask=~tgt_mask,
                       memory_key_padding_mask=~src_mask, tgt_is_causal=True)
        got = ours.decode(tgt, ours.encode(src, src_mask), src_mask, tgt_mask)
    real = tgt_mask
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_param_count_matches_numel(path, tmp_path):
    cfg = load_shipped(path, tmp_path).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_variants(tie):
    for base in (TINY_LM, TINY_SEED):
        cfg = ModelConfig(**{**base.__dict__, "tie_embeddings": tie})
        with torch.device("meta"):
            model = build_model(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_formula_1b():
    cfg = load_config(CONFIGS / "lm_1b.yaml").model
    n = param_count(cfg) - cfg.vocab_size * cfg.d_model  # without the input embedding, head kept
    T = 8192
    assert lm_train_flops_per_token(cfg, T) == 6 * n + 6 * cfg.n_layers * cfg.d_model * T


def test_attention_core_is_swappable():
    """An engine can replace the attention core with any f(q, k, v) in (B, T, H, D) layout."""
    torch.manual_seed(0)
    model = DecoderLM(TINY_LM).eval()
    tokens = torch.randint(0, 97, (2, 9))
    calls = []

    def eager_core(q, k, v, *, causal, key_mask=None, dropout=0.0, docs=None):
        calls.append(q.shape)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)

    expected = model(tokens)
    for block in model.blocks:
        block.attn.core = eager_core
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    assert calls == [(2, 9, 4, 8)] * 2
