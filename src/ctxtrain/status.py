"""One view of many runs: `ctxtrain status --runs DIR` (every run directory under DIR) and `ctxtrain status`
with no job id (every job of the Ray cluster), as one table, once or refreshed in place (`--watch`).

    ctxtrain status --runs runs/ --watch          # RUN STATE STEP LOSS TOKENS/S MFU ETA RESTARTS

A run's state comes from RUN_DIR/state.json, which rank 0 writes when the run starts ("running") and when it
ends ("finished", "stopped" with the reason, "failed"), and from how recently the run wrote anything: a run
that says "running" but has written nothing for max(5 min, 3 log intervals) was killed without a word (a lost
node, SIGKILL) and shows as "stale".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from ctxtrain.errors import UserError, interruptible
from ctxtrain.rundir import RunDir, eta_seconds, last_record

STALE_AFTER_S = 300.0
COLUMNS = ("RUN", "STATE", "STEP", "LOSS", "TOKENS/S", "MFU", "ETA", "RESTARTS")


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or under root (those with a config.yaml written by `ctxtrain train`), sorted."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"--runs {root}: no such directory; pass the folder that holds your run directories "
                        "(e.g. runs/)")
    found = [base] if RunDir(base).is_run() else []
    for config in sorted(base.rglob("config.yaml")):
        run = config.parent
        if run != base and RunDir(run).is_run() and not any(p in found for p in run.parents):
            found.append(run)
    return found


def train_section(run: RunDir) -> dict:
    """The `train` section of the run's config.yaml ({} when it cannot be read)."""
    try:
        section = yaml.safe_load(run.config.read_text())["train"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return {}
    return section if isinstance(section, dict) else {}


def run_row(path: str | Path, now: Optional[float] = None) -> dict:
    """One run directory's line: state, step/total, loss, tokens/s, MFU, ETA (running runs), restarts."""
    run = RunDir(path)
    now = time.time() if now is None else now
    last = last_record(run.path) or {}
    train = train_section(run)
    total = train.get("max_steps")
    state = run.read_state()
    name = state.get("state")
    if not name:  # a run directory of an older ctxtrain (no state.json): its metrics say what they can
        name = "finished" if last and total and last["step"] >= total else ("running" if last else "unknown")
    if name == "stopped" and state.get("reason"):
        name = f"stopped ({state['reason']})"
    if name == "running":
        touched = max((p.stat().st_mtime for p in (run.metrics, run.state, run.starts) if p.exists()),
                      default=0.0)
        interval = 3 * float(last.get("step_time_s") or 0) * int(train.get("log_every") or 1)
        if now - touched > max(STALE_AFTER_S, interval):
            name = f"stale ({(now - touched) / 60:.0f} min silent)"
    eta = eta_seconds(last, total) if name == "running" else None
    return {"run": str(path), "state": name, "step": last.get("step"), "max_steps": total,
            "loss": last.get("loss"),
            "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"), "eta_s": eta,
            "restarts": last.get("restarts", 0)}


def _hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _cells(row: dict) -> list[str]:
    step = "-" if row.get("step") is None else str(row["step"])
    if row.get("max_steps"):
        step += f"/{row['max_steps']}"
    return [row["run"], row["state"], step,
            "-" if row.get("loss") is None else f"{row['loss']:.4f}",
            "-" if row.get("tokens_per_s") is None else f"{row['tokens_per_s']:,.0f}",
            "-" if row.get("mfu") is None else f"{row['mfu']:.3f}",
            _hms(row.get("eta_s")), str(row.get("restarts") or 0)]


def table(rows: list[dict], first: str = "RUN") -> str:
    """Rows as aligned text columns, a header first."""
    lines = [[first, *COLUMNS[1:]]] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for line in lines:
        out.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                             enumerate(zip(line, widths))).rstrip())
    return "\n".join(out) + "\n"


def runs_table(root: str | Path) -> str:
    runs = find_runs(root)
    if not runs:
        return f"no run directories under {root}\n"
    return table([run_row(r) for r in runs])


def jobs_table(address: Optional[str]) -> str:
    """Every job of the cluster: the job's state from Ray, its progress from its run directory when this
    machine sees it."""
    from ctxtrain.launcher import list_jobs

    rows = []
    for job in list_jobs(address):
        row = run_row(job["run_dir"]) if job["run_dir"] and RunDir(job["run_dir"]).is_run() else {}
        row.update(run=job["job_id"], state=job["status"].lower())
        if job["status"] != "RUNNING":
            row["eta_s"] = None
        rows.append(row)
    return table(rows, "JOB") if rows else "no jobs on this cluster\n"


def watch(render: Callable[[], str], interval: float, out=None) -> int:
    """Print render() every `interval` seconds until Ctrl-C: in place in a terminal (cursor home, clear), one
    stamped block after another otherwise (a log file, a pipe)."""
    out = out or sys.stdout
    tty = out.isatty()
    interruptible()
    try:
        while True:
            text = render()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            if tty:
                out.write("\x1b[H\x1b[2J" + f"ctxtrain status  {stamp}  (every {interval:g} s, Ctrl-C to "
                                            "stop)\n\n"
                          + text)
            else:
                out.write(f"-- {stamp}\n{text}")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
