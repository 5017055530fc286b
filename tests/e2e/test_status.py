"""`ctxtrain status --runs DIR`: one table of finished runs and a run that is training right now, printed
once, refreshed in place in a pseudo-terminal (`--watch`), and as stamped blocks without one."""

from __future__ import annotations

import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.helpers import FAST, ctxtrain, env, metrics

pytestmark = pytest.mark.slow


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb", "ray", "tensorboard"))
    return dst


def _rows(text: str) -> dict[str, list[str]]:
    """The table's lines by run name (first column, the run directory's path)."""
    out = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] not in ("RUN", "--"):
            out[Path(cells[0]).name] = cells[1:]
    return out


@pytest.fixture
def runs(zero3_run, encdec_run, stdlib_shards, tmp_path):
    """Two finished runs (copies of the session's fixtures) and one that trains in the background until the
    test ends: lm_tiny narrowed, one local worker, a line per step."""
    root = tmp_path / "runs"
    root.mkdir()
    _copy_run(zero3_run[0], root / "lm_done")
    _copy_run(encdec_run, root / "enc_done")
    live = root / "live"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"), f"--train.run_dir={live}",
         f"--data.path={stdlib_shards}", *FAST, "--cluster.launcher=local", "--cluster.workers=1",
         "--train.max_steps=100000", "--train.log_every=1", "--checkpoint.every=0"],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(metrics(live)) < 3:
        assert proc.poll() is None, "the live run ended early"
        time.sleep(1)
    assert len(metrics(live)) >= 3
    yield root
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_status_runs_lists_finished_and_running_runs_and_watch_refreshes(runs):
    r = ctxtrain("status", "--runs", str(runs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["RUN", "STATE", "STEP", "LOSS", "TOKENS/S", "MFU", "ETA",
                                                "RESTARTS"]
    rows = _rows(r.stdout)
    assert sorted(rows) == ["enc_done", "live", "lm_done"], r.stdout
    assert rows["lm_done"][:2] == ["finished", "20/20"] and rows["enc_done"][:2] == ["finished", "150/150"]
    assert rows["lm_done"][-2:] == ["-", "0"]  # no ETA once finished; no restarts
    state, step = rows["live"][:2]
    done, total = map(int, step.split("/"))
    assert state == "running" and total == 100000 and done >= 3, r.stdout
    assert rows["live"][-2].count(":") == 2  # an ETA, h:mm:ss

    # --watch in a terminal: the table redrawn in place (cursor home + clear) with the live run's step moving
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ctxtrain", "status", "--runs", str(runs), "--watch",
                             "--interval", "1"], stdin=slave, stdout=slave, stderr=slave, env=env(),
                            close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + 120
    while time.time() < deadline and out.count(b"\x1b[H\x1b[2J") < 5:
        out += os.read(master, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    os.close(master)
    # whole frames only: the read can stop inside the last one (its header read, its table not yet)
    frames = out.decode(errors="replace").split("\x1b[H\x1b[2J")[1:-1]
    assert len(frames) >= 4 and all("live" in f and "lm_done" in f for f in frames)
    first, last = (int(_rows(f)["live"][1].split("/")[0]) for f in (frames[0], frames[-1]))
    assert last > first  # refreshed, not reprinted

    # without a terminal: stamped blocks, one after another
    proc = subprocess.Popen([sys.executable, "-m", "ctxtrain", "status", "--runs", str(runs), "--watch",
                             "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    text, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    blocks = text.decode().count("\n-- ") + text.decode().startswith("-- ")
    assert "\x1b[" not in text.decode() and blocks >= 2


def test_a_silent_running_run_shows_as_stale(zero3_run, tmp_path):
    from ctxtrain.rundir import RunDir
    from ctxtrain.status import run_row

    run = RunDir(_copy_run(zero3_run[0], tmp_path / "killed"))
    assert run_row(run.path)["state"] == "finished"
    run.write_state("running", step=20)
    assert run_row(run.path)["state"] == "running"
    assert run_row(run.path, now=time.time() + 3600)["state"].startswith("stale (60 min silent")
    assert ctxtrain("status", "--runs", str(tmp_path / "nope")).returncode == 2


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) that listen on port."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.append(local.rsplit(":", 1)[0])
    return out


def test_report_serve_answers_on_loopback_and_shows_new_steps(zero3_run, tmp_path):
    import json
    import re
    import urllib.request

    run = _copy_run(zero3_run[0], tmp_path / "going")
    proc = subprocess.Popen([sys.executable, "-m", "ctxtrain", "report", str(run), "--serve", "--port", "0",
                             "--refresh", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            text=True)
    try:
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert url, first + proc.stderr.read()
        port = int(url.group(1))
        assert _listening(port) == ["0100007F"]  # 127.0.0.1 only: not 0.0.0.0, not ::

        def page() -> str:
            with urllib.request.urlopen(url.group(0), timeout=30) as r:
                return r.read().decode()

        text = page()
        assert "<meta http-equiv='refresh' content='3'>" in text and "<td>20</td>" in text
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        with open(run / "metrics.jsonl", "a") as fh:  # the run goes on: step 21
            fh.write(json.dumps({**last, "step": 21, "loss": 1.2345}) + "\n")
        written = time.time()
        while "<td>21</td>" not in page():
            assert time.time() - written < 2 * 3, "step 21 not shown within two refresh periods"
            time.sleep(0.2)
        assert "1.2345" in page()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "report server stopped" in out and "Traceback" not in err, err
