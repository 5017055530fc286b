"""Where text comes from: input files (plain text, JSONL, TSV) and the two offline recipes.

- `stdlib`: the Python standard library's own sources and docstrings (~30 MB, on every machine with Python).
- `debian-gettext-fr`: English->French pairs from the French gettext catalogs (.mo) of Debian packages,
  fetched with `apt-get download` (a package registry, so it works offline of the web).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import struct
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ctxtrain.errors import UserError

TEXT_SUFFIXES_JSONL = (".jsonl", ".json")
PAIR_SUFFIXES = (".tsv",)
DEFAULT_GETTEXT_PACKAGES = ("libreoffice-l10n-fr", "gcc-12-locales")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs, files and directories -> a sorted, de-duplicated list of files."""
    files: set[Path] = set()
    for pattern in patterns:
        matched = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matched:
            raise UserError(f"--input {pattern!r} matched no files; check the path or quote the glob")
        for m in matched:
            p = Path(m)
            if p.is_dir():
                files.update(q for q in p.rglob("*") if q.is_file())
            elif p.is_file():
                files.add(p)
    for f in sorted(files):
        check_text(f)
    return sorted(files)


def check_text(path: Path) -> None:
    """A corpus file must be text: NUL bytes in its first 8 KiB mean a binary (an executable, an archive)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as e:
        raise UserError(f"--input {path}: cannot be read ({e.strerror or e}); check its "
                        "permissions") from None
    if b"\0" in head:
        raise UserError(f"--input {path} is a binary file, not text; prepare reads text, JSONL or TSV: "
                        "remove it from --input")


@contextlib.contextmanager
def reading(path: Path):
    """Open a text input; a file that is not UTF-8 ends in one line naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            yield fh
    except UnicodeDecodeError as e:
        raise UserError(f"--input {path}: not UTF-8 text (byte {e.start} of a line); convert it to UTF-8 "
                        "or remove it from --input") from None


def detect_task(files: list[Path], src_field: str, tgt_field: str) -> str:
    """translation when the inputs are TSV, or JSONL records with both pair fields; lm otherwise."""
    if all(f.suffix in PAIR_SUFFIXES for f in files):
        return "translation"
    if all(f.suffix in TEXT_SUFFIXES_JSONL for f in files):
        with reading(files[0]) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{files[0]}:{lineno}: not a JSON line; fix the line or pass plain "
                                        "text files") from None
                    pair = isinstance(rec, dict) and src_field in rec and tgt_field in rec
                    return "translation" if pair else "lm"
    return "lm"


def iter_documents(files: list[Path], text_field: str) -> Iterator[str]:
    """LM documents: one per plain-text file, one per JSONL record (its text_field)."""
    for f in files:
        if f.suffix in TEXT_SUFFIXES_JSONL:
            with reading(f) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(
                            f"{f}:{lineno}: not a JSON object with a {text_field!r} field; fix the line or "
                            "pass --text-field"
                        ) from None
                    if text:
                        yield str(text)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text


def count_documents(files: list[Path]) -> int:
    """How many LM documents the files hold (one per plain-text file, one per non-blank JSONL line), counted
    without parsing or tokenizing them: prepare's val split is a share of documents."""
    count = 0
    for f in files:
        if f.suffix in TEXT_SUFFIXES_JSONL:
            with reading(f) as fh:
                count += sum(1 for line in fh if line.strip())
        else:
            count += 1
    return count


def read_pairs(files: list[Path], src_field: str, tgt_field: str) -> list[tuple[str, str]]:
    """Translation pairs from TSV (source<TAB>target) or JSONL ({src_field, tgt_field})."""
    pairs = []
    for f in files:
        with reading(f) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line.strip() or line.startswith("#"):
                    continue
                if f.suffix in PAIR_SUFFIXES:
                    cols = line.split("\t")
                    if len(cols) < 2:
                        raise UserError(f"{f}:{lineno}: expected source<TAB>target; fix or remove the line")
                    src, tgt = cols[0], cols[1]
                else:
                    try:
                        rec = json.loads(line)
                        src, tgt = rec[src_field], rec[tgt_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(
                            f"{f}:{lineno}: not a JSON object with {src_field!r} and {tgt_field!r}; "
                            "fix the line or pass --src-field/--tgt-field"
                        ) from None
                if src.strip() and tgt.strip():
                    pairs.append((src.strip(), tgt.strip()))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Recipes


def stdlib_files() -> list[Path]:
    """Every .py file of this interpreter's standard library (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                  and "dist-packages" not in p.parts)


def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a GNU .mo catalog: context stripped, first plural form, header skipped."""
    data = path.read_bytes()
    if len(data) < 28:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic == 0x950412DE else ">"
    _, n, orig_off, trans_off = struct.unpack(end + "4I", data[4:20])
    pairs = []
    for i in range(n):
        olen, opos = struct.unpack(end + "2I", data[orig_off + 8 * i : orig_off + 8 * i + 8])
        tlen, tpos = struct.unpack(end + "2I", data[trans_off + 8 * i : trans_off + 8 * i + 8])
        msgid = data[opos : opos + olen].decode("utf-8", errors="replace")
        msgstr = data[tpos : tpos + tlen].decode("utf-8", errors="replace")
        if not msgid:
            continue  # the catalog header
        msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]
        msgstr = msgstr.split("\x00", 1)[0]
        pairs.append((msgid, msgstr))
    return pairs


def _clean(text: str) -> str:
    text = re.sub(r"~(?=\w)", "", text)  # LibreOffice menu accelerators: "~File"
    return " ".join(text.split())


def gettext_pairs(root: Path, lang: str = "fr") -> list[tuple[str, str]]:
    """English->lang pairs from every `.../<lang>/LC_MESSAGES/*.mo` under root, cleaned and de-duplicated."""
    seen: set[tuple[str, str]] = set()
    pairs = []
    for mo in sorted(root.rglob("*.mo")):
        if f"/{lang}/" not in mo.as_posix():
            continue
        for src, tgt in read_mo(mo):
            src, tgt = _clean(src), _clean(tgt)
            if not src or not tgt or src == tgt or (src, tgt) in seen:
                continue
            seen.add((src, tgt))
            pairs.append((src, tgt))
    return pairs


def fetch_debian_gettext(cache: Path, packages: list[str]) -> Path:
    """apt-get download the packages into cache and unpack them; returns the unpacked root."""
    debs = cache / "debs"
    root = cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        cmd = ["apt-get", "download", *missing]
        out = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
        if out.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            out = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"apt-get download {' '.join(missing)} failed ({last}); run `apt-get update` (as root) and "
                "retry"
            )
    for deb in sorted(debs.glob("*.deb")):
        marker = root / f".{deb.name}.unpacked"
        if not marker.exists():
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            marker.touch()
    return root


@dataclass
class Recipe:
    name: str
    task: str
    description: str


RECIPES = {
    "stdlib": Recipe("stdlib", "lm", "Python standard library sources (this interpreter's)"),
    "debian-gettext-fr": Recipe(
        "debian-gettext-fr", "translation", "English->French pairs from Debian packages' French gettext "
                                            "catalogs"
    ),
}
