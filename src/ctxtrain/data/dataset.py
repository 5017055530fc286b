"""A directory written by `ctxtrain prepare`, read from its index.json: the task, the vocabulary, the shards.
The directory may sit under a URI (s3://, gs://, http(s)://, file://): then index.json and tokenizer.json are
read into a node-local cache and each shard is fetched there when first read (`ctxtrain.data.remote`).

No torch and no webdataset here: the driver checks the data before it starts any worker (ctxtrain.preflight),
and the loader (ctxtrain.data.loader) reads the shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ctxtrain.errors import UserError
from ctxtrain.storage import is_uri

if TYPE_CHECKING:
    from ctxtrain.data.remote import CacheSettings, RemoteData


class DataError(UserError):
    """A missing, corrupt or inconsistent dataset; the message names the file."""


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path  # where it is read from on this machine (a remote dataset's: in the node's cache)
    docs: int
    tokens: int
    bytes: int
    remote: Optional["RemoteData"] = field(default=None, compare=False, repr=False)
    # translation: each pair's (source, target) ids, (docs, 2), where prepare recorded them
    lengths: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def local(self) -> Path:
        """The shard's file on this machine, fetched into the node's cache first from a remote dataset."""
        return self.path if self.remote is None else self.remote.ensure_file(self.name, self.bytes)


def data_location(path: str | Path) -> str | Path:
    """data.path as readers take it: a Path, or a URI unchanged (Path() would fold its "//")."""
    return str(path) if is_uri(path) else Path(path)


INDEX_KEYS = ("task", "vocab_size", "dtype", "special", "tokenizer_sha256", "splits")


class Dataset:
    """A directory written by `ctxtrain prepare`: index.json, tokenizer.json and the tar shards."""

    def __init__(self, path: str | Path, cache: Optional["CacheSettings"] = None):
        self.remote: Optional[RemoteData] = None
        if is_uri(path):
            from ctxtrain.data.remote import RemoteData

            self.remote = RemoteData(str(path), cache)
            self.path = self.remote.local_dir  # index.json and tokenizer.json; the shards as they are read
            self.read_meta()
            return
        self.path = Path(path)
        self.where = str(self.path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(
                f"{index_path} not found; data.path must be a directory made by `ctxtrain prepare` "
                f"(e.g. ctxtrain prepare --recipe stdlib --out {self.path})"
            )
        self.read_meta(index_path)

    def read_meta(self, index_path: Optional[Path] = None) -> None:
        if self.remote is not None:
            index_path, self.where = self.remote.read_meta(), self.remote.describe()
        try:
            self.index = json.loads(index_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{index_path} is not valid JSON ({str(e)[:80]}); re-run "
                            "`ctxtrain prepare`") from None
        except OSError as e:
            raise DataError(f"{index_path} cannot be read ({e.strerror or e}); check its "
                            "permissions") from None
        missing = [k for k in INDEX_KEYS if not isinstance(self.index, dict) or k not in self.index]
        if missing:
            raise DataError(f"{index_path} lacks {', '.join(missing)} (not written by `ctxtrain prepare`, or "
                            "edited); re-run `ctxtrain prepare`")
        self.task: str = self.index["task"]
        self.vocab_size: int = self.index["vocab_size"]
        try:
            self.dtype = np.dtype(self.index["dtype"])
        except TypeError:
            raise DataError(f"{index_path}: dtype {self.index['dtype']!r} is not a numpy dtype; "
                            "re-run `ctxtrain prepare`") from None
        self.special: dict = self.index["special"]
        self.fingerprint = hashlib.sha256(
            json.dumps([self.index["tokenizer_sha256"], self.index["splits"]], sort_keys=True).encode()
        ).hexdigest()[:16]
        if self.remote is not None:
            self.remote.ensure_file("tokenizer.json", sha256=self.index["tokenizer_sha256"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def shards(self, split: str) -> list[Shard]:
        if split not in self.index["splits"]:
            raise DataError(f"{self.path}/index.json has no {split!r} split")
        try:
            shards = [
                Shard(s["name"], self.path / s["name"], s["docs"], s["tokens"], s["bytes"], self.remote,
                      np.asarray(s["lengths"], dtype=np.int64).reshape(-1, 2) if "lengths" in s else None)
                for s in self.index["splits"][split]["shards"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else e
            raise DataError(f"{self.where}/index.json: the {split!r} split's shard list is malformed "
                            f"({what}); re-run `ctxtrain prepare`") from None
        for shard in shards:
            if shard.lengths is not None and len(shard.lengths) != shard.docs:
                raise DataError(f"{self.where}/index.json: shard {shard.name} records {len(shard.lengths)} "
                                f"pair lengths for {shard.docs} pairs; re-run `ctxtrain prepare`")
        return shards

    def usable_shards(self, split: str, skip_corrupt: bool) -> tuple[list[Shard], list[str]]:
        """Shards present with the size index.json recorded; the others raise, or are skipped and named."""
        good, skipped = [], []
        shards = self.shards(split)
        sizes = ({s.name: (s.path.stat().st_size if s.path.is_file() else None) for s in shards}
                 if self.remote is None else self.remote.sizes([s.name for s in shards]))
        for shard in shards:
            problem, where = None, shard.path if self.remote is None else self.remote.describe(shard.name)
            if sizes[shard.name] is None:
                problem = "is missing" if self.remote is None else "is missing from the store"
            elif sizes[shard.name] != shard.bytes:
                problem = (f"has {sizes[shard.name]} bytes, index.json says {shard.bytes} (truncated or "
                           "rewritten)")
            if problem is None:
                good.append(shard)
            elif skip_corrupt:
                skipped.append(shard.name)
            else:
                raise DataError(
                    f"shard {where} {problem}; restore it or re-run `ctxtrain prepare`, "
                    "or set data.skip_corrupt=true to train without it"
                )
        return good, skipped
