"""The memory levers that the engine wraps around the model, chosen by the `memory` config section.

    ctxtrain train configs/lm_tiny.yaml --memory.checkpoint=offload --memory.loss_chunk=2048
    --memory.mlp_chunk=2048

Each lever changes memory and time, never the maths: tests/unit/test_memory_levers.py checks losses and
gradients against the plain model for both model kinds. They are applied before `deepspeed.initialize`, so
ZeRO-3 hooks the modules as they will run.

- **Activation checkpointing of every block** (`memory.checkpoint`), on torch's non-reentrant checkpoint.
  Only the block's input is a checkpoint input; RoPE angles, masks and the encoder's output are shared by
  every block and stay where they are.
  `full` keeps the block input and recomputes the block in the backward pass. `selective` also keeps what is
  costly to recompute, attention's output: an op-level policy saves the outputs of the SDPA kernels and
  recomputes everything else (projections, norms, MLP), as torchtitan's selective AC does. `offload` is
  `full` with the kept block input moved to host memory by a pack hook (`HostOffload`): pinned memory, the
  copy on a side stream so that it overlaps the next block's compute, and in the backward pass the previous
  block's input is brought back while the current one recomputes.
- **The chunked LM head + cross-entropy** (`memory.loss_chunk`): `ChunkedLMHead` replaces `lm_head` (same
  weight Parameter, so the state dict and weight tying are unchanged). Its autograd function computes the loss
  and both gradients chunk by chunk during the forward pass, so the [tokens, vocab] logits exist one chunk at
  a time, in float32; the backward pass only scales the stored gradients by the incoming one. It is not
  DeepSpeed's `TiledFusedLogitsLoss`: that one adds the head's weight gradient during the forward pass without
  the incoming gradient, so the gradient is wrong as soon as the loss is scaled afterwards (DeepSpeed's
  gradient accumulation divides it; a 0.5 x loss gives twice the weight gradient), and its mean is a mean of
  chunk means (wrong when targets are padded, NaN for a chunk of padding).
- **The chunked MLP** (`memory.mlp_chunk`): every block's MLP runs over chunks of tokens, each under its own
  checkpoint, so the [tokens, d_ff] activations exist one chunk at a time. The equivalent of DeepSpeed's
  `TiledMLP`, on torch's checkpoint instead because `TiledMLP` recomputes without restoring the RNG (the
  seed's MLP dropout would draw other masks in the backward pass) and needs DeepSpeed's `ds_grad_is_ready`
  flag on every parameter; here each parameter receives one summed gradient, as every ZeRO stage expects.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ctxtrain.model.transformer import IGNORE_INDEX


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The residual blocks: the LM's `blocks`, the encoder-decoder's `encoder` and `decoder`."""
    return [m for name in ("blocks", "encoder", "decoder") for m in getattr(model, name, [])]


def mlps_of(model: nn.Module) -> list[nn.Module]:
    return [block.mlp for block in blocks_of(model)]


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing policies


def _sdpa_kernels() -> frozenset:
    """The ATen kernels behind F.scaled_dot_product_attention on CPU and GPU (flash, memory-efficient,
    cuDNN)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


SDPA_KERNELS = _sdpa_kernels()


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SDPA_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_attention)


class PinnedArena:
    """One block of pinned host memory of exactly `nbytes`, handed out in slices to one step's offloaded block
    inputs and reused by the next. torch's pinned-memory caching allocator would round each input up to a
    power of two (lm_1b at 1.36M tokens: 128 GiB pinned for 83 GiB of inputs); this allocates ordinary host
    memory of the exact size and pins it in place (cudaHostRegister). pin=False (a CPU) allocates the same
    block unpinned. Slices start at 512-byte boundaries."""

    ALIGN = 512

    def __init__(self, nbytes: int, pin: bool):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.capacity, self.offset, self.pinned = nbytes, 0, False
        if pin and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, 0)
            self.pinned = int(err) == 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """An uninitialised host tensor of this shape and dtype from the block, or None when it is used up."""
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.offset + n > self.capacity:
            return None
        out = self.buffer[self.offset:self.offset + n].view(dtype).view(shape)
        self.offset = min(self.capacity, -(-(self.offset + n) // self.ALIGN) * self.ALIGN)
        return out

    def reset(self) -> None:
        """Every slice came back: the next step starts from the beginning."""
        self.offset = 0

    def __del__(self):
        if getattr(self, "pinned", False):
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())


@dataclass
class _Packed:
    host: torch.Tensor
    device: torch.device
    copied: Optional[torch.cuda.Event] = None  # the device-to-host copy is done
    back: Optional[torch.Tensor] = None  # prefetched onto the device for the backward pass
    back_ready: Optional[torch.cuda.Event] = None


@dataclass
class HostOffload:
    """saved_tensors_hooks that keep each checkpointed block's input in host memory.

    pack (forward): the input is copied into pinned host memory on a side stream, so the copy overlaps the
    next block's compute; the device tensor is freed once the copy is done. unpack (backward, when the block
    is recomputed): the input comes back to the device, and the previous block's input starts coming back on
    the side stream while this block recomputes. The host memory is one `PinnedArena` of `arena_bytes` (what
    the planner's host term predicts for one micro-batch's block inputs), allocated at the first pack; an
    input that does not fit gets a pinned tensor of its own. On a CPU device the input already lives in host
    memory and is kept as it is. `packed` counts the inputs packed (one per block and micro-batch)."""

    device: torch.device
    arena_bytes: Optional[int] = None
    packed: int = 0
    _order: list = field(default_factory=list)
    arena: Optional[PinnedArena] = None

    def __post_init__(self):
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def host_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Pinned host memory for t: a slice of the arena, else (it is full, or has no size) a tensor of its
        own."""
        if self.arena is None and self.arena_bytes:
            self.arena = PinnedArena(self.arena_bytes, pin=True)
        host = self.arena.take(t.shape, t.dtype) if self.arena is not None else None
        return host if host is not None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)

    def pack(self, t: torch.Tensor):
        self.packed += 1
        if self.stream is None or t.device.type != "cuda":
            return t
        if self._order and all(p.host is None for p in self._order):
            self._order.clear()  # every input of the previous step came back: the arena is free again
            if self.arena is not None:
                self.arena.reset()
        host = self.host_tensor(t)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the caching allocator keeps t until the copy is done
            done = torch.cuda.Event()
            done.record(self.stream)
        packed = _Packed(host, t.device, done)
        self._order.append(packed)
        return packed

    def _prefetch(self, p: _Packed) -> None:
        if p.host is None or p.back is not None:
            return
        self.stream.wait_event(p.copied)
        with torch.cuda.stream(self.stream):
            p.back = p.host.to(p.device, non_blocking=True)
            p.back_ready = torch.cuda.Event()
            p.back_ready.record(self.stream)

    def unpack(self, p):
        if not isinstance(p, _Packed):
            return p
        self._prefetch(p)
        current = torch.cuda.current_stream(p.device)
        current.wait_event(p.back_ready)
        t = p.back
        t.record_stream(current)
        p.host = p.back = None
        i = next((i for i, q in enumerate(self._order) if q is p), 0)
        if i > 0:
            self._prefetch(self._order[i - 1])  # the block before this one is recomputed next
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def checkpoint_blocks(model: nn.Module, policy: str, offload: Optional[HostOffload] = None) -> int:
    """Wrap every block's forward in the checkpoint policy (the state dict keeps its names); returns the
    count."""
    if policy == "none":
        return 0
    blocks = blocks_of(model)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, policy, offload)
    return len(blocks)


def _checkpointed(forward, policy: str, offload: Optional[HostOffload], x: torch.Tensor, *args, **kwargs):
    def run(x):
        return forward(x, *args, **kwargs)

    if policy == "selective":
        return checkpoint(run, x, use_reentrant=False, context_fn=_selective_contexts)
    if policy == "offload" and torch.is_grad_enabled():
        with offload.hooks():
            return checkpoint(run, x, use_reentrant=False)
    return checkpoint(run, x, use_reentrant=False)


# ---------------------------------------------------------------------------------------------------------
# The chunked LM head + cross-entropy


def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                    want_hidden: bool, want_weight: bool):
    """Sum of token cross-entropies of hidden @ weight.T, and its gradients, one chunk of rows at a time.

    hidden (N, d), weight (V, d), targets (N,). Per chunk the logits (c, V) are formed in float32, turned into
    the loss and in place into softmax - onehot (the gradient of the summed loss w.r.t. the logits), and that
    gives the chunk's rows of the hidden gradient and its share of the weight gradient (accumulated in
    float32).
    """
    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for start in range(0, n, chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        logits = F.linear(h, weight).float()  # (c, V): the only [tokens, vocab] tensor, one chunk at a time
        valid = t != IGNORE_INDEX
        picked = torch.where(valid, t, 0)
        target_logit = logits.gather(1, picked[:, None]).squeeze(1)
        lse = torch.logsumexp(logits, dim=-1)
        total += ((lse - target_logit) * valid).sum()
        if want_hidden or want_weight:
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits[torch.arange(len(t), device=t.device), picked] -= 1.0
            logits.mul_(valid[:, None])
            g = logits.to(hidden.dtype)
            if want_hidden:
                grad_h[start:start + chunk] = g @ weight
            if want_weight:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
            del g
        del logits  # before the next chunk's logits exist, not after
    return total, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) whose gradients are computed in the forward pass, chunk by
    chunk; backward scales them by the incoming gradient (no [tokens, vocab] tensor in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total, grad_h, grad_w = _loss_and_grads(hidden, weight, targets, chunk, ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[1])
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


class ChunkedLMHead(nn.Module):
    """The LM head with the loss inside it: `forward(hidden)` gives logits as before, `forward(hidden,
    targets)` the mean cross-entropy over non-ignored targets, computed `chunk` tokens at a time. It holds the
    replaced head's weight Parameter, so the state dict and any weight tying are unchanged."""

    def __init__(self, head: nn.Linear, chunk: int):
        super().__init__()
        if head.bias is not None:
            raise ValueError("ChunkedLMHead: the LM head has no bias in ctxtrain's models")
        self.weight = head.weight
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            total = _ChunkedCrossEntropy.apply(h, self.weight, t, self.chunk)
        else:  # evaluation: the forward half only
            total = _loss_and_grads(h, self.weight, t, self.chunk, False, False)[0]
        return total / (t != IGNORE_INDEX).sum()


def chunk_head_loss(model: nn.Module, chunk: int) -> None:
    """Replace model.lm_head by a ChunkedLMHead and route model.head_loss through it."""
    model.lm_head = ChunkedLMHead(model.lm_head, chunk)
    model.head_loss = functools.partial(_chunked_head_loss, model)  # an instance attribute, not a submodule


def _chunked_head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden, targets)


# ---------------------------------------------------------------------------------------------------------
# The chunked MLP


def chunk_mlps(model: nn.Module, chunk: int) -> int:
    """Run every block's MLP over chunks of `chunk` tokens, each chunk checkpointed; returns the MLP count.

    Each MLP becomes a ZeRO-3 leaf module: its weights are gathered once per call rather than at every chunk's
    call of its linear layers, so ranks whose micro-batches differ in length (translation pairs) and so in
    their number of chunks still issue the same collectives. (DeepSpeed's TiledMLP example agrees on a chunk
    count with an all-reduce instead, a host sync in every MLP.)"""
    from deepspeed.utils import set_z3_leaf_module

    mlps = mlps_of(model)
    for mlp in mlps:
        mlp.forward = functools.partial(_chunked_mlp, mlp.forward, chunk)
        set_z3_leaf_module(mlp, True)
    return len(mlps)


def _chunked_mlp(forward, chunk: int, x: torch.Tensor) -> torch.Tensor:
    B, T = x.shape[0], x.shape[1]  # (B, T, d)
    per = max(1, chunk // B)  # sequence positions per chunk, so that a chunk holds about `chunk` tokens
    if per >= T:
        return forward(x)
    if not torch.is_grad_enabled():
        return torch.cat([forward(part) for part in x.split(per, dim=1)], dim=1)
    return torch.cat([checkpoint(forward, part, use_reentrant=False) for part in x.split(per, dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Host memory


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20


def return_freed_host_memory() -> bool:
    """Make glibc serve allocations of 4 MiB and more with mmap and give them back to the OS when freed.

    By default glibc raises that threshold each time a large block is freed (up to 32 MiB), after which freed
    tensors of up to 32 MiB stay in malloc's heap: a CPU worker's RSS then holds hundreds of MB of dead
    activations (measured: 1.0 GB of RSS for 0.6 GB of live tensors at 8k tokens). Fixed at 4 MiB, RSS follows
    the live tensors, which the planner's CPU prediction assumes; smaller tensors keep the heap's speed (1 MiB
    cost ~20% of lm_tiny's throughput, 4 MiB nothing measurable). Returns False where this is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------------
# All of them, as the memory config says


@dataclass
class Levers:
    """What apply_levers did to a model (the offload hooks count their packs)."""

    checkpointed_blocks: int = 0
    chunked_mlps: int = 0
    loss_chunk: Optional[int] = None
    offload: Optional[HostOffload] = None


def apply_levers(model: nn.Module, memory, device: torch.device,
                 offload_bytes: Optional[int] = None) -> Levers:
    """Apply memory.checkpoint, memory.loss_chunk and memory.mlp_chunk to a model (before the engine wraps
    it). offload_bytes: the pinned host memory that offload takes for one micro-batch's block inputs (the
    planner's `offload_host_bytes`)."""
    levers = Levers(loss_chunk=memory.loss_chunk)
    if memory.mlp_chunk:
        levers.chunked_mlps = chunk_mlps(model, memory.mlp_chunk)
    if memory.checkpoint == "offload":
        levers.offload = HostOffload(device, offload_bytes)
    levers.checkpointed_blocks = checkpoint_blocks(model, memory.checkpoint, levers.offload)
    if memory.loss_chunk:
        chunk_head_loss(model, memory.loss_chunk)
    return levers
