"""The W&B run-file reader, the run-id choice across restarts, and the MFU/peak rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ctxtrain.metrics import mfu, peak_flops
from ctxtrain.tracking import choose_run_id, read_history


def _offline_run(tmp_path, run_id, steps, resume=False):
    code = f"""
import wandb
run = wandb.init(project="t", id={run_id!r}, dir={str(tmp_path)!r}, resume="allow", mode="offline",
                 settings=wandb.Settings(console="off", quiet=True))
for s in {list(steps)!r}:
    run.log({{"loss": 1.0 / s, "lr": 0.1}}, step=s)
run.finish()
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "WANDB_SILENT": "true"})


def test_read_history_across_process_starts_and_a_torn_tail(tmp_path):
    _offline_run(tmp_path, "run0001", range(1, 6))
    _offline_run(tmp_path, "run0001", range(6, 9))
    _offline_run(tmp_path, "other001", range(1, 3))
    history = read_history(tmp_path, "run0001")
    assert [s for s, _ in history] == list(range(1, 9))
    assert history[0][1]["loss"] == 1.0 and history[-1][1]["lr"] == 0.1
    # a writer killed mid-record leaves a torn tail: reading stops there instead of failing
    files = sorted(tmp_path.glob("wandb/offline-run-*run0001*/run-run0001.wandb"))
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) - 40])
    assert [s for s, _ in read_history(tmp_path, "run0001")][:5] == [1, 2, 3, 4, 5]


def test_run_id_survives_restarts_of_one_launch(tmp_path):
    first = choose_run_id(tmp_path, None, "launch-a")
    assert choose_run_id(tmp_path, None, "launch-a") == first  # Ray restart before any checkpoint
    assert choose_run_id(tmp_path, "fromckpt", "launch-b") == "fromckpt"  # resume: the checkpoint's id
    fresh = choose_run_id(tmp_path, None, "launch-c")  # a new launch without a checkpoint: a new run
    assert fresh not in (first, "fromckpt")
    assert json.loads((tmp_path / "tracker.json").read_text()) == {"run_id": fresh, "launch_id": "launch-c"}


def test_mfu_is_null_on_cpu_unless_a_peak_is_stated():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, None) is None and mfu(1e9, 1000.0, 2, None) is None
    assert peak_flops(cpu, 100.0) == 1e14
    assert mfu(6e9, 1e4, 2, 1e14) == pytest.approx(6e9 * 1e4 / 2e14)


@pytest.mark.gpu
def test_mfu_is_a_number_on_gpu():
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(device, None)
    assert peak is not None or not any(k in name for k in ("H100", "H200", "A100")), name
    assert mfu(1e9, 1e4, 1, peak_flops(device, 989.0)) > 0


def test_resume_resends_the_steps_wandb_lost(tmp_path):
    """W&B kept steps 1-3 of a run killed after its step-5 checkpoint: the resume sends 4-5 from
    metrics.jsonl, then 6 onwards; the history holds every step once."""
    _offline_run(tmp_path, "runlost1", range(1, 4))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s,
                                                                "loss": 1.0 / s}) + "\n"
                                                    for s in range(1, 8)))
    code = f"""
from pathlib import Path
from ctxtrain.config import load_config
from ctxtrain.tracking import WandbTracker
from ctxtrain.rundir import MetricsWriter
from ctxtrain.tracking import resend_lost_steps
run_dir = Path({str(tmp_path)!r})
tracker = WandbTracker(load_config(None, ["--tracking.mode=offline"]), "runlost1", run_dir)
assert tracker.last_step == 3, tracker.last_step
metrics = MetricsWriter(run_dir, resume_step=5)
resend_lost_steps(tracker, metrics)
for step in (6, 7):  # recomputed after the resume
    tracker.log({{"step": step, "loss": 1.0 / step}}, step)
tracker.finish()
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "WANDB_SILENT": "true"})
    history = read_history(tmp_path, "runlost1")
    assert [s for s, _ in history] == list(range(1, 8))
    assert [json.loads(line)["step"]
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_last_record_skips_a_line_being_written(tmp_path):
    from ctxtrain.rundir import last_record

    assert last_record(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, '
                                            '"lo')
    assert last_record(tmp_path) == {"step": 2, "loss": 1.5}
