"""The Transformer models; imports only torch (and the standard library).

The config and the FLOP/parameter arithmetic import without torch: a driver that only reads a config, checks
it and starts workers (`ctxtrain train`, `plan`, `status`) does not pay torch's import (~2 s on 2 CPU cores).
The modules themselves load on first use of their names.
"""

from ctxtrain.model.config import ModelConfig
from ctxtrain.model.flops import (
    batch_train_flops,
    encdec_train_flops,
    lm_train_flops_per_token,
    matmul_params,
    param_count,
)

_TRANSFORMER = ("IGNORE_INDEX", "Attention", "DecoderLM", "EncoderDecoder", "attention_core", "build_model")

__all__ = [
    "IGNORE_INDEX",
    "Attention",
    "DecoderLM",
    "EncoderDecoder",
    "ModelConfig",
    "attention_core",
    "batch_train_flops",
    "build_model",
    "encdec_train_flops",
    "lm_train_flops_per_token",
    "matmul_params",
    "param_count",
]


def __getattr__(name: str):
    if name in _TRANSFORMER:
        from ctxtrain.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'ctxtrain.model' has no attribute {name!r}")
