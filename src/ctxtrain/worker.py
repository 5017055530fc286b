"""Entry of one worker process started by the local launcher: `python -m ctxtrain.worker MODULE:FUNC
CONFIG.json`.

It calls FUNC(cfg) — `ctxtrain.train:run` for training, the same function Ray Train calls. A UserError goes
to $CTXTRAIN_ERROR_FILE (the launcher prints it once) and exits 2; a run preempted by SIGTERM, its checkpoint
committed, exits 75.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from ctxtrain.config import from_dict
from ctxtrain.errors import PREEMPTED_EXIT, UserError
from ctxtrain.processes import die_with_parent


def main(argv: list[str]) -> int:
    # dies with its launcher, even a SIGKILLed one: an orphan would write into the run directory beside a
    # re-run
    die_with_parent(int(os.environ.get("CTXTRAIN_LAUNCHER_PID", os.getppid())))
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
    try:
        code = main(sys.argv[1:])
    except BaseException:  # a bug: its traceback, then out at once (no thread left behind keeps it alive)
        import traceback

        traceback.print_exc()
        code = 1
    # What this worker wrote is committed and closed, its process group destroyed, its DataLoader workers die
    # with it (PR_SET_PDEATHSIG). Python's own teardown would now garbage-collect torch's and DeepSpeed's
    # objects one by one: ~2 s at the end of every run on 2 CPU cores, for memory the exit frees anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
