"""DeepSpeed: the process group, the generated DeepSpeed config, ZeRO 0-3 with offload, the optimizer with its
weight-decay groups, the LR schedule, one training step, and consolidation of ZeRO shards for export.

Nobody writes a ds_config.json by hand: `ds_config(cfg)` derives it from the typed config and the run
directory keeps the generated one. The optimizer is torch's fused AdamW handed to DeepSpeed as a client
optimizer: with it, save + load continues bit for bit on every ZeRO stage, offload included (DeepSpeed's CPU
Adam recomputes its bias correction after a load and drifts by ~1e-4).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

# The caching allocator grows segments in place instead of carving fixed blocks: far less fragmentation when
# long sequences allocate and free activations of many sizes. Read at the first CUDA allocation; a user's own
# setting stands.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed calls torch's older collective names on every step; torch warns on each call.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                        category=FutureWarning)

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from ctxtrain.config import Config, OptimConfig, deepspeed_zero_stage, overlap_comm  # noqa: E402
from ctxtrain.engine.sequence import (  # noqa: E402
    SequenceParallel,
    init_sequence_parallel,
    local_lm_loss,
    local_scores,
    share_window,
    wrap_attention,
)
from ctxtrain.model.transformer import lm_targets  # noqa: E402
from ctxtrain.plan import bucket_elements  # noqa: E402
from ctxtrain.processes import free_port  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Process group


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (so we destroy it); under Ray Train, Ray owns it
    sp: Optional[SequenceParallel] = None  # this rank's sequence-parallel group (parallel.sp > 1)

    @property
    def sp_size(self) -> int:
        return self.sp.size if self.sp else 1

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data-parallel group: the ranks of one sequence-parallel group read one
        window."""
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    """This worker's device: the GPU its launcher assigned (Ray: CTXTRAIN_CUDA_DEVICE, the one Ray Train gave
    it; else the local rank's), or the CPU. One line when DeepSpeed's accelerator names another kind."""
    from ctxtrain.devices import check_accelerator
    from ctxtrain.errors import UserError

    want = cfg.train.device
    device = torch.device("cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but this worker sees no GPU; use train.device=auto or cpu")
        index = os.environ.get("CTXTRAIN_CUDA_DEVICE")
        torch.cuda.set_device(int(index) if index else local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    check_accelerator(device.type)
    return device


def group_timeout(cfg: Config) -> timedelta:
    """How long the workers' process group waits for its members to join, and for every collective: at least
    300 s (a rank may convert a checkpoint or compile an op while the others wait), or
    cluster.connect_timeout_s when that is longer."""
    return timedelta(seconds=max(cfg.cluster.connect_timeout_s, 300))


def join_loopback_group(cfg: Config, rank: int, world: int, port: int, listen_fd: Optional[int]) -> None:
    """Form the workers' process group on 127.0.0.1 only: rank 0's store serves on the already bound and
    listening socket listen_fd (torch's TCPStore would otherwise listen on every interface), the others
    connect to port; gloo's pairs use the loopback interface (processes.LOOPBACK_ENV, set by the caller)."""
    timeout = group_timeout(cfg)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd)
    backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def leave_process_group() -> None:
    """Destroy this process's group (the caller formed it, e.g. with join_loopback_group)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(cfg: Config) -> DistInfo:
    """Join the process group that the launcher (Ray Train, the local launcher, torchrun) set up, or make a
    one-process group; DeepSpeed then initializes on it."""
    owns = False
    if not dist.is_initialized():
        alone = "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # DeepSpeed's CPU shared-memory comm names its
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # buffers after these; nothing listens on them
        device = pick_device(cfg, int(os.environ["LOCAL_RANK"]))
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # The local launcher names a file store (no listening socket); a lone process needs no store at all;
        # torchrun and friends give MASTER_ADDR/PORT (env://).
        init = os.environ.get("CTXTRAIN_INIT_METHOD")
        timeout = group_timeout(cfg)
        if alone and not init:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init or "env://", rank=rank, world_size=world,
                                    timeout=timeout)
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    sp = cfg.parallel.sp
    if sp > 1:
        if info.world_size % sp:
            from ctxtrain.errors import UserError

            raise UserError(f"parallel.sp={sp} does not divide the {info.world_size} workers that started; "
                            "launch a multiple of parallel.sp workers")
        info.sp = init_sequence_parallel(sp)
    return info


# ---------------------------------------------------------------------------------------------------------
# Schedule, parameter groups, DeepSpeed config


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine/linear decay to min_lr."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, max(0.0, (step - optim.warmup_steps) / span))
    if optim.decay == "cosine":
        return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
    return optim.lr - progress * (optim.lr - optim.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); no decay on norms and biases (1-D parameters; a
    parameter that ZeRO-3 built partitioned keeps its shape in ds_shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def ds_config(cfg: Config, world_size: int, device: str = "cpu") -> dict:
    """The DeepSpeed config, derived from the typed config (saved as RUN_DIR/ds_config.json); world_size
    counts the data-parallel groups (the ranks of a sequence-parallel group share their samples).

    Nothing in it waits on the device per step: DeepSpeed's throughput timer (on by default, synchronizing the
    device twice per micro-batch) is off, and so is bf16's gradient-overflow check (an all-reduce and a host
    read per step): the training loop checks the losses and gradient norms it reads every train.log_every
    steps instead. bf16 without ZeRO runs ZeRO-1 (`deepspeed_zero_stage`), bf16 accumulates gradients in
    float32 across micro-batches."""
    z, stage, gpu = cfg.zero, deepspeed_zero_stage(cfg), device == "cuda"
    zero: dict = {"stage": stage, "overlap_comm": overlap_comm(cfg, device), "contiguous_gradients": True}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    bucket = bucket_elements(cfg.model)
    zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        if cfg.parallel.sp > 1:
            # ZeRO-3's reduce-scatter path averages gradients over every rank; only its all-reduce path sums
            # them over a sequence-parallel group (DeepSpeed 0.19: stage3 __avg_scatter_grads lacks the sp
            # factor). That path takes buckets up to reduce_bucket_size, which bucket_elements keeps >= every
            # parameter.
            zero["reduce_scatter"] = False
    bf16 = cfg.train.dtype == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16, **({"check_grad_overflow": False} if bf16 else {})},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16 and cfg.train.grad_accum > 1:
        # bf16 sums of many micro-batches' gradients lose bits; fp32 accumulation (ZeRO-1: DeepSpeed's
        # BF16_Optimizer, which reads the gradient norm's finiteness once per step)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


# ---------------------------------------------------------------------------------------------------------
# The model, and the pretrained weights it starts from


def build(cfg: Config, info: DistInfo, pretrained: bool) -> nn.Module:
    """The model of cfg.model; with `pretrained` (a run starting fresh: a resume's checkpoint brings its own
    weights) and model.init_from, holding that folder's weights before DeepSpeed wraps it. Under ZeRO-3 the
    model is built partitioned (deepspeed.zero.Init) and each rank copies its own partition of every parameter
    from the rows of the memory-mapped safetensors that hold it: no rank reads or holds the whole model, and
    nothing crosses the network. ZeRO 0-2 keep every weight on every rank anyway: each rank loads them all."""
    from ctxtrain.errors import UserError
    from ctxtrain.model import build_model
    from ctxtrain.model.hf import PretrainedWeights, UnsupportedModel

    if not (pretrained and cfg.model.init_from):
        return build_model(cfg.model)
    try:
        weights = PretrainedWeights(cfg.model.init_from, cfg.model)
    except UnsupportedModel as e:
        raise UserError(f"model.init_from: {e}") from None
    zero3 = deepspeed_zero_stage(cfg) == 3
    if zero3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, info.dp_size, info.device.type)):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - weights.names())
    if missing:
        raise UserError(f"model.init_from={cfg.model.init_from} lacks {len(missing)} weight(s) the model "
                        f"needs ({', '.join(missing[:3])}); is it the folder of this model?")
    with torch.no_grad():
        for name, param in params.items():
            if zero3:
                _load_partition(param, weights, name)
            else:
                param.copy_(weights.get(name))
    return model


def _load_partition(param: nn.Parameter, weights, name: str) -> None:
    """This rank's ZeRO-3 partition of a parameter from the folder: DeepSpeed pads the flattened parameter to
    a multiple of the ranks and gives rank r the r-th equal share (`ds_tensor`); a shape of any other kind
    (another DeepSpeed) falls back to gathering the parameter and filling it on rank 0."""
    group = param.ds_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    share = param.ds_tensor.numel()
    if share != -(-param.ds_numel // world):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.copy_(weights.get(name))
        return
    start = rank * share
    count = max(0, min(param.ds_numel - start, share))
    if count:
        param.ds_tensor.data[:count].copy_(weights.get_flat(name, start, start + count))


# ---------------------------------------------------------------------------------------------------------
# The engine


def batch_loss(model: nn.Module, batch: dict, device: torch.device,
               sp: Optional[SequenceParallel] = None) -> torch.Tensor:
    """Mean loss of one micro-batch: LM on packed windows, or teacher-forced translation. Under sequence
    parallelism, this rank's share of the window's mean (the group's shares add up to it)."""
    if "tokens" in batch:
        if sp is not None:
            batch = share_window(batch, sp, device)
        tokens, docs, positions = (None if batch.get(k) is None else batch[k].to(device, non_blocking=True)
                                   for k in ("tokens", "docs", "positions"))
        if sp is not None:
            return local_lm_loss(model, tokens, sp, docs, positions)
        inputs, targets = lm_targets(tokens, docs)
        return model(inputs, targets, docs=None if docs is None else docs[:, :-1],
                     positions=None if positions is None else positions[:, :-1])
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return model(b["src"], b["tgt"], src_mask=b["src_mask"], tgt_mask=b["tgt_mask"], targets=b["targets"],
                 src_docs=b.get("src_docs"), tgt_docs=b.get("tgt_docs"))


def _import_deepspeed_muon_uncompiled() -> None:
    """deepspeed.initialize asks whether the optimizer is one ZeRO supports by importing DeepSpeed's Muon
    optimizer, whose module-level `@torch.compile` kernels load Inductor: ~2 s of every worker start on 2 CPU
    cores, for kernels an AdamW run never calls. Import that module once with torch.compile as the identity;
    the check then finds it imported (a Muon run, were ctxtrain to offer one, would have to import it first,
    compiled)."""
    import sys

    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without Muon: nothing to avoid
        pass
    finally:
        torch.compile = compile_


class Engine:
    """A DeepSpeed engine around the model, with the step the training loop calls."""

    def __init__(self, cfg: Config, model: nn.Module, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        o = cfg.optim
        # fused: one in-place kernel per step; the default foreach path holds two float32 copies of the
        # partition as temporaries, which is the peak of a long-sequence step once activations are freed.
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay),
                                      lr=lr_at(1, o, cfg.train.max_steps), betas=(o.beta1, o.beta2),
                                      eps=o.eps, fused=True)
        self.config = ds_config(cfg, dist_info.dp_size, dist_info.device.type)
        # length-bucketed translation: a step's target tokens, on average over the epoch (`_token_shares`)
        self.tokens_per_step: Optional[float] = None
        if dist_info.sp is not None:
            wrap_attention(model, dist_info.sp)
        _import_deepspeed_muon_uncompiled()
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             config=self.config,
                                                             dist_init_required=False,
                                                             mpu=dist_info.sp.mpu if dist_info.sp else None)
        if dist_info.world_size == 1 and deepspeed_zero_stage(cfg) == 0:
            # Nothing to reduce on one rank, and DeepSpeed's fallback all-reduce would still flatten every
            # gradient into a copy (up to 5e8 elements): a whole model's gradients of memory at the peak.
            self.ds.enable_backward_allreduce = False

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batches: list[dict], lr: float) -> tuple[torch.Tensor, object]:
        """Forward/backward over the micro-batches (gradient accumulation), then one optimizer step.
        Returns this rank's mean loss as a device tensor and the global gradient norm before clipping (as
        DeepSpeed gives it: a tensor, a float or None); nothing here waits for the device."""
        self.ds.train()
        self.set_lr(lr)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch, share in zip(batches, self._token_shares(batches)):
            loss = batch_loss(self.ds, batch, self.device, self.dist.sp)
            self.ds.backward(loss if share is None else loss * share)
            self.ds.step()
            total += loss.detach().float()
        return total / len(batches), self.ds.get_global_grad_norm()

    def _token_shares(self, batches: list[dict]) -> list:
        """Length-bucketed translation: each micro-batch's loss weighted by its target tokens over
        `tokens_per_step`, the target tokens a step holds on average over the epoch (set by training from the
        pair lengths index.json records), so that every target token weighs the same whatever batch it came
        in. Without it a batch of 32 two-token labels would move the weights as far as one of 32 sentences of
        40 tokens. A constant rather than each step's own count keeps that so across steps as well (Adam
        normalises each step's update). Pairs in random order (and LM windows) hold about the same number of
        targets in every batch: None, the plain mean of the micro-batches' means."""
        if self.tokens_per_step is None or "tgt_mask" not in batches[0]:
            return [None] * len(batches)
        # DeepSpeed averages the ranks' gradients and divides each micro-batch's loss by their number
        scale = self.dist.world_size * len(batches) / self.tokens_per_step
        return [float(b["n_tokens"]) * scale for b in batches]

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.ds.eval()
        loss = batch_loss(self.ds, batch, self.device, self.dist.sp).detach().float()
        self.ds.train()
        return loss

    @torch.no_grad()
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Forward only through the engine (ZeRO-3's partitions, the memory levers, the sp group): every
        target's loss and argmax hit (the model's `token_scores`) for this rank's positions of the sequence:
        (first position, (B, T / sp, 2) on the CPU). A collective: every rank calls it, the ranks of an sp
        group with the same sequence, whose length is a multiple of sp."""
        self.ds.eval()
        try:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            if self.dist.sp is None:
                return 0, self.ds(inputs, targets, scores=True).cpu()
            start, scores = local_scores(self.ds, inputs, targets, self.dist.sp)
            return start, scores.cpu()
        finally:
            self.ds.train()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights as float32 CPU tensors on every rank, names as `build_model` gives them.
        Under ZeRO-3 the partitions are gathered (a collective: every rank calls this); ZeRO 0-2 hold them."""
        params = list(self.module.parameters())
        gather = (deepspeed.zero.GatheredParameters(params) if self.cfg.zero.stage == 3
                  else contextlib.nullcontext())
        with gather:
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, root: str, tag: str) -> None:
        """Every rank writes its DeepSpeed files under root/tag (one optimizer shard per rank under ZeRO)."""
        self.ds.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)

    def load(self, root: str, tag: str, universal: bool = False) -> None:
        """Load root/tag: DeepSpeed's files of the same world size, or (universal) a folder that
        `to_universal` converted, which loads on any world size."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.ds._config.load_universal_checkpoint = universal
        try:
            with weights_only_loading():
                path, _ = self.ds.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if universal:
            # ZeRO-3's universal load (DeepSpeed 0.19) gives every parameter group the hyperparameters of the
            # first: the norms and biases would get the matrices' weight decay. Ours come from the config.
            for group, hparams in zip(self.optimizer.param_groups, groups):
                group.update(hparams)
            # It also hands every partition the same `step` tensor, which torch's AdamW increments in place:
            # with two partitions the step would advance by two and the bias correction drift. One tensor
            # each.
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        if path is None:
            from ctxtrain.errors import UserError

            raise UserError(f"checkpoint {root}/{tag} could not be loaded by DeepSpeed; pick another with "
                            "--resume")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over every rank, in place (returns it)."""
    dist.all_reduce(t)
    return t


def post_once(key: str, value: str) -> None:
    """Put value under key in the process group's store unless a value is there already (the first post
    wins)."""
    dist.distributed_c10d._get_default_store().compare_set(key, "", value)  # private: no public accessor


def wait_posted(key: str, timeout_s: float) -> str:
    """The value under key in the process group's store, waiting for it up to timeout_s: a wait that does not
    count against the group's collective deadline (rank 0 converting a large checkpoint while the others
    wait)."""
    store = dist.distributed_c10d._get_default_store()
    store.wait([key], timedelta(seconds=timeout_s))
    return store.get(key).decode()


def posted(key: str) -> Optional[str]:
    """The value under key in the process group's store, or None (no wait: the store is only asked)."""
    store = dist.distributed_c10d._get_default_store()
    return store.get(key).decode() if store.check([key]) else None


def mean_over_ranks(value, device: torch.device) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _enum_member(cls, name: str):
    """What a pickle's `getattr(cls, name)` may be while loading a checkpoint: a member of DeepSpeed's
    ZeroStageEnum, nothing else (some Pythons, 3.11.2 among them, pickle an enum member as that call)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is ZeroStageEnum and isinstance(name, str) and name in ZeroStageEnum.__members__:
        return ZeroStageEnum[name]
    raise pickle.UnpicklingError(f"a checkpoint asked for getattr({cls!r}, {name!r}); refused: only "
                                 "ZeroStageEnum members are read from checkpoints")


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside (DeepSpeed's included, which pass weights_only=False) unpickles only tensors,
    containers and the three DeepSpeed classes its checkpoints hold (an enum member pickled as getattr goes
    through `_enum_member`): a checkpoint file cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address,
                                               (_enum_member, "builtins.getattr")]):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def to_universal(checkpoint_dir: str, out_dir: str) -> None:
    """Convert a ZeRO 1-3 checkpoint (DeepSpeed's files of some world size) into DeepSpeed's universal format
    (one folder per parameter: fp32 weights and Adam moments, unpartitioned) in out_dir, in this process:
    `deepspeed.checkpoint.ds_to_universal` with one extract and one merge worker (no process pool)."""
    import argparse
    import io
    from contextlib import redirect_stdout

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=checkpoint_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, no_strict=False,
                              inject_missing_state=True)  # ZeRO 1-2 files lack its version tag
    with redirect_stdout(io.StringIO()), weights_only_loading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_to_universal.main(args)


def consolidate(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a checkpoint directory: DeepSpeed's zero-to-fp32 for ZeRO 1-3, the module state
    for stage 0 (which writes no partitioned optimizer states)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(os.path.normpath(checkpoint_dir))
    with weights_only_loading():
        if any(name.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) for name in os.listdir(checkpoint_dir)):
            # its progress lines and bars would mix into `translate`'s and `generate`'s output
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
        else:
            state = torch.load(os.path.join(checkpoint_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                               weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
