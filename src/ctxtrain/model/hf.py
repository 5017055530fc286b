"""Hugging Face Llama-family models and ctxtrain's `DecoderLM`, both ways: configs, weight names, folders.

One mapping serves `model.init_from` (a Hugging Face folder into ctxtrain) and `ctxtrain export` (ctxtrain
into a Hugging Face folder). Llama, Mistral (without a sliding window) and Qwen2 (biases on q, k and v) are
the same network as `DecoderLM` with RMSNorm, SwiGLU and RoPE in the rotate-halves layout: the weights map by
name alone. RoPE settings are read in both of a config's forms — `rope_theta` + `rope_scaling` (most published
checkpoints, `type` or `rope_type`) and transformers 5's `rope_parameters` — and written in both.

torch is imported where tensors are handled: reading a folder's config (the driver resolves `init_from` before
any worker starts) needs none.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator, Optional

from ctxtrain.model.config import ModelConfig, RopeScaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
CLASS_OF = {name: cls for cls, name in ARCHITECTURES.items()}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


class UnsupportedModel(ValueError):
    """A folder or config that this mapping cannot express; the message names what and what is supported."""


def check_llama_shaped(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first field that a Llama-family model cannot express."""
    wanted = {"kind": "lm", "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
              "embed_scale": False}
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"model.{name}={getattr(cfg, name)}: the Llama format needs {name}={value}")


# ---------------------------------------------------------------------------------------------------------
# Configs


def read_config(folder: str | Path) -> dict:
    """A Hugging Face folder's config.json (one line when it is missing or not JSON)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UnsupportedModel(f"{folder} has no config.json; model.init_from takes a Hugging Face model "
                               "folder or a ctxtrain export") from None
    except (OSError, ValueError) as e:
        raise UnsupportedModel(f"{path} cannot be read as JSON ({str(e).splitlines()[0][:80]})") from None


def is_hf_folder(folder: str | Path) -> bool:
    """A Hugging Face model folder (its config names `architectures`), not a ctxtrain export."""
    try:
        return "architectures" in read_config(folder)
    except UnsupportedModel:
        return False


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either form of a Hugging Face config."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" in params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), RopeScaling()
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedModel(f"RoPE scaling {kind!r} is not supported; ctxtrain reads linear, dynamic, "
                               "yarn and llama3")
    fields = {"type": kind, "factor": float(scaling.get("factor", 1.0))}
    if scaling.get("original_max_position_embeddings"):
        fields["original_max_position"] = int(scaling["original_max_position_embeddings"])
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                "truncate"):
        if scaling.get(key) is not None:
            fields[key] = scaling[key]
    return float(theta), RopeScaling(**fields)


def model_fields(hf: dict, where: str = "the folder") -> dict:
    """The `model` section that a Hugging Face config describes (Llama, Mistral, Qwen2); UnsupportedModel in
    one line for anything else."""
    names = hf.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModel(f"{where}: architecture {', '.join(names) or '(none)'} is not supported; "
                               f"ctxtrain loads {', '.join(ARCHITECTURES)}")
    if arch == "mistral" and hf.get("sliding_window"):
        raise UnsupportedModel(f"{where}: Mistral with a sliding window ({hf['sliding_window']}) is not "
                               "supported; ctxtrain attends over the whole window (a config without "
                               "sliding_window is)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{where}: hidden_act={hf['hidden_act']}; ctxtrain's SwiGLU is silu")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, d // heads):
        raise UnsupportedModel(f"{where}: head_dim={hf['head_dim']} is not hidden_size / num_attention_heads "
                               f"= {d // heads}, which ctxtrain assumes")
    theta, scaling = _rope_from_hf(hf)
    return {  # plain data: the driver writes it into the run's config
        "kind": "lm", "architecture": arch, "vocab_size": int(hf["vocab_size"]), "d_model": d,
        "n_layers": int(hf["num_hidden_layers"]), "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads), "d_ff": int(hf["intermediate_size"]),
        "mlp": "swiglu", "norm": "rmsnorm", "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "pos": "rope",
        "rope_theta": theta, "rope_scaling": dataclasses.asdict(scaling),
        "max_position": hf.get("max_position_embeddings"),
        "bias": bool(hf.get("mlp_bias", False)),
        "qkv_bias": arch == "qwen2" or bool(hf.get("attention_bias", False)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "embed_scale": False,
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` of the equivalent Hugging Face model (the architecture it came from, else Llama),
    with its RoPE settings in both forms."""
    check_llama_shaped(cfg)
    arch = cfg.architecture or "llama"
    r = cfg.rope_scaling
    rope: dict = {"rope_type": r.type or "default", "rope_theta": cfg.rope_theta}
    if r.type:
        rope["factor"] = r.factor
        if cfg.original_context and r.type != "dynamic":
            rope["original_max_position_embeddings"] = cfg.original_context
        if r.type == "llama3":
            rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
        if r.type == "yarn":
            rope.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            if r.attention_factor is not None:
                rope["attention_factor"] = r.attention_factor
    # dynamic scales past max_position_embeddings: that is its original context
    max_position = cfg.original_context if r.type == "dynamic" else cfg.max_position
    out = {
        "architectures": [CLASS_OF[arch]],
        "model_type": arch,
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
        "rope_scaling": None if not r.type else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "attention_bias": cfg.qkv_bias and arch != "qwen2",
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": max_position or 1 << 20,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
    }
    if arch == "mistral":
        out["sliding_window"] = None
    return out


# ---------------------------------------------------------------------------------------------------------
# Weights


def to_hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """ctxtrain DecoderLM names -> Hugging Face names (tied head: lm_head left out, as transformers saves
    it)."""
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


def from_hf_name(name: str) -> Optional[str]:
    """A Hugging Face weight name -> ctxtrain's (None for what ctxtrain does not hold: rotary buffers)."""
    layer_back = {v: k for k, v in _LAYER_NAMES.items()}
    top_back = {v: k for k, v in _TOP_NAMES.items()}
    m = _HF_BLOCK.fullmatch(name)
    if m:
        inner = layer_back.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return top_back.get(name)


def from_hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Hugging Face names -> ctxtrain DecoderLM names (a tied head shares the embedding)."""
    check_llama_shaped(cfg)
    out = {from_hf_name(k): v for k, v in state.items() if from_hf_name(k)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_embed.weight"]
    return out


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards its index names (one line when
    there are none)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise UnsupportedModel(f"{index} is not a safetensors index ({str(e)[:80]})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UnsupportedModel(f"{folder}: the shard {missing[0]} that model.safetensors.index.json "
                                   "names is missing")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise UnsupportedModel(f"{folder} holds no weights (no model.safetensors, no "
                           "model.safetensors.index.json); ctxtrain reads safetensors folders "
                           "(save_pretrained writes them)")


def read_weights(folder: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    """(ctxtrain name, tensor) of every weight of a pretrained folder, one at a time."""
    weights = PretrainedWeights(folder, cfg)
    for name in sorted(weights.names()):
        yield name, weights.get(name)


# ---------------------------------------------------------------------------------------------------------
# A pretrained folder: a Hugging Face model or a ctxtrain export


def pretrained_fields(folder: str | Path) -> dict:
    """The `model` section a folder describes: a Hugging Face config, or a ctxtrain export's own."""
    config = read_config(folder)
    if "ctxtrain_model" in config:
        return {k: v for k, v in config["ctxtrain_model"].items() if k != "init_from"}
    if "architectures" not in config:
        raise UnsupportedModel(f"{folder}/config.json names no architectures and is no ctxtrain export; "
                               f"model.init_from takes a Hugging Face folder ({', '.join(ARCHITECTURES)}) or "
                               "the --out of `ctxtrain export`")
    return model_fields(config, str(folder))


class PretrainedWeights:
    """The weights of a folder by ctxtrain name, read one tensor at a time from memory-mapped safetensors (a
    Hugging Face folder's names mapped; a ctxtrain export's are ctxtrain's already). A tied head is the
    embedding."""

    def __init__(self, folder: str | Path, cfg: ModelConfig):
        from safetensors import safe_open

        self.cfg, self.where = cfg, {}
        export = "ctxtrain_model" in read_config(folder)
        self.files = {}
        for path in weight_files(folder):
            handle = safe_open(str(path), framework="pt")
            self.files[path] = handle
            for key in handle.keys():
                name = key if export else from_hf_name(key)
                if name is not None:
                    self.where[name] = (handle, key)
        if cfg.tie_embeddings and "tok_embed.weight" in self.where:
            self.where.setdefault("lm_head.weight", self.where["tok_embed.weight"])

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str):
        handle, key = self.where[name]
        return handle.get_tensor(key)

    def get_flat(self, name: str, start: int, end: int):
        """Elements start..end-1 of the weight flattened, reading only the rows that hold them (a ZeRO-3
        rank's partition: each rank reads its own share of the file)."""
        handle, key = self.where[name]
        part = handle.get_slice(key)
        shape = part.get_shape()
        row = 1
        for n in shape[1:]:
            row *= n
        first, last = start // row, -(-end // row)
        return part[first:last].reshape(-1)[start - first * row:end - first * row]
