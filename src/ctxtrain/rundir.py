"""The run directory's files: the atomic write, and the one reader of metrics.jsonl.

    RUN_DIR/config.yaml      the resolved config          RUN_DIR/metrics.jsonl   one JSON line per step
    RUN_DIR/starts.jsonl     one line per (re)start       RUN_DIR/checkpoints/    see checkpoint.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


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
    """The step records of a metrics.jsonl, in order. A line torn by a crash, a line that is not UTF-8 or not a
    JSON object with an integer step (damage, or an edit) is skipped: readers never fail on the file's content."""
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
    """The newest complete line of RUN_DIR/metrics.jsonl (a line being written, or torn by a crash, is skipped)."""
    try:
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    except OSError:
        return None
    return rows[-1] if rows else None
