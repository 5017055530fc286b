"""The shard format, written and read only here (the one module importing webdataset): a split is
`{split}-%06d.tar` files of samples, each sample a set of `KEY.FIELD.npy` members (LM: `ids.npy`, a whole
tokenized document; translation: `src.npy` and `tgt.npy`), uint16 or uint32 ids as index.json says.

Writing is deterministic (fixed mtime, owner and mode in every tar header): the same samples give
byte-identical shards. Reading decodes the .npy members without copying them.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import webdataset as wds

from ctxtrain.data.dataset import DataError, Shard


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardSet:
    """Writes `{split}-%06d.tar` shards of about target_bytes each and records what went into them."""

    def __init__(self, out: Path, split: str, target_bytes: int):
        self.out, self.split, self.target = out, split, target_bytes
        self.shards: list[dict] = []
        self._writer: Optional[wds.TarWriter] = None
        self._fh = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._fh = open(self.out / name, "wb")
        # Fixed mtime/user/mode: re-running prepare writes byte-identical tars.
        self._writer = wds.TarWriter(self._fh, mtime=0, user="ctxtrain", group="ctxtrain", mode=0o444)
        self.shards.append({"name": name, "docs": 0, "tokens": 0, "bytes": 0})

    def write(self, sample: dict, tokens: int, lengths: Optional[list[int]] = None) -> None:
        """lengths: a translation pair's [source, target] ids, recorded in index.json (`lengths` of the
        shard's record, one pair per sample) so that the loader can batch pairs by length without reading."""
        if self._writer is None:
            self._open()
        key = f"{self._count:09d}"
        self._count += 1
        self._writer.write({"__key__": key, **{k: npy_bytes(v) for k, v in sample.items()}})
        rec = self.shards[-1]
        rec["docs"] += 1
        rec["tokens"] += tokens
        if lengths is not None:
            rec.setdefault("lengths", []).append(lengths)
        if self._fh.tell() >= self.target:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            self.shards[-1]["bytes"] = (self.out / self.shards[-1]["name"]).stat().st_size
            self._writer = self._fh = None

    def finish(self) -> dict:
        self._close()
        return {
            "shards": self.shards,
            "docs": sum(s["docs"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
        }


# ---------------------------------------------------------------------------------------------------------
# Reading


def decode_npy(data: bytes, dtype: np.dtype) -> np.ndarray:
    """The array of a .npy member, without copying (the header is 10 or 12 bytes plus its dict)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    else:
        start = 12 + int.from_bytes(data[8:12], "little")
    return np.frombuffer(data, dtype=dtype, offset=start)


def iter_shard(shard: Shard, dtype: np.dtype, fields: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
    """The samples of one shard in order, each a tuple of arrays (one per field); errors name the shard."""
    try:
        with open(shard.local(), "rb") as fh:
            key, parts = None, {}
            for rec in wds.tariterators.tar_file_iterator(fh):
                base, ext = rec["fname"].split(".", 1)
                if base != key:
                    if parts:
                        yield tuple(parts[f] for f in fields)
                    key, parts = base, {}
                if ext in fields:
                    parts[ext] = decode_npy(rec["data"], dtype)
            if parts:
                yield tuple(parts[f] for f in fields)
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as e:
        raise DataError(
            f"shard {shard.path} is corrupt or unreadable ({str(e).split(' @ ')[0]}); re-run `ctxtrain "
            "prepare`"
        ) from None
