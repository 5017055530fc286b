"""The training loop that every worker runs, however it was started (Ray Train, the local launcher, torchrun).

    ctxtrain train configs/lm_tiny.yaml --cluster.workers=2

`run(cfg)` builds the pieces (process group, model, DeepSpeed engine, loader, checkpoint storage), resumes
from the newest committed checkpoint if there is one, and loops: fetch micro-batches, `Engine.train_step`, and
every `train.log_every` steps the metrics, evaluation, checkpoints and stop conditions. The schedule is a pure
function of the step and the data order a pure function of the cursor; the cursor, the step and the rest of
what a resume needs are the `TrainState` that checkpoints carry: a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from typing import Optional

import torch

from ctxtrain import checkpoint as ckpt
from ctxtrain import metrics as M
from ctxtrain.config import Config, for_workers, global_batch, to_yaml
from ctxtrain.data.loader import StreamingLoader
from ctxtrain.engine import (
    Engine,
    all_reduce_sum,
    apply_levers,
    build,
    gather_objects,
    init_distributed,
    lr_at,
    mean_over_ranks,
    shutdown,
)
from ctxtrain.engine.memory import return_freed_host_memory
from ctxtrain.errors import UserError
from ctxtrain.faults import Faults, Preemption, forget_preemption, request_preemption
from ctxtrain.model import batch_train_flops, param_count
from ctxtrain.plan import offload_host_bytes, plan
from ctxtrain.preflight import check_data, check_memory
from ctxtrain.progress import log_line
from ctxtrain.rundir import MetricsWriter, RunDir, write_atomic
from ctxtrain.state import TrainState
from ctxtrain.tracking import Tracker, make_tracker, resend_lost_steps


def _loader(cfg: Config, info, split: str) -> StreamingLoader:
    """This rank's loader: its data-parallel group's cursor; in a sequence-parallel group only the first rank
    reads (the engine broadcasts its windows)."""
    d = cfg.data
    train = split == "train"
    return StreamingLoader(d.path, split=split, seq_len=d.seq_len, batch_size=d.batch_size, rank=info.dp_rank,
                           world_size=info.dp_size, num_workers=d.num_workers if train else 0,
                           seed=cfg.train.seed, reads=info.sp is None or info.sp.rank == 0,
                           shuffle_buffer=d.shuffle_buffer, shuffle=train, loop=train,
                           skip_corrupt=d.skip_corrupt, max_src_len=d.max_src_len, max_tgt_len=d.max_tgt_len,
                           pin_memory=info.device.type == "cuda", documents=d.documents, cache=d.cache,
                           partitions=d.partitions if train else 1,  # eval: the split's first windows
                           buckets=None if d.length_buckets else 0, pack=d.pack_pairs if train else 0)


def evaluate(cfg: Config, engine: Engine) -> Optional[dict]:
    """Mean loss over the first train.eval_batches micro-batches of the val split on every data-parallel
    rank."""
    info = engine.dist
    losses = []
    for i, batch in enumerate(_loader(cfg, info, "val")):
        if i == cfg.train.eval_batches:
            break
        losses.append(engine.eval_loss(batch))
    if not losses:
        return None
    val_loss = mean_over_ranks(torch.stack(losses).mean(), engine.device) * info.sp_size  # sp shares add up
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def run(cfg: Config, trackers: tuple[Tracker, ...] = ()) -> dict:
    """Train (or resume) until max_steps, max_tokens, stop_at_step or stop_after_minutes; returns a summary.
    trackers: the launcher's own, beside W&B and TensorBoard (rank 0's Ray gauges)."""
    info = init_distributed(cfg)
    forget_preemption()
    # A local or torchrun worker runs this in its main thread; a Ray Train worker in a thread of its own,
    # where the launcher routes Ray's SIGTERM handling to request_preemption instead.
    previous = (signal.signal(signal.SIGTERM, request_preemption)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _train(cfg, info, trackers)
    except BaseException as e:
        if info.rank == 0:
            RunDir(cfg.train.run_dir).mark_failed(e)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown(info)


def _train(given: Config, info, trackers: tuple[Tracker, ...]) -> dict:
    """Setup (checks, checkpoint choice, engine, state, records), then the loop."""
    rank, world, device = info.rank, info.world_size, info.device
    try:
        cfg = for_workers(given, world)  # the micro-batch and accumulation that keep the global batch here
    except ValueError as e:
        raise UserError(str(e)) from None
    t_start = time.time()
    check_data(cfg)
    if os.environ.get("CTXTRAIN_MEMORY_CHECKED") != "1":
        check_memory(cfg, world, device)
    # The checkpoint is chosen (and verified) before anything in the run directory is written: a refused
    # resume leaves the run as it was.
    storage = ckpt.open_storage(cfg)
    launch_id = os.environ.get("CTXTRAIN_LAUNCH_ID")
    target = ckpt.resume_target(cfg, storage, launch_id, share=(rank, world), agree=gather_objects)
    run = RunDir(cfg.train.run_dir)
    if rank == 0:
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.config, to_yaml(given))
    import torch._dynamo  # noqa: F401  (torch.optim loads it on first use: code, not training state)

    return_freed_host_memory()
    memory = {"rss_before": M.rss_bytes(),  # CPU: the planner predicts the peak RSS growth over this
              "predicted": plan(cfg, world, device.type).device_peak}
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build(cfg, info, pretrained=target is None)  # model.init_from's weights unless resuming
    apply_levers(model, cfg.memory, device, offload_host_bytes(cfg, world) if device.type == "cuda" else None)
    engine = Engine(cfg, model, info)
    if rank == 0:
        write_atomic(run.ds_config, json.dumps(engine.config, indent=1) + "\n")
    torch.manual_seed(cfg.train.seed + 7919 * (rank + 1))  # dropout differs across ranks
    # one cursor per data-parallel group
    state = TrainState(_loader(cfg, info, "train"),
                       device, rank, world, launch_id, global_batch(given))
    if target is not None:
        ckpt.load(engine, target, cfg, state)
    # length buckets (as the cursor has them): every target token weighs the same (Engine._token_shares)
    per_pair = state.loader.mean_target_tokens()
    if per_pair is not None and state.loader.buckets:
        engine.tokens_per_step = per_pair * cfg.data.batch_size * info.dp_size * cfg.train.grad_accum
    tracker, metrics_file = _open_records(cfg, info, state, target, storage, trackers)
    return _loop(cfg, engine, state, storage, tracker, metrics_file, memory, t_start)


def _open_records(cfg: Config, info, state: TrainState, target, storage, trackers) -> tuple[Tracker, object]:
    """Rank 0's records of this start: the trackers, metrics.jsonl, starts.jsonl, state.json and the start
    line."""
    if info.rank != 0:
        return Tracker(), None
    run = RunDir(cfg.train.run_dir)
    tracker = make_tracker(cfg, 0, run.path, state.tracker_run_id, state.launch_id, state.kept_through,
                           trackers)
    state.tracker_run_id = tracker.run_id
    tracker.log_config({**cfg.to_dict(), **({"resumed_from": state.origin} if state.origin else {})})
    metrics_file = MetricsWriter(run.path, state.kept_through)
    resend_lost_steps(tracker, metrics_file)
    fresh = (target is None and cfg.checkpoint.resume == "never") or (target is not None and not target.own)
    state.restarts = run.record_start(state.step if target else None, state.launch_id, fresh)
    run.write_state("running", step=state.step, host=socket.gethostname(), pid=os.getpid())
    for notice in target.notices if target else []:
        print(f"ctxtrain: {notice}", flush=True)
    # this run's own checkpoint by its tag; another run's (--resume PATH) by its whole path
    resumed_from = target and (target.tag if target.storage is storage else target.describe())
    kind = "LM" if cfg.model.kind == "lm" else "encoder-decoder"
    layout = f" ({info.dp_size} data-parallel x sp {info.sp_size})" if info.sp_size > 1 else ""
    print(f"ctxtrain: {kind} {param_count(cfg.model) / 1e6:.1f}M params, {info.world_size} workers{layout} "
          f"on {info.device.type}, ZeRO-{cfg.zero.stage}, {cfg.train.dtype}, run dir {run.path}"
          + (f", resumed from {resumed_from}" if target else "")
          + (f", weights from {cfg.model.init_from}" if cfg.model.init_from and not target else "")
          + (f", W&B run {tracker.run_id} ({tracker.mode})" if tracker.run_id else ""), flush=True)
    return tracker, metrics_file


def _loop(cfg: Config, engine: Engine, state: TrainState, storage, tracker: Tracker, metrics_file,
          memory: dict, t_start: float) -> dict:
    info, t = engine.dist, cfg.train
    rank, device = info.rank, info.device
    faults, preemption = Faults(cfg, rank), Preemption(RunDir(t.run_dir), rank)
    faults.arm_read(state.step, state.loader)
    batches = iter(state.loader)
    from ctxtrain.infer import LoopProbes, ValBleu

    bleu = ValBleu(cfg, info.dp_rank, info.dp_size) if t.bleu_every else None
    probes = LoopProbes(cfg, info.dp_rank, info.dp_size) if t.probe_every else None
    peak = M.peak_flops(device, t.peak_tflops)
    show_lines = os.environ.get("CTXTRAIN_PROGRESS", "lines") != "bar"  # a terminal's bar draws metrics.jsonl
    pending, watch, last, first_line = M.PendingSteps(device, info.dp_size), M.Stopwatch(), {}, True
    while state.step < t.max_steps:
        step = state.step + 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with watch.time("data"):
            micro = [next(batches) for _ in range(t.grad_accum)]
        faults.at_step(step)
        loss, grad_norm = engine.train_step(micro, lr_at(step, cfg.optim, t.max_steps))
        sp = info.sp_size  # each rank of a sequence-parallel group computes its 1/sp of the window
        pending.add(step, loss, grad_norm, sum(int(b["n_tokens"]) for b in micro) // sp,
                    sum(batch_train_flops(cfg.model, b) for b in micro) / sp, watch.pop("data"),
                    M.memory(device, memory["rss_before"]))
        state.step = step
        if t.stop_at_step == step:
            state.stop_reason = "stop_at_step"
        if state.stop_reason is None and preemption.stop_after(step):
            state.stop_reason = "preempted"
        evaluating = (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
        scoring = bleu is not None and (step % t.bleu_every == 0 or step == t.max_steps)
        probing = probes is not None and (step % t.probe_every == 0 or step == t.max_steps)
        saving = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if not (step % t.log_every == 0 or step == 1 or evaluating or scoring or probing or saving
                or state.stop_reason or step == t.max_steps):
            continue

        # Every log_every steps (and before an evaluation or a checkpoint): the one host sync of the interval.
        timed_out = t.stop_after_minutes is not None and time.time() - t_start >= 60 * t.stop_after_minutes
        records, any_timed_out = pending.records(all_reduce_sum(pending.sums(timed_out)))
        for record in records:
            state.tokens += record.pop("_global_tokens")
            mfu = M.mfu(record.pop("_flops_per_token"), record["tokens_per_s"], info.world_size, peak)
            record.update(tokens=state.tokens, lr=lr_at(record["step"], cfg.optim, t.max_steps),
                          epoch=state.loader.epoch, data_skipped_shards=state.loader.stats["skipped_shards"],
                          restarts=state.restarts, mfu=mfu)
        if first_line:
            records[0]["mem_predicted_bytes"], first_line = memory["predicted"], False
        if state.stop_reason is None:  # stop conditions read at this sync, agreed by every rank
            if t.max_tokens is not None and state.tokens >= t.max_tokens:
                state.stop_reason = "max_tokens"
            elif any_timed_out:
                state.stop_reason = "stop_after_minutes"
        _check_finite(records, storage, rank, metrics_file, tracker)
        final = step == t.max_steps or state.stop_reason is not None
        record = records[-1]
        if evaluating:
            record.update(evaluate(cfg, engine) or {})
        if scoring:
            record.update(bleu.score(engine.full_weights(), device, gather_objects) or {})
        if probing:
            record.update(probes.score(engine, gather_objects) or {})
        if final or saving:
            t_ckpt = time.perf_counter()
            ckpt.save(engine, storage, cfg, state, faults)
            record["ckpt_save_s"] = time.perf_counter() - t_ckpt
        if rank == 0:
            for r in records:
                metrics_file.write(r)
                tracker.log(r, r["step"])
            if show_lines:
                log_line(record, t.max_steps, t_start)
        last = record
        if final:
            break
        pending.restart_clock()  # evaluation and checkpoint time is not step time
    if rank == 0:
        _close_records(RunDir(t.run_dir), state, tracker, metrics_file, last, t.max_steps)
    return {**last, "step": state.step, "tokens": state.tokens, "stop_reason": state.stop_reason,
            "sigterm": preemption.signalled}


def _check_finite(records: list[dict], storage, rank: int, metrics_file, tracker: Tracker) -> None:
    """A diverged run ends in one line naming its first step whose loss or gradient norm is not finite (read
    at this log line: DeepSpeed's per-step overflow check is off, as it waits on the device); the interval's
    records are written first, and no checkpoint after it: the newest committed one is the way back."""
    bad = next((r for r in records if not math.isfinite(r["loss"])
                or (r["grad_norm"] is not None and not math.isfinite(r["grad_norm"]))), None)
    if bad is None:
        return
    if rank == 0:
        for r in records:
            metrics_file.write(r)
            tracker.log(r, r["step"])
    newest = ckpt.committed_steps(storage)
    back = (f"resume from the newest committed checkpoint, {ckpt.tag_of(newest[-1])}," if newest
            else "no checkpoint was committed before it: start again")
    raise UserError(f"step {bad['step']}: the loss is {bad['loss']} and the gradient norm "
                    f"{bad['grad_norm']}: training diverged; {back} with a lower optim.lr or optim.grad_clip")


def _close_records(run: RunDir, state: TrainState, tracker: Tracker, metrics_file, last: dict,
                   max_steps: int) -> None:
    metrics_file.close()
    reason = state.stop_reason
    run.write_state("stopped" if reason else "finished", step=state.step, reason=reason)
    if last:
        keys = ("loss", "val_loss", "val_ppl", "val_bleu", "tokens", "tokens_per_s", "mfu")
        tracker.summary({k: last.get(k) for k in keys} | {"steps": state.step, "stop_reason": reason})
        print(f"ctxtrain: {'stopped (' + reason + ')' if reason else 'finished'} at step {state.step}, loss "
              f"{last['loss']:.4f}" + (f", val ppl {last['val_ppl']:.2f}" if "val_ppl" in last else "")
              + (f", val BLEU {last['val_bleu']:.2f}" if "val_bleu" in last else ""), flush=True)
    else:
        print(f"ctxtrain: the run is already at step {state.step} of train.max_steps={max_steps}; nothing to "
              "train (raise train.max_steps to continue)", flush=True)
    tracker.finish()
