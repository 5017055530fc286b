"""Least exposure and no hang: what a running job listens on, and SIGTERM ending every long verb in seconds."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
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
    cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"), f"--train.run_dir={run_dir}",
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
    Then SIGTERM to the verb ends it, its workers included, within 10 s, with one line."""
    proc, _ = _start(tmp_path, stdlib_shards, launcher)
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
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("ctxtrain:")] == ["ctxtrain: terminated (SIGTERM)"]
    time.sleep(2)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]


def test_sigterm_ends_prepare(tmp_path):
    """A long prepare (the whole standard library) ends on SIGTERM within 10 s and leaves no output behind."""
    out = tmp_path / "stdlib"
    proc = subprocess.Popen([sys.executable, "-m", "ctxtrain", "prepare", "--recipe", "stdlib", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    time.sleep(6)
    assert proc.poll() is None, proc.communicate()
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 10 and proc.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".stdlib.tmp-*")), list(tmp_path.iterdir())
