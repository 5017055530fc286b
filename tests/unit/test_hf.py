"""Hugging Face folders into ctxtrain and back: small Llama, Qwen2 (q/k/v biases) and Mistral models made here
with `transformers` and saved with `save_pretrained` (random weights), loaded through ctxtrain's mapping, give
transformers' logits (fp32) at a length past their original context, under plain RoPE and every scaling rule,
from either form of the config; and ctxtrain's config and weights load back into transformers."""

from __future__ import annotations

import json

import pytest
import torch

from ctxtrain.model import DecoderLM, ModelConfig
from ctxtrain.model.hf import (
    UnsupportedModel,
    hf_config,
    model_fields,
    read_config,
    read_weights,
    to_hf_state_dict,
    weight_files,
)
from tests.helpers import make_hf_folder

transformers = pytest.importorskip("transformers")

ORIGINAL = 64  # the made models' context; the logits are compared at LONG > ORIGINAL
LONG = 150
RULES = {
    "plain": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}
def make_folder(path, arch="llama", rope=None, tie=False):
    return make_hf_folder(path, arch, rope, tie, max_position_embeddings=ORIGINAL)


def load_ours(path) -> DecoderLM:
    cfg = ModelConfig(**model_fields(read_config(path), str(path)))
    model = DecoderLM(cfg).eval()
    state = dict(read_weights(path, cfg))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embed.weight"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rule", list(RULES))
def test_logits_equal_transformers_past_the_original_context(tmp_path, arch, rule):
    if arch != "llama" and rule not in ("plain", "yarn"):
        pytest.skip("the rules are the architecture-independent RoPE code: every rule on Llama, yarn on all")
    theirs = make_folder(tmp_path, arch, RULES[rule], tie=arch == "qwen2")
    ours = load_ours(tmp_path)
    assert ours.cfg.architecture == arch and ours.cfg.qkv_bias == (arch == "qwen2")
    assert ours.cfg.rope_scaling.type == (None if rule == "plain" else rule)
    tokens = torch.randint(0, 300, (2, LONG))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "yarn", "llama3"])
def test_the_legacy_config_form_reads_the_same(tmp_path, rule):
    """rope_theta + rope_scaling (most published checkpoints, `type` or `rope_type`) read as
    rope_parameters."""
    make_folder(tmp_path, "llama", RULES[rule])
    new = ModelConfig(**model_fields(read_config(tmp_path)))
    config = read_config(tmp_path)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {("type" if rule == "linear" else "rope_type"): params.pop("rope_type"),
                              **params}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelConfig(**model_fields(read_config(tmp_path))) == new


def test_a_sharded_folder_loads_as_one(tmp_path):
    """Sharded safetensors (model.safetensors.index.json and its shards), as large published models are."""
    theirs = make_folder(tmp_path / "one", "qwen2")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(weight_files(tmp_path / "sharded")) > 3
    tokens = torch.randint(0, 300, (1, LONG))
    with torch.no_grad():
        torch.testing.assert_close(load_ours(tmp_path / "sharded")(tokens), theirs(tokens).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("arch, rule", [(a, r) for r in RULES for a in ("llama", "qwen2")
                                        if a == "llama" or r == "yarn"])
def test_our_config_and_weights_load_back_into_transformers(tmp_path, arch, rule):
    theirs = make_folder(tmp_path / "in", arch, RULES[rule], tie=arch == "qwen2")
    ours = load_ours(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(ours.cfg)))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_hf_state_dict(ours.state_dict(), ours.cfg).items()},
              str(out / "model.safetensors"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(theirs)  # the same architecture back
    tokens = torch.randint(0, 300, (1, LONG))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, theirs(tokens).logits, rtol=1e-5, atol=1e-5)


def test_what_the_mapping_refuses_is_named(tmp_path):
    make_folder(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModel, match="holds no weights"):
        weight_files(tmp_path)
    config = read_config(tmp_path)
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel is not supported; ctxtrain loads "
                                               "LlamaForCausalLM"):
        model_fields({**config, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModel, match="'longrope' is not supported"):
        model_fields({**config, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModel, match="sliding window"):
        model_fields({**config, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
