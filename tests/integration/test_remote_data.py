"""Shards from object storage and HTTP: a real S3-protocol server (moto) and Python's HTTP server, both on
127.0.0.1, serve prepared shards to 2-worker training runs that read them through the node cache and train
the model a local data.path trains."""

from __future__ import annotations

import json

import pytest

from tests.helpers import S3_ENV, http_url, train, upload_to_s3

pytestmark = pytest.mark.slow

STEPS = ["--train.max_steps=8", "--checkpoint.every=4", "--train.log_every=1"]


def test_shards_from_s3_train_as_local_ones_and_resume_exactly_after_a_kill(stdlib_shards, tmp_path):
    uri = upload_to_s3(stdlib_shards, "resume/stdlib")
    cache = tmp_path / "cache"
    _, local = train(tmp_path / "local", stdlib_shards, *STEPS)
    common = [*STEPS, f"--data.cache_dir={cache}"]
    proc, m = train(tmp_path / "s3", uri, *common, "--fault.kill_rank=1", "--fault.at_step=6", check=False,
                    extra_env=S3_ENV)
    assert proc.returncode != 0 and max(m) < 8
    proc, m = train(tmp_path / "s3", uri, *common, extra_env=S3_ENV)
    assert "resumed from step_000004" in proc.stdout
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step once
    assert all(abs(m[s]["loss"] - local[s]["loss"]) <= 1e-6 * local[s]["loss"] for s in range(1, 9))
    # what the runs read sits in the node's cache, as the store holds it
    (node,) = cache.iterdir()
    fetched = sorted(p.name for p in node.glob("*.tar"))
    assert fetched and all((node / n).read_bytes() == (stdlib_shards / n).read_bytes() for n in fetched)
    assert (node / "tokenizer.json").read_bytes() == (stdlib_shards / "tokenizer.json").read_bytes()


def test_shards_over_http_through_a_server_that_fails_each_first_request(stdlib_shards, tmp_path):
    """Every object's first GET answers 503: the fetches are retried and the run trains as on local data;
    killed at step 5, it resumes from its checkpoint of step 3 and trains each step once, the local run's
    losses."""
    url = f"{http_url(stdlib_shards.parent, flaky=True)}/{stdlib_shards.name}"
    short = ["--train.max_steps=6", "--train.log_every=1", "--checkpoint.every=3"]
    _, local = train(tmp_path / "local", stdlib_shards, *short)
    common = [*short, f"--data.cache_dir={tmp_path / 'cache'}"]
    proc, m = train(tmp_path / "http", url, *common, "--fault.kill_rank=1", "--fault.at_step=5", check=False)
    assert proc.returncode != 0 and max(m) < 6
    proc, m = train(tmp_path / "http", url, *common)
    assert "resumed from step_000003" in proc.stdout
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "http" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # each step once
    assert [m[s]["loss"] for s in range(1, 7)] == [local[s]["loss"] for s in range(1, 7)]


def test_prepare_writes_into_a_bucket_what_it_writes_into_a_directory(email_pkg_files, tmp_path):
    """`prepare --out s3://...`: the same bytes as a local --out (index.json uploaded last), read back by the
    loader's Dataset; a second prepare to the same prefix needs --overwrite."""
    from ctxtrain.data.dataset import Dataset
    from ctxtrain.data.remote import CacheSettings
    from ctxtrain.storage import ObjectStore
    from tests.helpers import ctxtrain, s3_uri

    uri = s3_uri("prepared/email")
    ObjectStore(uri.replace("?", "?allow_bucket_creation=true&"), "test").fs.create_dir("ctxtrain-test")
    args = ["prepare", "--input", *map(str, email_pkg_files), "--vocab-size", "512", "--shard-size", "64KB"]
    local = ctxtrain(*args, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    remote = ctxtrain(*args, "--out", uri)
    assert remote.returncode == 0 and "uploaded" in remote.stderr, remote.stderr
    ds = Dataset(uri, CacheSettings(dir=str(tmp_path / "cache")))
    shards = ds.shards("train")
    assert len(shards) > 1
    for shard in shards:
        assert shard.local().read_bytes() == (tmp_path / "local" / shard.name).read_bytes()
    again = ctxtrain(*args, "--out", uri)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def _epoch_bytes(data, tmp_path, world: int, partitions=None, sp: int = 1) -> float:
    """One epoch read by `world` workers' loaders, each with a cache of its own (nodes that share none), in
    data-parallel groups of `sp` (each worker's loader as training makes it: its group's cursor, read by the
    group's first rank): the bytes the HTTP server sent for train shards, over the train shards' bytes."""
    from ctxtrain.data.dataset import Dataset
    from ctxtrain.data.loader import StreamingLoader
    from ctxtrain.data.remote import CacheSettings

    served: dict = {}
    url = f"{http_url(data.parent, served=served)}/{data.name}"
    units, cursors = [], set()
    for rank in range(world):
        loader = StreamingLoader(url, seq_len=64, batch_size=4, rank=rank // sp, world_size=world // sp,
                                 seed=3, shuffle_buffer=256, loop=False, partitions=partitions,
                                 reads=rank % sp == 0,
                                 cache=CacheSettings(dir=str(tmp_path / f"{partitions}-{sp}-{rank}")))
        units += [int(u) for b in loader for u in b["unit"] if u >= 0]
        cursors.add(json.dumps(loader.state_dict()))
    assert len(cursors) == 1  # every worker's cursor at the end of the epoch, readers' and followers'
    assert len(units) == len(set(units)) > 0.95 * loader.n_units  # an epoch, each unit once
    total = sum(s.bytes for s in Dataset(data).shards("train"))
    return sum(n for path, n in served.items() if "/train-" in path) / total


def test_each_shard_is_fetched_about_once_per_epoch_across_four_ranks(many_shards, tmp_path):
    """Four ranks, no shared cache: each reads its own partition of the stream, so the store serves the train
    shards about once (those at a partition's edge twice); one partition for all (every rank reading the
    whole stream, as before partitions) costs about four times that."""
    assert len(list(many_shards.glob("train-*.tar"))) >= 40
    assert _epoch_bytes(many_shards, tmp_path, 4) <= 1.1
    assert _epoch_bytes(many_shards, tmp_path, 4, partitions=1) >= 3.5


def test_a_sequence_parallel_group_reads_its_windows_once(many_shards, tmp_path):
    """Four workers in two sp=2 groups, no shared cache: the first rank of a group reads, the other keeps the
    cursor (training broadcasts the windows: tests/integration/test_sequence_parallel.py), so the store serves
    the shards about once, as two ranks without sp read them."""
    assert _epoch_bytes(many_shards, tmp_path, 4, sp=2) <= 1.1


def test_a_resume_from_two_ranks_on_three_reads_every_unit_of_the_epoch_once(many_shards, tmp_path):
    """Remote shards, two ranks for 6 steps, then three ranks from the cursor (which keeps the two
    partitions): every unit of the epoch once across the change, as one uninterrupted two-rank epoch reads
    them."""
    from ctxtrain.data.loader import StreamingLoader
    from ctxtrain.data.remote import CacheSettings

    url = f"{http_url(many_shards.parent)}/{many_shards.name}"

    def read(world: int, batch: int, state: dict | None, steps: int | None) -> tuple[list[int], dict]:
        units, cursor = [], None
        for rank in range(world):
            loader = StreamingLoader(url, seq_len=64, batch_size=batch, rank=rank, world_size=world, seed=3,
                                     shuffle_buffer=256, loop=False,
                                     cache=CacheSettings(dir=str(tmp_path / f"w{world}-r{rank}")))
            if state is not None:
                loader.load_state_dict(state)
            for i, b in enumerate(loader):
                units += [int(u) for u in b["unit"]]
                if steps is not None and i + 1 == steps:
                    break
            cursor = loader.state_dict()
        return units, cursor

    whole, _ = read(2, 6, None, None)
    first, cursor = read(2, 6, None, 6)
    assert cursor["consumed"] == 72 and cursor["partitions"] == 2
    rest, _ = read(3, 4, cursor, None)
    assert not set(first) & set(rest) and len(first + rest) == len(set(first + rest))
    assert sorted(first + rest) == sorted(whole)
