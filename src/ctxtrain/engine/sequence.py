"""Sequence parallelism (DeepSpeed-Ulysses), wrapped around the model by the engine.

    ctxtrain train configs/lm_tiny.yaml --cluster.workers=4 --parallel.sp=2      # 2 groups of 2

The workers form groups of `parallel.sp` consecutive ranks: DeepSpeed's `parallel_state_sp`, handed to
`deepspeed.initialize` as its mpu, so that gradients are summed over a group and averaged over the groups, and
ZeRO partitions over every rank. The first rank of a group reads the window and broadcasts it over the group
(`share_window`: one read per group; the others' loaders keep the same cursor without reading, and the cursor
is per data-parallel group); each rank keeps its slice of seq_len / sp tokens and targets.
Each attention's core is wrapped in DeepSpeed's `DistributedAttention`: an all-to-all gives every rank the
whole sequence for n_heads / sp of the heads (key/value heads likewise), attention runs on it as on one
device, and a second all-to-all gives back the rank's slice for every head. Positions are the tokens' places
in the whole window (the model's `pos_offset`), so RoPE, sinusoids and the causal mask are those of the
unsplit sequence. A rank backpropagates its tokens' summed loss over the window's token count; the group's sum
is then the window's mean, and sp = 2 trains the same model as sp = 1. Both counts are known on the host (each
rank holds the whole window), so this costs no collective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import deepspeed.comm as ds_dist
import torch
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.sequence.layer import DistributedAttention
from torch import nn

from ctxtrain.model.transformer import IGNORE_INDEX, Attention, lm_targets


@dataclass
class SequenceParallel:
    """This rank's place in its sequence-parallel group."""

    size: int
    rank: int
    group: Any

    @property
    def mpu(self):
        """What deepspeed.initialize takes to know the groups."""
        return parallel_state_sp


def init_sequence_parallel(size: int) -> SequenceParallel:
    """Form the groups of `size` consecutive ranks (every rank calls this once, after the process group)."""
    parallel_state_sp.initialize_sequence_parallel(size)
    group = parallel_state_sp.get_sequence_parallel_group()
    return SequenceParallel(size, ds_dist.get_rank(group=group), group)


def wrap_attention(model: nn.Module, sp: SequenceParallel) -> int:
    """Put DeepSpeed's all-to-all around every attention core (the core stays a function of q, k, v in
    (B, T, H, D) layout); returns how many were wrapped."""
    wrapped = 0
    for module in model.modules():
        if isinstance(module, Attention):
            ulysses = DistributedAttention(module.core, sp.group, scatter_idx=2, gather_idx=1)
            module.core = functools.partial(_ulysses_core, ulysses)  # a function, not a registered submodule
            wrapped += 1
    return wrapped


def _ulysses_core(ulysses: DistributedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs):
    # (B, T/sp, H, D) in and out; inside, (B, T, H/sp, D): batch first (batch_dim_idx 0)
    sp = ds_dist.get_world_size(ulysses.spg)
    if k.shape[2] < sp:
        # Fewer key/value heads than ranks (grouped-query attention): replicate each over the sp / kv ranks
        # whose query heads use it, so that rank r receives head r // (sp / kv), as ALST does. The replicas'
        # gradients add up in repeat_interleave's backward.
        k, v = (t.repeat_interleave(sp // t.shape[2], dim=2) for t in (k, v))
    return ulysses(q, k, v, 0, None, **kwargs)


def share_window(batch: dict, sp: SequenceParallel, device: torch.device) -> dict:
    """The group's window on every rank, from the one that read it (the group's first rank; the others'
    loaders gave empty batches of the same shapes): a broadcast of B x (seq_len + 1) ids, and as many document
    ids and positions where the batch has them, beside the all-to-alls of every attention."""
    out = dict(batch)
    for key in ("tokens", "docs", "positions"):
        if batch.get(key) is not None:
            out[key] = batch[key].to(device, non_blocking=True)
            torch.distributed.broadcast(out[key], group=sp.group, group_src=0)
    return out


def local_lm_loss(model: nn.Module, tokens: torch.Tensor, sp: SequenceParallel,
                  docs: Optional[torch.Tensor] = None,
                  positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's share of the window's mean loss: its slice of inputs and targets at their global positions
    (or their own, positions: restarting at each document), summed token losses over the window's token count.
    Every rank passes the whole window's document ids: attention inside the all-to-all sees the whole
    sequence."""
    inputs, targets = lm_targets(tokens, docs)
    T = inputs.shape[1]
    mine = rank_slice(T, sp)
    start = mine.start
    local_targets = targets[:, mine]
    local_count = (local_targets != IGNORE_INDEX).sum()
    window_count = (targets != IGNORE_INDEX).sum()
    mean = model(inputs[:, mine], local_targets, pos_offset=start, docs=None if docs is None
                 else docs[:, :-1],
                 positions=None if positions is None else positions[:, mine], window=T)
    return mean * (local_count / window_count)


def local_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 sp: SequenceParallel) -> tuple[int, torch.Tensor]:
    """This rank's slice of a sequence's token scores (the model's `token_scores`, forward only): its first
    position and (B, T / sp, 2). T must be a multiple of sp."""
    T = inputs.shape[1]
    mine = rank_slice(T, sp)
    return mine.start, model(inputs[:, mine], targets[:, mine], pos_offset=mine.start, window=T, scores=True)


def rank_slice(T: int, sp: SequenceParallel) -> slice:
    """This rank's positions of a T-token sequence split over its sp group."""
    per = T // sp.size
    return slice(sp.rank * per, (sp.rank + 1) * per)

