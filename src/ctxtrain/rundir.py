"""The run directory: every path in it, the metrics writer and reader, the atomic write, the checkpoint root.

    RUN_DIR/config.yaml         the resolved config           RUN_DIR/metrics.jsonl   one JSON line per step
    RUN_DIR/starts.jsonl        one line per (re)start        RUN_DIR/tracker.json    the W&B run id
    RUN_DIR/ds_config.json      the DeepSpeed config          RUN_DIR/state.json      running/finished/...
    RUN_DIR/wandb/              W&B's files                   RUN_DIR/tensorboard/    TensorBoard event files
    RUN_DIR/checkpoints/        checkpoints (checkpoint.py), or their local staging when
                                checkpoint.storage is a URI; `checkpoint_root` says where they live
    RUN_DIR/fault-*.done        fault rehearsals already done
    RUN_DIR/preempt.request     the driver got SIGTERM: the workers checkpoint at the next step boundary

Nothing else joins a file name onto a run directory: train, checkpoint, tracking, report, export and the
launchers take their paths from here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional


class RunDir:
    """The paths of one run directory (nothing is created by naming them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def starts(self) -> Path:
        return self.path / "starts.jsonl"

    @property
    def state(self) -> Path:
        """running / finished / stopped / failed, written by rank 0 (`ctxtrain status` reads it)."""
        return self.path / "state.json"

    def write_state(self, state: str, **fields) -> None:
        write_atomic(self.state, json.dumps({"state": state, "time": time.time(), **fields}) + "\n")

    def mark_failed(self, error: BaseException) -> None:
        """state.json says failed, with the error's first line, when this process's running run raised."""
        state = self.read_state()
        if state.get("pid") == os.getpid() and state.get("state") == "running":
            first = str(error).splitlines()[0] if str(error) else ""
            self.write_state("failed", error=f"{type(error).__name__}: {first}")

    def read_state(self) -> dict:
        try:
            state = json.loads(self.state.read_bytes())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def record_start(self, resumed_from: Optional[int], launch_id: Optional[str], fresh: bool) -> int:
        """Append this start to starts.jsonl; returns the restart count: the starts of this run (worker groups
        restarted by Ray, drivers re-run) since it last started fresh, minus one. A fresh start empties the
        file, unless it is a restart within the launch that started fresh (Ray restarted its workers)."""
        earlier = [json.loads(line)
                   for line in self.starts.read_text().splitlines()] if self.starts.exists() else []
        if fresh and not (launch_id and earlier and earlier[-1].get("launch_id") == launch_id):
            earlier = []
        line = {"time": time.time(), "resumed_from": resumed_from, "launch_id": launch_id}
        write_atomic(self.starts, "".join(json.dumps(r) + "\n" for r in earlier + [line]))
        return len(earlier)

    @property
    def tracker(self) -> Path:
        return self.path / "tracker.json"

    @property
    def ds_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        """Local checkpoints by default; the staging directory of a URI storage."""
        return self.path / "checkpoints"

    def checkpoint_root(self, storage: Optional[str]) -> str | Path:
        """Where the checkpoints live: checkpoint.storage (a URI, or a directory shared by the nodes), else
        RUN_DIR/checkpoints."""
        if storage and "://" in storage:
            return storage.rstrip("/")
        return Path(storage) if storage else self.checkpoints

    @property
    def preempt_request(self) -> Path:
        return self.path / "preempt.request"

    def fault_marker(self, rank: int, step: int, during: str) -> Path:
        return self.path / f"fault-rank{rank}-step{step}-{during}.done"

    def is_run(self) -> bool:
        return self.config.is_file()


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file, and no temporary beside it
        raise


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics.jsonl, in order. A line torn by a crash, a line that is not UTF-8 or not
    a JSON object with an integer step (damage, or an edit) is skipped: readers never fail on the file's
    content."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    rows = []
    for raw in data.splitlines():
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            rows.append(rec)
    return rows


def last_record(run_dir: str | Path) -> Optional[dict]:
    """The newest complete line of RUN_DIR/metrics.jsonl (a line being written, or torn by a crash, is
    skipped)."""
    try:
        rows = read_metrics(RunDir(run_dir).metrics)
    except OSError:
        return None
    return rows[-1] if rows else None


def eta_seconds(record: dict, max_steps: Optional[int]) -> Optional[float]:
    """Seconds to train.max_steps at the step time of a metrics record (None when either is unknown)."""
    if not max_steps or record.get("step_time_s") is None:
        return None
    return max(0, max_steps - record["step"]) * record["step_time_s"]


class MetricsWriter:
    """RUN_DIR/metrics.jsonl for rank 0: on resume the steps after the checkpoint are cut, so that each step
    appears once (they are recomputed, with the same values); then one line per step, flushed."""

    def __init__(self, run_dir: str | Path, resume_step: int):
        self.path = RunDir(run_dir).metrics
        # the lines up to the checkpoint, in order (torn or damaged lines are dropped)
        self.kept: list[dict] = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        self.fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()
