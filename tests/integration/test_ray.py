"""Ray orchestration on real Ray (CPU): embedded training with ZeRO-3, recovery from a killed worker (during a
step and during a checkpoint) with the losses of an uninterrupted run, a simulated two-node cluster, and job
submission against a head started here with `ray start --head`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import CONFIGS
from tests.helpers import FAST, ctxtrain, env, metrics, starts, train

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _same_losses(m: dict, reference: dict, steps) -> None:
    for step in steps:
        assert abs(m[step]["loss"] - reference[step]["loss"]) <= 1e-6, (step, m[step]["loss"],
                                                                        reference[step]["loss"])


@pytest.mark.heavy  # Ray recovery with identical losses: CI runs it with sp=2 (test_sequence_parallel)
def test_ray_recovers_from_a_killed_worker_with_identical_losses(zero3_run, stdlib_shards, tmp_path):
    _, reference, _ = zero3_run
    run_dir = tmp_path / "killed"
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5",
                    "--fault.kill_rank=1", "--fault.at_step=7", "--cluster.max_failures=2",
                    "--tracking.enabled=true",
                    launcher="ray")
    assert "Ray embedded: 2 workers" in proc.stdout and "dashboard http://127.0.0.1:" in proc.stdout
    assert (run_dir / "fault-rank1-step7-step.done").is_file()
    launches = starts(run_dir)
    assert len(launches) == 2, launches  # Ray restarted the worker group once
    assert launches[1]["resumed_from"] == 5 and launches[0]["launch_id"] == launches[1]["launch_id"]
    assert sorted(m) == list(range(1, 21))  # every step once, the recomputed 6 and 7 included
    _same_losses(m, reference, range(1, 21))
    assert m[20]["restarts"] == 1 and m[5]["restarts"] == 0
    assert (run_dir / "ray").is_dir()  # Ray's own run state lives in the run dir

    # W&B (offline): one run id across the restart, every step once in its history, with the step's metrics
    from ctxtrain.tracking import read_history

    run_id = json.loads((run_dir / "tracker.json").read_text())["run_id"]
    meta = json.loads((run_dir / "checkpoints" / "step_000020" / "meta.json").read_text())
    assert meta["tracker_run_id"] == run_id
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) >= 2 and all(f.name.split("-")[-1] == run_id or f.name.split("-")[-2] == run_id
                                     for f in folders), folders  # one folder per process start, one id
    history = read_history(run_dir, run_id)
    steps = [step for step, _ in history]
    assert sorted(steps) == list(range(1, 21)), steps  # each step once: first to last, none twice
    for step, values in history:
        assert values["loss"] == pytest.approx(m[step]["loss"], abs=1e-9)
        for key in ("lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_worker", "step_time_s",
                    "data_wait_s", "mem_bytes", "restarts"):
            assert key in values, (step, key)


@pytest.mark.heavy  # an uncommitted checkpoint is never used: CI runs it with the local launcher (test_train)
def test_ray_kill_during_checkpoint_never_resumes_the_half_written_one(zero3_run, stdlib_shards, tmp_path):
    _, reference, _ = zero3_run
    run_dir = tmp_path / "killed_in_ckpt"
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5",
                    "--checkpoint.keep_last=10", "--fault.kill_rank=1", "--fault.at_step=7",
                    "--fault.during=checkpoint", "--cluster.max_failures=2", launcher="ray")
    launches = starts(run_dir)
    assert len(launches) == 2 and launches[1]["resumed_from"] == 5, launches  # not 10: it had no COMMITTED
    assert sorted(m) == list(range(1, 21))
    _same_losses(m, reference, range(1, 21))
    # the step-10 checkpoint that the restarted group wrote is complete and committed
    assert (run_dir / "checkpoints" / "step_000010" / "COMMITTED").is_file()
    meta = json.loads((run_dir / "checkpoints" / "step_000010" / "meta.json").read_text())
    assert meta["restarts"] == 1


@pytest.mark.heavy  # a re-run driver resumes: CI runs the resume kinds with the local launcher
def test_ray_driver_rerun_resumes(stdlib_shards, tmp_path, zero3_run):
    """The driver died (here: it was told to stop at step 4); running the same command again resumes."""
    _, reference, _ = zero3_run
    run_dir = tmp_path / "rerun"
    train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--train.stop_at_step=4",
          launcher="ray")
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3",
                    "--train.stop_at_step=8",
                    launcher="ray")
    assert "resumed from step_000004" in proc.stdout
    _same_losses(m, reference, range(1, 9))


# CI joins a two-node cluster_utils cluster with --address in test_elastic (a node is lost)
@pytest.mark.heavy
def test_two_node_cluster_train_checkpoint_resume(two_node_cluster, stdlib_shards, tmp_path, zero3_run):
    cluster, nodes = two_node_cluster
    _, reference, _ = zero3_run
    run_dir = tmp_path / "two_nodes"
    common = ["--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=3", "--cluster.placement=spread",
              f"--cluster.address={cluster.address}"]
    proc, m = train(run_dir, stdlib_shards, *common, "--train.stop_at_step=3", launcher="ray")
    assert f"Ray cluster {cluster.address}" in proc.stdout
    assert (run_dir / "checkpoints" / "step_000003" / "COMMITTED").is_file()
    proc, m = train(run_dir, stdlib_shards, *common, "--train.stop_at_step=6", launcher="ray")
    assert "resumed from step_000003" in proc.stdout
    _same_losses(m, reference, range(1, 7))
    import ray

    ray.init(address=cluster.address)
    try:
        per_node = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert sorted(per_node.values()) == [0, 1, 1]  # 2 one-CPU workers can only run one per node


# ---------------------------------------------------------------------------------------------------------
# Jobs against a head started with `ray start --head`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port, dash = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp}", "--block"],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if ctxtrain("jobs", "--address", address).returncode == 0:
            break
        time.sleep(2)
    else:
        proc.terminate()
        pytest.fail("ray start --head did not come up in 90 s")
    yield address, temp
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    # `ray start --block` took the full 30 s here: the head is of no more use
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _wait_status(job: str, address: str, want: set[str], timeout: float = 300) -> str:
    deadline = time.time() + timeout
    out = ""
    while time.time() < deadline:
        out = ctxtrain("status", job, "--address", address).stdout
        state = out.split(":", 1)[1].split()[0] if ":" in out else ""
        if state in want:
            return out
        time.sleep(2)
    raise AssertionError(f"job {job} did not reach {want}: {out}")


SECRETS = {"WANDB_API_KEY": "wandb-secret-not-to-be-written", "HF_TOKEN": "hf-secret-not-to-be-written",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-not-to-be-written"}


def test_submit_status_logs_and_stop(ray_head, stdlib_shards, tmp_path):
    address, ray_temp = ray_head
    run_dir = tmp_path / "job"
    args = ["submit", str(CONFIGS / "lm_tiny.yaml"), "--address", address, *FAST,
            f"--train.run_dir={run_dir}",
            f"--data.path={stdlib_shards}", "--train.max_steps=6", "--train.log_every=2",
            "--tracking.enabled=true",
            "--tracking.mode=offline"]
    r = ctxtrain(*args, extra_env=SECRETS)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    assert job.startswith("ctxtrain-")
    out = _wait_status(job, address, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert f"job {job}: SUCCEEDED" in out, out + ctxtrain("logs", job, "--address", address).stdout[-3000:]
    # latest step, loss, tokens/s, ETA and the dashboard URL
    assert re.search(r"step 6/6  loss [\d.]+  tokens/s [\d,]+  eta 0 s", out), out
    assert "dashboard http://127.0.0.1:" in out
    logs = ctxtrain("logs", job, "--address", address).stdout
    assert "step=6/6 loss=" in logs
    assert sorted(metrics(run_dir)) == list(range(1, 7))
    # the secrets reached the job, and nothing else: not the run dir (W&B's offline files included), the
    # job's logs, nor the logs of any process of the Ray session
    assert list(run_dir.glob("wandb/offline-run-*")), sorted(p.name for p in run_dir.iterdir())
    assert "secret-not-to-be-written" not in logs
    session_logs = list(ray_temp.glob("session_*/logs"))
    assert session_logs and any(p.name == "runtime_env_agent.log" for p in session_logs[0].iterdir())
    for root in (run_dir, *session_logs):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                assert not [k for k, v in SECRETS.items() if v.encode() in data], path
    assert job in ctxtrain("jobs", "--address", address).stdout
    first = job

    # a long job, stopped while it runs
    long_dir = tmp_path / "long"
    args = ["submit", str(CONFIGS / "lm_tiny.yaml"), "--address", address, *FAST,
            f"--train.run_dir={long_dir}",
            f"--data.path={stdlib_shards}", "--train.max_steps=100000", "--train.log_every=1"]
    job = ctxtrain(*args).stdout.strip().splitlines()[-1]
    deadline = time.time() + 300
    while time.time() < deadline and not metrics(long_dir):
        time.sleep(2)
    assert metrics(long_dir), ctxtrain("logs", job, "--address", address).stdout[-3000:]
    # every job of the cluster in one table: the finished one and the one training now
    table = ctxtrain("status", "--address", address).stdout.splitlines()
    assert table[0].split()[:3] == ["JOB", "STATE", "STEP"], table
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows[first][:2] == ["succeeded", "6/6"] and rows[job][0] == "running", table
    assert rows[job][1].endswith("/100000")
    r = ctxtrain("stop", job, "--address", address)
    assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# Training gauges in Ray's metrics pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gauges(text: str, run: str) -> dict[str, tuple[float, dict]]:
    """ray_ctxtrain_* samples of one run from Prometheus text: name -> (value, labels)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(ray_ctxtrain_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            if labels.get("run") == run:
                out[m.group(1)] = (float(m.group(3)), labels)
    return out


def test_training_gauges_reach_rays_prometheus_endpoint(stdlib_shards, tmp_path):
    """Under embedded Ray, rank 0's gauges are in the Prometheus text of Ray's metrics agent (scraped over
    127.0.0.1 while the run trains), labelled by run, job and rank, with the values of the step they name."""
    import urllib.request

    from tests.conftest import CONFIGS

    port, run_dir = _free_port(), tmp_path / "promrun"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
         f"--train.run_dir={run_dir}",
         f"--data.path={stdlib_shards}", *FAST, "--cluster.launcher=ray", "--cluster.workers=1",
         "--train.max_steps=100000", "--train.log_every=2", "--checkpoint.every=0",
         f"--cluster.metrics_port={port}",
         f"--cluster.dashboard_port={_free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        deadline, matched = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None and matched is None:
            time.sleep(2)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            except OSError:
                continue  # the agent is not up yet
            g = _gauges(text, "promrun")
            if "ray_ctxtrain_step" not in g or g["ray_ctxtrain_step"][0] < 4:
                continue
            step = int(g["ray_ctxtrain_step"][0])
            row = metrics(run_dir).get(step)
            if row and g["ray_ctxtrain_loss"][0] == pytest.approx(row["loss"], rel=1e-6):
                # one export holds one step's values (else: a scrape between two sets, retry)
                matched = (g, row)
        assert matched, (proc.poll(), "no ray_ctxtrain_step >= 4 for run promrun on the metrics endpoint",
                         proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        g, row = matched
        labels = g["ray_ctxtrain_step"][1]
        assert labels["rank"] == "0" and labels["job_id"].startswith("launch-")
        for name, key in (("ray_ctxtrain_tokens_per_s", "tokens_per_s"), ("ray_ctxtrain_step_time_seconds",
                                                                          "step_time_s"),
                          ("ray_ctxtrain_memory_bytes", "mem_bytes"), ("ray_ctxtrain_restarts", "restarts")):
            assert g[name][0] == pytest.approx(row[key], rel=1e-6), name
    finally:
        proc.send_signal(signal.SIGTERM)  # a preemption: checkpoint, exit 75
        out, err = proc.communicate(timeout=180)
    assert f"metrics http://127.0.0.1:{port}/metrics" in out


RAY_ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]|Traceback|\bERROR\b|Exception in thread")


@pytest.mark.ray
def test_a_second_embedded_run_starts_beside_the_first_and_nothing_wrong_prints_no_error(stdlib_shards,
                                                                                         tmp_path):
    """Two users' embedded runs on one machine: the second starts on free ports (its own dashboard port; the
    dashboard agents on any free port, not Ray's default 52365) and finishes; neither console shows an
    error-level line (Ray's `E ...` log lines, a traceback) when nothing is wrong."""
    base = [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
            f"--data.path={stdlib_shards}",
            *FAST, "--cluster.launcher=ray", "--cluster.workers=1", "--checkpoint.every=0",
            "--train.log_every=2"]
    first = subprocess.Popen([*base, f"--train.run_dir={tmp_path / 'a'}", "--train.max_steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not metrics(tmp_path / "a") and first.poll() is None:
            time.sleep(1)
        assert metrics(tmp_path / "a"), first.communicate(timeout=60)[0][-3000:]
        agents = [" ".join(p.cmdline()) for p in psutil.Process(first.pid).children(recursive=True)
                  if any("dashboard/agent.py" in part for part in p.cmdline())]
        second = subprocess.run([*base, f"--train.run_dir={tmp_path / 'b'}", "--train.max_steps=4"],
                                capture_output=True, text=True, env=env(), timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)
        out_first = first.communicate(timeout=180)[0]
    out_second = second.stdout + second.stderr
    assert second.returncode == 0, out_second[-3000:]
    assert sorted(metrics(tmp_path / "b")) == [1, 2, 3, 4]
    ports = [re.search(r"dashboard http://127.0.0.1:(\d+)", out).group(1) for out in (out_first, out_second)]
    assert ports[0] != ports[1], ports
    # the first run's dashboard agent asked for any free port, not Ray's default 52365
    assert agents and all("--listen-port=0" in a for a in agents), agents
    for out in (out_first, out_second):
        assert not [line for line in out.splitlines() if RAY_ERROR_LINE.search(line)], out[-3000:]
