"""Corpus -> tokenizer.json + {train,val}-%06d.tar shards + index.json.

    ctxtrain prepare --recipe stdlib --out data/stdlib
    ctxtrain prepare --input 'corpus/**/*.txt' --out data/mine --vocab-size 32000
    ctxtrain prepare --input pairs.tsv --out data/en_fr --src-lang en --tgt-lang fr

LM shards hold whole tokenized documents (`KEY.ids.npy`), packed into windows only when read, so one
prepare serves every `data.seq_len`. Translation shards hold pairs (`KEY.src.npy`, `KEY.tgt.npy`).
Ids are uint16 when the vocabulary fits. The val split takes whole documents (every k-th document of a
seeded shuffle). Output is deterministic: the same inputs and options give byte-identical files. The
shards are written into a temporary sibling directory and moved into place at the end, so an existing
dataset is never left half-overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from ctxtrain.data import corpora
from ctxtrain.data.shards import ShardSet
from ctxtrain.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    file_sha256,
    lang_tag,
    load_tokenizer,
    special_ids,
    tokenizer_file,
    train_bpe,
)
from ctxtrain.errors import UserError
from ctxtrain.progress import bar as progress_bar
from ctxtrain.storage import is_uri

INDEX_FORMAT = "ctxtrain-shards/1"
ENCODE_CHUNK = 256


def parse_size(text: str) -> int:
    """'64MB', '512k', '1GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise UserError(f"--shard-size {text!r}: write a size such as 64MB, 512kB or 1GB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return max(1, int(float(m.group(1)) * scale))


@dataclass
class PrepareOptions:
    inputs: list[str] = field(default_factory=list)
    out: str = ""
    recipe: Optional[str] = None
    task: str = "auto"
    vocab_size: int = 8192
    tokenizer: Optional[str] = None
    shard_size: str = "64MB"
    val_fraction: float = 0.02
    seed: int = 0
    text_field: str = "text"
    src_field: str = "src"
    tgt_field: str = "tgt"
    src_lang: Optional[str] = None
    tgt_lang: Optional[str] = None
    packages: list[str] = field(default_factory=list)
    cache: Optional[str] = None
    overwrite: bool = False
    progress: bool = True


def _val_every(fraction: float, n_units: int) -> int:
    """Every k-th unit (document or pair) goes to val (0: none); a corpus of fewer than k units still gives
    one."""
    if fraction <= 0 or n_units < 2:
        return 0
    return max(2, min(n_units, round(1 / fraction)))


def _resolve_corpus(opts: PrepareOptions):
    """-> (task, lm files or None, translation pairs or None, description)."""
    if opts.recipe:
        if opts.recipe not in corpora.RECIPES:
            raise UserError(f"--recipe {opts.recipe}: unknown; choose one of {', '.join(corpora.RECIPES)}")
        if opts.recipe == "stdlib":
            return "lm", corpora.stdlib_files(), None, "recipe stdlib"
        cache = Path(opts.cache or Path.home() / ".cache" / "ctxtrain" / "debian-gettext-fr")
        root = corpora.fetch_debian_gettext(cache, list(opts.packages or corpora.DEFAULT_GETTEXT_PACKAGES))
        opts.src_lang, opts.tgt_lang = opts.src_lang or "en", opts.tgt_lang or "fr"
        return "translation", None, corpora.gettext_pairs(root, "fr"), "recipe debian-gettext-fr"
    if not opts.inputs:
        raise UserError("prepare needs --input GLOB... or --recipe NAME (stdlib, debian-gettext-fr)")
    files = corpora.expand_inputs(opts.inputs)
    task = opts.task if opts.task != "auto" else corpora.detect_task(files, opts.src_field, opts.tgt_field)
    if task == "translation":
        return task, None, corpora.read_pairs(files, opts.src_field, opts.tgt_field), "inputs"
    return task, files, None, "inputs"


def prepare(opts: PrepareOptions) -> dict:
    """Run the whole preparation; returns the written index."""
    if is_uri(opts.out):
        return _prepare_into_store(opts)
    out = _check_out(opts)
    t0 = time.perf_counter()
    task, files, pairs, source = _resolve_corpus(opts)
    rng = random.Random(opts.seed)
    if task == "lm":
        if not files:
            raise UserError("no input files to prepare")
        rng.shuffle(files)  # documents mix across shards; within a JSONL file they keep their order
        # the val share is of documents, however many files hold them
        n_units = corpora.count_documents(files)
    else:
        if not pairs:
            raise UserError("no translation pairs found in the inputs")
        rng.shuffle(pairs)
        n_units = len(pairs)
    extra = [lang_tag(opts.tgt_lang)] if task == "translation" and opts.tgt_lang else []

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e}); pick a writable place") from None
    try:
        tok = _tokenizer(opts, task, files, pairs, extra)
        if opts.tokenizer:  # byte for byte: `train` compares its hash with a pretrained model folder's
            shutil.copyfile(tokenizer_file(opts.tokenizer), tmp / "tokenizer.json")
        else:
            tok.save(str(tmp / "tokenizer.json"))
        special = special_ids(opts.tokenizer, tok) if opts.tokenizer else {"pad": PAD, "bos": BOS, "eos": EOS}
        vocab = tok.get_vocab_size()
        dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
        every = _val_every(opts.val_fraction, n_units)
        splits, duplicates, n_bytes = _write_splits(opts, task, files, pairs, tok, dtype, every, n_units, tmp)
        index = {
            "format": INDEX_FORMAT,
            "task": task,
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "tokenizer": "tokenizer.json",
            "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"),
            "special": {**special, **({"lang_tag": tok.token_to_id(extra[0])} if extra else {})},
            "src_lang": opts.src_lang if task == "translation" else None,
            "tgt_lang": opts.tgt_lang if task == "translation" else None,
            "source": source,
            "seed": opts.seed,
            "val_every": every,
            "duplicates_dropped": duplicates,
            "splits": splits,
        }
        if index["splits"]["train"]["docs"] == 0:
            raise UserError("the corpus gave no training documents; add inputs")
        (tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _summary(opts, out, index, n_bytes, time.perf_counter() - t0)
    return index


def _prepare_into_store(opts: PrepareOptions) -> dict:
    """--out as an object-store URI: prepared in a local temporary directory, then uploaded, index.json last
    (a reader that finds index.json finds every shard it lists)."""
    import dataclasses
    import tempfile

    from ctxtrain.storage import HttpStore, NotFound, open_store

    store = open_store(opts.out, "--out")
    if isinstance(store, HttpStore):
        raise UserError(f"--out {opts.out}: HTTP is read-only here; write to an object store (s3://, gs://) "
                        "or a directory, and serve that")
    try:
        exists = store.size("index.json") is not None
    except OSError as e:
        raise UserError(f"--out {store.describe()}: cannot reach the store ({str(e).splitlines()[0]}); check "
                        "the URI and the credentials in the environment") from None
    if exists and not opts.overwrite:
        raise UserError(f"--out {store.describe()} already holds a dataset (index.json); choose another "
                        "prefix or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix="ctxtrain-prepare-") as tmp:
        local = Path(tmp) / "data"
        index = prepare(dataclasses.replace(opts, out=str(local)))
        if exists:
            store.remove_dir("")
        files = sorted(local.iterdir(), key=lambda f: f.name == "index.json")  # index.json last
        try:
            for f in files:
                store.upload(f, f.name)
        except (NotFound, OSError) as e:
            raise UserError(f"--out {store.describe()}: upload failed ({str(e).splitlines()[0]}); check the "
                            "store and the credentials, then run prepare again") from None
        print(f"uploaded {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) to "
              f"{store.describe()}", file=sys.stderr)
    return index


def _check_out(opts: PrepareOptions) -> Path:
    """--out, --val-fraction and --shard-size checked before anything is read or written."""
    if not opts.out:
        raise UserError("prepare needs --out DIR")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pass a new or empty directory")
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise UserError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    if not 0 <= opts.val_fraction < 0.5:
        raise UserError(f"--val-fraction {opts.val_fraction}: must lie in [0, 0.5)")
    parse_size(opts.shard_size)
    return out


def _tokenizer(opts: PrepareOptions, task: str, files, pairs, extra: list[str]):
    """--tokenizer, or a BPE trained on the corpus (with the extra special tokens: a target-language tag)."""
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)
        missing = [t for t in extra if tok.token_to_id(t) is None]
        if missing:
            raise UserError(f"--tokenizer {opts.tokenizer} lacks {missing}; train a new one without "
                            "--tokenizer")
        _check_model_vocabulary(opts.tokenizer, tok)
        return tok
    if task == "lm":
        texts = corpora.iter_documents(files, opts.text_field)
    else:
        texts = (t for pair in pairs for t in pair)
    return train_bpe(texts, opts.vocab_size, extra)


def _check_model_vocabulary(path: str, tok) -> None:
    """--tokenizer as a model folder: its ids must lie inside the model's vocabulary (config.json's
    vocab_size), else training could not embed them; one line."""
    config = Path(path) / "config.json"
    try:
        vocab = json.loads(config.read_bytes()).get("vocab_size") if Path(path).is_dir() else None
    except (OSError, ValueError):
        vocab = None
    if isinstance(vocab, int) and tok.get_vocab_size() > vocab:
        raise UserError(f"--tokenizer {path}: its tokenizer has {tok.get_vocab_size()} ids but the model's "
                        f"vocabulary ({config}: vocab_size) is {vocab}; the folder's tokenizer.json does not "
                        "belong to its model: use the tokenizer the model was trained with")


def _write_splits(opts: PrepareOptions, task: str, files, pairs, tok, dtype, every: int, n_units: int,
                  tmp: Path) -> tuple[dict, int, int]:
    """Encode every unit (documents, or pairs) into the train and val shards; every `every`-th goes to val,
    exact duplicates are dropped (they would leak between train and val). Returns (the splits' records,
    duplicates dropped, source bytes read)."""
    target = parse_size(opts.shard_size)
    splits = {"train": ShardSet(tmp, "train", target), "val": ShardSet(tmp, "val", target)}
    bar = progress_bar(n_units, "prepare", "file" if task == "lm" else "pair", enabled=opts.progress)
    seen: set[bytes] = set()
    counts = {"duplicates": 0, "bytes": 0, "units": 0}

    def fresh(*texts: str) -> bool:
        digest = hashlib.sha1("\x00".join(texts).encode("utf-8", errors="replace")).digest()
        if digest in seen:
            counts["duplicates"] += 1
            return False
        seen.add(digest)
        return True

    def write(sample: dict, tokens: int, text_bytes: int, lengths: Optional[list[int]] = None) -> None:
        i = counts["units"]
        (splits["val"] if every and i % every == 0 else splits["train"]).write(sample, tokens, lengths)
        counts["units"] += 1
        counts["bytes"] += text_bytes

    if task == "lm":
        docs = (d for d in _docs_with_progress(files, opts.text_field, bar) if fresh(d))
        for chunk in _chunks(docs, ENCODE_CHUNK):
            for text, enc in zip(chunk, tok.encode_batch(chunk)):
                ids = np.asarray(enc.ids, dtype=dtype)
                write({"ids.npy": ids}, len(ids), len(text.encode("utf-8", errors="replace")))
    else:
        for chunk in _chunks((p for p in pairs if fresh(*p)), ENCODE_CHUNK):
            src_enc = tok.encode_batch([s for s, _ in chunk])
            tgt_enc = tok.encode_batch([t for _, t in chunk])
            for (s, t), se, te in zip(chunk, src_enc, tgt_enc):
                src, tgt = np.asarray(se.ids, dtype=dtype), np.asarray(te.ids, dtype=dtype)
                write({"src.npy": src, "tgt.npy": tgt}, len(src) + len(tgt),
                      len(s.encode()) + len(t.encode()), [len(src), len(tgt)])
            bar.update(len(chunk))
    bar.close()
    return {name: split.finish() for name, split in splits.items()}, counts["duplicates"], counts["bytes"]


def _summary(opts: PrepareOptions, out: Path, index: dict, n_bytes: int, secs: float) -> None:
    """prepare's closing line on stderr, and a warning when the corpus gave no val split."""
    tr, va = index["splits"]["train"], index["splits"]["val"]
    if va["docs"] == 0:
        unit = "document" if index["task"] == "lm" else "pair"
        why = "--val-fraction 0" if opts.val_fraction <= 0 else f"{tr['docs']} {unit}(s)"
        print(f"prepare: warning: {out} has no val split ({why}): evaluation during training is off (no "
              "val_loss); give more documents or a --val-fraction > 0", file=sys.stderr)
    print(f"prepared {out}: {index['task']}, vocab {index['vocab_size']} ({index['dtype']}), "
          f"train {tr['docs']} docs / {tr['tokens']:,} tokens in {len(tr['shards'])} shards, "
          f"val {va['docs']} docs / {va['tokens']:,} tokens; {index['duplicates_dropped']} duplicates "
          f"dropped; {secs:.1f} s, {n_bytes / secs / 1e6:.1f} MB/s, "
          f"{(tr['tokens'] + va['tokens']) / secs:,.0f} tokens/s",
          file=sys.stderr)


def _docs_with_progress(files: list[Path], text_field: str, bar: tqdm) -> Iterator[str]:
    for f in files:
        yield from corpora.iter_documents([f], text_field)
        bar.update(1)


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
