"""What ends a worker on purpose: preemption (SIGTERM: stop at a step boundary with a checkpoint) and
rehearsed failures (the `fault` section: a rank SIGKILLs itself at a chosen moment).

    ctxtrain train configs/lm_tiny.yaml --fault.kill_rank=1 --fault.at_step=7 --fault.during=checkpoint
"""

from __future__ import annotations

import os
import signal
import threading

from ctxtrain.config import Config
from ctxtrain.rundir import RunDir

# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM ends the run at a step boundary with a checkpoint

_sigterm = threading.Event()


def request_preemption(*_args) -> None:
    """This worker got SIGTERM (a signal handler, or Ray's SIGTERM path in a Ray Train worker)."""
    _sigterm.set()


def forget_preemption() -> None:
    """A new run in this process starts without the previous run's SIGTERM."""
    _sigterm.clear()


class Preemption:
    """SIGTERM to a worker (a spot reclaim, Slurm's --signal, a Kubernetes eviction), or
    RUN_DIR/preempt.request written by a signalled driver, ends the run at a step boundary with a checkpoint,
    every rank at the same step.

    The rank that learns of it posts "stop after step s + 1" (s: the step it has just finished) in the process
    group's store; the first post wins. Every rank reads the store after each step. A rank that finishes step
    s + 1 has exchanged gradients with the poster during that step, so it has seen the post: the ranks agree
    without a collective of their own, and without a host sync per step."""

    KEY = "ctxtrain/preempt_after"

    def __init__(self, run: RunDir, rank: int):
        self.run, self.rank = run, rank
        self.posted = False

    @property
    def signalled(self) -> bool:
        """This worker itself got SIGTERM (not only the driver's request)."""
        return _sigterm.is_set()

    def stop_after(self, step: int) -> bool:
        from ctxtrain.engine import post_once, posted

        if not self.posted and (_sigterm.is_set() or (self.rank == 0 and self.run.preempt_request.exists())):
            post_once(self.KEY, str(step + 1))
            self.posted = True
        after = posted(self.KEY)
        return after is not None and step >= int(after)


# ---------------------------------------------------------------------------------------------------------
# Fault injection (rehearse recovery on a real cluster)


class Faults:
    """The `fault` section for this rank: SIGKILL itself once at fault.at_step (and the next repeat-1 steps)
    during a step, at the first checkpoint at or after it, or from its data loader's worker while that reads
    the step's batch. A marker in the run directory makes each fault happen once, across restarts."""

    def __init__(self, cfg: Config, rank: int):
        self.f, self.rank, self.run = cfg.fault, rank, RunDir(cfg.train.run_dir)
        self.grad_accum = cfg.train.grad_accum  # micro-batches a step reads

    def at_step(self, step: int) -> None:
        """During step `step` (fault.during=step)."""
        self._maybe_die(step, "step")

    def at_checkpoint(self, step: int) -> None:
        """After this rank wrote its shard of the checkpoint of `step`, before the commit
        (fault.during=checkpoint)."""
        self._maybe_die(step, "checkpoint")

    def arm_read(self, step: int, loader) -> None:
        """fault.during=read: the loader's worker SIGKILLs this rank while it reads the batch of fault.at_step
        (then of the next steps, one per start, with fault.repeat); `step` is the last step already
        trained."""
        f = self.f
        if f.kill_rank != self.rank or f.during != "read":
            return
        for target in range(max(f.at_step, step + 1), f.at_step + f.repeat):
            if self._claim(target):
                print(f"ctxtrain: fault injection: rank {self.rank} will be killed by its data loader while "
                      f"it reads the batch of step {target}", flush=True)
                loader.kill_at = (target - 1 - step) * self.grad_accum
                return

    def _maybe_die(self, step: int, during: str) -> None:
        f = self.f
        if f.kill_rank != self.rank or f.during != during or step < f.at_step:
            return
        if during == "step" and not f.at_step <= step < f.at_step + f.repeat:
            return
        if not self._claim(step if during == "step" else f.at_step):
            return
        print(f"ctxtrain: fault injection: rank {self.rank} kills itself at step {step} during {during}",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def _claim(self, step: int) -> bool:
        marker = self.run.fault_marker(self.rank, step, self.f.during)
        if marker.exists():
            return False
        with open(marker, "w") as fh:
            fh.write(f"rank {self.rank} killed at step {step} during {self.f.during}\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True
