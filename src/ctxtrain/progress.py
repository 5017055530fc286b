"""The progress bar in the terminal that launched training: step/total, loss, tokens/s and ETA.

Rank 0 writes RUN_DIR/metrics.jsonl; the launching process (the local launcher, or the Ray driver of an
embedded cluster) tails it and draws a tqdm bar on its own terminal. A bar drawn by rank 0 itself would not
survive Ray, which forwards worker output line by line. Without a terminal (CI, Ray job logs) there is no
bar: rank 0 prints a plain line every `train.log_every` steps. `CTXTRAIN_PROGRESS=lines` forces lines.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ctxtrain.rundir import eta_seconds, last_record


def want_bar() -> bool:
    return sys.stderr.isatty() and os.environ.get("CTXTRAIN_PROGRESS", "") != "lines"


def _screen() -> tuple[int, int]:
    """The terminal's (columns, rows); 100 x 24 where it reports 0 (a fresh pseudo-terminal does, and tqdm
    then computes -1 rows and draws nothing)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        return size.columns or 100, size.lines or 24
    except OSError:
        return 100, 24


def bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar for prepare/export: drawn on a terminal, silent elsewhere (their summary lines remain)."""
    cols, rows = _screen()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, ncols=cols, nrows=rows, mininterval=0.5,
                disable=not (enabled and sys.stderr.isatty()))


def log_line(r: dict, max_steps: int, t_start: float) -> None:
    """The plain line that rank 0 prints every train.log_every steps where no bar is drawn (`ctxtrain status`
    reads a job's progress from these lines when it cannot see the run directory)."""
    extra = f" val_loss={r['val_loss']:.4f}" if "val_loss" in r else ""
    extra += f" val_bleu={r['val_bleu']:.2f}" if "val_bleu" in r else ""
    print(f"step={r['step']}/{max_steps} loss={r['loss']:.4f}{extra} lr={r['lr']:.2e} "
          f"tokens/s={r['tokens_per_s']:,.0f} elapsed={time.time() - t_start:,.0f}s "
          f"eta={eta_seconds(r, max_steps):,.0f}s", flush=True)


class ProgressBar:
    def __init__(self, run_dir: str | Path, max_steps: int, interval: float = 0.5):
        self.run_dir = Path(run_dir)
        self.max_steps, self.interval = max_steps, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar = None

    def __enter__(self) -> "ProgressBar":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._update()
        if self._bar is not None:
            self._bar.close()

    def _update(self) -> None:
        last = last_record(self.run_dir)
        if last is None:
            return
        if self._bar is None:
            self._bar = tqdm(total=self.max_steps, initial=last["step"], desc="train", unit="step",
                             ncols=_screen()[0], nrows=_screen()[1], file=sys.stderr, smoothing=0.1)
        self._bar.n = last["step"]
        post = f"loss={last['loss']:.4f} tokens/s={last['tokens_per_s']:,.0f}"
        if last.get("val_loss") is not None:
            post += f" val_loss={last['val_loss']:.4f}"
        self._bar.set_postfix_str(post, refresh=False)
        self._bar.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()
