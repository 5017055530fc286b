"""Streaming loader over WebDataset shards with an exact, re-splittable cursor.

How an epoch is laid out (all of it arithmetic on index.json, the same on every rank and worker):

1. The training shards are put in a seeded order (a permutation per epoch).
2. Their contents form one stream of *units*. LM: documents, each followed by EOS, are concatenated and cut
   into windows of seq_len + 1 ids, window u covering stream tokens [u*L, u*L + L] (consecutive windows share
   one token, so every token but the first is a target exactly once). Translation: one unit per pair.
3. The units form P *partitions* (`data.partitions`, by default the data-parallel world size of the run's
   first start: one partition per rank), contiguous spans of the stream, as MosaicML Streaming's canonical
   partition does. The *global order* interleaves them: position q is unit q // P of partition q % P, each
   partition visiting its units in seeded permutations of blocks of shuffle_buffer / P. Position q is a
   single integer. Translation pairs come in *length buckets* (`data.length_buckets`): a partition's block
   sorted by the pairs' lengths (recorded in index.json), cut into runs of one step's share of the
   partition, each partition's runs shuffled: each micro-batch holds pairs of
   about one length, and the order is still a function of the epoch and the position alone.
4. Optimizer micro-step s consumes global positions [c + s*G, c + (s+1)*G) with G = world_size * batch_size:
   G / P units of every partition. Rank r takes the r-th slice of B positions of the step ordered by
   partition, so that with world_size dividing P a rank reads its own partitions' shards and no others.
   DataLoader workers hand over chunks of C consecutive micro-batches (C ~ 256k tokens, to keep the queue's
   per-message cost low); worker w makes chunks j with j % workers == w, the round-robin order in which
   torch's DataLoader collects them.

The cursor is (epoch, consumed, P, the buckets' run length): the number of global positions already handed to
training, and the layout they count in. Nothing in it depends on the world size or worker count, so a restart
with other counts continues from the same position: no unit is lost or repeated (where the new world size does
not divide P, some partitions are read by two ranks). An epoch ends when fewer than G positions are left; that
remainder (smaller than one global batch) is dropped so that every rank yields the same number of batches, and
is counted in `stats["dropped_units"]`.

Each reader scans its part of the stream in order and keeps only its own units; shards that hold none of them
are not opened (nor fetched, from a remote dataset), so a resume seeks straight to its shard. Within a shard,
tar members are read sequentially.
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctxtrain.data.dataset import DataError, Dataset, Shard
from ctxtrain.data.shards import iter_shard
from ctxtrain.processes import die_with_parent

IGNORE_INDEX = -100  # the model's ignored target id (kept here to keep data free of model imports)
# Tokens per DataLoader message (a chunk of micro-batches); CTXTRAIN_LOADER_CHUNK_TOKENS=1 makes every
# micro-batch its own message, so that workers read just ahead of the trainer (fault rehearsals use it).
CHUNK_TOKENS = int(os.environ.get("CTXTRAIN_LOADER_CHUNK_TOKENS", 1 << 18))


# ---------------------------------------------------------------------------------------------------------
# The plan of one epoch: pure arithmetic


class EpochPlan:
    """Which stream unit sits at each global position, and which positions a rank's micro-batch k holds.

    The epoch's N units form P partitions, contiguous spans of S = N // P units of the stream (the last N -
    P*S are dropped). Global position q belongs to partition q % P, at its local index q // P; a partition
    shuffles its units in blocks of M // P. A step of G positions then holds G / P units of every partition,
    and when P divides G the rank r of R takes them partition by partition: the step's positions ordered by
    partition, its slice [r*B, (r+1)*B). With R dividing P a rank reads only its P / R partitions (one
    contiguous span of the stream when P = R): each shard is read by one rank, those at a span's edge by two.
    P = 1 is one partition: the whole stream in blocks of M, what every rank reads."""

    def __init__(self, n_units: int, start: int, batch_size: int, world_size: int, rank: int,
                 block: int, seed: int, epoch: int, shuffle: bool, chunk: int = 1, first_chunk: int = 0,
                 partitions: int = 1, costs: Optional[np.ndarray] = None, run: int = 0):
        self.P = max(1, min(partitions, n_units)) if n_units else 1
        self.S = n_units // self.P  # units in each partition
        self.n_units, self.start, self.chunk, self.first_chunk = self.S * self.P, start, chunk, first_chunk
        self.B, self.R, self.rank = batch_size, world_size, rank
        self.G = batch_size * world_size
        self.Mp = max(1, block // self.P) if shuffle else 1  # a partition's shuffle block
        # length buckets: a block sorted by cost, cut into runs of `run` local indices (whole runs in a block)
        self.costs = costs if shuffle and run > 0 and costs is not None else None
        self.run = run if self.costs is not None else 0
        if self.run:
            self.Mp = max(self.run, self.Mp // self.run * self.run)
        self.M = self.Mp * self.P  # global positions in a block: Mp local indices of every partition
        self.seed, self.epoch = seed, epoch
        self.n_steps = max(0, (self.n_units - start) // self.G)
        self.dropped = max(0, n_units - start - self.n_steps * self.G)
        self.n_chunks = -(-self.n_steps // chunk)
        # partition by partition within a step where every partition has G / P positions in it
        self.by_partition = self.P > 1 and self.G % self.P == 0 and start % self.P == 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def positions(self, k: int) -> np.ndarray:
        """Global positions of this rank's micro-batch k."""
        a = self.start + k * self.G
        idx = self.rank * self.B + np.arange(self.B)  # this rank's slice of the step
        if not self.by_partition:
            return a + idx
        per = self.G // self.P  # positions of each partition in a step
        return a + (idx % per) * self.P + idx // per

    def _slice_index(self, q: np.ndarray) -> np.ndarray:
        """Each position's index in its step's order (the inverse of `positions`)."""
        o = (q - self.start) % self.G
        if not self.by_partition:
            return o
        return (o % self.P) * (self.G // self.P) + o // self.P

    def _perm(self, p: int, c: int) -> np.ndarray:
        """The shuffle of partition p's block c (local indices c*Mp ..)."""
        key = (p, c)
        if key not in self._perms:
            size = min(self.Mp, self.S - c * self.Mp)
            # one partition: the seeds of the unpartitioned layout, whose orders stay as they were
            seed = [self.seed, self.epoch, c, 0x51CE] if self.P == 1 else [self.seed, self.epoch, p, c,
                                                                           0x9A27]
            if self.run:
                perm = self._bucketed(p, c, size)
            else:
                perm = (np.random.default_rng(seed).permutation(size) if self.Mp > 1
                        else np.zeros(1, dtype=np.int64))
            if len(self._perms) > 4 * self.P:  # a batch spans at most two blocks of each partition
                self._perms = {k: v for k, v in self._perms.items() if k[1] >= c - 1}
            self._perms[key] = perm
        return self._perms[key]

    def _bucketed(self, p: int, c: int, size: int) -> np.ndarray:
        """Length buckets: partition p's block c sorted by its units' costs (ties in a seeded random order),
        cut into runs of `run` (a step's share of a partition: one rank's micro-batch when the world size
        is the partitions'), the whole runs shuffled and the short remainder last. Each partition shuffles its
        runs on its own, so that a step mixes the lengths of its partitions' runs (a step of one length
        throughout learned slower: bench/README.md)."""
        first = p * self.S + c * self.Mp
        cost = self.costs[first : first + size]  # (size, k): sorted by column 0, then 1, ...
        tie = np.random.default_rng([self.seed, self.epoch, p, c, 0xB0C5]).random(size)
        order = np.lexsort((tie, *cost.T[::-1]))
        whole = size // self.run
        runs = np.random.default_rng([self.seed, self.epoch, p, c, 0x5EED]).permutation(whole)
        picked = (runs[:, None] * self.run + np.arange(self.run)).reshape(-1)
        return np.concatenate([order[picked], order[whole * self.run :]])

    def unit_of(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> stream units: partition q % P, its local index q // P through its block's
        shuffle."""
        p, i = positions % self.P, positions // self.P
        c = i // self.Mp
        key = c * self.P + p  # one (partition, block) pair each
        out = np.empty_like(positions)
        for k in np.unique(key):
            sel = key == k
            pk, ck = int(k % self.P), int(k // self.P)
            out[sel] = pk * self.S + ck * self.Mp + self._perm(pk, ck)[i[sel] - ck * self.Mp]
        return out

    def owned_units_in_block(self, b: int, worker: int, workers: int) -> np.ndarray:
        """Sorted stream units of block b (global positions b*M ..) that this rank's worker will need (its
        chunks: (first_chunk + j) % workers == worker)."""
        lo, hi = b * self.M, min((b + 1) * self.M, self.n_units)
        q = np.arange(lo, hi)
        step = (q - self.start) // self.G
        mine = (q >= self.start) & (step < self.n_steps) & (self._slice_index(q) // self.B == self.rank)
        mine &= (self.first_chunk + step // self.chunk) % workers == worker
        return np.sort(self.unit_of(q[mine])) if mine.any() else np.zeros(0, dtype=np.int64)


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of shards (a seeded permutation; index order when not shuffling)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)


# ---------------------------------------------------------------------------------------------------------
# Unit sources: stream units fetched in increasing order, skipping what is not needed


class _ShardCursor:
    """Walks the epoch's shards in order; can jump to the shard containing a stream offset."""

    def __init__(self, shards: list[Shard], lengths: list[int], dtype: np.dtype, fields: tuple[str, ...],
                 vocab_size: int):
        self.shards, self.dtype, self.fields, self.vocab_size = shards, dtype, fields, vocab_size
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.i = -1
        self._it: Optional[Iterator] = None
        self._docs_read = 0

    def seek_shard(self, offset: int) -> int:
        """Open the shard holding stream offset; returns that shard's start offset."""
        self.i = int(np.searchsorted(self.offsets, offset, side="right") - 1)
        if self.i >= len(self.shards):
            raise IndexError("offset past the end of the epoch")
        self._it = iter_shard(self.shards[self.i], self.dtype, self.fields)
        self._docs_read = 0
        return int(self.offsets[self.i])

    def shard_end(self) -> int:
        return int(self.offsets[self.i + 1])

    def next_sample(self) -> tuple[np.ndarray, ...]:
        try:
            sample = next(self._it)
        except StopIteration:
            shard = self.shards[self.i]
            raise DataError(
                f"shard {shard.path} ended after {self._docs_read} of {shard.docs} samples (truncated?); "
                "re-run `ctxtrain prepare`"
            ) from None
        self._docs_read += 1
        for ids in sample:  # an id past the vocabulary would fail deep inside the model's embedding
            if len(ids) and int(ids.max()) >= self.vocab_size:
                raise DataError(
                    f"shard {self.shards[self.i].path} holds token id {int(ids.max())}, past the vocabulary "
                    f"of {self.vocab_size} in index.json (made with another tokenizer?); re-run `ctxtrain "
                    "prepare`"
                )
        return sample


class WindowSource:
    """LM windows: documents + EOS concatenated, window u = stream[u*L : u*L + L + 1]."""

    def __init__(self, shards: list[Shard], seq_len: int, eos: int, dtype: np.dtype, vocab_size: int):
        self.L, self.eos = seq_len, eos
        self.cursor = _ShardCursor(shards, [s.tokens + s.docs for s in shards], dtype, ("ids.npy",),
                                   vocab_size)
        self.dtype = dtype
        self.doc: Optional[np.ndarray] = None
        self.doc_start = 0
        self.doc_len = 0  # ids + the EOS

    @staticmethod
    def n_units(shards: list[Shard], seq_len: int) -> int:
        stream = sum(s.tokens + s.docs for s in shards)
        return max(0, (stream - 1) // seq_len)

    def _advance(self, pos: int) -> None:
        """Move to the next document, jumping to the shard of pos when the current shard ends before it."""
        if self.doc is None or pos >= self.cursor.shard_end():
            self.doc_start = self.cursor.seek_shard(pos)
        else:
            self.doc_start += self.doc_len
        (ids,) = self.cursor.next_sample()
        self.doc, self.doc_len = ids, len(ids) + 1
        if self.doc_start + self.doc_len > self.cursor.shard_end():
            raise DataError(
                f"shard {self.cursor.shards[self.cursor.i].path} holds more tokens than index.json says; "
                "re-run `ctxtrain prepare`"
            )

    def get(self, u: int) -> np.ndarray:
        return self.get_documents(u)[0]

    def get_documents(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """Window u and the lengths of its pieces of documents (each with its EOS), in order."""
        L = self.L
        pos = u * L
        if self.doc is not None and self.doc_start <= pos and pos + L + 1 < self.doc_start + self.doc_len:
            # inside one document: a view
            return self.doc[pos - self.doc_start : pos - self.doc_start + L + 1], np.array([L + 1])
        out = np.empty(L + 1, dtype=self.dtype)
        pieces = []
        filled = 0
        while filled < L + 1:
            while self.doc is None or self.doc_start + self.doc_len <= pos:
                self._advance(pos)
            a = pos - self.doc_start
            take = min(L + 1 - filled, self.doc_len - a)
            n_ids = self.doc_len - 1
            real = max(0, min(a + take, n_ids) - a)
            out[filled : filled + real] = self.doc[a : a + real]
            if a + take > n_ids:
                out[filled + take - 1] = self.eos
            pieces.append(take)
            filled += take
            pos += take
        return out, np.array(pieces)


class PairSource:
    """Translation pairs: unit u = the u-th pair of the epoch's stream."""

    def __init__(self, shards: list[Shard], dtype: np.dtype, vocab_size: int):
        self.cursor = _ShardCursor(shards, [s.docs for s in shards], dtype, ("src.npy", "tgt.npy"),
                                   vocab_size)
        self.next_unit: Optional[int] = None

    @staticmethod
    def n_units(shards: list[Shard]) -> int:
        return sum(s.docs for s in shards)

    def get(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        if self.next_unit is None or u >= self.cursor.shard_end():
            self.next_unit = self.cursor.seek_shard(u)
        while self.next_unit < u:
            self.cursor.next_sample()
            self.next_unit += 1
        self.next_unit += 1
        return self.cursor.next_sample()


# ---------------------------------------------------------------------------------------------------------
# Batches


# Workers hand numpy arrays to the trainer: through the DataLoader's queue they cost ~80 us a batch, where
# torch tensors (moved to shared memory, one file descriptor each) cost ~1 ms. `to_torch` runs in the trainer.


def collate_lm(windows: list, units: np.ndarray, documents: str = "") -> dict:
    """Windows (B, L+1) in the shards' dtype. documents "ids": each window came with the lengths of its
    pieces of documents, and the batch gets their ids, `docs` (B, L+1): 0, 1, ... along each window;
    "positions" also each token's place in its document, `positions` (B, L+1)."""
    if not documents:
        return {"tokens": np.stack(windows), "unit": units}
    tokens = np.stack([w for w, _ in windows])
    docs = np.stack([np.repeat(np.arange(len(p), dtype=np.int32), p) for _, p in windows])
    batch = {"tokens": tokens, "docs": docs, "unit": units}
    if documents == "positions":
        starts = [np.repeat(np.cumsum(p) - p, p) for _, p in windows]
        batch["positions"] = (np.arange(tokens.shape[1]) - np.stack(starts)).astype(np.int32)
    return batch


def collate_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], units: np.ndarray, special: dict,
                  max_src: int, max_tgt: int, pack: int = 0) -> dict:
    """Source: [lang tag] + ids + EOS; decoder input: BOS + ids; targets: ids + EOS; padded per batch.

    pack > 0 (`data.pack_pairs`): the pairs are packed, in their order, into rows of at most `pack` ids a side
    (first fit, as t5x packs examples), and the batch also holds each token's pair within its row, `src_docs`
    and `tgt_docs` (-1 on padding): the model keeps every pair to itself. The same pairs and targets as
    unpacked, far less padding."""
    pad, bos, eos, tag = special["pad"], special["bos"], special["eos"], special.get("lang_tag")
    head = [tag] if tag is not None else []
    srcs = [np.concatenate([head, src[: max_src - 1 - len(head)], [eos]]) for src, _ in pairs]
    tgts = [np.concatenate([[bos], tgt[: max_tgt - 1]]) for _, tgt in pairs]  # decoder input; targets: + EOS
    if pack:
        rows = _pack_rows([(len(s), len(t)) for s, t in zip(srcs, tgts)], pack)
    else:
        rows = [[i] for i in range(len(pairs))]  # a row a pair
    B = len(rows)
    S = max(sum(len(srcs[i]) for i in row) for row in rows)
    T = max(sum(len(tgts[i]) for i in row) for row in rows)
    src = np.full((B, S), pad, dtype=np.int64)
    tgt_in = np.full((B, T), pad, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    src_docs, tgt_docs = np.full((B, S), -1, dtype=np.int64), np.full((B, T), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        a = b = 0
        for j, i in enumerate(row):
            s, t = srcs[i], tgts[i]
            src[r, a:a + len(s)], src_docs[r, a:a + len(s)] = s, j
            tgt_in[r, b:b + len(t)], tgt_docs[r, b:b + len(t)] = t, j
            targets[r, b:b + len(t) - 1], targets[r, b + len(t) - 1] = t[1:], eos
            a, b = a + len(s), b + len(t)
    batch = {"src": src, "src_mask": src_docs >= 0, "tgt": tgt_in, "tgt_mask": tgt_docs >= 0,
             "targets": targets, "unit": units}
    if pack:
        batch.update(src_docs=src_docs, tgt_docs=tgt_docs)
    return batch


def _pack_rows(lengths: list[tuple[int, int]], room: int) -> list[list[int]]:
    """Pairs (source, decoder input lengths), in order, into rows of at most `room` ids a side: each pair goes
    to the first row it fits in."""
    rows: list[list[int]] = []
    used: list[list[int]] = []
    for i, (s, t) in enumerate(lengths):
        for row, u in zip(rows, used):
            if u[0] + s <= room and u[1] + t <= room:
                row.append(i)
                u[0], u[1] = u[0] + s, u[1] + t
                break
        else:
            rows.append([i])
            used.append([s, t])
    return rows


def to_torch(batch: dict, pin: bool = False) -> dict:
    """numpy batch -> tensors (ids as int64), plus `n_tokens`: the target tokens it trains on. pin: in pinned
    host memory, so that the copy to the GPU runs asynchronously (`.to(device, non_blocking=True)`)."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v).astype(np.int64 if v.dtype != bool else bool))
           for k, v in batch.items()}
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    out["n_tokens"] = out["tokens"][:, 1:].numel() if "tokens" in out else int(out["tgt_mask"].sum())
    return out


def padding_ratio(batches: list[dict]) -> float:
    """Translation: the tokens computed (source and decoder input, padded to each batch's longest) over the
    real ones."""
    computed = sum(int(np.prod(b["src_mask"].shape)) + int(np.prod(b["tgt_mask"].shape)) for b in batches)
    return computed / sum(int(b["src_mask"].sum() + b["tgt_mask"].sum()) for b in batches)


def _identity(batch: dict) -> dict:
    return batch


def _die_with_parent(_worker_id: int) -> None:
    """A DataLoader worker dies with its trainer. Without this, a trainer killed by SIGKILL leaves its forked
    workers holding the trainer's sockets, and Ray sees the dead rank only after minutes of keepalive
    timeouts. It ignores SIGTERM: a scheduler that signals every process (Slurm, a container's stop) asks the
    trainer for a checkpoint at the next step, which needs its readers alive until then."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def _kill_trainer() -> None:
    """fault.during=read: SIGKILL the trainer from inside its data-loader worker, in the middle of a read."""
    trainer = os.getppid() if get_worker_info() is not None else os.getpid()
    os.kill(trainer, signal.SIGKILL)
    time.sleep(60)  # PR_SET_PDEATHSIG ends this worker with its trainer


class _Stream(IterableDataset):
    """One rank's micro-batches from a cursor onwards, epoch after epoch; runs inside each DataLoader worker.

    Chunks are numbered continuously across epochs, so the workers keep the DataLoader's round-robin
    order through epoch boundaries and start only once per iteration, not once per epoch.
    """

    def __init__(self, loader: "StreamingLoader", epoch: int, consumed: int, kill_at: Optional[int] = None):
        self.loader, self.epoch, self.consumed, self.kill_at = loader, epoch, consumed, kill_at

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            epoch, start, first_chunk = self.epoch, self.consumed, 0
            while True:
                plan = self.loader.plan(epoch, start, first_chunk)
                yield from self._epoch(plan, self.loader.epoch_shards(epoch), worker, workers)
                first_chunk += plan.n_chunks
                if not self.loader.loop:
                    return
                epoch, start = epoch + 1, 0
        except DataError as e:
            # Raised in a worker, an exception reaches the trainer as a multi-line wrapper; a marker keeps it
            # one line.
            yield [{"__error__": str(e)}]

    def _epoch(self, plan: "EpochPlan", shards: list[Shard], worker: int, workers: int):
        """This worker's chunks of one epoch: lists of consecutive micro-batches."""
        ld = self.loader
        ds = ld.dataset
        sources: dict[int, object] = {}

        def source(u: int):
            """A reader per partition: each reads its span forward (units come sorted within a block)."""
            p = u // plan.S
            if p not in sources:
                sources[p] = (WindowSource(shards, ld.seq_len, ds.special["eos"], ds.dtype, ds.vocab_size)
                              if ds.task == "lm" else PairSource(shards, ds.dtype, ds.vocab_size))
            return sources[p]

        C = plan.chunk
        cache: dict[int, object] = {}
        loaded_through = plan.start // plan.M - 1  # blocks before the cursor hold nothing for us
        for j in range(plan.n_chunks):
            if (plan.first_chunk + j) % workers != worker:
                continue
            chunk = []
            for k in range(j * C, min((j + 1) * C, plan.n_steps)):
                positions = plan.positions(k)
                # k counts from the cursor in its epoch
                dying = self.kill_at == k and plan.epoch == self.epoch
                for b in range(loaded_through + 1, int(positions.max()) // plan.M + 1):
                    for u in map(int, plan.owned_units_in_block(b, worker, workers)):
                        cache[u] = source(u).get_documents(u) if ld.documents else source(u).get(u)
                        if dying:
                            _kill_trainer()
                    loaded_through = b
                if dying:
                    _kill_trainer()
                units = plan.unit_of(positions)
                samples = [cache.pop(int(u)) for u in units]
                if ds.task == "lm":
                    chunk.append(collate_lm(samples, units, ld.documents))
                else:
                    chunk.append(collate_pairs(samples, units, ds.special, ld.max_src_len, ld.max_tgt_len,
                                               ld.pack))
            yield chunk


class StreamingLoader:
    """Iterates one rank's micro-batches; `state_dict()` is the exact cursor.

    Training (`loop=True`) runs epoch after epoch with a fresh shard order and shuffle each; evaluation
    (`loop=False, shuffle=False`) reads the split once in index order.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 64,
        shuffle: bool = True,
        loop: bool = True,
        skip_corrupt: bool = False,
        max_src_len: int = 128,
        max_tgt_len: int = 128,
        pin_memory: bool = False,
        documents: str = "",
        cache=None,
        partitions: Optional[int] = None,
        buckets: Optional[int] = 0,
        reads: bool = True,
        pack: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset = Dataset(path, cache)  # cache: data.cache_dir etc. for a dataset under a URI
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer, self.shuffle, self.loop = seed, shuffle_buffer, shuffle, loop
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len
        self.pack = pack  # translation: rows of this many ids a side, pairs packed in them (0: a pair a row)
        self.pin_memory = pin_memory  # batches in pinned host memory (training on a GPU)
        # LM batches with their windows' document ids ("ids") and also each token's position in its document
        # ("positions"): data.doc_mask and data.doc_positions
        if documents not in ("", "ids", "positions"):
            raise ValueError(f"documents={documents!r}: one of '', 'ids', 'positions'")
        self.documents = documents
        # False: a sequence-parallel follower, whose group's first rank reads the windows and hands them over
        # (engine/sequence.share_window); this one yields empty batches of their shapes and keeps the cursor
        self.reads = reads
        # the epoch's partitions (EpochPlan): a fresh start takes one per rank, a resume keeps its cursor's
        self.partitions = partitions or world_size
        self.shards, skipped = self.dataset.usable_shards(split, skip_corrupt)
        # translation pairs in length buckets (EpochPlan): runs of `buckets` pairs (None: a step's share of a
        # partition), kept in the cursor like the partitions; 0 = none (the default; always for LM windows,
        # evaluation and shards without recorded lengths)
        lengths = self.dataset.task != "lm" and shuffle and all(s.lengths is not None for s in self.shards)
        self.buckets = (0 if not lengths else buckets if buckets is not None
                        else max(1, batch_size * world_size // self.partitions))
        if self.dataset.task == "lm":
            self.n_units = WindowSource.n_units(self.shards, seq_len)
        else:
            self.n_units = PairSource.n_units(self.shards)
        # Micro-batches per DataLoader message: ~256k tokens, so the queue's per-message cost stays small.
        unit_tokens = seq_len + 1 if self.dataset.task == "lm" else max_src_len + max_tgt_len
        self.chunk = max(1, CHUNK_TOKENS // (batch_size * unit_tokens)) if num_workers else 1
        self.epoch, self.consumed = 0, 0
        # fault.during=read: the micro-batch (from the cursor) to die reading
        self.kill_at: Optional[int] = None
        self.stats = {"skipped_shards": len(skipped), "skipped_names": skipped, "dropped_units": 0,
                      "epochs_done": 0, "units_per_epoch": self.n_units}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_shards(self, epoch: int) -> list[Shard]:
        order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        return [self.shards[i] for i in order]

    def plan(self, epoch: int, start: int, first_chunk: int = 0) -> EpochPlan:
        return EpochPlan(self.n_units, start, self.batch_size, self.world_size, self.rank,
                         self.shuffle_buffer, self.seed, epoch, self.shuffle, self.chunk, first_chunk,
                         self.partitions, self.unit_costs(epoch) if self.buckets else None, self.buckets)

    def _batched_lengths(self, shards: list[Shard]) -> tuple[np.ndarray, np.ndarray]:
        """Each pair's source (with its tag and EOS) and target (ids + EOS) tokens as `collate_pairs` batches
        them, from the lengths index.json records, in the order of `shards`."""
        head = 1 if self.dataset.special.get("lang_tag") is not None else 0
        lengths = (np.concatenate([s.lengths for s in shards]) if shards
                   else np.zeros((0, 2), dtype=np.int64))
        return (np.minimum(lengths[:, 0], self.max_src_len - 1 - head) + 1 + head,
                np.minimum(lengths[:, 1], self.max_tgt_len - 1) + 1)

    def mean_target_tokens(self) -> Optional[float]:
        """Translation: the target tokens of a pair on average over the split; None for LM windows or shards
        without recorded lengths."""
        if self.dataset.task == "lm" or not self.shards or any(s.lengths is None for s in self.shards):
            return None
        return float(np.mean(self._batched_lengths(self.shards)[1]))

    def unit_costs(self, epoch: int) -> np.ndarray:
        """What length buckets sort pairs by, in the epoch's stream order: (the longer side, both sides) in
        batched tokens. The longer side first pads both sides least (1.17x on the tests' en->fr slice at 2
        ranks, against 1.23x for the sum alone and 2.5x without buckets)."""
        src, tgt = self._batched_lengths(self.epoch_shards(epoch))
        return np.stack([np.maximum(src, tgt), src + tgt], axis=1)

    def batches_per_epoch(self) -> int:
        return self.n_units // self.global_batch

    # The cursor ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "dataset": self.dataset.fingerprint, "units_per_epoch": self.n_units,
                "partitions": self.partitions, "buckets": self.buckets}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "split", "dataset"):
            if state.get(key) != self.state_dict()[key]:
                raise DataError(
                    f"data cursor was saved with {key}={state.get(key)!r}, this run has "
                    f"{self.state_dict()[key]!r}; resume with the same data settings or start fresh "
                    "(--no-resume)"
                )
        if state.get("units_per_epoch", self.n_units) != self.n_units:
            raise DataError(
                f"data cursor counts {state['units_per_epoch']} units per epoch, the shards now give "
                f"{self.n_units} (a shard was skipped or restored); resume with the same shards or start "
                "fresh (--no-resume)"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        # the layout the cursor counts in (a cursor from before partitions: the one-partition layout)
        self.partitions = int(state.get("partitions", 1))
        self.buckets = int(state.get("buckets", 0))  # a cursor from before length buckets: none

    # Iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan(self.epoch, self.consumed)
        if self.n_units < self.global_batch:
            if not self.loop:
                return
            raise DataError(
                f"{self.dataset.path} {self.split} split has {self.n_units} samples of seq_len "
                f"{self.seq_len}, fewer than one global batch ({self.global_batch}); add data or lower "
                "data.batch_size"
            )
        left = plan.n_steps
        for batch in self._read() if self.reads else self._placeholders(plan.n_steps):
            while left == 0:  # the previous epoch is used up: the workers have moved on to the next
                plan, left = self._next_epoch(plan)
            self.consumed += self.global_batch
            left -= 1
            yield batch
        if left == 0:
            self._next_epoch(plan)

    def _read(self) -> Iterator[dict]:
        """The batches the DataLoader workers read, from the cursor on."""
        dl = DataLoader(_Stream(self, self.epoch, self.consumed, self.kill_at), batch_size=None,
                        num_workers=self.num_workers, collate_fn=_identity,
                        prefetch_factor=2 if self.num_workers else None, worker_init_fn=_die_with_parent)
        for chunk in dl:
            for batch in chunk:
                if "__error__" in batch:
                    raise DataError(batch["__error__"])
                yield to_torch(batch, self.pin_memory)

    def _placeholders(self, n_steps: int) -> Iterator[dict]:
        """A follower's batches (`reads=False`): empty ones of the reader's shapes, as many as it reads (the
        rest of this epoch, or without end when looping); nothing read. LM windows: the only data sequence
        parallelism takes."""
        B, T = self.batch_size, self.seq_len + 1
        for _ in itertools.count() if self.loop else range(n_steps):
            batch = {"tokens": torch.zeros((B, T), dtype=torch.int64), "unit": torch.full((B,), -1),
                     "n_tokens": B * (T - 1)}
            for key in ("docs", "positions")[: ("", "ids", "positions").index(self.documents)]:
                batch[key] = torch.zeros((B, T), dtype=torch.int64)
            yield batch

    def _next_epoch(self, plan: EpochPlan) -> tuple[EpochPlan, int]:
        self.stats["dropped_units"] += plan.dropped
        self.stats["epochs_done"] += 1
        self.epoch, self.consumed = self.epoch + 1, 0
        nxt = self.plan(self.epoch, 0)
        return nxt, nxt.n_steps


def read_stream_tokens(loader: StreamingLoader, epoch: int) -> np.ndarray:
    """The whole LM token stream of an epoch (documents + EOS in the epoch's shard order), read plainly
    with tarfile; tests and benchmarks compare the loader against it."""
    parts = []
    eos = loader.dataset.special["eos"]
    for shard in loader.epoch_shards(epoch):
        with tarfile.open(shard.local()) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                parts.append(np.load(io.BytesIO(data)))
                parts.append(np.array([eos], dtype=loader.dataset.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=loader.dataset.dtype)
