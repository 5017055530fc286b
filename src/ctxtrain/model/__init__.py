"""The Transformer models; imports only torch (and the standard library)."""

from ctxtrain.model.config import ModelConfig
from ctxtrain.model.flops import encdec_train_flops, lm_train_flops_per_token, matmul_params, param_count
from ctxtrain.model.transformer import (
    IGNORE_INDEX,
    Attention,
    DecoderLM,
    EncoderDecoder,
    attention_core,
    build_model,
)

__all__ = [
    "IGNORE_INDEX",
    "Attention",
    "DecoderLM",
    "EncoderDecoder",
    "ModelConfig",
    "attention_core",
    "build_model",
    "encdec_train_flops",
    "lm_train_flops_per_token",
    "matmul_params",
    "param_count",
]
