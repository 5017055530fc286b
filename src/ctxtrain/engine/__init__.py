"""The engine: DeepSpeed (the only package importing it) and what it wraps around the model.

- `core`: the process group, the generated DeepSpeed config, ZeRO 0-3, the optimizer, the step, consolidation,
the
  universal-checkpoint conversion (a ZeRO checkpoint of one world size loaded on another).
- `memory`: the memory levers (activation checkpointing policies, the chunked LM head + loss, the chunked
MLP).
"""

from ctxtrain.engine.core import (
    DistInfo,
    Engine,
    all_reduce_sum,
    barrier,
    batch_loss,
    build,
    consolidate,
    ds_config,
    gather_objects,
    init_distributed,
    join_loopback_group,
    leave_process_group,
    lr_at,
    mean_over_ranks,
    param_groups,
    pick_device,
    post_once,
    posted,
    shutdown,
    to_universal,
    wait_posted,
)
from ctxtrain.engine.memory import Levers, apply_levers

__all__ = [
    "DistInfo",
    "Engine",
    "Levers",
    "all_reduce_sum",
    "apply_levers",
    "barrier",
    "batch_loss",
    "build",
    "consolidate",
    "ds_config",
    "gather_objects",
    "init_distributed",
    "join_loopback_group",
    "leave_process_group",
    "lr_at",
    "mean_over_ranks",
    "param_groups",
    "pick_device",
    "post_once",
    "posted",
    "shutdown",
    "to_universal",
    "wait_posted",
]
