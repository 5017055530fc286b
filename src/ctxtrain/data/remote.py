"""Shards from object storage or HTTP (`data.path` as s3://, gs://, http(s)://, file:// ...), through a
node-local cache.

The dataset's index.json and tokenizer.json are read from the store into the cache directory when a Dataset
opens; a shard is fetched into it the first time a reader on this node needs it (one process fetches, the
others of the node wait on its lock and read the same file), checked against the size index.json recorded,
and kept until the cache passes its limit, when the shards used longest ago are evicted. A transient error is
retried with backoff until `data.fetch_deadline_s`; then, or at once for a missing object or refused
credentials, one line names the URL.

Cache layout: CACHE_DIR/<16 hex of the URI>/{index.json, tokenizer.json, train-000000.tar, ...}.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ctxtrain.errors import UserError
from ctxtrain.storage import NotFound, Refused, open_store, replace_into, with_retries

DEFAULT_CACHE = "~/.cache/ctxtrain/data"


@dataclass(frozen=True)
class CacheSettings:
    """data.cache_dir, data.cache_limit_gb and data.fetch_deadline_s."""

    dir: Optional[str] = None
    limit_gb: Optional[float] = None
    deadline_s: float = 120.0


class RemoteData:
    """A dataset under a URI and its node-local cache directory (picklable: a DataLoader worker reopens the
    store)."""

    def __init__(self, uri: str, settings: Optional[CacheSettings] = None):
        self.uri = uri.rstrip("/")
        self.settings = settings or CacheSettings()
        root = Path(os.path.expanduser(self.settings.dir or os.environ.get("CTXTRAIN_DATA_CACHE")
                                       or DEFAULT_CACHE))
        self.local_dir = root / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        try:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            probe = self.local_dir / f".writable-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"data.cache_dir={root} is not writable ({e.strerror or e}); point "
                            "data.cache_dir at a writable local directory for the shards fetched from "
                            f"{self.describe()}") from None
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.uri, "data.path")
        return self._store

    def describe(self, name: str = "") -> str:
        head = self.uri.partition("?")[0]
        return f"{head}/{name}" if name else head

    def _retrying(self, operation, name: str):
        try:
            return with_retries(operation, f"data.path: fetching {self.describe(name)}",
                                self.settings.deadline_s)
        except Refused as e:
            raise UserError(f"data.path={self.describe()}: the store refused {name} ({e}); check the "
                            "credentials in this machine's environment (AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None

    def read_meta(self) -> Path:
        """index.json from the store into the cache (every open: the store is the truth); its path."""
        try:
            data = self._retrying(lambda: self.store.read("index.json"), "index.json")
        except NotFound:
            raise UserError(f"data.path={self.describe()} holds no index.json; point data.path at a dataset "
                            "written by `ctxtrain prepare` (its --out, uploaded whole)") from None
        target = self.local_dir / "index.json"
        tmp = self.local_dir / f".index.json.{os.getpid()}"
        tmp.write_bytes(data)
        replace_into(tmp, target)
        return target

    def ensure_file(self, name: str, size: Optional[int] = None, sha256: Optional[str] = None) -> Path:
        """A file of the dataset in the cache, fetched unless it is there with the expected size (or hash);
        evicts past the limit. Processes of one node take turns on a lock: one fetch a node."""
        target = self.local_dir / name
        with open(self.local_dir / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.is_file() and _matches(target, size, sha256):
                os.utime(target)  # used now: evicted last
                return target
            tmp = self.local_dir / f".{name}.{os.getpid()}.part"
            try:
                self._retrying(lambda: self.store.download(name, tmp), name)
            except NotFound:
                tmp.unlink(missing_ok=True)
                raise UserError(f"{self.describe(name)} is missing from the store (index.json lists it); "
                                "upload the dataset again whole, or set data.skip_corrupt=true to train "
                                "without it") from None
            if not _matches(tmp, size, sha256):
                got = tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                raise UserError(f"{self.describe(name)} has {got} bytes, index.json says {size} (truncated "
                                "or rewritten in the store); upload the dataset again whole")
            replace_into(tmp, target)
        self.evict(keep=target)
        return target

    def sizes(self, names: list[str]) -> dict[str, Optional[int]]:
        """The store's size of each file (None: not there): one listing of an object store, a HEAD each over
        HTTP."""
        listing = getattr(self.store, "list", None)
        if listing is not None:
            entries = self._retrying(lambda: {e.name: e.size for e in listing() if not e.is_dir}, "")
            return {n: entries.get(n) for n in names}
        return {n: self._retrying(lambda n=n: self.store.size(n), n) for n in names}

    def evict(self, keep: Path) -> None:
        """Past data.cache_limit_gb: remove the shards used longest ago (never `keep`)."""
        if self.settings.limit_gb is None:
            return
        limit = int(self.settings.limit_gb * (1 << 30))
        shards = sorted((p for p in self.local_dir.glob("*.tar") if p != keep),
                        key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in shards) + (keep.stat().st_size if keep.is_file() else 0)
        for p in shards:
            if total <= limit:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)  # a reader that has it open keeps reading it


def _matches(path: Path, size: Optional[int], sha256: Optional[str]) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256
