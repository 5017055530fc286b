"""Shared test setup: repository paths, CPU-only DeepSpeed, small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ctxtrain.devices import cpu_only_env

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ASSETS = REPO / "tests" / "assets"

for _name, _value in cpu_only_env().items():  # DS_ACCELERATOR=cpu, only where there is no CUDA device
    os.environ.setdefault(_name, _value)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------------------------
# Prepared datasets, made once per test session from real text


def _prepare(out, **kw):
    from ctxtrain.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(out=str(out), progress=False, **kw))
    return out


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory):
    """The whole Python standard library, prepared as by the quick start, in ~2 MB shards (several shards)."""
    return _prepare(tmp_path_factory.mktemp("data") / "stdlib", recipe="stdlib", shard_size="2MB")


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory):
    """120 files of the standard library in ~40 small shards: the edges of four ranks' spans are a few."""
    from ctxtrain.data.corpora import stdlib_files

    out = tmp_path_factory.mktemp("data") / "many"
    return _prepare(out, inputs=[str(f) for f in stdlib_files()[:120]], vocab_size=512, shard_size="16KB")


@pytest.fixture(scope="session")
def email_pkg_files():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"]) / "email"
    return [str(p) for p in sorted(root.rglob("*.py"))]


@pytest.fixture(scope="session")
def four_shard_lm(tmp_path_factory, email_pkg_files):
    """The stdlib's email package in exactly four train shards (sized from a one-shard run)."""
    base = tmp_path_factory.mktemp("data")
    one = _prepare(base / "one", inputs=email_pkg_files, vocab_size=2048, shard_size="1GB", val_fraction=0.05)
    import json

    total = json.loads((one / "index.json").read_text())["splits"]["train"]["shards"][0]["bytes"]
    for divisor in [3 + i / 4 for i in range(17)]:
        out = _prepare(base / f"four-{divisor}", inputs=email_pkg_files, vocab_size=2048,
                       shard_size=str(int(total / divisor)), val_fraction=0.05)
        if len(json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]) == 4:
            return out
    raise AssertionError("could not size the email package into four shards")


@pytest.fixture(scope="session")
def one_shard_lm(tmp_path_factory, email_pkg_files):
    return _prepare(tmp_path_factory.mktemp("data") / "one", inputs=email_pkg_files, vocab_size=2048,
                    shard_size="1GB", val_fraction=0.05)


@pytest.fixture(scope="session")
def short_docs_lm(tmp_path_factory, email_pkg_files):
    """The email package cut at its blank lines into ~1,400 short documents (tens of tokens each, a JSONL
    record each): a window of 128 tokens holds several, for tests of data.doc_mask."""
    import json

    base = tmp_path_factory.mktemp("data")
    parts = [p.strip() for f in email_pkg_files for p in Path(f).read_text().split("\n\n") if p.strip()]
    jsonl = base / "paragraphs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in parts))
    return _prepare(base / "short", inputs=[str(jsonl)], vocab_size=2048, shard_size="1GB", val_fraction=0.05)


@pytest.fixture(scope="session")
def en_fr_shards(tmp_path_factory):
    """The committed English->French slice, in a few shards."""
    return _prepare(tmp_path_factory.mktemp("data") / "en_fr", inputs=[str(ASSETS / "en_fr_slice.tsv")],
                    vocab_size=4096, shard_size="64kB", src_lang="en", tgt_lang="fr", val_fraction=0.05)


@pytest.fixture(scope="session")
def encdec_run(tmp_path_factory, en_fr_shards):
    """A small encoder-decoder (translate_tiny narrowed) trained 150 steps (~25 s) on the committed en->fr
    slice with 2 local workers, ZeRO-3, a checkpoint at the end: what translate/eval read (after 30 steps it
    still answers every sentence with <eos>), and the reference curve's run (its first 30 losses). It scores
    val_bleu every 50 steps (32 pairs): the curve also shows that scoring leaves training alone."""
    from tests.helpers import train

    run_dir = tmp_path_factory.mktemp("runs") / "encdec"
    train(run_dir, en_fr_shards, *ENCDEC_SMALL, *ENCDEC_BLEU, "--zero.stage=3", config="translate_tiny.yaml")
    return run_dir


ENCDEC_SMALL = ["--train.max_steps=150", "--checkpoint.every=150", "--data.batch_size=16",
                "--model.d_model=64",
                "--model.n_layers=2", "--model.d_ff=128", "--data.max_src_len=48", "--data.max_tgt_len=48",
                "--model.vocab_size=4096", "--optim.lr=3e-3", "--optim.warmup_steps=10"]
ENCDEC_BLEU = ["--train.bleu_every=50", "--train.bleu_pairs=32"]


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, stdlib_shards):
    """The reference run: 20 uninterrupted ZeRO-3 steps of lm_tiny (narrowed) on 2 local workers, a checkpoint
    every 5 (keeping the last 2 and every 10th), W&B (offline) and TensorBoard on as a user's run has them.
    Runs with faults must reproduce its losses."""
    from tests.helpers import train

    run_dir = tmp_path_factory.mktemp("runs") / "zero3"
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5",
                    "--checkpoint.keep_last=2", "--checkpoint.keep_every=10", "--tracking.enabled=true",
                    "--tracking.tensorboard=true")
    return run_dir, m, proc


@pytest.fixture
def two_node_cluster():
    """ray.cluster_utils.Cluster: a head with no CPUs and two 1-CPU nodes, so 2 workers need both nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, nodes
    cluster.shutdown()
