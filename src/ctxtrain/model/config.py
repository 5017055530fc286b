"""The model's own config: the shape of the network and nothing about how it is trained.

It lives beside the model (and imports nothing but the standard library) so that the model
package stays free of the rest of ctxtrain; `ctxtrain.config` nests it as the `model` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class RopeScaling:
    """A RoPE scaling rule, as transformers implements it for Llama-family models (`rope_scaling` /
    `rope_parameters` in a Hugging Face config): how a pretrained model's rotary positions stretch to a longer
    context."""

    type: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = None
    """linear: positions divided by factor. dynamic: NTK-aware base, grown with the sequence past the original
    context. yarn: NTK-by-parts interpolation with an attention factor. llama3: Llama 3.1's by-wavelength
    rule. null: plain RoPE."""

    factor: float = 1.0
    """How many times the original context the positions are stretched over (>= 1)."""

    original_max_position: Optional[int] = None
    """The context the pretrained model was trained for (yarn, llama3, dynamic); null: model.max_position."""

    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position / low_freq_factor are divided by factor."""

    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position / high_freq_factor are kept."""

    beta_fast: float = 32.0
    """yarn: rotations below which a dimension is extrapolated (kept)."""

    beta_slow: float = 1.0
    """yarn: rotations above which a dimension is interpolated (divided by factor)."""

    attention_factor: Optional[float] = None
    """yarn: the scale of cos and sin (of attention's logits); null: 0.1 ln(factor) + 1, the paper's."""

    truncate: bool = True
    """yarn: round the ramp's ends to whole dimensions (transformers' default)."""


@dataclass
class ModelConfig:
    kind: Literal["lm", "encdec"] = "lm"
    """`lm`: decoder-only causal LM. `encdec`: encoder-decoder for translation (the seed's)."""

    vocab_size: int = 8192
    """Rows of the token embedding; must cover the tokenizer of `data.path`."""

    d_model: int = 256
    """Width of the residual stream."""

    n_layers: int = 4
    """Transformer blocks (for `encdec`: decoder blocks, and encoder blocks unless `n_encoder_layers` is
    set)."""

    n_encoder_layers: Optional[int] = None
    """Encoder blocks of an `encdec` model; null means `n_layers`."""

    n_heads: int = 4
    """Attention heads; `d_model` must be divisible by it."""

    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means `n_heads` (plain multi-head)."""

    d_ff: int = 704
    """Hidden width of the MLP (for SwiGLU: of each of the gate and up projections)."""

    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP kind: `swiglu` (Llama) or `gelu` (the seed's two-layer MLP, with GELU)."""

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalization before each sub-layer (pre-norm) and at the end of each stack."""

    norm_eps: float = 1e-5
    """Epsilon of the norms."""

    pos: Literal["rope", "sinusoidal"] = "rope"
    """Positions: `rope` rotates queries and keys; `sinusoidal` adds the seed's sine table to the
    embeddings."""

    rope_theta: float = 10000.0
    """RoPE base; larger bases are the usual long-context choice."""

    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """RoPE scaling rule (transformers' linear, dynamic, yarn, llama3) for a context past the pretrained
    one."""

    max_position: Optional[int] = None
    """The context the model is trained for (a Hugging Face config's max_position_embeddings); null: not
    stated. Sinusoidal positions and the probes refuse longer ones."""

    bias: bool = False
    """Biases in the linear layers (the seed has them, Llama does not)."""

    qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2)."""

    tie_embeddings: bool = False
    """Share the token embedding with the output projection (and, for `encdec`, source with target)."""

    embed_scale: bool = False
    """Multiply token embeddings by sqrt(d_model), as the seed does."""

    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output; 0 disables it."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""

    init_from: Optional[str] = None
    """Start from these weights: a Hugging Face model folder (Llama, Mistral, Qwen2: config.json and
    safetensors) or a ctxtrain export. The rest of this section is then read from it (fields given here must
    agree, except rope_scaling, max_position and dropout)."""

    architecture: Optional[str] = None
    """The Hugging Face architecture the weights came from (llama, mistral, qwen2); an export writes it back.
    null: ctxtrain's own model (exported as Llama when it is Llama-shaped)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"model.{name}={value}: must be a positive integer")
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ValueError(
                f"model.n_heads={self.n_heads}: d_model={self.d_model} is not divisible by it; "
                f"choose one of {divisors[-6:]}"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads} (grouped-query "
                "attention)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(
                f"model.pos=rope: head dim d_model/n_heads={self.head_dim} is odd; RoPE needs an even head "
                "dim"
            )
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"model.d_model={self.d_model}: the sinusoidal table needs an even width")
        if self.n_encoder_layers is not None and self.n_encoder_layers < 1:
            raise ValueError(f"model.n_encoder_layers={self.n_encoder_layers}: must be a positive integer or "
                             "null")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps, model.init_std and model.rope_theta must be positive")
        if self.max_position is not None and self.max_position < 1:
            raise ValueError(f"model.max_position={self.max_position}: must be a positive number of tokens "
                             "or null")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        r = self.rope_scaling
        if r.type is None:
            return
        if self.pos != "rope":
            raise ValueError(f"model.rope_scaling.type={r.type}: scales RoPE, and model.pos={self.pos}")
        if r.factor < 1:
            raise ValueError(f"model.rope_scaling.factor={r.factor}: must be >= 1 (how many times the "
                             "original context the positions stretch over)")
        if r.type != "linear" and self.original_context is None:
            raise ValueError(f"model.rope_scaling.type={r.type} needs the original context: set "
                             "model.rope_scaling.original_max_position (or model.max_position)")

    @property
    def original_context(self) -> Optional[int]:
        """The pretrained context a RoPE scaling rule starts from."""
        return self.rope_scaling.original_max_position or self.max_position

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers if self.n_encoder_layers is not None else self.n_layers
