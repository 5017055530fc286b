"""The memory planner: what one training worker holds at its peak, from the config alone, before anything
starts.

    ctxtrain plan configs/lm_1b.yaml --gpus 8 --gpu-mem 141 --data.seq_len=131072

Formulas only (no tensors, no deepspeed): every term below is a function with a docstring saying what it
counts. Nothing is fitted to a machine: the activation terms count the tensors that autograd keeps for the
model's own ops (tests/unit/test_plan.py checks them against what autograd saves, exactly), the static terms
follow DeepSpeed's ZeRO partitioning, and one stated margin (`memory.margin`) covers the allocator.

Notation: P parameters, N ranks (ZeRO partitions over all of them), n = batch x seq_len / sp tokens of one
micro-batch on one rank (sp: the sequence-parallel degree), d width, F MLP width, V vocabulary, L layers, H
heads (KV key/value heads), s bytes of an activation element (2 bf16, 4 fp32), w bytes of a working parameter
(= s).

The peak of a step is
    parameters + gradients + optimizer state (on the device unless offloaded) + communication buckets
    + max(the backward pass's activations, the optimizer step's temporaries) + margin
and the backward pass's activations are the checkpointed activations of every layer plus the larger of the
loss buffer (the end of the forward pass) and the peak layer's working set (its recomputation and its
gradients), plus attention's workspace. On a CPU "device" is host memory, and the prediction is of the
worker's peak RSS growth over its RSS before the model was built.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ctxtrain.config import Config, deepspeed_zero_stage, overlap_comm
from ctxtrain.model.config import ModelConfig
from ctxtrain.model.flops import param_count

GIB = 1 << 30

BUCKET_ELEMENTS = 50_000_000
"""Elements of DeepSpeed's gradient-reduction and all-gather buckets, as ctxtrain sets them (capped at P).
DeepSpeed's default, 5e8, would hold 1-2 GB of device memory in the bucket alone; 5e7 elements (100 MB of
bf16) still make messages large enough to run the interconnect at full bandwidth."""


# ---------------------------------------------------------------------------------------------------------
# What a micro-batch is


@dataclass(frozen=True)
class Shape:
    """The numbers the formulas read, taken from a config (and a sequence length, to solve for the
    longest)."""

    model: ModelConfig
    batch: int
    seq_len: int  # LM window, or the target length of a translation pair
    src_len: int  # source length of a translation pair (0 for the LM)
    s: int  # bytes per activation element
    stage: int
    world: int
    offload_optimizer: bool
    offload_params: bool
    overlap_comm: bool
    checkpoint: str
    loss_chunk: Optional[int]
    mlp_chunk: Optional[int]
    dropout: float
    device: str  # "cuda" or "cpu"
    sp: int = 1
    doc_mask: bool = False

    @property
    def kv_width(self) -> int:
        """Key/value width of a token as attention holds it: n_kv_heads x head_dim, or, with sequence
        parallelism past the key/value heads (sp > n_kv_heads), the sp replicas that the all-to-all spreads
        one to a rank."""
        return max(self.model.kv_heads, self.sp) * self.model.head_dim

    @property
    def tokens(self) -> int:
        """n: target tokens of one micro-batch on one rank (the decoder's, for an encoder-decoder): a
        sequence- parallel rank holds seq_len / sp of every window."""
        return self.batch * self.seq_len // self.sp

    @property
    def src_tokens(self) -> int:
        return self.batch * self.src_len


def shape_of(cfg: Config, world: int, device: str, seq_len: Optional[int] = None,
             checkpoint: Optional[str] = None) -> Shape:
    m = cfg.model
    lm = m.kind == "lm"
    t = seq_len if seq_len is not None else (cfg.data.seq_len if lm else cfg.data.max_tgt_len)
    src = 0 if lm else (seq_len if seq_len is not None else cfg.data.max_src_len)
    return Shape(model=m, batch=cfg.data.batch_size, seq_len=t, src_len=src,
                 s=2 if cfg.train.dtype == "bf16" else 4, stage=deepspeed_zero_stage(cfg), world=world,
                 offload_optimizer=cfg.zero.offload_optimizer, offload_params=cfg.zero.offload_params,
                 overlap_comm=overlap_comm(cfg, device), checkpoint=checkpoint or cfg.memory.checkpoint,
                 loss_chunk=cfg.memory.loss_chunk, mlp_chunk=cfg.memory.mlp_chunk, dropout=m.dropout,
                 device=device, sp=cfg.parallel.sp, doc_mask=lm and cfg.data.doc_mask)


def bucket_elements(model: ModelConfig) -> int:
    """DeepSpeed's reduce/all-gather bucket size that ctxtrain writes into ds_config: BUCKET_ELEMENTS, or the
    largest single parameter when that is larger (ZeRO-3 reduces a parameter that overflows the bucket on
    another path), and never more than the model."""
    largest = max(model.vocab_size * model.d_model, model.d_ff * model.d_model)
    return int(min(max(BUCKET_ELEMENTS, largest), param_count(model)))


# ---------------------------------------------------------------------------------------------------------
# Static terms: weights, gradients, optimizer state, buckets (DeepSpeed ZeRO, with torch's AdamW)


def _largest_module(m: ModelConfig) -> int:
    """Parameters of the largest module that ZeRO-3 gathers at once: a block, or the embedding / LM head."""
    d, f = m.d_model, m.d_ff
    attn = 2 * d * d + 2 * d * m.kv_heads * m.head_dim
    mlp = (3 if m.mlp == "swiglu" else 2) * d * f
    block = attn + mlp + (attn if m.kind == "encdec" else 0)
    return max(block, m.vocab_size * d)


def parameters(sh: Shape) -> tuple[int, int]:
    """Working weights (device, host). ZeRO 0-2 keep all P at w bytes on every rank; ZeRO-3 keeps 1/N of them,
    plus the gathered working set: the module being computed and the one prefetched (twice the largest
    module); with zero.offload_params the 1/N share lives in host memory."""
    P, w = param_count(sh.model), sh.s
    if sh.stage < 3:
        return P * w, 0
    gathered = min(P, 2 * _largest_module(sh.model)) * w
    share = math.ceil(P / sh.world) * w
    return (gathered, share) if sh.offload_params else (share + gathered, 0)


def gradients(sh: Shape) -> tuple[int, int]:
    """Gradients (device, host). ZeRO 0-1: every parameter's gradient at w bytes (ZeRO-1 partitions them only
    at the step). ZeRO-2/3: this rank's 1/N partition (w bytes); ZeRO-3 also holds a module's whole gradient
    until it is reduced into the partitions (two of the largest module's in flight). With optimizer offload
    the partition's gradient is copied to host memory as float32 for the step."""
    P, w, N = param_count(sh.model), sh.s, sh.world
    device = P * w if sh.stage <= 1 else math.ceil(P / N) * w
    if sh.stage == 3:
        device += min(P, 2 * _largest_module(sh.model)) * w
    host = math.ceil(P / N) * 4 if sh.offload_optimizer else 0
    return device, host


def optimizer_state(sh: Shape) -> tuple[int, int]:
    """AdamW's state (device, host): two float32 moments per parameter, plus DeepSpeed's float32 master copy
    of the weights under ZeRO 1-3 (it keeps one even in fp32 training) and under bf16 without ZeRO. ZeRO 1-3
    hold 1/N of it per rank; zero.offload_optimizer puts it in host memory."""
    P, N = param_count(sh.model), sh.world
    if sh.stage == 0:
        per_param = 8 + (4 if sh.s == 2 else 0)
        total = P * per_param
    else:
        total = math.ceil(P / N) * 12
    return (0, total) if sh.offload_optimizer else (total, 0)


def communication_buckets(sh: Shape) -> int:
    """DeepSpeed's contiguous gradient bucket (ZeRO 1-3; float32 for ZeRO-1, which accumulates there, w bytes
    otherwise), doubled with zero.overlap_comm. ZeRO-0 all-reduces through a flattened copy of the gradients
    (DeepSpeed's fallback, up to 5e8 elements at once); on one rank ctxtrain turns that off."""
    if sh.stage == 0:
        return 0 if sh.world == 1 else min(param_count(sh.model), 500_000_000) * sh.s
    per = 4 if sh.stage == 1 else sh.s
    return bucket_elements(sh.model) * per * (2 if sh.overlap_comm else 1)


def optimizer_step_transients(sh: Shape) -> int:
    """Temporaries of the optimizer step, when activations are already freed: under ZeRO 1-3 the float32
    gradient of this rank's partition that DeepSpeed builds for the step. (ctxtrain's AdamW is torch's fused
    one, which updates in place; the foreach default would add two float32 copies of the partition.)"""
    if sh.offload_optimizer or sh.stage == 0:
        return 0
    return math.ceil(param_count(sh.model) / sh.world) * 4


# ---------------------------------------------------------------------------------------------------------
# Activations, per token: what autograd keeps for each op of a block (see ctxtrain.model.transformer)


def norm_kept(m: ModelConfig, s: int) -> int:
    """Bytes per token that a pre-norm keeps besides its output: RMSNorm computes in float32, so it keeps the
    float32 view of its input (the input itself in fp32, a copy in bf16), the normalized value (s) and 1/rms;
    LayerNorm keeps its input (s), mean and 1/std."""
    d = m.d_model
    if m.norm == "rmsnorm":
        return 4 * d + s * d + 4
    return s * d + 2 * (4 if s == 4 else s)


def attention_kept(sh: Shape) -> int:
    """Bytes per token that one self-attention keeps: q, k and v as SDPA's inputs, its output (also the output
    projection's input) and its float32 log-sum-exp per head. (Its input, the norm's output, is counted with
    the norm.) With data.doc_mask on a CPU (`DocumentAttention`) no log-sum-exp: each document's attention is
    recomputed in the backward pass; FlexAttention on a GPU keeps one, as SDPA does."""
    m, s = sh.model, sh.s
    lse = 0 if sh.doc_mask and sh.device == "cpu" else 4 * m.n_heads
    return s * (2 * m.d_model + 2 * sh.kv_width) + lse


def mlp_kept(m: ModelConfig, s: int, dropout: float) -> int:
    """Bytes per token that the MLP keeps: SwiGLU its gate output, silu(gate), up and their product (4F); the
    GELU MLP its up output and GELU's output (2F), with dropout also its mask and output."""
    f = m.d_ff
    kept = 4 * f * s if m.mlp == "swiglu" else 2 * f * s
    if m.mlp == "gelu" and dropout > 0:
        kept += f * (1 + s)
    return kept


def residual_dropout_kept(m: ModelConfig, s: int, dropout: float, sublayers: int) -> int:
    """Dropout on the residual branches keeps a mask and its output per sub-layer (nothing when dropout is 0).
    Approximate: the kernels differ in the masks they keep (within 5% of a block on CPU,
    tests/unit/test_plan.py); dropout belongs to the short translation sequences, not to the long ones the
    planner is for."""
    return 0 if dropout <= 0 else sublayers * m.d_model * (1 + s)


def block_kept(sh: Shape, decoder: bool = False) -> int:
    """Bytes per token that one block keeps with no checkpointing: two (three in the decoder of an
    encoder-decoder) pre-norms with their outputs, self-attention, cross-attention's queries and outputs (its
    keys and values over the source are in `cross_kv_kept`), and the MLP. The block's input is the first
    norm's kept input; the residual sum after attention is the next norm's."""
    m, s = sh.model, sh.s
    norms = 3 if decoder else 2
    kept = norms * (norm_kept(m, s) + s * m.d_model) + attention_kept(sh) + mlp_kept(m, s, sh.dropout)
    if decoder:
        kept += 2 * s * m.d_model + 4 * m.n_heads  # cross-attention: q, output, log-sum-exp
    return kept + residual_dropout_kept(m, s, sh.dropout, norms)


def cross_kv_kept(sh: Shape) -> int:
    """Bytes per source token that each decoder layer's cross-attention keeps: its keys and values."""
    return 2 * sh.s * sh.model.kv_heads * sh.model.head_dim


def _layers(sh: Shape) -> list[tuple[int, bool]]:
    """(tokens, is_decoder_layer) for every block."""
    m = sh.model
    if m.kind == "lm":
        return [(sh.tokens, False)] * m.n_layers
    return [(sh.src_tokens, False)] * m.encoder_layers + [(sh.tokens, True)] * m.n_layers


def math_attention_scores(sh: Shape, decoder: bool) -> int:
    """Attention dropout on CPU makes SDPA fall back to its math kernel, which keeps each attention's float32
    scores, probabilities and dropout product: 12 bytes per score of B x H x T x S (self-attention over the
    layer's own length; a decoder layer also over the source). Flash and cuDNN kernels (GPU, and CPU without
    dropout) work in tiles and keep only the log-sum-exp. Translation lengths keep this small."""
    if sh.dropout <= 0 or sh.device == "cuda":
        return 0
    per = 12 * sh.batch * sh.model.n_heads // sh.sp  # a sequence-parallel rank attends with H / sp heads
    if sh.model.kind == "lm":
        return per * sh.seq_len ** 2
    if not decoder:
        return per * sh.src_len ** 2
    return per * (sh.seq_len ** 2 + sh.seq_len * sh.src_len)


def layer_bytes(sh: Shape, tokens: int, decoder: bool) -> int:
    """All that one block keeps for a micro-batch with no checkpointing (its MLP's part only a chunk's worth
    when chunked, as each chunk is recomputed in the backward pass)."""
    kept = block_kept(sh, decoder) * tokens + math_attention_scores(sh, decoder)
    if sh.mlp_chunk and sh.mlp_chunk < tokens:
        kept -= mlp_kept(sh.model, sh.s, sh.dropout) * (tokens - sh.mlp_chunk)
    if decoder:
        kept += cross_kv_kept(sh) * sh.src_tokens
    return kept


def kept_between_passes(sh: Shape, tokens: int, decoder: bool) -> int:
    """What one block keeps from its forward pass to its backward pass, by memory.checkpoint: everything
    (none); its input (full, offload); its input and attention's output and log-sum-exp (selective)."""
    if sh.checkpoint == "none":
        return layer_bytes(sh, tokens, decoder)
    kept = sh.s * sh.model.d_model * tokens
    if sh.checkpoint == "selective":
        kept += (sh.s * sh.model.d_model + 4 * sh.model.n_heads) * tokens * (2 if decoder else 1)
    return kept


def checkpointed_activations(sh: Shape) -> tuple[int, int]:
    """Every block's kept activations (device, host), plus what the trunk's ends keep: the final norm, the
    encoder's output (read by every decoder layer) and RoPE's cos/sin table. With `offload` on a GPU the block
    inputs are in host memory and at most two are on the device at once (one in use, one brought back
    early)."""
    m, s = sh.model, sh.s
    kept = sum(kept_between_passes(sh, t, dec) for t, dec in _layers(sh))
    ends = norm_kept(m, s) * sh.tokens + s * m.d_model * sh.src_tokens
    if m.pos == "rope":
        ends += 2 * s * m.head_dim * max(sh.seq_len // sh.sp, sh.src_len)
    if sh.checkpoint == "offload" and sh.device == "cuda":
        largest = max(s * m.d_model * t for t, _ in _layers(sh))
        return ends + 2 * largest, kept
    return kept + ends, 0


def offload_host_bytes(cfg: Config, world: int) -> int:
    """memory.checkpoint=offload on a GPU: the pinned host memory that one micro-batch's kept block inputs
    take, the host share of `checkpointed_activations`. The engine allocates exactly this much (a
    `PinnedArena`), so the plan's host term is what the run pins."""
    return checkpointed_activations(shape_of(cfg, world, "cuda", checkpoint="offload"))[1]


def layer_gradients(sh: Shape, tokens: int) -> int:
    """Gradient temporaries while one block runs backward: the gradients of its output and input, and the
    larger of the MLP's (three [tokens, F] gradients at the product's backward, a chunk's worth when chunked)
    and attention's (dq, dk, dv and d(output), with the GPU kernels' float32 dq accumulator)."""
    m, s = sh.model, sh.s
    mlp_tokens = min(tokens, sh.mlp_chunk) if sh.mlp_chunk else tokens
    mlp = (3 if m.mlp == "swiglu" else 2) * m.d_ff * s * mlp_tokens
    attn = (2 * m.d_model + 2 * sh.kv_width) * s * tokens + attention_dq_accumulator(sh, tokens)
    return 2 * s * m.d_model * tokens + max(mlp, attn)


def attention_dq_accumulator(sh: Shape, tokens: int) -> int:
    """Flash attention's backward pass (flash-attention 2/3, and the cuDNN and memory-efficient SDPA kernels
    on a GPU) accumulates dq in float32 across the key blocks before casting it: 4 x d bytes per token of the
    layer, alive while that attention runs backward (a sequence-parallel rank: its n_heads / sp heads over the
    whole window, the same bytes as its own tokens x d). None on a CPU: its flash kernel keeps dq in the
    working dtype."""
    return 4 * sh.model.d_model * tokens if sh.device == "cuda" else 0


def peak_layer(sh: Shape) -> int:
    """The largest block's working set in the backward pass: what it recomputes (all it would keep, minus what
    was kept) and its gradient temporaries."""
    best = 0
    for tokens, dec in _layers(sh):
        recomputed = 0 if sh.checkpoint == "none" else layer_bytes(sh, tokens, dec) - kept_between_passes(
            sh, tokens, dec) + sh.s * sh.model.d_model * tokens
        best = max(best, recomputed + layer_gradients(sh, tokens))
    return best


def document_block_mask(sh: Shape) -> int:
    """data.doc_mask on a GPU: FlexAttention's block mask of a window, built once per micro-batch and kept
    through its backward pass: for the partial and the full blocks, and their transposes for the backward, a
    count per row of 128-token blocks and an int32 index per pair of blocks (4 x 4 x (T/128)^2 bytes per
    window: 16 MiB at 128k tokens, 1 GiB at 1M). Nothing on a CPU (one SDPA call per document)."""
    if not sh.doc_mask or sh.device != "cuda":
        return 0
    blocks = -(-sh.seq_len // 128)
    return sh.batch * 4 * (4 * blocks * blocks + 4 * blocks)


def all_to_all_buffers(sh: Shape) -> int:
    """Sequence parallelism: while one attention runs (or is recomputed), each of q, k, v and its output
    passes through DeepSpeed's all-to-all as a contiguous copy, the exchanged tensor and its reshaped result:
    about three copies of q (n x d x s) in flight besides the kept ones. Nothing without sequence
    parallelism."""
    return 0 if sh.sp == 1 else 3 * sh.s * sh.model.d_model * sh.tokens


def loss_buffer(sh: Shape) -> int:
    """The LM head and the loss at the end of the forward pass, besides the head's input (n x d x s). Plain:
    the [n, V] logits, log-softmax's float32 output and the backward's two float32 [n, V] gradients (bf16 adds
    the logits' bf16 copy and the gradient's cast): 3 x 4 (fp32) or 14 (bf16) bytes per logit. Chunked
    (memory.loss_chunk = c): a chunk's float32 logits and logsumexp's temporary (8 bytes per logit of c
    tokens), plus the gradients kept for the backward pass: the hidden states' (n x d x s) and the head's,
    accumulated in float32 (V x d x 4; in bf16 each chunk's share is formed in bf16 and cast before it is
    added, V x d x 6 more)."""
    m, n, s = sh.model, sh.tokens, sh.s
    V, d = m.vocab_size, m.d_model
    if not sh.loss_chunk or sh.loss_chunk >= n:
        return n * d * s + n * V * (12 if s == 4 else 14)
    return n * d * s + 8 * sh.loss_chunk * V + n * d * s + V * d * (4 if s == 4 else 10)


CUDA_CONTEXT_BYTES = 600 << 20


def cuda_context(sh: Shape) -> int:
    """What a process's CUDA context holds on the device besides the caching allocator's blocks: the context
    itself, cuBLAS and cuDNN workspaces, the kernels' code. Stated, not measured here: about 0.6 GiB with
    torch 2.x on an H100 (the CUDA documentation gives 300-600 MiB by card and driver). None on a CPU."""
    return CUDA_CONTEXT_BYTES if sh.device == "cuda" else 0


NCCL_BUFFSIZE = 4 << 20  # NCCL's default buffer per channel and direction
NCCL_CHANNELS = 32  # NCCL's upper bound of channels on NVLink/InfiniBand machines


def communicators(sh: Shape) -> int:
    """The process groups this rank talks over: every rank (when there are several), its sequence-parallel
    group and its data-parallel group (with parallel.sp > 1)."""
    if sh.world == 1:
        return 0
    return 1 + (2 if sh.sp > 1 and sh.world > sh.sp else 1 if sh.sp > 1 else 0)


def nccl_buffers(sh: Shape) -> int:
    """NCCL's device buffers, outside the caching allocator: per communicator, a send and a receive buffer of
    NCCL_BUFFSIZE for each channel, for the ring and the tree algorithm: 2 x 2 x 32 x 4 MiB = 512 MiB at most
    (stated: NCCL sizes its channels to the machine; fewer on PCIe). None on a CPU (gloo uses host memory)."""
    if sh.device != "cuda":
        return 0
    return communicators(sh) * 2 * 2 * NCCL_CHANNELS * NCCL_BUFFSIZE


# ---------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Term:
    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass
class Plan:
    """The terms of one worker's memory, the predicted peaks and what they are compared with."""

    shape: Shape
    terms: list[Term]
    margin: float
    device_peak: int = 0
    host_peak: int = 0
    notes: list[str] = field(default_factory=list)

    def fits(self, device_bytes: Optional[float], host_bytes: Optional[float]) -> bool:
        return ((device_bytes is None or self.device_peak <= device_bytes)
                and (host_bytes is None or self.host_peak <= host_bytes))


def plan(cfg: Config, world: int, device: str, seq_len: Optional[int] = None,
         checkpoint: Optional[str] = None) -> Plan:
    """One worker's memory for this config on `world` workers; seq_len and checkpoint override the
    config's."""
    sh = shape_of(cfg, world, device, seq_len, checkpoint)
    (p_dev, p_host), (g_dev, g_host), (o_dev, o_host) = parameters(sh), gradients(sh), optimizer_state(sh)
    a_dev, a_host = checkpointed_activations(sh)
    layer, loss, a2a = peak_layer(sh), loss_buffer(sh), all_to_all_buffers(sh)
    docs = document_block_mask(sh)
    scores = max(math_attention_scores(sh, dec) for _, dec in _layers(sh))
    step = optimizer_step_transients(sh)
    terms = [
        Term("parameters", p_dev, p_host, f"{param_count(sh.model) / 1e6:,.1f}M, ZeRO-{sh.stage} over "
                                          f"{world}"),
        Term("gradients", g_dev, g_host),
        Term("optimizer state", o_dev, o_host,
             "AdamW moments + fp32 master" + (" (offloaded)" if o_host else "")),
        Term("communication buckets", communication_buckets(sh)),
        Term("checkpointed activations", a_dev, a_host, f"memory.checkpoint={sh.checkpoint}"),
        Term("peak layer working set", layer, 0, "recompute + gradients of one block"),
        Term("loss buffer", loss, 0, f"chunk {sh.loss_chunk} tokens" if sh.loss_chunk else "whole [n, V] "
                                                                                           "logits"),
        Term("attention workspace", scores, 0, "math kernel's scores, largest layer (in the layer terms)"
             if scores else "flash/cuDNN tiles: the log-sum-exp, in the layer terms"),
        Term("all-to-all buffers", a2a, 0, f"sequence parallel over {sh.sp}" if a2a else "parallel.sp=1"),
        Term("document block mask", docs, 0, "FlexAttention's, per window" if docs else
             "data.doc_mask off" if not sh.doc_mask else "CPU: one SDPA call per document, nothing kept"),
        Term("optimizer step temporaries", step, 0, "when activations are freed"),
        Term("CUDA context", cuda_context(sh), 0, "context, cuBLAS/cuDNN workspaces (stated)"
             if sh.device == "cuda" else "CPU: none"),
        Term("NCCL buffers", nccl_buffers(sh), 0, f"{communicators(sh)} communicator(s) (stated upper bound)"
             if sh.device == "cuda" else "CPU: gloo, host memory"),
    ]
    static = p_dev + g_dev + o_dev + terms[3].device + cuda_context(sh) + nccl_buffers(sh)
    backward = a_dev + docs + max(layer + a2a, loss)
    raw = static + max(backward, step)
    host = p_host + g_host + o_host + a_host
    if device == "cpu":  # one memory: what is "offloaded" stays in the worker's RSS
        raw, host = raw + host, 0
    margin = cfg.memory.margin
    result = Plan(sh, terms, margin)
    result.device_peak = int(raw * (1 + margin))
    result.host_peak = int(host * (1 + margin))
    terms.append(Term(f"allocator margin ({margin:.0%})", result.device_peak - raw, result.host_peak - host,
                      "fragmentation of the caching allocator (GPU) or of malloc's arenas (CPU)"))
    return result


def longest_seq_len(cfg: Config, world: int, device: str, device_bytes: float, host_bytes: Optional[float],
                    checkpoint: str, multiple: int = 1) -> int:
    """The longest sequence (a multiple of `multiple`) whose plan fits; 0 if none does."""
    lo, hi = 0, multiple
    while plan(cfg, world, device, hi, checkpoint).fits(device_bytes, host_bytes):
        lo, hi = hi, hi * 2
        if hi > 1 << 34:
            return lo
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid in (lo, hi):
            break
        if plan(cfg, world, device, mid, checkpoint).fits(device_bytes, host_bytes):
            lo = mid
        else:
            hi = mid
    return lo


def _with(cfg: Config, **sections) -> Config:
    from ctxtrain.config import from_dict

    d = cfg.to_dict()
    for key, value in sections.items():
        section, name = key.split("__")
        d[section][name] = value
    return from_dict(d)


def lever_that_fits(cfg: Config, world: int, device: str, device_bytes: float,
                    host_bytes: Optional[float]) -> Optional[tuple[str, Plan]]:
    """The cheapest memory lever (added one after the other, as a user would) under which the config fits:
    the chunked loss, selective then full checkpointing, the chunked MLP, offloaded checkpoints (GPU), ZeRO-3
    and optimizer offload (several workers). Returns the overrides to add and their plan, or None."""
    n = cfg.data.seq_len * cfg.data.batch_size
    chunk = min(4096, n)
    steps: list[tuple[str, dict]] = []
    if not cfg.memory.loss_chunk and chunk < n:
        steps.append((f"--memory.loss_chunk={chunk}", {"memory__loss_chunk": chunk}))
    order = ["none", "selective", "full"] + (["offload"] if device == "cuda" else [])
    for policy in order[order.index(cfg.memory.checkpoint) + 1:] if cfg.memory.checkpoint in order else []:
        steps.append((f"--memory.checkpoint={policy}", {"memory__checkpoint": policy}))
    if not cfg.memory.mlp_chunk and chunk < n:
        steps.append((f"--memory.mlp_chunk={chunk}", {"memory__mlp_chunk": chunk}))
    if world > 1 and cfg.zero.stage < 3:
        steps.append(("--zero.stage=3", {"zero__stage": 3}))
    if cfg.zero.stage > 0 and not cfg.zero.offload_optimizer:
        steps.append(("--zero.offload_optimizer=true", {"zero__offload_optimizer": True}))
    said: list[str] = []
    changes: dict = {}
    for flag, change in steps:
        said = [f for f in said if f.split("=")[0] != flag.split("=")[0]] + [flag]
        changes.update(change)
        trial = plan(_with(cfg, **changes), world, device)
        if trial.fits(device_bytes, host_bytes):
            return " ".join(said), trial
    return None


def check_fits(cfg: Config, world: int, device: str, device_bytes: float, host_bytes: Optional[float],
               where: str) -> Plan:
    """Refuse, in one line, a config predicted not to fit (unless memory.force); returns its plan
    otherwise."""
    from ctxtrain.errors import UserError

    p = plan(cfg, world, device)
    if cfg.memory.force or p.fits(device_bytes, host_bytes):
        return p
    over_host = host_bytes is not None and p.host_peak > host_bytes
    need, have = (p.host_peak, host_bytes) if over_host else (p.device_peak, device_bytes)
    found = lever_that_fits(cfg, world, device, device_bytes, host_bytes)
    fix = (f"{found[0]} would make it fit (predicted {fmt_bytes(found[1].device_peak)})" if found
           else "no memory lever makes it fit; shorten data.seq_len (see `ctxtrain plan`) or add workers")
    what = "host memory" if over_host else where
    raise UserError(f"data.seq_len={cfg.data.seq_len} x data.batch_size={cfg.data.batch_size} is predicted "
                    f"not to fit: {fmt_bytes(need)} per worker against {fmt_bytes(have)} of {what}; {fix}, "
                    "or --memory.force=true runs it anyway")


# ---------------------------------------------------------------------------------------------------------
# What this machine offers


def gpu_memory_bytes() -> Optional[int]:
    """What this machine's first GPU offers a job (its total memory as torch reports it: 79.6 GiB on an H100);
    None without CUDA. The plan counts the CUDA context and NCCL's buffers as terms of its own."""
    from ctxtrain.devices import cuda_available

    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def available_here(workers: int, want_gpu: Optional[bool] = None) -> tuple[str, float, Optional[float]]:
    """(device kind, bytes per worker on the device, bytes of host memory per worker) on this machine, for
    `workers` workers started here: a GPU each when there is one, else a share of host memory."""
    host = host_memory_bytes() / max(1, workers)
    gpu = gpu_memory_bytes() if want_gpu is not False else None
    if gpu is not None:
        return "cuda", gpu, host
    return "cpu", host, None


def host_memory_bytes() -> int:
    """Memory this machine can give now: MemAvailable, or the cgroup limit when lower."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit():
            avail = min(avail, int(raw))
    return avail


def fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / (1 << 20):,.1f} MiB"


def format_plan(cfg: Config, p: Plan, device_bytes: Optional[float], host_bytes: Optional[float],
                assumed: Optional[str] = None) -> str:
    """The table `ctxtrain plan` prints: the terms per worker, the peaks, the verdict and the longest
    lengths; `assumed` says what the available device memory was taken to be."""
    sh = p.shape
    where = "GPU" if sh.device == "cuda" else "CPU: device memory is host memory, the peak is RSS growth"
    tokens = f"{sh.batch} x {sh.seq_len} tokens" + (f" (source {sh.src_len})" if sh.src_len else "")
    split = f" split over sp={sh.sp} workers" if sh.sp > 1 else ""
    lines = [f"one worker of {sh.world}: {tokens}{split}, {'bf16' if sh.s == 2 else 'fp32'}, "
             f"ZeRO-{sh.stage}, memory.checkpoint={sh.checkpoint}, loss_chunk={sh.loss_chunk}, "
             f"mlp_chunk={sh.mlp_chunk} ({where})",
             *([f"available memory: {assumed}"] if assumed else []),
             "",
             f"{'term':28} {'device':>12} {'host':>12}  note"]
    for t in p.terms:
        lines.append(f"{t.name:28} {fmt_bytes(t.device):>12} {fmt_bytes(t.host) if t.host else '-':>12}  "
                     f"{t.note}")
    lines.append(f"{'predicted peak':28} {fmt_bytes(p.device_peak):>12} "
                 f"{fmt_bytes(p.host_peak) if p.host_peak else '-':>12}")
    device_text, host_text = (f"{fmt_bytes(b) if b else '?':>12}" for b in (device_bytes, host_bytes))
    lines.append(f"{'available':28} {device_text} {host_text}")
    if device_bytes is None:
        lines.append("verdict: unknown (give --gpu-mem)")
        return "\n".join(lines)
    lines.append("verdict: " + ("fits" if p.fits(device_bytes, host_bytes) else "does NOT fit"))
    if not p.fits(device_bytes, host_bytes):
        found = lever_that_fits(cfg, sh.world, sh.device, device_bytes, host_bytes)
        lines.append(f"lever: {found[0]} (predicted {fmt_bytes(found[1].device_peak)})" if found
                     else "lever: none fits; shorten the sequence or add workers")
    what = "data.seq_len" if cfg.model.kind == "lm" else "pair length (max_src_len = max_tgt_len)"
    lines += ["", f"longest {what} that fits, with loss_chunk={sh.loss_chunk} and mlp_chunk={sh.mlp_chunk}:"]
    for policy in ("none", "full", "selective", "offload"):
        longest = longest_seq_len(cfg, sh.world, sh.device, device_bytes, host_bytes, policy, multiple=sh.sp)
        lines.append(f"  memory.checkpoint={policy:10} {longest:>12,}")
    return "\n".join(lines)
