"""Least exposure and no hang: what a running job listens on, and SIGTERM ending every long verb in seconds
(`train` with a checkpoint: a preemption)."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import CONFIGS
from tests.helpers import FAST, env, metrics

pytestmark = pytest.mark.slow


def listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of a process and its descendants."""
    out = []
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((c.laddr.ip, c.laddr.port, " ".join(p.cmdline())[:80]))
        except psutil.Error:
            continue
    return out


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _start(tmp_path: Path, data: Path, launcher: str) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / launcher
    cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
           f"--train.run_dir={run_dir}",
           f"--data.path={data}", *FAST, f"--cluster.launcher={launcher}", "--train.max_steps=100000",
           "--train.log_every=1", "--checkpoint.every=0", "--data.num_workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 240
    while time.time() < deadline and not metrics(run_dir) and proc.poll() is None:
        time.sleep(1)
    assert metrics(run_dir), proc.communicate(timeout=60)
    return proc, run_dir


@pytest.mark.parametrize("launcher", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_running_job_listens_on_loopback_only_and_sigterm_ends_it(stdlib_shards, tmp_path, launcher):
    """Every socket that the job's processes listen on (the launcher, the workers, their data-loader workers;
    under embedded Ray also GCS, raylet, dashboard, agents and Ray's workers) is bound to a loopback address.
    Then SIGTERM to the verb (a preemption) ends it, its workers included, within 10 s: a checkpoint at the
    next step boundary, exit status 75 and two lines (what happens, then what was committed)."""
    proc, run_dir = _start(tmp_path, stdlib_shards, launcher)
    try:
        sockets = listening(proc.pid)
        assert sockets, "no listening socket found: the process tree was not seen"
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert not exposed, exposed
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 10, took
    assert proc.returncode == 75 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("ctxtrain:")]
    assert len(lines) == 2 and lines[0].startswith("ctxtrain: SIGTERM: the workers write a checkpoint"), lines
    step = max(metrics(run_dir))
    assert lines[1] == (f"ctxtrain: preempted (SIGTERM); newest committed checkpoint step_{step:06d}; run "
                        "the same command again to resume"), (lines, step)
    assert (run_dir / "checkpoints" / f"step_{step:06d}" / "COMMITTED").is_file()
    assert not (run_dir / "preempt.request").exists()
    time.sleep(2)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]


def test_sigterm_ends_prepare(tmp_path):
    """A long prepare (the whole standard library) ends on SIGTERM within 10 s and leaves no output behind."""
    out = tmp_path / "stdlib"
    proc = subprocess.Popen([sys.executable, "-m", "ctxtrain", "prepare", "--recipe", "stdlib", "--out",
                             str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    time.sleep(6)
    assert proc.poll() is None, proc.communicate()
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 10 and proc.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".stdlib.tmp-*")), list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Faults under load: the driver killed during a save, a full disk during a save (the reference is the
# uninterrupted 20-step ZeRO-3 run; a kill in the middle of a data-loader read and three consecutive kills
# are in test_sequence_parallel's Ray recovery test)

REFERENCE = ["--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5"]


class Lines:
    """A process's stdout, collected line by line by a thread while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in list(self.lines)):
                return True
            time.sleep(0.1)
        return False


def _train_cmd(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
            f"--train.run_dir={run_dir}",
            f"--data.path={data}", *FAST, "--cluster.launcher=local", *REFERENCE, *extra]


def test_driver_killed_during_a_save_then_rerun(zero3_run, stdlib_shards, tmp_path):
    """SIGKILL to the driver while step_000010 is being written: its workers die with it (no orphan writes on
    into the run directory), the committed step_000005 is untouched, and a re-run resumes from it with the
    uninterrupted losses."""
    _, whole, _ = zero3_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run_dir, stdlib_shards, "--train.stop_at_step=12"),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env())
    saving = run_dir / "checkpoints" / "step_000010"
    deadline = time.time() + 300
    while time.time() < deadline and not saving.is_dir() and proc.poll() is None:
        time.sleep(0.005)
    assert saving.is_dir(), "the save of step 10 was never seen"
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    assert not (saving / "COMMITTED").is_file(), ("the save finished before the kill; the test missed its "
                                                  "window")
    first = run_dir / "checkpoints" / "step_000005"
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.cmdline()[:4] for p in alive]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    rerun = subprocess.run(_train_cmd(run_dir, stdlib_shards, "--train.stop_at_step=12"), capture_output=True,
                           text=True, env=env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and "step_000005" in rerun.stdout, rerun.stdout[-2000:]
    m = metrics(run_dir)
    for step in range(6, 13):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6, step
    assert (saving / "COMMITTED").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MB tmpfs (root only), the checkpoint storage of a run."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_during_a_save(zero3_run, stdlib_shards, tmp_path, small_disk):
    """The checkpoint disk fills up after step_000005 is committed: the save of step_000010 fails on a rank,
    leaves nothing behind and training goes on; once space is back, step_000015 commits. The committed
    checkpoint is untouched and the losses are the uninterrupted run's."""
    _, whole, _ = zero3_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run_dir, stdlib_shards, "--train.stop_at_step=15",
                                       "--train.log_every=1",
                                       f"--checkpoint.storage={small_disk}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    out = Lines(proc)
    filler = small_disk / "filler"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics(run_dir).get(6)) and proc.poll() is None:
            time.sleep(0.1)
        first = small_disk / "step_000005"
        assert (first / "COMMITTED").is_file(), out.lines[-20:]
        before = {p.name: p.read_bytes() for p in first.iterdir()}
        with open(filler, "wb") as fh:  # fill the disk
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        assert out.wait_for("checkpoint step_000010 not written", 300), "".join(out.lines[-60:])
    finally:
        filler.unlink(missing_ok=True)
    assert proc.wait(timeout=600) == 0, "".join(out.lines[-30:])
    notice = next(line for line in out.lines if "step_000010 not written" in line)
    assert ("No space left" in notice
            or "write failed" in notice) and "newest committed one is step_000005" in notice
    assert not (small_disk / "step_000010").exists()
    assert (small_disk / "step_000015" / "COMMITTED").is_file()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    m = metrics(run_dir)
    for step in range(1, 16):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6, step
