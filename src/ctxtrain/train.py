"""The training loop that every worker runs, however it was started (Ray Train, the local launcher, torchrun).

    ctxtrain train configs/lm_tiny.yaml --cluster.workers=2

`run(cfg)` builds the pieces (process group, model, loaders, DeepSpeed engine, checkpoint storage), resumes
from the newest committed checkpoint if there is one, and loops: fetch micro-batches, `Engine.train_step`,
metrics, evaluation, checkpoints, stop conditions. The schedule is a pure function of the step, the data
order a pure function of the cursor, and both are in the checkpoint: a resumed run continues bit for bit.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ctxtrain import checkpoint as ckpt
from ctxtrain import metrics as M
from ctxtrain.config import Config, for_workers, global_batch, to_yaml
from ctxtrain.data.loader import StreamingLoader
from ctxtrain.engine import Engine, apply_levers, gather_objects, init_distributed, lr_at, shutdown
from ctxtrain.engine.memory import return_freed_host_memory
from ctxtrain.errors import UserError
from ctxtrain.model import build_model, encdec_train_flops, lm_train_flops_per_token, param_count
from ctxtrain.preflight import check_data, check_memory
from ctxtrain.rundir import MetricsWriter, RunDir, write_atomic
from ctxtrain.tracking import Tracker, make_tracker

# ---------------------------------------------------------------------------------------------------------
# Run-directory files written by rank 0


def resend_lost_steps(tracker: Tracker, metrics_file: MetricsWriter) -> None:
    """After a resume: the steps up to the checkpoint that the tracker lost with a killed process (W&B writes
    asynchronously) are sent again from metrics.jsonl; the tracker skips every step it already holds."""
    for record in metrics_file.kept:
        tracker.log(record, record["step"])


def record_start(run_dir: Path, resumed_from: Optional[int], launch_id: Optional[str], fresh: bool) -> int:
    """Append this start to RUN_DIR/starts.jsonl; returns the restart count: the starts of this run (worker
    groups restarted by Ray, drivers re-run) since it last started fresh, minus one."""
    path = RunDir(run_dir).starts
    if fresh and path.exists():
        path.unlink()
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), "resumed_from": resumed_from, "launch_id": launch_id}) + "\n")
    return sum(1 for _ in open(path)) - 1


# ---------------------------------------------------------------------------------------------------------
# Fault injection (rehearse recovery on a real cluster)


def maybe_die(cfg: Config, rank: int, step: int, during: str) -> None:
    """SIGKILL this rank once at fault.at_step (and the next repeat-1 steps) during a step, or at the first
    checkpoint at or after it."""
    f = cfg.fault
    if f.kill_rank != rank or f.during != during or step < f.at_step:
        return
    if during == "step" and not f.at_step <= step < f.at_step + f.repeat:
        return
    fault_step = step if during == "step" else f.at_step
    if not _claim_fault(cfg, rank, fault_step):
        return
    print(f"ctxtrain: fault injection: rank {rank} kills itself at step {step} during {during}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _claim_fault(cfg: Config, rank: int, step: int) -> bool:
    """A marker in the run directory makes each fault happen once, across restarts."""
    marker = RunDir(cfg.train.run_dir).fault_marker(rank, step, cfg.fault.during)
    if marker.exists():
        return False
    with open(marker, "w") as fh:
        fh.write(f"rank {rank} killed at step {step} during {cfg.fault.during}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def arm_read_fault(cfg: Config, rank: int, step: int, loader: StreamingLoader) -> None:
    """fault.during=read: the loader's worker SIGKILLs this rank while it reads the batch of fault.at_step (then
    of the next steps, one per start, with fault.repeat)."""
    f = cfg.fault
    if f.kill_rank != rank or f.during != "read":
        return
    for target in range(max(f.at_step, step + 1), f.at_step + f.repeat):
        if _claim_fault(cfg, rank, target):
            print(f"ctxtrain: fault injection: rank {rank} will be killed by its data loader while it reads the "
                  f"batch of step {target}", flush=True)
            loader.kill_at = (target - 1 - step) * cfg.train.grad_accum
            return


# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM ends the run at a step boundary with a checkpoint

_sigterm = threading.Event()


def request_preemption(*_args) -> None:
    """This worker got SIGTERM (a signal handler, or Ray's SIGTERM path in a Ray Train worker)."""
    _sigterm.set()


class Preemption:
    """SIGTERM to a worker (a spot reclaim, Slurm's --signal, a Kubernetes eviction), or RUN_DIR/preempt.request
    written by a signalled driver, ends the run at a step boundary with a checkpoint, every rank at the same step.

    The rank that learns of it posts "stop after step s + 1" (s: the step it has just finished) in the process
    group's store; the first post wins. Every rank reads the store after each step. A rank that finishes step s + 1
    has exchanged gradients with the poster during that step, so it has seen the post: the ranks agree without a
    collective of their own, and without a host sync per step."""

    KEY = "ctxtrain/preempt_after"

    def __init__(self, run: RunDir, rank: int):
        import torch.distributed as dist

        self.run, self.rank = run, rank
        self.store = dist.distributed_c10d._get_default_store()
        self.posted = False

    @property
    def signalled(self) -> bool:
        """This worker itself got SIGTERM (not only the driver's request)."""
        return _sigterm.is_set()

    def stop_after(self, step: int) -> bool:
        if not self.posted and (_sigterm.is_set() or (self.rank == 0 and self.run.preempt_request.exists())):
            self.store.compare_set(self.KEY, "", str(step + 1))
            self.posted = True
        if self.store.check([self.KEY]):
            return step >= int(self.store.get(self.KEY))
        return False


# ---------------------------------------------------------------------------------------------------------
# RNG state (dropout) in meta.json


def rng_state(device: torch.device) -> str:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def set_rng_state(blob: str, device: torch.device) -> None:
    state = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------------------
# Metrics that stay on the device until the next log line


class PendingSteps:
    """The steps since the last log line. A step's loss and gradient norm stay device tensors; `flush` reads all
    of them with one collective and one transfer (the only host sync of the interval), so the device is never
    waited on per step. Step time and tokens/s are the interval's averages: without a sync per step, the host's
    clock per step would measure how far it ran ahead, not the step."""

    def __init__(self, device: torch.device, sp: int = 1):
        self.device, self.sp = device, sp
        self.steps: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, step: int, loss, grad_norm, tokens: int, flops: float, data_wait: float, memory: dict) -> None:
        self.steps.append({"step": step, "loss": loss, "grad_norm": grad_norm, "tokens": tokens, "flops": flops,
                           "data_wait_s": data_wait, "memory": memory})

    def flush(self, timed_out: bool) -> tuple[list[dict], bool]:
        """Records of the pending steps (losses averaged over ranks, tokens summed) and whether any rank timed out."""
        n = len(self.steps)
        local = torch.stack([torch.stack([p["loss"].to(torch.float64),
                                          torch.tensor(float(p["tokens"]), dtype=torch.float64, device=self.device)])
                             for p in self.steps] + [torch.tensor([float(timed_out), 0.0], dtype=torch.float64,
                                                                  device=self.device)])
        torch.distributed.all_reduce(local)
        norms = [p["grad_norm"] for p in self.steps]  # global already (DeepSpeed reduces it)
        if any(isinstance(g, torch.Tensor) for g in norms):
            nan = float("nan")
            norms = torch.stack([torch.as_tensor(nan if g is None else g, dtype=torch.float64, device=self.device)
                                 for g in norms]).tolist()
            norms = [None if g != g else g for g in norms]
        summed = local.tolist()
        groups = torch.distributed.get_world_size() // self.sp  # a sequence-parallel group's shares add up
        elapsed = time.perf_counter() - self.t0
        step_time = elapsed / n
        records = []
        for p, (loss_sum, tokens), norm in zip(self.steps, summed[:n], norms):
            records.append({
                "step": p["step"],
                "loss": loss_sum / groups,
                "grad_norm": float(norm) if norm is not None else None,
                "_global_tokens": int(tokens),
                "tokens_per_s": tokens / step_time,
                "tokens_per_s_worker": p["tokens"] / step_time,
                "_flops_per_token": p["flops"] / max(p["tokens"], 1),
                "step_time_s": step_time,
                "data_wait_s": p["data_wait_s"],
                **p["memory"],
            })
        self.steps.clear()
        self.restart_clock()
        return records, summed[n][0] > 0

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()


def plan_peak(cfg: Config, world: int, device: torch.device) -> int:
    """The planner's predicted peak for this worker (logged next to the measured peak on the first line)."""
    from ctxtrain.plan import plan

    return plan(cfg, world, device.type).device_peak


# ---------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)


def _loader(cfg: Config, rank: int, world: int, split: str) -> StreamingLoader:
    d = cfg.data
    train = split == "train"
    return StreamingLoader(d.path, split=split, seq_len=d.seq_len, batch_size=d.batch_size, rank=rank,
                           world_size=world, num_workers=d.num_workers if train else 0, seed=cfg.train.seed,
                           shuffle_buffer=d.shuffle_buffer, shuffle=train, loop=train, skip_corrupt=d.skip_corrupt,
                           max_src_len=d.max_src_len, max_tgt_len=d.max_tgt_len)


def evaluate(cfg: Config, engine: Engine) -> Optional[dict]:
    """Mean loss over the first train.eval_batches micro-batches of the val split on every data-parallel rank."""
    info = engine.dist
    loader = _loader(cfg, info.dp_rank, info.dp_size, "val")
    losses = []
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:
            break
        losses.append(engine.eval_loss(batch))
    if not losses:
        return None
    from ctxtrain.engine import mean_over_ranks

    val_loss = mean_over_ranks(torch.stack(losses).mean(), engine.device) * info.sp_size  # shares of a group add up
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def _flops(cfg: Config, batch: dict) -> float:
    """Training FLOPs of one micro-batch as computed (padding included for translation)."""
    if cfg.model.kind == "lm":
        B, T1 = batch["tokens"].shape
        return lm_train_flops_per_token(cfg.model, T1 - 1) * B * (T1 - 1)
    B, S = batch["src"].shape
    return B * encdec_train_flops(cfg.model, S, batch["tgt"].shape[1])


def run(cfg: Config) -> dict:
    """Train (or resume) until max_steps, max_tokens, stop_at_step or stop_after_minutes; returns a summary."""
    info = init_distributed(cfg)
    _sigterm.clear()
    # A local or torchrun worker runs this in its main thread; a Ray Train worker in a thread of its own, where
    # the launcher routes Ray's SIGTERM handling to request_preemption instead.
    previous = (signal.signal(signal.SIGTERM, request_preemption)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _train(cfg, info)
    except BaseException as e:
        if info.rank == 0:
            run = RunDir(cfg.train.run_dir)
            state = run.read_state()
            if state.get("pid") == os.getpid() and state.get("state") == "running":
                run.write_state("failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown(info)


def _train(given: Config, info) -> dict:
    rank, world, device = info.rank, info.world_size, info.device
    run = RunDir(given.train.run_dir)
    run_dir = run.path
    try:
        cfg = for_workers(given, world)  # the micro-batch and accumulation that keep the global batch here
    except ValueError as e:
        raise UserError(str(e)) from None
    t_start = time.time()
    check_data(cfg)
    if os.environ.get("CTXTRAIN_MEMORY_CHECKED") != "1":
        check_memory(cfg, world, device)
    # Choose (and verify) the checkpoint before anything in the run directory is written: a refused resume
    # must leave the run as it was.
    storage = ckpt.open_storage(cfg)
    launch_id = os.environ.get("CTXTRAIN_LAUNCH_ID")
    target = ckpt.resume_target(cfg, storage, launch_id, share=(rank, world), agree=gather_objects)
    if target is not None:
        ckpt.check_compatible(target.storage.read_meta(target.tag), cfg, world, target.describe())
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run.config, to_yaml(given))
    import torch._dynamo  # noqa: F401  (torch.optim loads it on first use: ~70 MB of code, not of training state)

    return_freed_host_memory()

    rss_before = M.rss_bytes()  # CPU: the planner predicts the peak RSS growth over this
    predicted = plan_peak(cfg, world, device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    apply_levers(model, cfg.memory, device)
    engine = Engine(cfg, model, info)
    if rank == 0:
        write_atomic(run.ds_config, json.dumps(engine.config, indent=1) + "\n")
    torch.manual_seed(cfg.train.seed + 7919 * (rank + 1))  # dropout differs across ranks

    train_loader = _loader(cfg, info.dp_rank, info.dp_size, "train")  # one cursor per data-parallel group
    progress = Progress()
    meta = None
    if target is not None:
        meta = ckpt.load(engine, target, cfg, world, rank)
        progress.step, progress.tokens = meta["step"], meta["tokens"]
        train_loader.load_state_dict(meta["loader"][0])  # every rank's cursor is the same global position
        if meta["world_size"] == world:
            set_rng_state(meta["rng"][rank], device)
        elif rank == 0:
            before, now = meta.get("global_batch"), global_batch(given)
            print(f"ctxtrain: checkpoint {target.tag} was written by {meta['world_size']} workers, this run has "
                  f"{world}: {'converted to the universal format; ' if cfg.zero.stage else ''}micro-batch "
                  f"{cfg.data.batch_size} x accumulation {cfg.train.grad_accum} per worker, global batch {now}"
                  + (f" (was {before}; set train.global_batch to keep it)" if before and before != now else ""),
                  flush=True)

    metrics_file, restarts, tracker = None, 0, Tracker()
    if rank == 0:
        tracker = make_tracker(cfg, rank, run_dir, meta.get("tracker_run_id") if meta else None, launch_id,
                               progress.step)
        tracker.log_config(cfg.to_dict())
        metrics_file = MetricsWriter(run_dir, progress.step)
        resend_lost_steps(tracker, metrics_file)
        restarts = record_start(run_dir, progress.step if meta else None, launch_id,
                                fresh=meta is None and cfg.checkpoint.resume == "never")
        run.write_state("running", step=progress.step, host=socket.gethostname(), pid=os.getpid())
        # this run's own checkpoint by its tag; another run's (--resume PATH) by its whole path
        resumed_from = target and (target.tag if target.storage is storage else target.describe())
        for notice in target.notices if target else []:
            print(f"ctxtrain: {notice}", flush=True)
        kind = "LM" if cfg.model.kind == "lm" else "encoder-decoder"
        layout = f" ({info.dp_size} data-parallel x sp {info.sp_size})" if info.sp_size > 1 else ""
        print(f"ctxtrain: {kind} {param_count(cfg.model) / 1e6:.1f}M params, {world} workers{layout} on {device.type}, "
              f"ZeRO-{cfg.zero.stage}, {cfg.train.dtype}, run dir {run_dir}"
              + (f", resumed from {resumed_from}" if target else "")
              + (f", W&B run {tracker.run_id} ({tracker.mode})" if tracker.run_id else ""), flush=True)

    peak = M.peak_flops(device, cfg.train.peak_tflops)
    # A launcher that draws a progress bar from metrics.jsonl (a terminal) asks for no periodic lines.
    show_lines = os.environ.get("CTXTRAIN_PROGRESS", "lines") != "bar"
    watch = M.Stopwatch()
    arm_read_fault(cfg, rank, progress.step, train_loader)
    batches = iter(train_loader)
    preemption = Preemption(run, rank)
    bleu = None
    if cfg.train.bleu_every:
        from ctxtrain.infer import ValBleu

        bleu = ValBleu(cfg, info.dp_rank, info.dp_size)
    last = {}
    stop_reason = None
    pending = PendingSteps(device, info.sp_size)
    first_line = True
    while progress.step < cfg.train.max_steps:
        step = progress.step + 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with watch.time("data"):
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        maybe_die(cfg, rank, step, "step")
        loss, grad_norm = engine.train_step(micro, lr_at(step, cfg.optim, cfg.train.max_steps))
        sp = info.sp_size  # each rank of a sequence-parallel group computes its 1/sp of the window
        pending.add(step, loss, grad_norm, sum(int(b["n_tokens"]) for b in micro) // sp,
                    sum(_flops(cfg, b) for b in micro) / sp, watch.pop("data"), M.memory(device, rss_before))
        progress.step = step
        if cfg.train.stop_at_step == step:
            stop_reason = "stop_at_step"
        if stop_reason is None and preemption.stop_after(step):
            stop_reason = "preempted"
        evaluating = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps
        scoring = bleu is not None and (step % cfg.train.bleu_every == 0 or step == cfg.train.max_steps)
        saving = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if not (step % cfg.train.log_every == 0 or step == 1 or evaluating or scoring or saving or stop_reason
                or step == cfg.train.max_steps):
            continue

        # Every log_every steps (and before an evaluation or a checkpoint): the one host sync of the interval.
        limit = cfg.train.stop_after_minutes
        timed_out = limit is not None and time.time() - t_start >= 60 * limit
        records, any_timed_out = pending.flush(timed_out)
        for record in records:
            progress.tokens += record.pop("_global_tokens")
            record.update(tokens=progress.tokens, lr=lr_at(record["step"], cfg.optim, cfg.train.max_steps),
                          epoch=train_loader.epoch, data_skipped_shards=train_loader.stats["skipped_shards"],
                          restarts=restarts, mfu=M.mfu(record.pop("_flops_per_token"), record["tokens_per_s"],
                                                       world, peak))
            if first_line:
                record["mem_predicted_bytes"] = predicted
                first_line = False
        if stop_reason is None:  # stop conditions read at this sync, agreed by every rank
            if cfg.train.max_tokens is not None and progress.tokens >= cfg.train.max_tokens:
                stop_reason = "max_tokens"
            elif any_timed_out:
                stop_reason = "stop_after_minutes"
        final = step == cfg.train.max_steps or stop_reason is not None
        record = records[-1]

        if evaluating:
            result = evaluate(cfg, engine)
            if result:
                record.update(result)
        if scoring:
            record.update(bleu.score(engine.full_weights(), device, gather_objects) or {})
        if final or saving:
            t_ckpt = time.perf_counter()
            rank_state = {"loader": train_loader.state_dict(), "rng": rng_state(device)}
            extra = {"stop_reason": stop_reason, "restarts": restarts, "launch_id": launch_id,
                     "global_batch": global_batch(given)}
            failed = ckpt.save(engine, storage, ckpt.tag_of(step), rank, rank_state,
                               lambda states: ckpt.build_meta(cfg, step, progress.tokens, states, tracker.run_id,
                                                              extra),
                               fault_hook=lambda: maybe_die(cfg, rank, step, "checkpoint"))
            if rank == 0 and failed:
                newest = ckpt.committed_steps(storage)
                print(f"ctxtrain: checkpoint {ckpt.tag_of(step)} not written ({failed}); the newest committed one "
                      f"is {ckpt.tag_of(newest[-1]) if newest else 'none'}; training goes on", flush=True)
            elif rank == 0:
                ckpt.apply_retention(storage, cfg)
            record["ckpt_save_s"] = time.perf_counter() - t_ckpt
        if rank == 0:
            for r in records:
                metrics_file.write(r)
                tracker.log(r, r["step"])
            if show_lines:
                _log_line(record, cfg.train.max_steps, t_start)
        last = record
        if final:
            break
        pending.restart_clock()  # evaluation and checkpoint time is not step time

    if rank == 0:
        metrics_file.close()
        run.write_state("stopped" if stop_reason else "finished", step=progress.step, reason=stop_reason)
        if last:
            tracker.summary({k: last.get(k) for k in ("loss", "val_loss", "val_ppl", "val_bleu", "tokens", "tokens_per_s",
                                                  "mfu")}
                            | {"steps": progress.step, "stop_reason": stop_reason})
            print(f"ctxtrain: {'stopped (' + stop_reason + ')' if stop_reason else 'finished'} at step "
                  f"{progress.step}, loss {last['loss']:.4f}"
                  + (f", val ppl {last['val_ppl']:.2f}" if "val_ppl" in last else "")
                  + (f", val BLEU {last['val_bleu']:.2f}" if "val_bleu" in last else ""), flush=True)
        else:
            print(f"ctxtrain: the run is already at step {progress.step} of train.max_steps={cfg.train.max_steps}; "
                  "nothing to train (raise train.max_steps to continue)", flush=True)
        tracker.finish()
    return {**last, "step": progress.step, "tokens": progress.tokens, "stop_reason": stop_reason,
            "sigterm": preemption.signalled}


def _log_line(r: dict, max_steps: int, t_start: float) -> None:
    elapsed = time.time() - t_start
    eta = (max_steps - r["step"]) * r["step_time_s"]
    extra = f" val_loss={r['val_loss']:.4f}" if "val_loss" in r else ""
    extra += f" val_bleu={r['val_bleu']:.2f}" if "val_bleu" in r else ""
    print(f"step={r['step']}/{max_steps} loss={r['loss']:.4f}{extra} lr={r['lr']:.2e} "
          f"tokens/s={r['tokens_per_s']:,.0f} elapsed={elapsed:,.0f}s eta={eta:,.0f}s", flush=True)
