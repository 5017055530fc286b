"""Files under a URI: object stores (s3://, gs://, hdfs://, file://) through pyarrow's filesystems, and
read-only HTTP(S) servers through the standard library. The one module that talks to either: checkpoints
(`checkpoint.storage`) and data (`data.path`) both come through here.

Credentials are the storage clients' own, read from the environment as they read it (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS ...); ctxtrain never writes them anywhere.
An endpoint other than the provider's goes in the URI (`s3://bucket/path?endpoint_override=http://host:port`).

`with_retries` runs an operation until it succeeds, a permanent error (not found, access refused) ends it, or
a deadline passes: a transient network error does not end a run.
"""

from __future__ import annotations

import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

from ctxtrain.errors import UserError

OBJECT_SCHEMES = ("s3", "gs", "gcs", "hdfs", "file")
HTTP_SCHEMES = ("http", "https")
T = TypeVar("T")


def is_uri(path) -> bool:
    """A URI ctxtrain reads through this module (not a plain path)."""
    scheme = urllib.parse.urlsplit(str(path)).scheme
    return scheme in OBJECT_SCHEMES + HTTP_SCHEMES


class NotFound(FileNotFoundError):
    """The object is not there (permanent)."""


class Refused(PermissionError):
    """The store refused the request: credentials or permissions (permanent)."""


@dataclass
class Entry:
    name: str
    is_dir: bool
    size: int


_REFUSED = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
            "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403", "HTTP status 401")


def _classify(e: Exception) -> Exception:
    """pyarrow's errors as NotFound / Refused / the error itself (transient)."""
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in str(e) or "NO_SUCH_BUCKET" in str(e):
        return NotFound(str(e).splitlines()[0])
    if any(word in str(e) for word in _REFUSED):
        return Refused(str(e).splitlines()[0])
    return e


class ObjectStore:
    """Files under an object-store URI through pyarrow (paths relative to the URI)."""

    def __init__(self, uri: str, what: str):
        import pyarrow.fs as pafs

        self._pafs = pafs
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with long messages
            raise UserError(f"{what}={uri}: cannot open ({str(e).splitlines()[0]}); check the URI and "
                            "credentials") from None
        self.uri = uri
        self.base = self.base.rstrip("/")

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def describe(self, rel: str = "") -> str:
        head, _, query = self.uri.partition("?")
        return f"{head.rstrip('/')}/{rel}" if rel else head

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _classify(e) from None

    def list(self, rel: str = "") -> list[Entry]:
        """What a directory holds ([] when there is none)."""
        pafs = self._pafs
        infos = self._call(self.fs.get_file_info, pafs.FileSelector(self.path(rel), allow_not_found=True))
        return [Entry(i.base_name, i.type == pafs.FileType.Directory, i.size or 0) for i in infos]

    def size(self, rel: str) -> Optional[int]:
        """A file's size; None when it is not there."""
        info = self._call(self.fs.get_file_info, self.path(rel))
        return info.size if info.type == self._pafs.FileType.File else None

    def read(self, rel: str) -> bytes:
        with self._call(self.fs.open_input_stream, self.path(rel)) as fh:
            return self._call(fh.read)

    def write(self, rel: str, data: bytes) -> None:
        with self._call(self.fs.open_output_stream, self.path(rel)) as fh:
            fh.write(data)

    def upload(self, local: Path, rel: str) -> None:
        """A local file or directory to rel."""
        pafs = self._pafs
        if local.is_dir():
            self._call(self.fs.create_dir, self.path(rel), recursive=True)
        self._call(pafs.copy_files, str(local), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                   destination_filesystem=self.fs)

    def download(self, rel: str, local: Path) -> None:
        """rel (a file or a directory) to a local path."""
        pafs = self._pafs
        self._call(pafs.copy_files, self.path(rel), str(local), source_filesystem=self.fs,
                   destination_filesystem=pafs.LocalFileSystem())

    def make_dir(self, rel: str) -> None:
        self._call(self.fs.create_dir, self.path(rel), recursive=True)

    def remove_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass


class HttpStore:
    """Files under an http(s):// URL, read-only (GET and HEAD through urllib)."""

    def __init__(self, uri: str, what: str, timeout_s: float = 30.0):
        self.uri, self.timeout = uri.rstrip("/"), timeout_s

    def describe(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def _open(self, rel: str, method: str = "GET"):
        request = urllib.request.Request(self.describe(rel), method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFound(f"HTTP 404 for {self.describe(rel)}") from None
            if e.code in (401, 403):
                raise Refused(f"HTTP {e.code} for {self.describe(rel)}") from None
            raise OSError(f"HTTP {e.code} for {self.describe(rel)}") from None
        except urllib.error.URLError as e:
            raise OSError(str(e.reason)) from None

    def size(self, rel: str) -> Optional[int]:
        try:
            with self._open(rel, "HEAD") as r:
                length = r.headers.get("Content-Length")
                return int(length) if length is not None else None
        except NotFound:
            return None

    def read(self, rel: str) -> bytes:
        with self._open(rel) as r:
            return r.read()

    def download(self, rel: str, local: Path) -> None:
        with self._open(rel) as r, open(local, "wb") as fh:
            while chunk := r.read(1 << 20):
                fh.write(chunk)


def open_store(uri: str, what: str) -> ObjectStore | HttpStore:
    """The store under a URI; `what` names the setting in error lines (e.g. "data.path")."""
    if urllib.parse.urlsplit(uri).scheme in HTTP_SCHEMES:
        return HttpStore(uri, what)
    return ObjectStore(uri, what)


def with_retries(operation: Callable[[], T], what: str, deadline_s: float, first_wait_s: float = 0.5) -> T:
    """operation() until it succeeds; transient errors (network, server) are retried with exponential
    backoff and jitter until deadline_s has passed, then named in one line; NotFound and Refused are raised at
    once (the caller names them)."""
    start, wait, tries = time.monotonic(), first_wait_s, 0
    while True:
        tries += 1
        try:
            return operation()
        except (NotFound, Refused):
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise UserError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                                f"(tried {tries} times over {time.monotonic() - start:.0f} s); check that "
                                "the address is reachable from this machine") from None
            time.sleep(min(wait * (0.5 + random.random()), left))
            wait = min(wait * 2, 8.0)


def replace_into(tmp: Path, target: Path) -> None:
    """Move a downloaded temporary file into place (atomic on one filesystem; another process of this node
    that was first wins and this copy is dropped)."""
    try:
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
