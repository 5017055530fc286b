"""Parameter counts and training FLOPs, computed from the config alone (no model is built).

MFU (see ../../../README.md, "Performance") uses `lm_train_flops_per_token`:

    6 * N + 6 * L * d * T   per token

N counts the weights that do a matmul for every token: everything except the token-embedding lookup
tables, with the LM head counted (tied or not, it is a d x V matmul). The second term is attention's
score and value products, 12 * L * d * T for full attention, halved because causal attention computes
half of the T x T matrix (FLOPs counted once, as Megatron and DESIGN.md do).
"""

from __future__ import annotations

from ctxtrain.model.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model if cfg.norm == "rmsnorm" else 2 * cfg.d_model


def _attention_params(cfg: ModelConfig) -> int:
    d, qd, kvd = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    n = d * qd + 2 * d * kvd + qd * d
    if cfg.bias or cfg.qkv_bias:
        n += qd + 2 * kvd
    if cfg.bias:
        n += d
    return n


def _mlp_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ff
    if cfg.mlp == "swiglu":
        return 3 * d * f + ((2 * f + d) if cfg.bias else 0)
    return 2 * d * f + ((f + d) if cfg.bias else 0)


def _block_params(cfg: ModelConfig) -> int:
    return 2 * _norm_params(cfg) + _attention_params(cfg) + _mlp_params(cfg)


def _decoder_block_params(cfg: ModelConfig) -> int:
    return 3 * _norm_params(cfg) + 2 * _attention_params(cfg) + _mlp_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Parameters of the token lookup tables (1 table when tied or decoder-only, 2 for untied enc-dec)."""
    tables = 1 if (cfg.kind == "lm" or cfg.tie_embeddings) else 2
    return tables * cfg.vocab_size * cfg.d_model


def param_count(cfg: ModelConfig) -> int:
    """Every trainable parameter, shared ones once (equals sum(p.numel() for p in model.parameters()))."""
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    if cfg.kind == "lm":
        trunk = cfg.n_layers * _block_params(cfg) + _norm_params(cfg)
    else:
        trunk = (
            cfg.encoder_layers * _block_params(cfg)
            + _norm_params(cfg)
            + cfg.n_layers * _decoder_block_params(cfg)
            + _norm_params(cfg)
        )
    return embedding_params(cfg) + trunk + head


def matmul_params(cfg: ModelConfig) -> int:
    """N of the FLOPs formula: every parameter but the lookup tables, plus the LM head's d x V matmul."""
    return param_count(cfg) - embedding_params(cfg) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings
                                                       else 0)


def lm_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token of a decoder-only LM at sequence length seq_len."""
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layers * cfg.d_model * seq_len


def encdec_train_flops(cfg: ModelConfig, src_len: int, tgt_len: int) -> float:
    """Forward + backward FLOPs of one (source, target) pair of an encoder-decoder.

    Encoder weights act on source tokens, decoder weights and the head on target tokens; attention
    adds 12*L*d*S^2 (bidirectional encoder), 6*L*d*T^2 (causal decoder) and 12*L*d*T*S (cross).
    """
    d, V = cfg.d_model, cfg.vocab_size
    enc = cfg.encoder_layers * _block_params(cfg) + _norm_params(cfg)
    dec = cfg.n_layers * _decoder_block_params(cfg) + _norm_params(cfg) + V * d
    dense = 6.0 * (enc * src_len + dec * tgt_len)
    attn = 12.0 * cfg.encoder_layers * d * src_len**2 + cfg.n_layers * d * (6.0 * tgt_len**2
                                                                            + 12.0 * tgt_len * src_len)
    return dense + attn


def batch_train_flops(cfg: ModelConfig, batch: dict) -> float:
    """Training FLOPs of one micro-batch as the loader gives it (translation: its padding included, as
    computed): LM windows `tokens` (B, T + 1), or translation `src` (B, S) and `tgt` (B, T)."""
    if "tokens" in batch:
        B, T1 = batch["tokens"].shape
        return lm_train_flops_per_token(cfg, T1 - 1) * B * (T1 - 1)
    B, S = batch["src"].shape
    return B * encdec_train_flops(cfg, S, batch["tgt"].shape[1])
