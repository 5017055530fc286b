"""Elastic training on real DeepSpeed (CPU, gloo) and real shards: a ZeRO checkpoint written by 2 workers
resumes on 1 and on 3 (DeepSpeed's universal checkpoint, converted once), with the same global batch, the same
losses, the optimizer state carried over and every sample seen once; SIGTERM (a preemption) to a worker or the
driver, local and under Ray, ends in a checkpoint at the next step boundary and an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from ctxtrain.data.loader import StreamingLoader
from tests.conftest import CONFIGS
from tests.helpers import FAST, env, metrics, train

pytestmark = pytest.mark.slow

# 12 windows per optimizer step: 2 workers x 6, 1 worker x 6 x 2 accumulated, 3 workers x 4 (lm_tiny narrowed,
# as everywhere: the conversion and the split do not depend on the width; these runs are 3 workers on 2 cores)
GLOBAL = ["--data.batch_size=6", "--train.global_batch=12", "--train.max_steps=20", "--checkpoint.every=5"]


def _copy_at_step_10(src, dst):
    shutil.copytree(src, dst)
    for later in (15, 20):
        shutil.rmtree(dst / "checkpoints" / f"step_{later:06d}", ignore_errors=True)
    return dst


def _max_diff(a: dict, b: dict, steps) -> float:
    return max(abs(a[s]["loss"] - b[s]["loss"]) for s in steps)


@pytest.fixture(scope="module")
def global12(tmp_path_factory, stdlib_shards):
    """Uninterrupted 2-worker runs with a global batch of 12, one per ZeRO stage (made when first asked for),
    with every 5th checkpoint kept: the references that the runs on other worker counts must follow."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp("global12") / f"zero{stage}"
            _, m = train(run_dir, stdlib_shards, *GLOBAL, f"--zero.stage={stage}",
                         "--checkpoint.keep_every=5")
            runs[stage] = (run_dir, m)
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_worker_count_continues_exactly(global12, stdlib_shards, tmp_path, stage):
    common = [*GLOBAL, f"--zero.stage={stage}", "--checkpoint.keep_every=5"]
    ref, whole = global12(stage)
    for workers in (1, 3):
        run = _copy_at_step_10(ref, tmp_path / f"on{workers}")
        proc, m = train(run, stdlib_shards, *common, f"--cluster.workers={workers}")
        assert "resumed from step_000010" in proc.stdout, proc.stdout
        assert (f"written by 2 workers, this run has {workers}: converted to the universal format; "
                f"micro-batch {6 if workers < 3 else 4} x accumulation {2 if workers == 1 else 1} per "
                "worker, global batch 12") in proc.stdout, proc.stdout
        assert sorted(m) == list(range(1, 21))
        assert _max_diff(m, whole, range(11, 21)) <= 1e-4, [(s, m[s]["loss"], whole[s]["loss"]) for s in m]
        assert m[20]["tokens"] == whole[20]["tokens"]
        meta = json.loads((run / "checkpoints" / "step_000020" / "meta.json").read_text())
        assert meta["world_size"] == workers and meta["global_batch"] == 12
        assert [c["consumed"] for c in meta["loader"]] == [240] * workers  # 20 steps x 12 windows
        assert (run / "checkpoints" / "step_000010" / "universal" / "COMMITTED").is_file()
    if stage != 3:
        return
    # The control that a reset optimizer must fail: Adam's moments in the cached conversion set to zero. The
    # conversion is reused (not redone), so this run resumes with the weights but fresh moments.
    control = _copy_at_step_10(tmp_path / "on1", tmp_path / "reset")
    zeroed = 0
    for path in (control / "checkpoints" / "step_000010" / "universal" / "zero").glob("*/exp_avg*.pt"):
        state = torch.load(path, weights_only=True)
        torch.save({**state, "param": torch.zeros_like(state["param"])} if isinstance(state, dict)
                   else torch.zeros_like(state), path)
        zeroed += 1
    assert zeroed > 10
    _, reset = train(control, stdlib_shards, *common, "--cluster.workers=1")
    assert abs(reset[11]["loss"] - whole[11]["loss"]) <= 1e-4  # the same weights at step 10
    assert _max_diff(reset, whole, range(12, 21)) > 1e-3  # but not the same updates without the moments


def test_every_window_is_read_once_across_a_change_of_worker_count(stdlib_shards):
    """Steps 1-10 on 2 workers (micro-batch 6), then steps 11-20 on 1 worker (6 x 2) and, separately, on 3
    (4): the windows read are exactly those of 20 uninterrupted steps on 2 workers, none twice. The cursor
    carries the layout of the run's first start (two partitions), as a checkpoint's does."""

    def units(world: int, batch: int, micro_steps: int, consumed: int) -> list[int]:
        out = []
        for rank in range(world):
            loader = StreamingLoader(stdlib_shards, split="train", seq_len=128, batch_size=batch, rank=rank,
                                     world_size=world, num_workers=0, seed=1234, shuffle_buffer=8192)
            loader.load_state_dict({**loader.state_dict(), "consumed": consumed, "partitions": 2})
            it = iter(loader)
            out += [int(u) for _ in range(micro_steps) for u in next(it)["unit"]]
        return out

    whole = units(2, 6, 20, 0)
    assert len(set(whole)) == 240
    first = units(2, 6, 10, 0)
    for world, batch, micro in ((1, 6, 20), (3, 4, 10)):
        after = units(world, batch, micro, 120)
        assert len(after) == 120 and not set(first) & set(after)
        assert sorted(first + after) == sorted(whole)


# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM ends the run at the next step boundary with a checkpoint; a resume continues exactly


def _start_train(run_dir, data, launcher: str, *extra: str,
                 extra_env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
           f"--train.run_dir={run_dir}",
           f"--data.path={data}", *FAST, f"--cluster.launcher={launcher}", "--train.max_steps=20",
           "--zero.stage=3",
           "--train.log_every=1", "--checkpoint.every=100", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(**(extra_env or {})), start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run_dir, step: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = max(metrics(run_dir), default=0)
        if done >= step:
            return done
        time.sleep(0.2)
    raise AssertionError(proc.communicate(timeout=60))


def _worker_pids(proc: subprocess.Popen, marker: str) -> list[int]:
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
            if marker in " ".join(p.cmdline())]


def _rank_of(pid: int) -> int:
    return int(psutil.Process(pid).environ().get("RANK", -1))


def test_sigterm_to_a_local_worker_or_the_driver_checkpoints_at_the_next_step_and_resumes_exactly(
        zero3_run, stdlib_shards, tmp_path):
    _, whole, _ = zero3_run
    run_dir = tmp_path / "preempted"
    # 1. SIGTERM to worker 1 (its node is reclaimed): the group checkpoints within two steps and exits 75
    proc = _start_train(run_dir, stdlib_shards, "local")
    seen = _wait_for_step(proc, run_dir, 4)
    worker = next(pid for pid in _worker_pids(proc, "ctxtrain.worker") if _rank_of(pid) == 1)
    os.kill(worker, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stop = max(metrics(run_dir))
    assert proc.returncode == 75, err[-3000:]
    assert seen <= stop <= seen + 3 and stop < 20, (seen, stop)
    assert f"stopped (preempted) at step {stop}" in out
    assert (f"ctxtrain: preempted (SIGTERM); newest committed checkpoint step_{stop:06d}; run the same "
            "command again to resume") in err
    assert (run_dir / "checkpoints" / f"step_{stop:06d}" / "COMMITTED").is_file()
    # 2. the same command resumes; SIGTERM to the driver this time (Slurm's --signal): the same, later
    proc = _start_train(run_dir, stdlib_shards, "local")
    seen = _wait_for_step(proc, run_dir, stop + 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and f"resumed from step_{stop:06d}" in out, err[-3000:]
    second = max(metrics(run_dir))
    assert seen <= second <= seen + 3 and second < 20, (seen, second)
    assert (run_dir / "checkpoints" / f"step_{second:06d}" / "COMMITTED").is_file()
    assert not (run_dir / "preempt.request").exists()
    # 3. and to the end: every step once, the uninterrupted run's losses
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3",
                    "--checkpoint.every=100")
    assert f"resumed from step_{second:06d}" in proc.stdout
    assert sorted(m) == list(range(1, 21))
    assert _max_diff(m, whole, range(1, 21)) <= 1e-6


@pytest.mark.ray
def test_sigterm_to_a_ray_worker_checkpoints_and_ray_resumes_the_group_exactly(zero3_run, stdlib_shards,
                                                                               tmp_path):
    """Under embedded Ray: the signalled worker's group checkpoints at the next step boundary, Ray restarts
    the group (a failure within cluster.max_failures), it resumes from that checkpoint and finishes."""
    _, whole, _ = zero3_run
    run_dir = tmp_path / "ray"
    proc = _start_train(run_dir, stdlib_shards, "ray")
    seen = _wait_for_step(proc, run_dir, 4)
    os.kill(_worker_pids(proc, "RayTrainWorker")[0], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out + err)[-4000:]
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and seen <= starts[1]["resumed_from"] <= seen + 3, (seen, starts)
    stop = starts[1]["resumed_from"]
    assert f"stopped (preempted) at step {stop}" in out
    assert (run_dir / "checkpoints" / f"step_{stop:06d}" / "COMMITTED").is_file()
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 21)) and m[20]["restarts"] == 1
    assert _max_diff(m, whole, range(1, 21)) <= 1e-6


# ---------------------------------------------------------------------------------------------------------
# An elastic range under Ray: a lost node, and the run goes on with the workers that remain


@pytest.mark.ray
def test_an_elastic_run_loses_a_node_and_finishes_on_the_workers_that_remain(two_node_cluster, global12,
                                                                             stdlib_shards, tmp_path):
    """cluster.workers=1..2 on two 1-CPU nodes: one node is lost at step 7; Ray Train restarts the group on
    the one worker that can still be placed; it resumes step_000005 (written by 2) on 1 worker, micro-batch 6
    x 2, and its losses are those of the uninterrupted 2-worker run (the same global batch)."""
    cluster, nodes = two_node_cluster
    common = [*GLOBAL, "--zero.stage=2", "--checkpoint.every=5"]
    _, whole = global12(2)
    run_dir = tmp_path / "elastic"
    # Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for the range's largest group before it
    # starts a smaller one; the driver passes it on to Ray Train's controller
    proc = _start_train(run_dir, stdlib_shards, "ray", *common, "--cluster.workers=1..2",
                        f"--cluster.address={cluster.address}",
                        extra_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"})
    _wait_for_step(proc, run_dir, 7)
    cluster.remove_node(nodes[1])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-4000:]
    assert "1..2 (elastic) workers" in out
    assert ("written by 2 workers, this run has 1: converted to the universal format; micro-batch 6 x "
            "accumulation 2 per worker, global batch 12") in out, out[-4000:]
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in starts] == [None, 5], starts
    meta = json.loads((run_dir / "checkpoints" / "step_000020" / "meta.json").read_text())
    assert meta["world_size"] == 1
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 21))
    assert _max_diff(m, whole, range(1, 21)) <= 1e-4, [(s, m[s]["loss"], whole[s]["loss"]) for s in m]
