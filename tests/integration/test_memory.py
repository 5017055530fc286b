"""The memory levers and the planner in real training runs (DeepSpeed on CPU, real shards): the levers give
the plain run's losses under ZeRO-3 on 2 workers, for both model kinds; the planner's prediction on the first
metrics line is within 15% of the measured peak RSS growth for configs of different lengths and levers."""

from __future__ import annotations

import json

import pytest

from tests.helpers import train

pytestmark = pytest.mark.slow

THREE_STEPS = ["--train.max_steps=3", "--checkpoint.every=0", "--zero.stage=3", "--cluster.workers=2"]


def assert_same_losses(a: dict, b: dict, steps=(1, 2, 3)):
    for step in steps:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * abs(b[step]["loss"]), (step, a[step]["loss"],
                                                                                       b[step]["loss"])


def test_lm_levers_keep_the_losses_under_zero3(stdlib_shards, tmp_path):
    _, plain = train(tmp_path / "plain", stdlib_shards, *THREE_STEPS, "--data.seq_len=256",
                     "--data.batch_size=2")
    _, chunked = train(tmp_path / "levers", stdlib_shards, *THREE_STEPS, "--data.seq_len=256",
                       "--data.batch_size=2",
                       "--memory.checkpoint=selective", "--memory.loss_chunk=96", "--memory.mlp_chunk=80")
    assert_same_losses(chunked, plain)


def test_encoder_decoder_levers_keep_the_losses_under_zero3(en_fr_shards, tmp_path):
    common = [*THREE_STEPS, "--model.vocab_size=4096", "--model.dropout=0", "--data.batch_size=8"]
    _, plain = train(tmp_path / "plain", en_fr_shards, *common, config="translate_tiny.yaml")
    _, chunked = train(tmp_path / "levers", en_fr_shards, *common, "--memory.checkpoint=offload",
                       "--memory.loss_chunk=64", "--memory.mlp_chunk=48", config="translate_tiny.yaml")
    assert_same_losses(chunked, plain)


# One worker, so that the measured growth is one worker's; a 32k vocabulary, as in bench/longseq.py, so that
# the loss matters. Lengths and levers differ; each run is two steps (the optimizer's state exists from step 1
# on).
PLANNED = {
    "2k-plain-zero0": ["--data.seq_len=2048", "--zero.stage=0"],
    "6k-full-chunks-zero0": ["--data.seq_len=6144", "--zero.stage=0", "--memory.checkpoint=full",
                             "--memory.loss_chunk=1024", "--memory.mlp_chunk=1024"],
    "4k-selective-loss-zero3": ["--data.seq_len=4096", "--zero.stage=3", "--memory.checkpoint=selective",
                                "--memory.loss_chunk=2048"],
}


@pytest.mark.parametrize("name", list(PLANNED))
def test_planner_predicts_the_measured_peak(stdlib_shards, tmp_path, name):
    run_dir = tmp_path / name
    _, m = train(run_dir, stdlib_shards, "--cluster.workers=1", "--data.batch_size=1",
                 "--model.vocab_size=32000",
                 "--data.num_workers=0", "--train.max_steps=2", "--checkpoint.every=0",
                 "--train.eval_batches=1",
                 *PLANNED[name], narrow=False)
    predicted = m[1]["mem_predicted_bytes"]
    measured = max(m[s]["mem_peak_bytes"] for s in m)  # peak RSS growth of the worker over the run
    assert abs(predicted - measured) <= 0.15 * measured, (name, predicted / 2**20, measured / 2**20)
    assert all("mem_predicted_bytes" not in m[s] for s in m if s != 1)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["mem_predicted_bytes"] == predicted
