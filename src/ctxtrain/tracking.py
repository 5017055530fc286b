"""Tracking behind a small interface (`log`, `log_config`, `summary`, `finish`); W&B, and only here.

Rank 0 creates the W&B run; every other rank gets the no-op `Tracker`. The mode: `WANDB_MODE` when set,
else `tracking.mode`; `auto` means online when this machine is logged in (`wandb login`, i.e. ~/.netrc) or
`WANDB_API_KEY` is set, offline otherwise (the run lands in RUN_DIR/wandb/ and `wandb sync` uploads it).

One W&B run per job, across restarts. The run id is chosen at the first start (RUN_DIR/tracker.json), stored
in every checkpoint's meta.json and reused on resume with W&B's resume mode — after Ray restarted the workers
or after a re-run driver. A resumed job recomputes the steps after its checkpoint; W&B expects monotonic
steps, so steps that W&B already holds are not sent again (their recomputed values are the same: resume is
exact). What W&B holds is read from W&B itself, not assumed: online, the resumed run's step counter; offline,
the history records in this run's files under RUN_DIR/wandb (`read_history`). W&B writes asynchronously, so a
process killed by Ray can lose its last records: on resume, the steps that metrics.jsonl keeps (up to the
checkpoint) and W&B lacks are sent again from metrics.jsonl, then training continues. Each step reaches the
history once.
"""

from __future__ import annotations

import json
import netrc
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Optional

from ctxtrain.config import Config
from ctxtrain.rundir import RunDir, write_atomic


class Tracker:
    """The interface, and the no-op used on ranks other than 0 and when tracking is off."""

    run_id: Optional[str] = None
    last_step: int = 0  # the newest step the backend already holds (resumed runs)

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(cfg: Config) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.tracking.mode != "auto":
        return cfg.tracking.mode
    return "online" if logged_in() else "offline"


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


class WandbTracker(Tracker):
    def __init__(self, cfg: Config, run_id: str, run_dir: Path):
        import wandb

        self.mode = wandb_mode(cfg)
        t = cfg.tracking
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=t.project,
            entity=t.entity,
            group=t.group,
            tags=t.tags or None,
            name=t.name or run_dir.name,
            dir=str(RunDir(run_dir).path),
            mode=self.mode,
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.run_id = self.run.id
        if self.mode == "offline":
            self.last_step = max((step for step, _ in read_history(run_dir, self.run_id)), default=0)
        else:
            self.last_step = max(0, int(getattr(self.run, "step", 0) or 0) - 1) if self.run.resumed else 0

    def log(self, metrics: dict, step: int) -> None:
        if step <= self.last_step:
            return  # W&B already holds this step (recomputed after a resume, with the same values)
        self.run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=step)
        self.last_step = step

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            if v is not None:
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def choose_run_id(run_dir: Path, from_checkpoint: Optional[str], launch_id: Optional[str]) -> str:
    """The W&B run id of this start: the checkpoint's; else this launch's earlier start's (a restart before the
    first checkpoint); else a new one. Recorded in RUN_DIR/tracker.json."""
    path = RunDir(run_dir).tracker
    try:
        known = json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, or damaged: a new W&B run id, not a traceback
        known = {}
    known = known if isinstance(known, dict) else {}
    if from_checkpoint:
        run_id = from_checkpoint
    elif launch_id and known.get("launch_id") == launch_id and known.get("run_id"):
        run_id = known["run_id"]
    else:
        run_id = new_run_id()
    write_atomic(path, json.dumps({"run_id": run_id, "launch_id": launch_id}) + "\n")
    return run_id


def make_tracker(cfg: Config, rank: int, run_dir: Path, checkpoint_run_id: Optional[str],
                 launch_id: Optional[str]) -> Tracker:
    if rank != 0 or not cfg.tracking.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return Tracker()
    return WandbTracker(cfg, choose_run_id(run_dir, checkpoint_run_id, launch_id), run_dir)


# ---------------------------------------------------------------------------------------------------------
# Reading W&B's run files (offline runs): records framed like a LevelDB log after a 7-byte ":W&B" header


_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[object]:
    """The protobuf Records of one .wandb file, stopping at a torn or corrupt tail (a killed writer)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left  # block trailer padding
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_history(run_dir: Path, run_id: str) -> list[tuple[int, dict]]:
    """(step, metrics) of every history record of run_id under RUN_DIR/wandb, all process starts together."""
    out = []
    for path in sorted(RunDir(run_dir).wandb.glob(f"*run-*{run_id}*/run-{run_id}.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            values = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
            step = values.get("_step", record.history.step.num)
            out.append((int(step), values))
    return out
