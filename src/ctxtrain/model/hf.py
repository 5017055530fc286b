"""Weight mapping between `DecoderLM` and Hugging Face `LlamaForCausalLM` (names only: same RoPE layout).

Used by the parity test and by `ctxtrain export`. Imports only torch; building the Hugging Face config
dict needs no `transformers` either.
"""

from __future__ import annotations

import re

import torch

from ctxtrain.model.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def check_llama_shaped(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first field that Llama cannot express."""
    wanted = {"kind": "lm", "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
              "embed_scale": False}
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"model.{name}={getattr(cfg, name)}: the Llama format needs {name}={value}")


def to_llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ctxtrain DecoderLM names -> LlamaForCausalLM names (tied head: lm_head left out, as HF saves it)."""
    check_llama_shaped(cfg)
    out = {}
    for name, tensor in state.items():
        m = _BLOCK.fullmatch(name)
        if m:
            out[f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"] = tensor
        elif name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        else:
            out[_TOP_NAMES[name]] = tensor
    return out


def from_llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> ctxtrain DecoderLM names."""
    check_llama_shaped(cfg)
    layer_back = {v: k for k, v in _LAYER_NAMES.items()}
    top_back = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            out[f"blocks.{m.group(1)}.{layer_back[m.group(2)]}"] = tensor
        elif name in top_back:
            out[top_back[name]] = tensor
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_embed.weight"]
    return out


def llama_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` of the equivalent LlamaForCausalLM."""
    check_llama_shaped(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": 1 << 20,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
    }
