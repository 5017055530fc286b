"""Entry of one worker process started by the local launcher: `python -m ctxtrain.worker MODULE:FUNC CONFIG.json`.

It calls FUNC(cfg) — `ctxtrain.train:run` for training, the same function Ray Train calls. A UserError goes
to $CTXTRAIN_ERROR_FILE (the launcher prints it once) and exits 2; a run preempted by SIGTERM, its checkpoint
committed, exits 75.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys

from ctxtrain.config import from_dict
from ctxtrain.errors import PREEMPTED_EXIT, UserError


def die_with_launcher() -> None:
    """A worker dies with its launcher, even a SIGKILLed one: an orphaned worker would go on writing into the run
    directory beside the run that a re-run driver starts (Linux: PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get("CTXTRAIN_LAUNCHER_PID", str(os.getppid())):
        os._exit(1)  # the launcher died before the call


def main(argv: list[str]) -> int:
    die_with_launcher()
    entry, cfg_path = argv
    module, func = entry.split(":")
    cfg = from_dict(json.loads(open(cfg_path).read()), cfg_path)
    try:
        result = getattr(importlib.import_module(module), func)(cfg)
    except UserError as e:
        path = os.environ.get("CTXTRAIN_ERROR_FILE")
        if path:
            with open(path, "w") as fh:
                fh.write(str(e))
        else:
            print(f"ctxtrain: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and result.get("stop_reason") == "preempted":
        return PREEMPTED_EXIT  # a checkpoint is committed: "resume me"
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # What this worker wrote is committed and closed, its process group destroyed, its DataLoader workers die
    # with it (PR_SET_PDEATHSIG). Python's own teardown would now garbage-collect torch's and DeepSpeed's objects
    # one by one: ~2 s at the end of every run on 2 CPU cores, for memory the exit frees anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
