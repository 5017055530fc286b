"""Elastic training on real DeepSpeed (CPU, gloo) and real shards: a ZeRO checkpoint written by 2 workers
resumes on 1 and on 3 (DeepSpeed's universal checkpoint, converted once), with the same global batch, the same
losses, the optimizer state carried over and every sample seen once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctxtrain.data.loader import StreamingLoader
from tests.helpers import train

pytestmark = pytest.mark.slow

# 12 windows per optimizer step: 2 workers x 6, 1 worker x 6 x 2 accumulated, 3 workers x 4
GLOBAL = ["--data.batch_size=6", "--train.global_batch=12", "--train.max_steps=20", "--checkpoint.every=10"]


def _copy_at_step_10(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_000020")
    return dst


def _max_diff(a: dict, b: dict, steps) -> float:
    return max(abs(a[s]["loss"] - b[s]["loss"]) for s in steps)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_worker_count_continues_exactly(stdlib_shards, tmp_path, stage):
    common = [*GLOBAL, f"--zero.stage={stage}"]
    ref = tmp_path / "ref"
    _, whole = train(ref, stdlib_shards, *common)  # 2 workers, uninterrupted
    for workers in (1, 3):
        run = _copy_at_step_10(ref, tmp_path / f"on{workers}")
        proc, m = train(run, stdlib_shards, *common, f"--cluster.workers={workers}")
        assert "resumed from step_000010" in proc.stdout, proc.stdout
        assert (f"written by 2 workers, this run has {workers}: converted to the universal format; micro-batch "
                f"{12 // max(2, workers) if workers > 1 else 6} x accumulation {2 if workers == 1 else 1} per "
                "worker, global batch 12") in proc.stdout, proc.stdout
        assert sorted(m) == list(range(1, 21))
        assert _max_diff(m, whole, range(11, 21)) <= 1e-4, [(s, m[s]["loss"], whole[s]["loss"]) for s in m]
        assert m[20]["tokens"] == whole[20]["tokens"]
        meta = json.loads((run / "checkpoints" / "step_000020" / "meta.json").read_text())
        assert meta["world_size"] == workers and meta["global_batch"] == 12
        assert [c["consumed"] for c in meta["loader"]] == [240] * workers  # 20 steps x 12 windows
        assert (run / "checkpoints" / "step_000010" / "universal" / "COMMITTED").is_file()

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
    """Steps 1-10 on 2 workers (micro-batch 6), then steps 11-20 on 1 worker (6 x 2) and, separately, on 3 (4):
    the windows read are exactly those of 20 uninterrupted steps on 2 workers, none twice."""

    def units(world: int, batch: int, micro_steps: int, consumed: int) -> list[int]:
        out = []
        for rank in range(world):
            loader = StreamingLoader(stdlib_shards, split="train", seq_len=128, batch_size=batch, rank=rank,
                                     world_size=world, num_workers=0, seed=1234, shuffle_buffer=8192)
            loader.load_state_dict({**loader.state_dict(), "consumed": consumed})
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
