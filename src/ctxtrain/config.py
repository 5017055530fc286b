"""One config tree: dataclasses with a docstring under every field, loaded from YAML, overridden on the
command line as `--section.field=value`, checked with errors that name the field and the fix.

    ctxtrain config show configs/lm_tiny.yaml --model.n_layers=3

Every error is a `ConfigError` whose message is one line; the CLI prints it and exits 2.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import inspect
import json
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ctxtrain.errors import UserError
from ctxtrain.model.config import ModelConfig


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message is one line naming the field, the value and what is allowed."""


@dataclass
class DataConfig:
    path: str = "data/stdlib"
    """Shard directory written by `ctxtrain prepare` (holds index.json, tokenizer.json and the tars), or the
    same under a URI: s3://bucket/path, gs://..., http(s)://host/path, file:///path (shards are fetched into
    data.cache_dir; an S3-compatible endpoint: s3://bucket/path?endpoint_override=http://host:port)."""

    seq_len: int = 256
    """Tokens per LM training sample; the loader packs documents into windows of seq_len + 1 ids."""

    batch_size: int = 8
    """Samples per micro-batch on each rank (LM windows, or translation pairs)."""

    num_workers: int = 1
    """DataLoader worker processes per rank; 0 reads in the training process itself."""

    shuffle_buffer: int = 1024
    """Samples shuffled together in each block of the global order (deterministic from train.seed); 1 keeps
    stream order. A reader holds its share of one block: about shuffle_buffer x (seq_len + 1) x 2 bytes /
    (ranks x workers)."""

    skip_corrupt: bool = False
    """Skip a missing or truncated shard (counted in the loader's stats) instead of stopping with an error."""

    max_src_len: int = 128
    """Translation: source ids beyond this are cut."""

    max_tgt_len: int = 128
    """Translation: target ids (with BOS/EOS) beyond this are cut."""

    doc_mask: bool = False
    """Keep the documents packed into a window apart: each token attends only to the earlier tokens of its own
    document, and the prediction across a document boundary (of the next document's first token) is not
    trained. How Llama 3 trained long context; the loss of a window is then the mean of its documents'."""

    partitions: Optional[int] = None
    """Contiguous spans of each epoch's stream, each read by one data-parallel rank, so that a shard is read
    (fetched, under a URI) about once per epoch across the job (null: the data-parallel world size of the
    run's first start; a resume keeps its cursor's). 1: every rank reads the whole stream."""

    length_buckets: bool = False
    """Translation: each micro-batch of pairs of about the same length, so that little of what the model
    computes is padding (pairs sorted by length within each partition's shuffle block, cut into micro-batches,
    those shuffled; needs the pair lengths `prepare` records in index.json), and each target token weighted
    the same. 2x the target tokens/s on the Debian gettext pairs, but less learned per step there (README,
    "Translation batches"): off unless asked. A resume keeps its cursor's choice."""

    pack_pairs: int = 0
    """Translation: pack each micro-batch's pairs into rows of this many ids a side (as t5x packs examples),
    each pair attending to itself only, its positions its own: the same pairs, the same loss, far less
    padding (1.2x the real tokens at 128 on the Debian gettext pairs, 3x unpacked). At least data.max_src_len
    and data.max_tgt_len; 0: one row a pair, padded to the micro-batch's longest. Training batches only."""

    cache_dir: Optional[str] = None
    """Where shards of a data.path under a URI (s3://, gs://, http(s)://) are cached on each node (null:
    $CTXTRAIN_DATA_CACHE, else ~/.cache/ctxtrain/data); a node fetches a shard once while it stays cached."""

    cache_limit_gb: Optional[float] = None
    """Size limit of the node's shard cache; past it the shards used longest ago are evicted (null: none)."""

    fetch_deadline_s: float = 120.0
    """How long a shard fetch that fails for a transient reason (network, server) is retried, with backoff,
    before the run stops with a line naming the URL."""

    doc_positions: bool = False
    """Positions restart at 0 at each document of a packed window (with data.doc_mask): a document sees the
    positions it would see alone, which matters for sinusoidal positions (RoPE is relative already)."""

    @property
    def cache(self):
        """The shard cache's settings (ctxtrain.data.remote.CacheSettings)."""
        from ctxtrain.data.remote import CacheSettings

        return CacheSettings(self.cache_dir, self.cache_limit_gb, self.fetch_deadline_s)

    @property
    def documents(self) -> str:
        """What the loader adds to LM batches: "" nothing, "ids" the documents' ids, "positions" also each
        token's position in its document."""
        return "positions" if self.doc_positions else "ids" if self.doc_mask else ""

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "shuffle_buffer", "max_src_len", "max_tgt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be a positive integer")
        for name in ("num_workers", "pack_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be 0 or more")
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"data.partitions={self.partitions}: must be a positive integer or null")


@dataclass
class TrainConfig:
    run_dir: str = "runs/lm_tiny"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ (shared by all nodes on a cluster)."""

    max_steps: int = 1000
    """Optimizer steps of the whole run; the LR schedule is laid out over them."""

    max_tokens: Optional[int] = None
    """Stop once this many training tokens were consumed (null: only max_steps counts)."""

    seed: int = 1234
    """Seed of weights, data order and dropout."""

    dtype: Literal["bf16", "fp32"] = "bf16"
    """Training precision: bf16 (mixed, fp32 master weights) or fp32."""

    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""

    global_batch: Optional[int] = None
    """Samples per optimizer step over all workers, kept whatever the number of workers (an elastic range, a
    resume on another count): the micro-batch (at most data.batch_size) and the accumulation are derived for
    the workers that start, the largest micro-batch that splits it exactly. null: data.batch_size x
    train.grad_accum x the data-parallel groups of cluster.workers."""

    stop_at_step: Optional[int] = None
    """End cleanly with a checkpoint after this step; the schedule still follows max_steps."""

    stop_after_minutes: Optional[float] = None
    """End cleanly with a checkpoint once this much wall time has passed (time-limited allocations)."""

    eval_every: int = 100
    """Steps between evaluations on the val shards (0: never, except at the end)."""

    eval_batches: int = 16
    """Micro-batches per evaluation on each rank."""

    bleu_every: int = 0
    """Translation: steps between greedy sacreBLEU scores (`val_bleu`, `val_chrf`) of the first
    train.bleu_pairs held-out pairs, decoded across the ranks (0: never)."""

    bleu_pairs: int = 256
    """Held-out pairs that train.bleu_every decodes (the first ones of the val split: a fixed subset)."""

    probe_every: int = 0
    """LM: steps between context probes (`ctxtrain probe`'s loss by position and passkey retrieval, as the
    `probe` section says), split across the ranks, into metrics.jsonl as probe/... keys (0: never)."""

    log_every: int = 10
    """Steps between plain log lines when no terminal shows a progress bar."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when a GPU is visible to the worker, else CPU."""

    peak_tflops: Optional[float] = None
    """Dense bf16 peak of one accelerator for MFU; null: looked up for known GPUs, and MFU is null on CPU."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "eval_batches", "log_every", "bleu_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be a positive integer")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"train.global_batch={self.global_batch}: must be a positive integer or null")
        if self.global_batch is not None and self.grad_accum != 1:
            raise ValueError(f"train.global_batch={self.global_batch} and "
                             f"train.grad_accum={self.grad_accum}: the accumulation is derived from the "
                             "global batch; set only one of them")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every}: must be 0 (off) or a positive integer")
        if self.bleu_every < 0:
            raise ValueError(f"train.bleu_every={self.bleu_every}: must be 0 (off) or a positive integer")
        if self.probe_every < 0:
            raise ValueError(f"train.probe_every={self.probe_every}: must be 0 (off) or a positive integer")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.max_steps:
            raise ValueError(
                f"train.stop_at_step={self.stop_at_step}: must lie in 1..train.max_steps={self.max_steps}"
            )
        if self.stop_after_minutes is not None and self.stop_after_minutes <= 0:
            raise ValueError(f"train.stop_after_minutes={self.stop_after_minutes}: must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"train.max_tokens={self.max_tokens}: must be positive or null")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"train.peak_tflops={self.peak_tflops}: must be positive or null")
        if not self.run_dir:
            raise ValueError("train.run_dir is empty: name a run directory, e.g. runs/my_run")


@dataclass
class ProbeConfig:
    """The context probes that train.probe_every runs during training."""

    lengths: list[int] = field(default_factory=list)
    """Lengths the probes run at (empty: data.seq_len)."""

    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """The passkey's depths in [0, 1] (0: right after the instruction, 1: right before the question)."""

    samples: int = 4
    """Passkey keys per (length, depth) cell ."""

    windows: int = 8
    """Held-out windows per length for an in-loop probe's loss by position."""

    scoring: Literal["auto", "greedy", "forced"] = "auto"
    """How an in-loop probe runs. greedy: on the gathered weights, one plain copy of the model per rank,
    passkey decoded through the KV cache. forced: through the training engine itself, forward only (ZeRO-3's
    partitions, the run's parallel.sp groups and memory levers: the lengths the run trains at), passkey scored
    by the teacher-forced argmax over the key's tokens (both give the same verdicts where both run). auto:
    forced when parallel.sp > 1 or a memory lever is on (one device may not hold the window), else greedy."""

    def __post_init__(self) -> None:
        for name in ("samples", "windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name}={getattr(self, name)}: must be a positive integer")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"probe.lengths={self.lengths}: lengths are positive integers")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"probe.depths={self.depths}: one or more depths in [0, 1]")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""

    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""

    warmup_steps: int = 50
    """Linear warmup from 0 to lr over these steps."""

    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr between warmup and max_steps."""

    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and biases get none."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr}: must lie in 0..optim.lr={self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be 0 or more")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)}: must lie in [0, 1)")
        for name in ("weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)}: must be 0 or more")


@dataclass
class MemoryConfig:
    checkpoint: Literal["none", "full", "selective", "offload"] = "none"
    """Activation checkpointing of every block. none: keep every activation. full: keep each block's input and
    recompute the block in the backward pass. selective: also keep attention's output (costly to recompute at
    long length) and recompute the projections, MLP and norms. offload: full, with the kept block inputs moved
    to host memory and brought back for the backward pass (pinned memory, copies on a side stream on GPU)."""

    loss_chunk: Optional[int] = None
    """Tokens per chunk of the LM head + cross-entropy (0 or null: all tokens of a micro-batch at once).
    Chunked, the [tokens, vocab] logits exist one chunk at a time in forward and backward; same loss and
    gradients."""

    mlp_chunk: Optional[int] = None
    """Tokens per chunk of every MLP (0 or null: not chunked): the idea of DeepSpeed's TiledMLP, on torch's
    checkpoint (ctxtrain.engine.memory). Chunked, the MLP's [tokens, d_ff] activations exist one chunk at a
    time; same outputs and gradients, one more MLP forward."""

    margin: float = 0.05
    """Allocator margin of `ctxtrain plan`: this fraction is added to the predicted peak (fragmentation of the
    caching allocator on GPU, of malloc's arenas on CPU)."""

    force: bool = False
    """Train even when `ctxtrain plan` predicts that the config does not fit in the memory of a worker."""

    def __post_init__(self) -> None:
        for name in ("loss_chunk", "mlp_chunk"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"memory.{name}={value}: must be a positive number of tokens, or 0/null "
                                 "(off)")
            if value == 0:
                setattr(self, name, None)
        if not 0 <= self.margin < 1:
            raise ValueError(f"memory.margin={self.margin}: must lie in [0, 1) (a fraction of the predicted "
                             "peak)")


@dataclass
class ParallelConfig:
    sp: int = 1
    """Sequence-parallel degree (DeepSpeed-Ulysses): each window is split across groups of `sp` consecutive
    workers, which exchange attention's heads with an all-to-all; data parallelism runs across the groups
    (workers = data-parallel groups x sp). Must divide cluster.workers, model.n_heads and data.seq_len, and
    divide the key/value heads or be a multiple of them (past them, as in ALST, each key/value head is
    replicated over sp / n_kv_heads ranks: a Llama-3-8B with 8 of them spreads one sequence over up to 32)."""

    def __post_init__(self) -> None:
        if self.sp < 1:
            raise ValueError(f"parallel.sp={self.sp}: must be a positive integer (1: no sequence "
                             "parallelism)")


@dataclass
class ZeroConfig:
    stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+
    parameters)."""

    offload_optimizer: bool = False
    """Keep optimizer states (and the step) in CPU memory."""

    offload_params: bool = False
    """Keep parameters in CPU memory between uses (stage 3 only)."""

    overlap_comm: Optional[bool] = None
    """Overlap gradient reduction (ZeRO-2) and parameter prefetch (ZeRO-3) with compute (a second bucket of
    memory); null: on with GPUs, where it keeps the interconnect busy while the GPU computes, off on CPUs,
    where the same cores would do both."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage={self.stage}: must be 0, 1, 2 or 3")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"zero.offload_params=true: needs zero.stage=3 (have {self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer=true: needs zero.stage 1, 2 or 3")


@dataclass
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints (0: only at the end); one is always written when the run ends or stops."""

    keep_last: int = 2
    """Committed checkpoints kept, newest first."""

    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""

    storage: Optional[str] = None
    """Where checkpoints live: null for RUN_DIR/checkpoints, a shared path, or a URI (s3://, gs://,
    file://)."""

    resume: str = "auto"
    """auto: resume from the newest committed checkpoint if any; never: start fresh; or a checkpoint path."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_every < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_every must be 0 or more")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: must be at least 1")
        if not self.resume:
            raise ValueError("checkpoint.resume is empty: use auto, never, or a checkpoint path")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to Weights & Biases from rank 0 (metrics.jsonl is written either way)."""

    tensorboard: bool = True
    """Write every metric of metrics.jsonl to RUN_DIR/tensorboard/ from rank 0 (`tensorboard --logdir runs/`),
    with or without W&B."""

    project: str = "ctxtrain"
    """W&B project."""

    entity: Optional[str] = None
    """W&B entity (team or user); null: the logged-in default."""

    group: Optional[str] = None
    """W&B group, to gather related runs."""

    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    name: Optional[str] = None
    """W&B run name; null: the run directory's name."""

    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when logged in or WANDB_API_KEY is set, offline otherwise; WANDB_MODE wins over this."""


@dataclass
class ClusterConfig:
    launcher: Literal["ray", "local"] = "ray"
    """ray: Ray Train workers (embedded Ray, or the cluster at `address`); local: plain processes on this
    machine."""

    workers: int = 1
    """Training workers (ranks). A range MIN..MAX (YAML or command line) makes the run elastic: Ray starts as
    many as it can place within it and, when a worker group restarts with another size, training resumes on
    that."""

    min_workers: Optional[int] = None
    """Lower end of an elastic range (`workers: MIN..MAX` sets it); null: exactly `workers`."""

    address: Optional[str] = None
    """Ray cluster to join (ray://, host:port or auto); null: $RAY_ADDRESS, else Ray starts embedded here."""

    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker."""

    gpus_per_worker: Optional[float] = None
    """GPUs per worker, 0 or 1 (a fraction would put two ranks on one GPU, which NCCL refuses); null: 1 when
    the Ray cluster has GPUs, else 0."""

    placement: Literal["pack", "spread"] = "pack"
    """pack workers onto as few nodes as possible, or spread them one per node."""

    max_failures: int = 3
    """Worker-group restarts Ray may do after a worker dies; each resumes from the newest committed
    checkpoint."""

    preempt_grace_s: float = 120.0
    """SIGTERM to `ctxtrain train` (Slurm's --signal, a Kubernetes eviction) asks the workers for a checkpoint
    at the next step boundary and an exit with status 75 ("resume me"); past this many seconds the driver
    stops them without one. Give the scheduler's signal lead / grace period a little more than this."""

    dashboard_host: str = "127.0.0.1"
    """Interface for the embedded Ray dashboard and job server; 0.0.0.0 exposes them to the network."""

    dashboard_port: Optional[int] = None
    """Port of the embedded Ray dashboard and job server; null: 8265 when it is free, else any free port
    (another embedded run on this machine holds it), named in the start line."""

    metrics_port: Optional[int] = None
    """Port of the embedded Ray's Prometheus endpoint (http://127.0.0.1:PORT/metrics), which carries the
    training gauges (ray_ctxtrain_*); null: Ray picks a free one and the start line names it."""

    connect_timeout_s: float = 30.0
    """Deadline for reaching a Ray cluster (--address) and for a fresh head's job agent (`submit`); past it
    the command ends with one line naming the address. The workers' process group waits longer: this or 300 s,
    whichever is more, for its members and for every collective."""

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"cluster.connect_timeout_s={self.connect_timeout_s}: must be positive")
        if self.workers < 1:
            raise ValueError(f"cluster.workers={self.workers}: must be at least 1")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"cluster.workers={self.min_workers}..{self.workers}: the range must satisfy "
                             "1 <= MIN <= MAX")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cluster.cpus_per_worker={self.cpus_per_worker}: must be positive")
        if self.gpus_per_worker not in (None, 0, 1):
            raise ValueError(f"cluster.gpus_per_worker={self.gpus_per_worker:g}: must be 0, 1 or null (a "
                             "worker is one rank on at most one GPU; NCCL refuses two ranks on one GPU)")
        if self.preempt_grace_s <= 0:
            raise ValueError(f"cluster.preempt_grace_s={self.preempt_grace_s}: must be positive")
        if self.max_failures < -1:
            raise ValueError(f"cluster.max_failures={self.max_failures}: must be -1 (unlimited) or more")


@dataclass
class FaultConfig:
    kill_rank: Optional[int] = None
    """Rank that SIGKILLs itself once, to rehearse recovery (null: no fault)."""

    at_step: Optional[int] = None
    """Step of the fault: during that step, or during the first checkpoint at or after it."""

    during: Literal["step", "checkpoint", "read"] = "step"
    """step: die in the middle of a training step; checkpoint: die after writing this rank's shard, before the
    commit; read: the rank's data-loader worker kills it while reading that step's batch (the step must lie in
    the epoch that the run is reading when it starts)."""

    repeat: int = 1
    """Die again at each of the next repeat-1 steps (step, read), once each: consecutive kills, each
    resumed."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network's shape."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards and how they are read."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The run: steps, precision, stopping, evaluation."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""

    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO partitioning and offload."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Activation checkpointing and the chunked loss and MLP: what a long sequence costs in memory."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the workers split the work: sequence parallelism across groups of workers."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints: interval, retention, storage, resume."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Weights & Biases."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Workers and the Ray cluster."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The context probes run during training (train.probe_every)."""

    fault: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for recovery rehearsals."""

    def __post_init__(self) -> None:
        self._check_sequence_parallel()
        self._check_bleu()
        self._check_documents()
        self._check_batch_split()
        f = self.fault
        if f.kill_rank is not None:
            if f.at_step is None or f.at_step < 1:
                raise ValueError(f"fault.at_step={f.at_step}: set a step >= 1 when fault.kill_rank is set")
            if not 0 <= f.kill_rank < self.cluster.workers:
                raise ValueError(
                    f"fault.kill_rank={f.kill_rank}: must lie in "
                    f"0..cluster.workers-1={self.cluster.workers - 1}"
                )
            if f.during == "read" and f.kill_rank % self.parallel.sp:
                raise ValueError(
                    f"fault.kill_rank={f.kill_rank} with fault.during=read: under parallel.sp="
                    f"{self.parallel.sp} only the first rank of each group reads data; choose a multiple of "
                    f"{self.parallel.sp}"
                )
        if f.repeat < 1 or (f.repeat > 1 and f.during == "checkpoint"):
            raise ValueError(f"fault.repeat={f.repeat}: must be 1, or more with fault.during=step or read")

    def _check_documents(self) -> None:
        if self.data.doc_positions and not self.data.doc_mask:
            raise ValueError("data.doc_positions=true restarts positions at each document: it needs "
                             "data.doc_mask=true (documents that attend to each other share one position "
                             "line)")
        if self.data.doc_mask and self.model.kind != "lm":
            raise ValueError(f"data.doc_mask=true: model.kind={self.model.kind} trains on sentence pairs, "
                             "not on packed documents; set data.doc_mask=false")
        d = self.data
        if d.pack_pairs and self.model.kind != "encdec":
            raise ValueError(f"data.pack_pairs={d.pack_pairs}: packs translation pairs, and model.kind="
                             f"{self.model.kind} trains on windows; set data.pack_pairs=0 (data.doc_mask "
                             "keeps a window's documents apart)")
        if d.pack_pairs and d.pack_pairs < max(d.max_src_len, d.max_tgt_len):
            raise ValueError(f"data.pack_pairs={d.pack_pairs}: a row must hold the longest pair "
                             f"(data.max_src_len={d.max_src_len}, data.max_tgt_len={d.max_tgt_len}); set it "
                             f"to at least {max(d.max_src_len, d.max_tgt_len)} (or 0: no packing)")
        if self.data.doc_mask and self.model.dropout:
            raise ValueError(f"data.doc_mask=true with model.dropout={self.model.dropout}: the document "
                             "mask's attention has no dropout; set model.dropout=0 (long-context training of "
                             "pretrained models runs without it)")

    def _check_bleu(self) -> None:
        if self.train.probe_every and self.model.kind != "lm":
            raise ValueError(f"train.probe_every={self.train.probe_every}: the probes measure a language "
                             f"model's use of its context, and model.kind={self.model.kind} translates; set "
                             "train.probe_every=0 (val_bleu scores translations)")
        if self.train.bleu_every and self.model.kind != "encdec":
            raise ValueError(f"train.bleu_every={self.train.bleu_every}: BLEU scores translations, and "
                             f"model.kind={self.model.kind} does not translate; set train.bleu_every=0 "
                             "(perplexity is val_ppl)")

    def _check_sequence_parallel(self) -> None:
        sp = self.parallel.sp
        if sp == 1:
            return
        if self.model.kind != "lm":
            raise ValueError(f"parallel.sp={sp}: sequence parallelism is for the decoder-only LM; "
                             f"translation pairs (data.max_src_len={self.data.max_src_len}) are too short to "
                             "split, use parallel.sp=1")
        bad = [f"{name}={value}" for name, value in (("cluster.workers", self.cluster.workers),
                                                     ("model.n_heads", self.model.n_heads),
                                                     ("data.seq_len", self.data.seq_len)) if value % sp]
        if bad:
            raise ValueError(f"parallel.sp={sp} must divide {', '.join(bad)}; choose an sp that divides "
                             "the workers, the heads and the sequence length")
        kv = self.model.kv_heads
        if kv % sp and sp % kv:  # past the key/value heads, each is replicated over sp / kv ranks
            raise ValueError(f"parallel.sp={sp} and model.n_kv_heads={kv}: one must divide the other (each "
                             "rank takes kv / sp key/value heads, or sp / kv ranks share one); choose sp "
                             f"among the divisors and multiples of {kv} that divide model.n_heads")

    def _check_batch_split(self) -> None:
        c = self.cluster
        if c.min_workers is not None and c.min_workers < c.workers and self.parallel.sp > 1:
            raise ValueError(f"cluster.workers={c.min_workers}..{c.workers} with "
                             f"parallel.sp={self.parallel.sp}: an elastic range is for data parallelism "
                             "only; give a fixed cluster.workers")
        for n in range(c.min_workers or c.workers, c.workers + 1):
            batch_split(self, n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def global_batch(cfg: Config) -> int:
    """Samples per optimizer step over all workers: train.global_batch, else what cluster.workers makes."""
    t = cfg.train
    return t.global_batch or cfg.data.batch_size * t.grad_accum * (cfg.cluster.workers // cfg.parallel.sp)


def deepspeed_zero_stage(cfg: Config) -> int:
    """The ZeRO stage DeepSpeed runs: zero.stage, except that bf16 without ZeRO runs ZeRO-1. DeepSpeed wraps a
    stage-0 bf16 optimizer in its unfused fp16 wrapper, which checks every parameter for overflow on the host
    at every step; ZeRO-1 steps the same AdamW on flat partitions (on one rank it holds the same state)."""
    return 1 if cfg.zero.stage == 0 and cfg.train.dtype == "bf16" else cfg.zero.stage


def overlap_comm(cfg: Config, device: str) -> bool:
    """zero.overlap_comm, or when null: on for a GPU, off for a CPU."""
    return cfg.zero.overlap_comm if cfg.zero.overlap_comm is not None else device == "cuda"


def batch_split(cfg: Config, workers: int) -> tuple[int, int]:
    """(micro-batch per data-parallel group, gradient accumulation) that make the global batch on `workers`
    workers: the largest micro-batch up to data.batch_size that splits it exactly (the fewest accumulation
    steps). ValueError (one line) when no exact split exists."""
    groups = max(1, workers // cfg.parallel.sp)
    if cfg.train.global_batch is None and workers == cfg.cluster.workers:
        return cfg.data.batch_size, cfg.train.grad_accum
    total = global_batch(cfg)
    for accum in range(1, total // groups + 1):
        if total % (groups * accum) == 0 and total // (groups * accum) <= cfg.data.batch_size:
            return total // (groups * accum), accum
    what = (f"train.global_batch={total}" if cfg.train.global_batch else
            f"the global batch {total} (data.batch_size x train.grad_accum x {cfg.cluster.workers} workers)")
    raise ValueError(f"{what} does not split exactly over {workers} workers in micro-batches of at most "
                     f"data.batch_size={cfg.data.batch_size}; set a train.global_batch that every worker "
                     "count of cluster.workers divides")


def for_workers(cfg: Config, workers: int) -> Config:
    """The config a worker trains with on `workers` workers: micro-batch and accumulation from batch_split
    (the rest, train.global_batch included, as given)."""
    micro, accum = batch_split(cfg, workers)
    if (micro, accum) == (cfg.data.batch_size, cfg.train.grad_accum):
        return cfg
    out = copy.deepcopy(cfg)
    out.data.batch_size, out.train.grad_accum = micro, accum
    return out


# ---------------------------------------------------------------------------------------------------------
# Building a typed tree from plain data, with one-line errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and, for strings from the command line, parse) one value against its annotation."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}={value!r}: expected {_type_name(tp)}")
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        try:
            return _coerce(value, inner, name)
        except ConfigError:
            raise bad from None
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",")
                                                                                 if v]
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{name}: unsupported annotation {tp}")


WORKER_RANGE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields in {source}, got "
                          f"{data!r}")
    if cls is ClusterConfig and isinstance(data.get("workers"), str) and WORKER_RANGE.match(data["workers"]):
        lo, hi = WORKER_RANGE.match(data["workers"]).groups()  # an elastic range MIN..MAX
        data = {**data, "workers": int(hi), "min_workers": int(lo)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known: {', '.join(hints)}"
            raise ConfigError(f"unknown config key {prefix}{key} in {source}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def migrate(data: dict, source: str) -> list[str]:
    """Rewrite, in place, fields that an earlier version named otherwise; returns one deprecation line for
    each.

    train.activation_checkpointing (bool) became memory.checkpoint (none | full | selective | offload)."""
    train = data.get("train")
    if not isinstance(train, dict) or "activation_checkpointing" not in train:
        return []
    old = _coerce(train.pop("activation_checkpointing"), bool, "train.activation_checkpointing")
    if data.get("memory") is None:
        data["memory"] = {}
    memory = data["memory"]
    if not isinstance(memory, dict):
        return []  # _build names the bad section
    given = memory.get("checkpoint")
    if old and given not in (None, "full"):
        raise ConfigError(f"train.activation_checkpointing=true contradicts memory.checkpoint={given} in "
                          f"{source}; drop the deprecated train.activation_checkpointing")
    if old:
        memory["checkpoint"] = "full"
    return [f"train.activation_checkpointing is deprecated (in {source}); write memory.checkpoint="
            f"{'full' if old else 'none'} instead"]


def from_dict(data: dict, source: str = "the config") -> Config:
    """A plain nested dict (as in YAML or `to_dict`) -> a checked Config."""
    migrate(data, source)
    return _build(Config, data, "", source)


def parse_override(arg: str) -> tuple[list[str], str]:
    """'--section.field=value' -> (['section', 'field'], 'value')."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override {arg!r}: write it as --section.field=value, e.g. --train.max_steps=100")
    key, raw = body.split("=", 1)
    return key.split("."), raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `--section.field=value` in a plain dict; the value stays a string until it is checked."""
    for arg in overrides:
        path, raw = parse_override(arg)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {part} is not a section")
        node[path[-1]] = raw
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), resolve: bool = True) -> Config:
    """Read a YAML experiment file (or the defaults, with path None) and apply command-line overrides.
    resolve: read model.init_from's folder into the model section (False for a run's own config.yaml, which
    holds it already: the folder need not exist any more)."""
    data: dict = {}
    source = "the defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/lm_tiny.yaml")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror or e}); check its "
                              "permissions") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train: ...)")
    data = apply_overrides(data, list(overrides))
    source = source if not overrides else f"{source} or the command line"
    for line in migrate(data, source):
        print(f"ctxtrain: {line}", file=sys.stderr)
    if resolve:
        resolve_init_from(data, source)
    return from_dict(data, source)


# What a run may set for itself when it starts from a pretrained model: the context it extends to, and
# dropout.
OWN_MODEL_FIELDS = ("init_from", "rope_scaling", "max_position", "dropout")


def resolve_init_from(data: dict, source: str) -> None:
    """model.init_from: fill the model section from the folder (a Hugging Face config, or a ctxtrain export's
    model), in place. A field given explicitly must agree with the folder, except OWN_MODEL_FIELDS; one line
    names those that do not."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return
    from ctxtrain.model.hf import UnsupportedModel, pretrained_fields

    folder = str(model["init_from"])
    try:
        fields = pretrained_fields(folder)
    except UnsupportedModel as e:
        raise ConfigError(f"model.init_from: {e}") from None
    given = {k: v for k, v in model.items() if k not in OWN_MODEL_FIELDS}
    theirs = dataclasses.asdict(ModelConfig(**fields))
    ours = dataclasses.asdict(_build(ModelConfig, {**fields, **given}, "model.", source))
    clash = [f"model.{k}={ours[k]!r} (the folder has {theirs[k]!r})" for k in given if ours[k] != theirs[k]]
    if clash:
        raise ConfigError(f"model.init_from={folder}: {'; '.join(clash)} in {source}; drop them (the folder "
                          "decides the model's shape) or start from another folder")
    own = {k: model[k] for k in OWN_MODEL_FIELDS if k in model}
    data["model"] = {**{k: v for k, v in fields.items()}, **own}


def to_yaml(cfg: Config, comments: bool = False) -> str:
    """The resolved config as YAML; with comments, each field's docstring above it."""
    if not comments:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        docs = field_docs(type(sub))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(sub):
            for doc_line in textwrap.wrap(docs.get(f.name, ""), 100):
                lines.append(f"  # {doc_line}")
            value = getattr(sub, f.name)
            if dataclasses.is_dataclass(value):  # a nested section (model.rope_scaling): one field a line
                lines.append(f"  {f.name}:")
                for key, item in dataclasses.asdict(value).items():
                    lines.append("    " + yaml.safe_dump({key: item}, default_flow_style=True).strip()[1:-1])
                continue
            dumped = yaml.safe_dump({f.name: value}, sort_keys=False, default_flow_style=True)
            lines.append("  " + dumped.strip()[1:-1])
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def section_hash(section: Any) -> str:
    """Stable short hash of a config section (checkpoints record the model's)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Names of the fields that differ between two plain config dicts, as 'section.field old->new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r}->{b!r}")
    return out
