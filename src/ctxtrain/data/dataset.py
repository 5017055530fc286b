"""A directory written by `ctxtrain prepare`, read from its index.json: the task, the vocabulary, the shards.

No torch and no webdataset here: the driver checks the data before it starts any worker (ctxtrain.preflight),
and the loader (ctxtrain.data.loader) reads the shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxtrain.errors import UserError


class DataError(UserError):
    """A missing, corrupt or inconsistent dataset; the message names the file."""


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    docs: int
    tokens: int
    bytes: int


INDEX_KEYS = ("task", "vocab_size", "dtype", "special", "tokenizer_sha256", "splits")


class Dataset:
    """A directory written by `ctxtrain prepare`: index.json, tokenizer.json and the tar shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(
                f"{index_path} not found; data.path must be a directory made by `ctxtrain prepare` "
                f"(e.g. ctxtrain prepare --recipe stdlib --out {self.path})"
            )
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

    def shards(self, split: str) -> list[Shard]:
        if split not in self.index["splits"]:
            raise DataError(f"{self.path}/index.json has no {split!r} split")
        try:
            return [
                Shard(s["name"], self.path / s["name"], s["docs"], s["tokens"], s["bytes"])
                for s in self.index["splits"][split]["shards"]
            ]
        except (KeyError, TypeError) as e:
            raise DataError(f"{self.path}/index.json: the {split!r} split's shard list is malformed (no "
                            f"{e}); re-run `ctxtrain prepare`") from None

    def usable_shards(self, split: str, skip_corrupt: bool) -> tuple[list[Shard], list[str]]:
        """Shards present with the size index.json recorded; the others raise, or are skipped and named."""
        good, skipped = [], []
        for shard in self.shards(split):
            problem = None
            if not shard.path.is_file():
                problem = "is missing"
            elif shard.path.stat().st_size != shard.bytes:
                problem = (f"has {shard.path.stat().st_size} bytes, index.json says {shard.bytes} (truncated "
                           "or rewritten)")
            if problem is None:
                good.append(shard)
            elif skip_corrupt:
                skipped.append(shard.name)
            else:
                raise DataError(
                    f"shard {shard.path} {problem}; restore it or re-run `ctxtrain prepare`, "
                    "or set data.skip_corrupt=true to train without it"
                )
        return good, skipped
