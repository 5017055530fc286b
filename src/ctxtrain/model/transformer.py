"""The Transformer, read top to bottom: norms, positions, attention, MLP, blocks, the two models.

Notable:
- One attention module serves self-attention (causal or not), cross-attention and grouped-query heads.
  Its core is a plain function of (q, k, v) in (B, T, H, D) layout (`attention_core`, SDPA), stored on the
  module as `.core` so that an engine can swap in sequence-parallel or offloaded attention
  (DeepSpeed-Ulysses' `DistributedAttention` takes exactly such a function).
- The MLP is a module with its own weights (`SwiGLU`, `GeluMLP`), so a tiled MLP can wrap it.
- The LM head and loss are separable from the trunk: `hidden_states()` runs the trunk, `head_loss()`
  turns hidden states into a loss, so a tiled loss never has to see the full logits.
- RoPE follows the Hugging Face Llama convention (rotate the two halves of each head), so Llama weights
  map onto `DecoderLM` by name alone (see `ctxtrain.model.hf`).
- Decoding runs the same forward with a `Cache`: each attention keeps its keys and values (`AttentionCache`),
  so one implementation of the maths serves training and incremental decoding (`ctxtrain.model.decode`).
- Padding masks are boolean, True where a token is real.
- Positions can start past 0 (`pos_offset`): a slice of a longer sequence (sequence parallelism) or the next
  tokens after a cache get the positions of their place in the whole sequence.
- No distribution here: no DeepSpeed, Ray or process groups. The engine wraps this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ctxtrain.model.config import ModelConfig

IGNORE_INDEX = -100
"""Target id that the loss skips (padding in translation batches)."""

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, D)


# ---------------------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama); computed in float32 and cast back, as Hugging Face does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# ---------------------------------------------------------------------------------------------------------
# Positions


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The seed's table: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same), for positions of any
    shape (...,) -> (..., dim)."""
    device = positions.device
    pos = positions.to(torch.float32)[..., None]
    inv = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(*positions.shape, dim, device=device)
    table[..., 0::2] = torch.sin(pos * inv)
    table[..., 1::2] = torch.cos(pos * inv)
    return table


def sinusoidal_table(length: int, dim: int, device=None, offset: int = 0) -> torch.Tensor:
    """The sinusoids of positions offset..offset+length-1: (T, dim)."""
    return sinusoids(torch.arange(offset, offset + length, device=device), dim)


def rope_frequencies(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (D/2,) and the scale of cos and sin under the model's scaling rule, as
    transformers computes them for Llama-family models (modeling_rope_utils), so that a pretrained model's
    positions mean here what they meant there. seq_len: the positions' extent (only `dynamic` grows with it).

    linear divides the frequencies by factor. dynamic (NTK) raises the base once seq_len passes the original
    context: base x (factor x seq_len / original - (factor - 1))^(D / (D - 2)). yarn blends each dimension
    between the original frequency (fast-rotating dimensions, kept) and it divided by factor (slow ones) along
    a linear ramp between the dimensions that turn beta_fast and beta_slow times over the original context,
    and scales cos and sin by its attention factor. llama3 divides the frequencies of wavelengths longer than
    original / low_freq_factor by factor, keeps those shorter than original / high_freq_factor, and blends
    between."""
    D, theta, r = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    exponents = torch.arange(0, D, 2, device=device, dtype=torch.float32) / D
    inv = 1.0 / (theta ** exponents)
    if r.type is None:
        return inv, 1.0
    original = cfg.original_context
    if r.type == "linear":
        return inv / r.factor, 1.0
    if r.type == "dynamic":
        extent = max(seq_len, original)
        base = theta * ((r.factor * extent / original) - (r.factor - 1)) ** (D / (D - 2))
        return 1.0 / (base ** exponents), 1.0
    if r.type == "yarn":
        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
            return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(r.beta_fast), dim_of(r.beta_slow)
        if r.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(D // 2, device=device, dtype=torch.float32) - low) / (high - low), 0,
                           1)
        kept = 1 - ramp  # the share of the original (extrapolated) frequency
        inv = (inv / r.factor) * (1 - kept) + inv * kept
        scale = r.attention_factor if r.attention_factor is not None else (
            0.1 * math.log(r.factor) + 1.0 if r.factor > 1 else 1.0)
        return inv, scale
    # llama3
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / r.low_freq_factor, original / r.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (original / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    blended = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled), 1.0


class Rotary(nn.Module):
    """RoPE angles for positions offset..offset+T-1 (or given per token: (B, T) positions, for documents that
    restart them); no parameters, nothing in the state dict. extent: the length of the whole sequence when
    these tokens are a slice of it (sequence parallelism), which `dynamic` scaling grows with; by default the
    end of the slice."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._cache: dict = {}

    def forward(self, length: int, device: torch.device, dtype: torch.dtype, offset: int = 0,
                positions: Optional[torch.Tensor] = None, extent: Optional[int] = None) -> Rope:
        extent = extent or offset + length
        if positions is not None:
            inv_freq, scale = rope_frequencies(self.cfg, extent, device)
            freqs = positions[..., None].to(torch.float32) * inv_freq  # (B, T, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)
            return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        key = (offset, length, extent, device, dtype)
        if key not in self._cache:
            self._cache.clear()
            inv_freq, scale = rope_frequencies(self.cfg, extent, device)
            positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq  # (T, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
            cos, sin = emb.cos(), emb.sin()
            if scale != 1.0:
                cos, sin = cos * scale, sin * scale
            self._cache[key] = (cos.to(dtype), sin.to(dtype))
        return self._cache[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x of shape (B, T, H, D) by the angles of its positions: cos, sin of shape (T, D), or (B, T, D)
    when every row has positions of its own."""
    cos, sin = rope
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D)
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------
# Attention

AttentionCore = Callable[..., torch.Tensor]


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_mask: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    docs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v through SDPA.

    q: (B, T, H, D); k, v: (B, S, KV, D) with H a multiple of KV (grouped-query heads). With S > T the queries
    are the last T positions of the S (decoding after a cache): causal then aligns them at the end.
    key_mask: (B, S) bool, True for real keys, or (B, T, S), True where a query sees a key. docs: (B, T)
    document ids of a packed window (causal self-attention within each document: `document_attention`).
    Returns (B, T, H, D).
    """
    if docs is not None:
        return document_attention(q, k, v, docs, dropout=dropout)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    T, S = q.shape[-2], k.shape[-2]
    if key_mask is None or key_mask.dim() == 3:  # (B, T, S): which keys each query sees (packed pairs)
        mask = None if key_mask is None else key_mask[:, None]  # (B, 1, T, S)
    else:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
    if causal and (mask is not None or T != S):
        if T > 1:  # one new query sees every key: nothing to hide
            past = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            mask = past if mask is None else mask & past
        causal = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)  # (B, T, H, D)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor, *,
                       dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within the documents of packed windows, never building a [T, T] mask: a token sees the
    earlier tokens of its own document only. q (B, T, H, D), k, v (B, T, KV, D), docs (B, T) document ids,
    non-decreasing along T. On a GPU FlexAttention with a block mask skips every block of keys outside the
    query's document; elsewhere `DocumentAttention` runs one causal SDPA call per document. No attention
    dropout (data.doc_mask needs model.dropout=0)."""
    if dropout:
        raise ValueError("document_attention has no attention dropout (data.doc_mask needs model.dropout=0)")
    if q.is_cuda:
        return flex_documents(q, k, v, docs)
    lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in docs]
    return DocumentAttention.apply(q, k, v, lengths)


class DocumentAttention(torch.autograd.Function):
    """One causal SDPA call per document of each row, written into one output; the backward pass recomputes
    each document's attention and writes its gradients into whole-window dq, dk, dv. It keeps q, k and v
    (which attention keeps anyway) and nothing per document, so memory is plain attention's: no copy of the
    output, no per-document gradients concatenated (autograd through the pieces would hold both)."""

    @staticmethod
    def forward(ctx, q, k, v, lengths: list[list[int]]):
        ctx.save_for_backward(q, k, v)
        ctx.lengths = lengths
        out = torch.empty_like(q)
        for b, start, end in _segments(lengths):
            out[b, start:end] = _causal(q[b, start:end], k[b, start:end], v[b, start:end])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, start, end in _segments(ctx.lengths):
            with torch.enable_grad():
                part = [t[b, start:end].detach().requires_grad_() for t in (q, k, v)]
                grads = torch.autograd.grad(_causal(*part), part, grad_out[b, start:end])
            dq[b, start:end], dk[b, start:end], dv[b, start:end] = grads
        return dq, dk, dv, None


def _segments(lengths: list[list[int]]):
    """(row, start, end) of every document of every row."""
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            yield b, start, start + n
            start += n


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over one document: q (n, H, D), k, v (n, KV, D) -> (n, H, D)."""
    heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, h, n, D)
    out = F.scaled_dot_product_attention(*heads_first, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_FLEX: dict = {}  # the compiled kernel, and the block mask of the last window's documents (its `docs`)


def flex_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor,
                   compiled: bool = True) -> torch.Tensor:
    """document_attention through FlexAttention's document mask (torchtitan's): the block mask is built once
    per window (every layer, and the recomputation under activation checkpointing, passes the same `docs`
    tensor), by the compiled create_block_mask, which evaluates the mask block by block. compiled=False runs
    both in eager mode: FlexAttention's reference, which forms the whole [T, T] mask (a CPU test of the
    mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX.get("docs") is not docs:
        def same_document_causal(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

        B, T = docs.shape
        if compiled and "make_mask" not in _FLEX:  # compiled, it never forms the [T, T] mask
            _FLEX["make_mask"] = torch.compile(create_block_mask)
        make = _FLEX["make_mask"] if compiled else create_block_mask
        _FLEX.update(docs=docs, mask=make(same_document_causal, B, None, T, T, device=docs.device))
    if compiled and "kernel" not in _FLEX:
        _FLEX["kernel"] = torch.compile(flex_attention, dynamic=False)
    kernel = _FLEX["kernel"] if compiled else flex_attention
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=_FLEX["mask"],
                 enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@dataclass
class AttentionCache:
    """The keys and values that one attention keeps while decoding, (B, S, KV, D): self-attention's grow by
    each step's tokens; cross-attention's are the encoder output's, computed at the first step and kept."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention with projections; self-attention when `memory` is None, else cross-attention.
    With a cache (decoding) the new tokens' keys and values join the cached ones (self-attention), or the
    cached keys and values of the memory are used (cross-attention)."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.core: AttentionCore = attention_core

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[Rope] = None,
        key_mask: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
        cache: Optional[AttentionCache] = None,
        docs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        if rope is not None:
            q = apply_rope(q, rope)
        if memory is not None and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # cross-attention while decoding: the memory's keys, computed once
        else:
            kv_input = x if memory is None else memory
            S = kv_input.shape[1]
            k = self.wk(kv_input).view(B, S, self.kv_heads, self.head_dim)  # (B, S, KV, D)
            v = self.wv(kv_input).view(B, S, self.kv_heads, self.head_dim)
            if rope is not None:
                k = apply_rope(k, rope)
            if cache is not None and memory is None and cache.k is not None:
                # the past, then the new
                k, v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
            if cache is not None:
                cache.k, cache.v = k, v
        dropout = self.dropout if self.training else 0.0
        out = self.core(q, k, v, causal=self.causal, key_mask=key_mask, dropout=dropout, docs=docs)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------------------
# MLP


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — Llama's MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — the seed's position-wise feed-forward network, with GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)


# ---------------------------------------------------------------------------------------------------------
# Blocks: pre-norm residual sub-layers, x + f(norm(x))


@dataclass
class LayerCache:
    """One block's decoding caches: its self-attention's and (decoder block of the encoder-decoder) its
    cross-attention's."""

    attn: AttentionCache = field(default_factory=AttentionCache)
    cross: AttentionCache = field(default_factory=AttentionCache)


class Block(nn.Module):
    """Self-attention then MLP. Causal in the decoder-only LM, bidirectional in the encoder."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Optional[Rope], mask: Optional[torch.Tensor],
                cache: Optional[LayerCache] = None, docs: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, key_mask=mask, cache=cache and cache.attn,
                                       docs=docs))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder's output, then MLP (the seed's decoder
    layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal=True)
        self.cross_norm = make_norm(cfg)
        self.cross = Attention(cfg, causal=False)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[Rope],
        mask: Optional[torch.Tensor],
        memory: torch.Tensor,
        memory_mask: Optional[torch.Tensor],
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, key_mask=mask, cache=cache and cache.attn))
        x = x + self.dropout(self.cross(self.cross_norm(x), key_mask=memory_mask, memory=memory,
                                        cache=cache and cache.cross))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# ---------------------------------------------------------------------------------------------------------
# Models


def init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32, skipping IGNORE_INDEX targets."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def embed(table: nn.Embedding, tokens: torch.Tensor, cfg: ModelConfig, pos_offset: int = 0,
          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token ids -> vectors: table lookup, the seed's optional sqrt(d) scale and sinusoidal positions (of
    pos_offset.., or of each token's own: positions (B, T))."""
    x = table(tokens)  # (B, T, d)
    if cfg.embed_scale:
        x = x * math.sqrt(cfg.d_model)
    if cfg.pos == "sinusoidal":
        table = sinusoidal_table(tokens.shape[1], cfg.d_model, x.device, pos_offset) if positions is None \
            else sinusoids(positions, cfg.d_model)
        x = x + table.to(x.dtype)
    return x


def lm_targets(tokens: torch.Tensor, docs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """A packed window (B, L+1) -> inputs (B, L) and next-token targets (B, L). With the window's document
    ids (B, L+1), a target of another document than its input (the first token of a document, predicted from
    the EOS before it) is not trained on (IGNORE_INDEX), as Megatron's eod_mask_loss does: a document's
    losses are then those of the document alone."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if docs is not None:
        targets = targets.masked_fill(docs[:, 1:] != docs[:, :-1], IGNORE_INDEX)
    return inputs, targets


@dataclass
class Cache:
    """A model's decoding state: each block's caches, the positions already seen, their key mask (False: left
    padding; None while nothing is padded), and for the encoder-decoder the encoder's output and its mask."""

    layers: list[LayerCache]
    length: int = 0
    key_mask: Optional[torch.Tensor] = None  # (B, length)
    memory: Optional[torch.Tensor] = None  # (B, S, d)
    memory_mask: Optional[torch.Tensor] = None  # (B, S)

    def extend_mask(self, mask: Optional[torch.Tensor], tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """The key mask over the cached positions and the new tokens (mask: theirs, None when all are
        real)."""
        if mask is None and self.key_mask is None:
            return None  # nothing padded so far: no mask at all
        B, T = tokens.shape
        new = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        if self.key_mask is None and bool(new.all()):
            return None
        before = self.key_mask if self.key_mask is not None else torch.ones(B, self.length, dtype=torch.bool,
                                                                            device=tokens.device)
        self.key_mask = torch.cat([before, new], dim=1)
        return self.key_mask

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (in that order): beam search's reordering after each step."""
        for layer in self.layers:
            layer.attn.select(index)
            layer.cross.select(index)
        for name in ("key_mask", "memory", "memory_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


class DecoderLM(nn.Module):
    """Decoder-only causal LM: embed -> causal blocks -> norm -> LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def hidden_states(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, pos_offset: int = 0,
                      cache: Optional[Cache] = None, docs: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
        """The trunk: (B, T) token ids at positions pos_offset.. -> (B, T, d) normalized hidden states. With a
        cache (decoding) the tokens follow the cached ones: their positions, and attention over the cache
        too. A packed window's documents: docs (B, W) their ids over the whole window (attention stays within
        a document), positions (B, T) each token's own (restarting at each document). window: the whole
        window's length W when the tokens are a slice of it (sequence parallelism)."""
        if cache is not None:
            pos_offset, mask = cache.length, cache.extend_mask(mask, tokens)
        x = self.embed_dropout(embed(self.tok_embed, tokens, self.cfg, pos_offset, positions))
        T = tokens.shape[1]
        rope = None if self.rotary is None else self.rotary(T, x.device, x.dtype, pos_offset, positions,
                                                             window)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if cache is None else cache.layers[i], docs)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def new_cache(self) -> Cache:
        return Cache([LayerCache() for _ in self.blocks])

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """LM head + mean cross-entropy; a tiled loss replaces this without touching the trunk."""
        return cross_entropy(self.lm_head(hidden), targets)

    def token_scores(self, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Each target's loss and whether it is the argmax: (B, T, 2) float32, [..., 0] the next-token loss
        (0 at IGNORE_INDEX), [..., 1] 1.0 where the target is the most likely token. The LM head runs `chunk`
        positions at a time, so the [T, V] logits never exist whole (the probes' scoring)."""
        out = torch.zeros(*targets.shape, 2, dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.shape[1], chunk):
            logits = self.lm_head(hidden[:, start:start + chunk]).float()
            part = targets[:, start:start + chunk]
            out[:, start:start + chunk, 0] = F.cross_entropy(logits.flatten(0, 1), part.flatten(),
                                                             ignore_index=IGNORE_INDEX,
                                                             reduction="none").view(part.shape)
            out[:, start:start + chunk, 1] = (logits.argmax(-1) == part).float()
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        pos_offset: int = 0,
        cache: Optional[Cache] = None,
        scores: bool = False,
        **documents,
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean loss with them (scores: `token_scores` instead).
        documents: hidden_states' docs, positions and window."""
        hidden = self.hidden_states(tokens, mask, pos_offset, cache, **documents)
        if targets is None:
            return self.lm_head(hidden)
        if scores:
            return self.token_scores(hidden, targets)
        return self.head_loss(hidden, targets)


class EncoderDecoder(nn.Module):
    """The seed's translation model: bidirectional encoder, causal decoder with cross-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Tied: one table for source, target and output (the seed shares all three); registered once.
        self.src_tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_tok_embed = None if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        self.encoder = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.encoder_layers))
        self.encoder_norm = make_norm(cfg)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.decoder_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.src_tok_embed.weight

    @property
    def target_table(self) -> nn.Embedding:
        return self.tgt_tok_embed if self.tgt_tok_embed is not None else self.src_tok_embed

    def _rope(self, x: torch.Tensor, offset: int = 0,
              positions: Optional[torch.Tensor] = None) -> Optional[Rope]:
        return None if self.rotary is None else self.rotary(x.shape[1], x.device, x.dtype, offset, positions)

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) source ids -> (B, S, d) memory. src_mask: (B, S) real tokens, or (B, S, S) which tokens each
        sees (packed pairs, with each token's own position in its pair: positions (B, S))."""
        x = self.embed_dropout(embed(self.src_tok_embed, src, self.cfg, positions=positions))
        rope = self._rope(x, positions=positions)
        for block in self.encoder:
            x = block(x, rope, src_mask)
        return self.encoder_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
               tgt_mask: Optional[torch.Tensor] = None, cache: Optional[Cache] = None,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) target ids (shifted right) + memory -> (B, T, d) normalized hidden states. With a cache
        (decoding) the ids follow the cached ones, and the memory's keys and values are computed once. Packed
        pairs: src_mask (B, T, S) and tgt_mask (B, T, T) say which keys each target token sees, positions
        (B, T) its place in its pair."""
        offset = 0
        if cache is not None:
            offset, tgt_mask = cache.length, cache.extend_mask(tgt_mask, tgt)
        x = self.embed_dropout(embed(self.target_table, tgt, self.cfg, offset, positions))
        rope = self._rope(x, offset, positions)
        for i, block in enumerate(self.decoder):
            x = block(x, rope, tgt_mask, memory, src_mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tgt.shape[1]
        return self.decoder_norm(x)

    def new_cache(self, memory: torch.Tensor, memory_mask: Optional[torch.Tensor]) -> Cache:
        """The decoding cache for the encoder output `memory` (its mask: real source tokens)."""
        return Cache([LayerCache() for _ in self.decoder], memory=memory, memory_mask=memory_mask)

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.lm_head(hidden), targets)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                src_docs: Optional[torch.Tensor] = None,
                tgt_docs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean loss over non-ignored target tokens with them. Packed
        pairs (data.pack_pairs): src_docs (B, S) and tgt_docs (B, T), each token's pair within its row (-1:
        padding); a pair sees only itself, at positions of its own, so its loss is the one it has alone."""
        if src_docs is None:
            hidden = self.decode(tgt, self.encode(src, src_mask), src_mask, tgt_mask)
        else:
            same = src_docs[:, :, None] == src_docs[:, None, :]
            memory = self.encode(src, same, pair_positions(src_docs))
            # a target token sees its own pair's source; padding sees everything (its loss is not taken)
            cross = (tgt_docs[:, :, None] == src_docs[:, None, :]) | (tgt_docs < 0)[:, :, None]
            hidden = self.decode(tgt, memory, cross, tgt_docs[:, :, None] == tgt_docs[:, None, :],
                                 positions=pair_positions(tgt_docs))
        if targets is None:
            return self.lm_head(hidden)
        return self.head_loss(hidden, targets)


def pair_positions(docs: torch.Tensor) -> torch.Tensor:
    """Each token's position within its run of equal ids along a row (packed pairs): (B, L) -> (B, L)."""
    index = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def build_model(cfg: ModelConfig) -> nn.Module:
    return DecoderLM(cfg) if cfg.kind == "lm" else EncoderDecoder(cfg)
