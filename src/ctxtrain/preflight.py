"""What a launcher checks before it starts workers (and a worker again where no launcher could): the data, the
memory the planner predicts, the W&B login, the checkpoint to resume from. One line each, exit status 2.

No torch, deepspeed or webdataset here: `ctxtrain train` runs these in its driver before any worker starts,
and importing those (~4 s on 2 CPU cores) is the workers' business.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ctxtrain import checkpoint as ckpt
from ctxtrain.config import Config
from ctxtrain.data.dataset import Dataset
from ctxtrain.errors import UserError

if TYPE_CHECKING:
    import torch


def check_data(cfg: Config) -> Dataset:
    """The dataset exists, fits the model, and holds at least one global batch; one-line errors otherwise."""
    ds = Dataset(cfg.data.path, cfg.data.cache)
    want = "lm" if cfg.model.kind == "lm" else "translation"
    if ds.task != want:
        raise UserError(f"data.path={cfg.data.path} holds {ds.task} data but model.kind={cfg.model.kind} "
                        f"needs {want} data; point data.path at a {want} dataset")
    if ds.vocab_size > cfg.model.vocab_size and cfg.model.init_from:
        raise UserError(f"data.path={cfg.data.path}: its tokenizer has {ds.vocab_size} ids, past the "
                        f"vocabulary of model.init_from={cfg.model.init_from} ({cfg.model.vocab_size}); "
                        f"prepare the data with the model's own tokenizer (`ctxtrain prepare --tokenizer "
                        f"{cfg.model.init_from}`)")
    if ds.vocab_size > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the tokenizer of {cfg.data.path} has "
                        f"{ds.vocab_size} ids; set model.vocab_size >= {ds.vocab_size}")
    ds.usable_shards("train", cfg.data.skip_corrupt)
    if cfg.model.init_from:
        tokenizer = Path(cfg.model.init_from) / "tokenizer.json"
        theirs = hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.is_file() else None
        if theirs is not None and theirs != ds.index["tokenizer_sha256"]:
            raise UserError(f"data.path={cfg.data.path} was tokenized with another tokenizer than "
                            f"model.init_from={cfg.model.init_from} (its tokenizer.json); prepare the data "
                            f"with `ctxtrain prepare --tokenizer {cfg.model.init_from}`")
    return ds


def runs_here(cfg: Config) -> bool:
    """The workers start on this machine: the local launcher, or Ray embedded here (no address to join)."""
    return cfg.cluster.launcher == "local" or not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def check_memory(cfg: Config, world: int, device: Optional["torch.device"] = None) -> None:
    """Refuse in one line a config that `ctxtrain plan` predicts will not fit (memory.force skips this).

    Without a device, for workers about to start on this machine: its GPUs, else its host memory shared by the
    workers. With one (a worker checking itself, when no driver could: a remote cluster, torchrun): that
    device's free memory."""
    from ctxtrain.plan import CUDA_CONTEXT_BYTES, available_here, check_fits, host_memory_bytes

    if cfg.memory.force:
        return
    if device is None:
        kind, device_bytes, host_bytes = available_here(cfg.cluster.workers,
                                                        want_gpu=cfg.cluster.gpus_per_worker != 0)
        where = ("GPU memory" if kind == "cuda"
                 else f"this machine's available memory shared by {cfg.cluster.workers} workers")
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        host_bytes = host_memory_bytes() / max(1, local)
        kind = device.type
        if kind == "cuda":
            import torch

            # free now, plus this process's own context, which the plan counts as a term
            device_bytes = torch.cuda.mem_get_info(device)[0] + CUDA_CONTEXT_BYTES
            where = f"free memory of {device}"
        else:
            device_bytes, host_bytes = host_bytes, None
            where = f"this node's available memory shared by {local} workers"
    check_fits(cfg, world, kind, device_bytes, host_bytes, where)


def preflight(cfg: Config) -> None:
    """What a launcher checks before it starts workers: data, memory, W&B login, the checkpoint to resume
    from."""
    check_data(cfg)
    if runs_here(cfg):
        check_memory(cfg, cfg.cluster.workers)
        os.environ["CTXTRAIN_MEMORY_CHECKED"] = "1"  # the workers need not check again
    from ctxtrain.tracking import logged_in, wandb_mode

    if cfg.tracking.enabled and wandb_mode(cfg) == "online" and not logged_in():
        raise UserError("W&B mode is online but this machine has no W&B login; run `wandb login`, set "
                        "WANDB_API_KEY, or use --tracking.mode=offline (or WANDB_MODE=offline)")
    target = ckpt.resume_target(cfg, ckpt.open_storage(cfg), share=None)  # sizes only; workers check CRCs
    if target is None and cfg.model.init_from:  # a fresh start reads the folder's weights (a resume: its own)
        from ctxtrain.model.hf import UnsupportedModel, weight_files

        try:
            weight_files(cfg.model.init_from)
        except UnsupportedModel as e:
            raise UserError(f"model.init_from: {e}") from None
