"""Workers as plain processes on this machine (`cluster.launcher=local`), without Ray.

Starts `cluster.workers` processes of `python -m ctxtrain.worker`, each with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set (as torchrun does), so the per-worker entry point is the same function Ray
calls. Their process group meets in a file store and gloo talks over the loopback interface: nothing the local
launcher starts listens on a network interface. If one worker fails the others are stopped; a worker's
one-line error is printed once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ctxtrain.config import Config
from ctxtrain.errors import PREEMPTED_EXIT, UserError
from ctxtrain.processes import LOOPBACK_ENV, free_port


def launch(cfg: Config, entry: str = "ctxtrain.train:run", workers: int | None = None) -> int:
    """Run entry(cfg) in `workers` processes; returns 0, or the first failing worker's exit status."""
    n = workers or cfg.cluster.workers
    with tempfile.TemporaryDirectory(prefix="ctxtrain-launch-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        port = free_port()
        threads = max(1, int(cfg.cluster.cpus_per_worker))
        launch_id = uuid.uuid4().hex[:12]
        procs = []
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "CTXTRAIN_INIT_METHOD": (Path(tmp) / "process-group").as_uri(), **LOOPBACK_ENV,
                   "OMP_NUM_THREADS": str(threads), "CTXTRAIN_ERROR_FILE": str(Path(tmp) / f"error-{rank}"),
                   "CTXTRAIN_LAUNCH_ID": launch_id, "CTXTRAIN_LAUNCHER_PID": str(os.getpid())}
            # A session of their own: Ctrl-C reaches the launcher only, which stops the workers (no rank's
            # KeyboardInterrupt traceback after the one-line message).
            procs.append(subprocess.Popen([sys.executable, "-m", "ctxtrain.worker", entry, str(cfg_path)],
                                          env=env,
                                          start_new_session=True))
        try:
            return _wait(procs, Path(tmp))
        except BaseException:  # KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI's handler)
            _stop(procs)
            raise


def _wait(procs: list[subprocess.Popen], tmp: Path) -> int:
    """0 when every worker finished; 75 when they stopped on a preemption (SIGTERM) with a checkpoint; else
    the first failure, the others stopped."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, PREEMPTED_EXIT)]
        if failed:
            time.sleep(0.5)  # let a worker that raised a UserError finish writing it
            _stop(procs)
            errors = sorted(tmp.glob("error-*"))
            if errors:
                raise UserError(errors[0].read_text().strip())
            rank, code = failed[0]
            reason = f"signal {-code}" if code < 0 else f"exit status {code}"
            print(f"ctxtrain: worker {rank} failed ({reason}); the other workers were stopped",
                  file=sys.stderr)
            return 1
        if all(c in (0, PREEMPTED_EXIT) for c in codes):
            return PREEMPTED_EXIT if PREEMPTED_EXIT in codes else 0
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the workers now (Ctrl-C, a failed worker, a preemption past its grace): SIGKILL, as SIGTERM asks a
    worker for a checkpoint first. An interrupted save is never committed; nothing is lost."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
