"""Data: real corpora into WebDataset shards, and the streaming loader's exactly-once, resumable cursor."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ctxtrain.data.loader import DataError, Dataset, StreamingLoader, padding_ratio, read_stream_tokens
from ctxtrain.data.shards import iter_shard
from ctxtrain.data.tokenizer import load_tokenizer
from tests.conftest import ASSETS, _prepare

L = 64  # short windows keep the exactness checks quick; the code paths are the same at any length


# ---------------------------------------------------------------------------------------------------------
# prepare


def _index(path: Path) -> dict:
    return json.loads((path / "index.json").read_text())


@pytest.mark.parametrize("name", ["stdlib_shards", "en_fr_shards"])
def test_prepared_shards_are_valid_tars_with_matching_index(name, request):
    path = request.getfixturevalue(name)
    index = _index(path)
    assert index["dtype"] == "uint16"
    for split in ("train", "val"):
        assert index["splits"][split]["shards"], split
        for shard in index["splits"][split]["shards"]:
            tar_path = path / shard["name"]
            # plain `tar` reads it
            listing = subprocess.run(["tar", "-tf", str(tar_path)], capture_output=True, text=True,
                                     check=True)
            members = listing.stdout.split()
            # tokens in the tar (read with tarfile + numpy) match index.json
            tokens, docs = 0, set()
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    tokens += np.load(io.BytesIO(tar.extractfile(m).read())).size
                    docs.add(m.name.split(".")[0])
            assert (tokens, len(docs)) == (shard["tokens"], shard["docs"])
            assert len(members) == shard["docs"] * (1 if index["task"] == "lm" else 2)
            # webdataset reads it
            samples = list(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False))
            assert len(samples) == shard["docs"]
            assert tar_path.stat().st_size == shard["bytes"]
    assert len(index["splits"]["train"]["shards"]) > 1


def test_tokenizer_round_trips_text(stdlib_shards, en_fr_shards):
    tok = load_tokenizer(stdlib_shards / "tokenizer.json")
    text = Path(json.__file__).read_text()
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    fr = load_tokenizer(en_fr_shards / "tokenizer.json")
    sample = "Éditer l'affichage 3D — « déjà » ; œuvre"
    assert fr.decode(fr.encode(sample).ids) == sample
    assert fr.token_to_id("<2fr>") == _index(en_fr_shards)["special"]["lang_tag"]


def test_a_vocabulary_past_65536_ids_is_kept_in_uint32(tmp_path, one_shard_lm):
    """A pretrained tokenizer with more than 65,536 ids (Llama 3: 128k): `prepare --tokenizer` writes uint32
    ids and the loader reads the ids past 65,535 back as they were."""
    tok = load_tokenizer(one_shard_lm / "tokenizer.json")
    words = [f"zq{i}x" for i in range(70_000)]
    tok.add_tokens(words)
    assert tok.get_vocab_size() > 70_000
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(words[-200:]) + " plain text"
    (tmp_path / "doc.txt").write_text(text)
    data = _prepare(tmp_path / "wide", inputs=[str(tmp_path / "doc.txt")],
                    tokenizer=str(tmp_path / "tokenizer.json"),
                    val_fraction=0.0)
    assert _index(data)["dtype"] == "uint32"
    ids = tok.encode(text).ids
    assert max(ids) > 65_535
    stream = read_stream_tokens(StreamingLoader(data, seq_len=8, shuffle=False), 0)
    assert stream.tolist() == ids + [_index(data)["special"]["eos"]]


def test_prepare_is_deterministic(tmp_path, email_pkg_files):
    a = _prepare(tmp_path / "a", inputs=email_pkg_files, vocab_size=1024, shard_size="50kB")
    b = _prepare(tmp_path / "b", inputs=email_pkg_files, vocab_size=1024, shard_size="50kB")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) > 4
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_val_split_is_by_document(stdlib_shards):
    def docs(split):
        seen = set()
        for shard in Dataset(stdlib_shards).shards(split):
            with tarfile.open(shard.path) as tar:
                for m in tar:
                    seen.add(tar.extractfile(m).read())
        return seen

    train, val = docs("train"), docs("val")
    assert val and not (train & val)


def test_val_share_is_a_fraction_of_the_documents_whatever_the_files(tmp_path):
    """--val-fraction holds out that share of the documents: one JSONL file of 100 documents and the same 100
    in two files both give 10 val documents (it was decided per file: 0 and 50). A corpus too small to hold
    any out says so on stderr."""
    text = Path(json.__file__).read_text()
    docs = [json.dumps({"text": f"document {i}: " + text[i * 40:(i + 1) * 40]}) for i in range(100)]
    (tmp_path / "one.jsonl").write_text("\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(docs[:50]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(docs[50:]) + "\n")
    for name, inputs in (("one", ["one.jsonl"]), ("two", ["a.jsonl", "b.jsonl"])):
        out = _prepare(tmp_path / name, inputs=[str(tmp_path / f) for f in inputs], vocab_size=300,
                       val_fraction=0.1)
        splits = _index(out)["splits"]
        assert (splits["val"]["docs"], splits["train"]["docs"]) == (10, 90), name
    (tmp_path / "single.jsonl").write_text(docs[0] + "\n")
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "prepare", "--input",
                        str(tmp_path / "single.jsonl"),
                        "--out", str(tmp_path / "single"), "--vocab-size", "300", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "no val split" in line]
    assert len(warning) == 1 and "evaluation" in warning[0], r.stderr


def test_prepare_cli_translation_and_jsonl(tmp_path):
    out = tmp_path / "pairs"
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "prepare", "--input",
                        str(ASSETS / "en_fr_slice.tsv"),
                        "--out", str(out), "--vocab-size", "2048", "--tgt-lang", "fr", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and _index(out)["task"] == "translation"
    # JSONL with a text field is an LM corpus
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": Path(json.__file__).read_text()[i::7]}) for i in range(7)))
    _prepare(tmp_path / "lm", inputs=[str(jsonl)], vocab_size=512)
    assert _index(tmp_path / "lm")["task"] == "lm"
    # An existing output is not overwritten without --overwrite, and stays intact
    before = (out / "index.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "prepare", "--input", str(jsonl), "--out",
                        str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert (out / "index.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# The loader: every unit exactly once, equal batches per rank, exact resume on any world size


def _read(path, world, workers, *, batch=4, state=None, limit=None, **kw):
    """Iterate every rank of a (simulated) world; returns per-rank lists of batches and final states."""
    per_rank, states = [], []
    for rank in range(world):
        loader = StreamingLoader(path, seq_len=L, batch_size=batch, rank=rank, world_size=world,
                                 num_workers=workers, seed=7, loop=False, **{"shuffle_buffer": 16, **kw})
        if state is not None:
            loader.load_state_dict(state)
        got = []
        for b in loader:
            got.append(b)
            if limit is not None and len(got) == limit:
                break
        per_rank.append(got)
        states.append(loader.state_dict())
    return per_rank, states


def _units(per_rank) -> np.ndarray:
    return np.concatenate([b["unit"].numpy() for got in per_rank for b in got])


def _check_windows(path, per_rank):
    """Each window holds exactly the stream tokens of its unit (stream read independently with tarfile)."""
    ref = read_stream_tokens(StreamingLoader(path, seq_len=L, seed=7), epoch=0)
    for got in per_rank:
        for b in got:
            for row, u in zip(b["tokens"].numpy(), b["unit"].numpy()):
                np.testing.assert_array_equal(row, ref[u * L : u * L + L + 1])


@pytest.mark.parametrize(
    "fixture, world, workers",
    [("stdlib_shards", 2, 2), ("four_shard_lm", 3, 1), ("one_shard_lm", 2, 2)],
    ids=["2ranks-x-2workers", "3ranks-over-4shards", "1shard-over-2x2"],
)
def test_epoch_sees_every_window_once(fixture, world, workers, request):
    path = request.getfixturevalue(fixture)
    if fixture == "four_shard_lm":
        assert len(Dataset(path).shards("train")) == 4
    if fixture == "one_shard_lm":
        assert len(Dataset(path).shards("train")) == 1
    per_rank, _ = _read(path, world, workers)
    counts = {len(got) for got in per_rank}
    assert len(counts) == 1, f"ranks yield different batch counts: {counts}"
    units = _units(per_rank)
    n_units = StreamingLoader(path, seq_len=L).n_units
    assert len(np.unique(units)) == len(units)  # nothing twice
    assert n_units - len(units) < 4 * world  # only a remainder smaller than one global batch is left
    _check_windows(path, per_rank)
    # The stream itself covers every token of the split: documents + EOS, in the epoch's shard order.
    ds = Dataset(path)
    assert len(read_stream_tokens(StreamingLoader(path, seq_len=L, seed=7), 0)) == sum(
        s.tokens + s.docs for s in ds.shards("train"))


def test_windows_carry_their_documents(short_docs_lm):
    """data.doc_mask: each window comes with its documents' ids (the next one starts after each EOS) and, with
    data.doc_positions, each token's place in its document; 2 loader workers, as training reads."""
    eos = Dataset(short_docs_lm).special["eos"]
    loader = StreamingLoader(short_docs_lm, seq_len=L, batch_size=4, num_workers=2, documents="positions")
    boundaries = 0
    for i, b in zip(range(40), loader):
        tokens, docs, positions = (b[k].numpy() for k in ("tokens", "docs", "positions"))
        assert docs.shape == positions.shape == tokens.shape == (4, L + 1)
        np.testing.assert_array_equal(docs[:, 0], 0)
        # a new document after EOS
        np.testing.assert_array_equal(np.diff(docs, axis=1), tokens[:, :-1] == eos)
        starts = np.concatenate([np.ones((4, 1), bool), np.diff(docs, axis=1) == 1], axis=1)
        np.testing.assert_array_equal(positions == 0, starts)
        np.testing.assert_array_equal(positions[:, 1:][~starts[:, 1:]], positions[:, :-1][~starts[:, 1:]] + 1)
        boundaries += int(starts[:, 1:].sum())
    assert boundaries > 100  # short documents: many in every window
    # the same windows as without documents
    plain = StreamingLoader(short_docs_lm, seq_len=L, batch_size=4, num_workers=2)
    for (a, b), _ in zip(zip(plain, StreamingLoader(short_docs_lm, seq_len=L, batch_size=4, documents="ids")),
                         range(10)):
        np.testing.assert_array_equal(a["tokens"].numpy(), b["tokens"].numpy())
        assert "positions" not in b and "docs" not in a


def test_order_is_a_seeded_permutation(four_shard_lm):
    a, _ = _read(four_shard_lm, 1, 0, limit=30)
    b, _ = _read(four_shard_lm, 1, 0, limit=30)
    assert np.array_equal(_units(a), _units(b))
    other = StreamingLoader(four_shard_lm, seq_len=L, batch_size=4, seed=8, shuffle_buffer=16, loop=False)
    units_other = np.concatenate([next(iter(other))["unit"].numpy()])
    assert not np.array_equal(_units(a)[:4], units_other)
    assert not np.array_equal(np.sort(_units(a)), _units(a))  # shuffled, not stream order


@pytest.mark.parametrize(
    "fixture, before, after",
    [
        ("stdlib_shards", (2, 2), (2, 2)),  # same world
        ("stdlib_shards", (2, 2), (3, 1)),  # more ranks, fewer workers
        ("four_shard_lm", (3, 1), (1, 2)),  # fewer ranks
        ("one_shard_lm", (2, 2), (4, 0)),
    ],
)
def test_resume_continues_exactly(fixture, before, after, request):
    path = request.getfixturevalue(fixture)
    k = 5
    first, states = _read(path, *before, limit=k)
    assert all(s == states[0] for s in states)  # every rank's cursor is the same global position
    assert states[0]["consumed"] == k * 4 * before[0]
    rest, _ = _read(path, *after, state=states[0])
    units = np.concatenate([_units(first), _units(rest)])
    n_units = StreamingLoader(path, seq_len=L).n_units
    assert len(np.unique(units)) == len(units)
    assert n_units - len(units) < 4 * max(before[0], after[0])
    _check_windows(path, first + rest)
    # ... and what comes next is exactly what an uninterrupted reader (same world) would have produced.
    if before == after:
        whole, _ = _read(path, *before)
        assert np.array_equal(np.sort(_units(whole)), np.sort(units))
        for r in range(before[0]):
            assert [b["unit"].tolist() for b in whole[r][k:]] == [b["unit"].tolist() for b in rest[r]]


def test_training_loader_runs_epochs_and_counts_remainder(one_shard_lm):
    loader = StreamingLoader(one_shard_lm, seq_len=L, batch_size=4, num_workers=2, seed=7)
    per_epoch = loader.batches_per_epoch()
    seen = []
    for i, b in enumerate(loader):
        seen.append((loader.epoch, b["unit"].numpy()))
        if i == 2 * per_epoch + 3:
            break
    assert loader.stats["epochs_done"] == 2
    assert loader.stats["dropped_units"] == 2 * (loader.n_units - per_epoch * 4)
    epoch0 = np.concatenate([u for e, u in seen[:per_epoch]])
    epoch1 = np.concatenate([u for e, u in seen[per_epoch : 2 * per_epoch]])
    assert len(np.unique(epoch0)) == len(np.unique(epoch1)) == per_epoch * 4
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch


def test_translation_pairs_once_and_padded(en_fr_shards):
    per_rank, _ = _read(en_fr_shards, 2, 2, batch=8)
    assert len({len(g) for g in per_rank}) == 1
    units = _units(per_rank)
    n = StreamingLoader(en_fr_shards).n_units
    assert len(np.unique(units)) == len(units) and n - len(units) < 16
    ds = Dataset(en_fr_shards)
    tag, bos, eos, pad = ds.special["lang_tag"], ds.special["bos"], ds.special["eos"], ds.special["pad"]
    b = per_rank[0][0]
    assert (b["src"][:, 0] == tag).all() and (b["tgt"][:, 0] == bos).all()
    for i in range(b["src"].shape[0]):
        n_src, n_tgt = int(b["src_mask"][i].sum()), int(b["tgt_mask"][i].sum())
        assert b["src"][i, n_src - 1] == eos and (b["src"][i, n_src:] == pad).all()
        assert b["targets"][i, n_tgt - 1] == eos and (b["targets"][i, n_tgt:] == -100).all()
        assert (b["targets"][i, : n_tgt - 1] == b["tgt"][i, 1:n_tgt]).all()  # teacher forcing: shifted by one


def test_prepare_records_each_pairs_lengths(en_fr_shards):
    ds = Dataset(en_fr_shards)
    for shard in ds.shards("train")[:3]:
        pairs = list(iter_shard(shard, ds.dtype, ("src.npy", "tgt.npy")))
        assert shard.lengths.tolist() == [[len(s), len(t)] for s, t in pairs]


def _epoch(path, world, state=None, limit=None, buckets=None, pack=0):
    return _read(path, world, 0, batch=32, shuffle_buffer=1024, max_src_len=96, max_tgt_len=96, state=state,
                 limit=limit, buckets=buckets, pack=pack)


def test_packed_pairs_pad_translation_batches_little_in_the_same_order(en_fr_shards):
    """data.pack_pairs=128 on the Debian gettext slice, 2 ranks of 32 pairs in random order: at most 1.25x the
    real tokens computed (2.5x unpacked), and every micro-batch holds the pairs and targets it holds
    unpacked."""
    packed, _ = _epoch(en_fr_shards, 2, buckets=0, pack=128)
    plain, _ = _epoch(en_fr_shards, 2, buckets=0)
    ratio, before = padding_ratio(packed[0] + packed[1]), padding_ratio(plain[0] + plain[1])
    assert ratio <= 1.25 and before > 2, (ratio, before)
    for a, b in zip(packed[0] + packed[1], plain[0] + plain[1]):
        assert a["unit"].tolist() == b["unit"].tolist() and a["n_tokens"] == b["n_tokens"]
        assert sorted(a["targets"][a["tgt_mask"]].tolist()) == sorted(b["targets"][b["tgt_mask"]].tolist())
        assert a["src"].shape[1] <= 128 and a["src_docs"].max() < 32


def test_length_buckets_pad_translation_batches_little(en_fr_shards):
    """The Debian gettext slice, 2 ranks of 32 pairs: at most 1.25x the real tokens computed (2.5x in one
    random order), every pair of the epoch once."""
    bucketed, states = _epoch(en_fr_shards, 2)
    assert states[0]["buckets"] == 32
    plain, _ = _epoch(en_fr_shards, 2, buckets=0)
    ratio, before = padding_ratio(bucketed[0] + bucketed[1]), padding_ratio(plain[0] + plain[1])
    assert ratio <= 1.25 and before > 2, (ratio, before)
    units = _units(bucketed)
    assert len(np.unique(units)) == len(units) == len(_units(plain))


def test_length_buckets_resume_on_another_world_size_exactly(en_fr_shards):
    """2 ranks for 20 steps, then 3 from the cursor (its buckets and partitions): each pair once, and the
    positions after the cursor hold the units they held for the 2 ranks."""
    first, states = _epoch(en_fr_shards, 2, limit=20)
    rest, _ = _epoch(en_fr_shards, 3, state=states[0])
    units = np.concatenate([_units(first), _units(rest)])
    assert len(np.unique(units)) == len(units)
    assert StreamingLoader(en_fr_shards).n_units - len(units) < 3 * 32
    after = _units(rest)
    two = StreamingLoader(en_fr_shards, batch_size=32, world_size=2, shuffle_buffer=1024, seed=7,
                          max_src_len=96, max_tgt_len=96, buckets=None)
    c = states[0]["consumed"]
    assert np.array_equal(np.sort(after), np.sort(two.plan(0, 0).unit_of(np.arange(c, c + len(after)))))


# ---------------------------------------------------------------------------------------------------------
# Broken shards


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxtrain", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_missing_and_truncated_shard_give_one_line(tmp_path, four_shard_lm):
    missing = _copy(four_shard_lm, tmp_path / "missing")
    (missing / "train-000002.tar").unlink()
    r = _run_cli("data", "bench", str(missing), "--repeats", "1", "--epochs", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "train-000002.tar" in r.stderr and "missing" in r.stderr

    truncated = _copy(four_shard_lm, tmp_path / "truncated")
    shard = truncated / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = _run_cli("data", "bench", str(truncated), "--repeats", "1", "--epochs", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "train-000001.tar" in r.stderr


def test_corrupt_content_is_named_while_reading(tmp_path, four_shard_lm):
    """Same size as recorded, garbage inside: found when the reader gets there, named, never a hang."""
    broken = _copy(four_shard_lm, tmp_path / "garbled")
    shard = broken / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[: 4096] = b"\x07" * 4096
    shard.write_bytes(bytes(data))
    loader = StreamingLoader(broken, seq_len=L, batch_size=4, num_workers=2, seed=7, loop=False)
    with pytest.raises(DataError, match="train-000003.tar"):
        for _ in loader:
            pass


def test_skip_corrupt_counts_the_skipped_shard(tmp_path, four_shard_lm):
    broken = _copy(four_shard_lm, tmp_path / "skip")
    (broken / "train-000000.tar").unlink()
    loader = StreamingLoader(broken, seq_len=L, batch_size=4, seed=7, loop=False, skip_corrupt=True)
    assert loader.stats["skipped_shards"] == 1 and loader.stats["skipped_names"] == ["train-000000.tar"]
    units = np.concatenate([b["unit"].numpy() for b in loader])
    assert len(np.unique(units)) == len(units) == loader.batches_per_epoch() * 4


def test_cursor_refuses_other_data(four_shard_lm, one_shard_lm):
    a = StreamingLoader(four_shard_lm, seq_len=L)
    b = StreamingLoader(one_shard_lm, seq_len=L)
    with pytest.raises(DataError, match="dataset"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="seq_len"):
        StreamingLoader(four_shard_lm, seq_len=2 * L).load_state_dict(a.state_dict())


def test_data_bench_prints_both_rates(stdlib_shards):
    r = _run_cli("data", "bench", str(stdlib_shards), "--repeats", "1", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "plain tar read" in r.stdout and "loader" in r.stdout and "ratio loader/plain" in r.stdout
