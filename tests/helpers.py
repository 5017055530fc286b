"""Running `ctxtrain` as a user does (a subprocess of the real CLI) and reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CONFIGS, REPO

# Small windows and batches, and W&B and TensorBoard off where a test does not look at them (house style 6;
# they cost ~4 s and ~1 s a run here). The tests that look at them turn them on.
BASE = ["--data.batch_size=4", "--data.seq_len=128", "--train.eval_every=0", "--train.eval_batches=2",
        "--train.log_every=5", "--cluster.workers=2", "--train.dtype=fp32", "--tracking.enabled=false",
        "--tracking.tensorboard=false"]
# lm_tiny narrowed: its layers and code paths (RoPE, RMSNorm, SwiGLU, the 8k vocabulary), 64 wide and 2 deep,
# a step ~0.2 s instead of ~0.7 s; a shorter warmup so that 20 steps still learn. Memory tests train the full
# width.
NARROW = ["--model.d_model=64", "--model.d_ff=128", "--model.n_layers=2", "--optim.warmup_steps=5"]
FAST = [*BASE, *NARROW]


def env(**extra: str) -> dict:
    # The checkout's own source first: a test runs the code beside it, whatever else is installed.
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", **extra}


def ctxtrain(*args: str, timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxtrain", *args], capture_output=True, text=True,
                          env=env(**(extra_env or {})), timeout=timeout)


def train(run_dir: Path, data: Path, *overrides: str, config: str = "lm_tiny.yaml", check: bool = True,
          launcher: str = "local", extra_env: dict | None = None, narrow: bool = True):
    """`ctxtrain train` on real shards; returns (completed process, metrics lines by step). narrow=False keeps
    the config's own width (a memory measurement)."""
    proc = ctxtrain("train", str(CONFIGS / config), f"--train.run_dir={run_dir}", f"--data.path={data}",
                    *(FAST if narrow else BASE), f"--cluster.launcher={launcher}", *overrides,
                    extra_env=extra_env)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, metrics(run_dir)


def metrics(run_dir: Path) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "starts.jsonl").read_text().splitlines()]
