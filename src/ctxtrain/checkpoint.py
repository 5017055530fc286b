"""Sharded checkpoints that describe themselves, a commit marker, retention, resume.

    RUN_DIR/checkpoints/step_000200/   DeepSpeed's per-rank files (one optimizer shard per rank under ZeRO)
                        meta.json      the TrainState of every rank (step, tokens, loader cursors, RNG states,
                                       tracker run id ...), world size, config (and its model hash), manifest
                        COMMITTED      written last, once every rank has finished writing
    RUN_DIR/checkpoints/latest         name of the newest committed checkpoint, replaced atomically

A directory without COMMITTED does not exist for resume: it is a save that a crash interrupted, and the
next save of that step removes it. meta.json also holds a manifest (size and CRC-32 of every file, each rank
hashing its own files at save time); resume and export verify a checkpoint against it before using it, and a
damaged newest checkpoint is reported in one line and passed over for the previous committed one.
Retention keeps the newest `checkpoint.keep_last` plus every step that is
a multiple of `checkpoint.keep_every`.

With `checkpoint.storage` set to a URI (s3://, gs://, file://), every rank writes into a local staging
directory of the same layout, uploads its own files, and rank 0 uploads meta.json, then COMMITTED, then
latest: the commit order holds in the bucket too. Resume downloads the chosen checkpoint into staging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ctxtrain.config import Config, deepspeed_zero_stage, diff_fields, section_hash
from ctxtrain.errors import UserError
from ctxtrain.rundir import RunDir, write_atomic
from ctxtrain.state import meta_of

if TYPE_CHECKING:
    from ctxtrain.faults import Faults
    from ctxtrain.state import TrainState

STEP_DIR = re.compile(r"step_(\d{6,})$")
COMMITTED = "COMMITTED"
META = "meta.json"


def tag_of(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------------------
# Storage: a local (or shared) directory, or an object-store URI (ctxtrain.storage)


class LocalStorage:
    """Checkpoints written in place (a local disk or a filesystem shared by all nodes)."""

    def __init__(self, root: Path):
        self.root = root
        self.local_root = root

    def list_steps(self) -> list[tuple[int, bool]]:
        """(step, committed) of every step directory, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), (p / COMMITTED).is_file()))
        return sorted(out)

    def read_meta(self, tag: str) -> dict:
        return json.loads((self.root / tag / META).read_bytes())

    def sizes(self, tag: str) -> dict[str, int]:
        """name -> size of every file of a checkpoint directory."""
        d = self.root / tag
        return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.is_dir() else {}

    def remove(self, tag: str) -> None:
        shutil.rmtree(self.root / tag, ignore_errors=True)

    def upload_rank_files(self, tag: str, names: list[str]) -> None:
        pass  # already in place

    def put_text(self, rel: str, text: str) -> None:
        write_atomic(self.root / rel, text)

    def fetch(self, tag: str, rank: int, every_rank: bool = False) -> None:
        pass

    def share_universal(self, tag: str) -> None:
        pass  # every rank reads the same directory

    def fetch_universal(self, tag: str) -> None:
        pass

    def drop_staged(self, tag: str) -> None:
        pass  # the files are the checkpoint

    def describe(self, tag: str) -> str:
        return str(self.root / tag)


class UriStorage:
    """Checkpoints in an object store (s3://, gs://, hdfs://, file://; `ctxtrain.storage`), staged locally."""

    def __init__(self, uri: str, staging: Path):
        from ctxtrain.storage import ObjectStore

        self.store = ObjectStore(uri, "checkpoint.storage")
        self.uri = uri.rstrip("/")
        self.local_root = staging

    def list_steps(self) -> list[tuple[int, bool]]:
        out = []
        for entry in self.store.list():
            m = STEP_DIR.match(entry.name)
            if m and entry.is_dir:
                out.append((int(m.group(1)), self.store.size(f"{entry.name}/{COMMITTED}") is not None))
        return sorted(out)

    def read_meta(self, tag: str) -> dict:
        return json.loads(self.store.read(f"{tag}/{META}"))

    def sizes(self, tag: str) -> dict[str, int]:
        return {e.name: e.size for e in self.store.list(tag) if not e.is_dir}

    def remove(self, tag: str) -> None:
        self.store.remove_dir(tag)
        shutil.rmtree(self.local_root / tag, ignore_errors=True)

    def upload_rank_files(self, tag: str, names: list[str]) -> None:
        self.store.make_dir(tag)
        for name in names:
            self.store.upload(self.local_root / tag / name, f"{tag}/{name}")

    def put_text(self, rel: str, text: str) -> None:
        self.store.write(rel, text.encode())

    def fetch(self, tag: str, rank: int, every_rank: bool = False) -> None:
        """Download this rank's shard (every rank's, for a conversion) and the shared files into staging.
        Ranks of one node share the staging directory, so each file lands under a temporary name and is
        renamed."""
        dest = self.local_root / tag
        dest.mkdir(parents=True, exist_ok=True)
        for entry in self.store.list(tag):
            m = re.search(r"zero_pp_rank_(\d+)_", entry.name)
            if entry.is_dir or (m and int(m.group(1)) != rank and not every_rank):
                continue
            target = dest / entry.name
            if target.is_file() and target.stat().st_size == entry.size:
                continue
            tmp = dest / f".{entry.name}.rank{rank}"
            self.store.download(f"{tag}/{entry.name}", tmp)
            os.replace(tmp, target)

    def share_universal(self, tag: str) -> None:
        """Upload the checkpoint's universal conversion beside it, for the ranks of other nodes (and later
        runs)."""
        if self.store.size(f"{tag}/{UNIVERSAL}/{COMMITTED}") is not None:
            return
        self.store.upload(self.local_root / tag / UNIVERSAL, f"{tag}/{UNIVERSAL}")

    def fetch_universal(self, tag: str) -> None:
        """The conversion, downloaded into this node's staging unless a rank of this node already has it."""
        out = self.local_root / tag / UNIVERSAL
        if (out / COMMITTED).is_file():
            return
        tmp = self.local_root / tag / f".{UNIVERSAL}.fetch-{os.getpid()}"
        self.store.download(f"{tag}/{UNIVERSAL}", tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another rank of this node was first
            shutil.rmtree(tmp, ignore_errors=True)

    def drop_staged(self, tag: str) -> None:
        """After the commit the bucket holds the checkpoint; the local staging copy would only take disk."""
        shutil.rmtree(self.local_root / tag, ignore_errors=True)

    def describe(self, tag: str) -> str:
        return f"{self.uri}/{tag}"


def open_storage(cfg: Config) -> LocalStorage | UriStorage:
    """The run's checkpoint storage: checkpoint.storage (a URI, staged in RUN_DIR/checkpoints; or a
    directory), else RUN_DIR/checkpoints."""
    run = RunDir(cfg.train.run_dir)
    root = run.checkpoint_root(cfg.checkpoint.storage)
    if isinstance(root, str):
        return UriStorage(root, run.checkpoints)
    return LocalStorage(root)


# ---------------------------------------------------------------------------------------------------------
# Choosing and checking what to resume from


def committed_steps(storage) -> list[int]:
    return [step for step, ok in storage.list_steps() if ok]


META_KEYS = ("step", "tokens", "world_size", "loader", "rng", "config")


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def manifest(local_dir: Path, names: list[str]) -> dict[str, dict]:
    """Size and CRC-32 of the named files (a rank's own files, hashed by that rank right after writing)."""
    return {n: {"size": (local_dir / n).stat().st_size, "crc32": crc32_of(local_dir / n)} for n in names}


def verify(storage, tag: str, share: Optional[tuple[int, int]] = (0, 1)) -> Optional[str]:
    """Why a committed checkpoint cannot be used (meta.json unreadable or incomplete, a file missing or of
    the wrong size, a CRC mismatch), or None when it is sound. Sizes are checked for every file; CRCs (local
    storage only) for the files of `share` = (rank, world): the world's ranks split the reading, and the
    caller combines their answers. share=None checks sizes only (cheap, for a launcher's preflight)."""
    try:
        meta = storage.read_meta(tag)
    except FileNotFoundError:
        return f"{META} is missing"
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return f"{META} is not valid JSON ({str(e).splitlines()[0][:80]})"
    except OSError as e:
        return f"{META} cannot be read ({e.strerror or e})"
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        return f"{META} lacks {', '.join(missing)}"
    files = meta.get("files")
    if not isinstance(files, dict):
        return None  # written before manifests existed: nothing more to check
    present = storage.sizes(tag)
    for name, want in sorted(files.items()):
        if name not in present:
            return f"{name} is missing"
        if present[name] != want["size"]:
            return (f"{name} is {present[name]:,} bytes, the manifest says {want['size']:,} (truncated or "
                    "overwritten)")
    if share is not None and isinstance(storage, LocalStorage):
        rank, world = share
        for i, (name, want) in enumerate(sorted(files.items())):
            if i % world == rank and crc32_of(storage.root / tag / name) != want["crc32"]:
                return f"{name} does not match its CRC-32 (corrupted)"
    return None


class Target:
    """A committed checkpoint chosen for resume: the storage that holds it and its tag. own: this run's (else
    another run's, named by --resume PATH: this run then starts a trajectory of its own from it)."""

    def __init__(self, storage, tag: str, notices: Optional[list[str]] = None, own: bool = True):
        self.storage, self.tag, self.notices, self.own = storage, tag, notices or [], own

    def describe(self) -> str:
        return self.storage.describe(self.tag)


def _one_answer(reason: Optional[str], agree) -> Optional[str]:
    answers = agree(reason)
    return next((a for a in answers if a), None)


def resume_target(cfg: Config, storage, launch_id: Optional[str] = None,
                  share: Optional[tuple[int, int]] = None, agree=lambda r: [r]) -> Optional[Target]:
    """The checkpoint to resume from: the newest sound committed one (auto), none (never), or exactly the one
    named by --resume (a path, or a step_NNNNNN of this run) — except after a restart within one launch (Ray
    restarted the workers): then the newest sound committed checkpoint whatever the setting, since this launch
    wrote it. A damaged checkpoint is passed over with a notice (auto) or refused (named); one written for
    another model or ZeRO stage is refused (`check_compatible`).

    share=(rank, world) splits the CRC reading across the ranks and agree (an all-gather) combines their
    verdicts, so that every rank makes the same choice."""
    target = _choose(cfg, storage, launch_id, share, agree)
    if target is not None:
        check_compatible(target.storage.read_meta(target.tag), cfg, target.describe())
    return target


def _choose(cfg: Config, storage, launch_id: Optional[str], share: Optional[tuple[int, int]],
            agree) -> Optional[Target]:
    setting = cfg.checkpoint.resume
    steps = committed_steps(storage)
    if setting not in ("auto", "never"):
        named = _named(setting, storage)
        if not (launch_id and steps and _launch_of(storage, steps[-1]) == launch_id):
            reason = _one_answer(verify(named.storage, named.tag, share), agree)
            if reason:
                raise UserError(f"--resume {setting}: checkpoint {named.describe()} is damaged: {reason}; "
                                "name another committed checkpoint, or omit --resume to take the newest "
                                "sound one")
            return named
    elif setting == "never" and not (launch_id and steps and _launch_of(storage, steps[-1]) == launch_id):
        return None
    notices = []
    for step in reversed(steps):
        reason = _one_answer(verify(storage, tag_of(step), share), agree)
        if reason is None:
            if notices:
                notices[-1] += f"; resuming from {tag_of(step)}"
            return Target(storage, tag_of(step), notices)
        notices.append(f"checkpoint {storage.describe(tag_of(step))} is damaged ({reason}); passed over")
    if notices:
        raise UserError(f"every committed checkpoint of {storage.describe('')} is damaged (newest: "
                        f"{notices[0].split(' is damaged ', 1)[1].removesuffix('; passed over')}); "
                        "start fresh with --no-resume")
    return None


def _launch_of(storage, step: int) -> Optional[str]:
    try:
        return storage.read_meta(tag_of(step)).get("launch_id")
    except (OSError, ValueError, AttributeError):
        return None


def _same_place(a, b) -> bool:
    """Two storages name the same checkpoint root (a path given two ways, or the same URI)."""
    if isinstance(a, LocalStorage) and isinstance(b, LocalStorage):
        return a.root.resolve() == b.root.resolve()
    return a.describe("") == b.describe("")


def _named(setting: str, storage) -> Target:
    """The checkpoint that --resume names: a directory (this run's or another's) or a tag of this run."""
    path = Path(setting.rstrip("/"))
    m = STEP_DIR.match(path.name)
    if not m:
        raise UserError(f"--resume {setting}: not a checkpoint directory (step_NNNNNN); committed ones of "
                        f"this run: {', '.join(tag_of(s) for s in committed_steps(storage)) or 'none'}")
    if len(path.parts) == 1 and "://" not in setting:  # a bare tag: this run's checkpoint of that step
        where = storage
    elif path.is_dir():
        where = LocalStorage(path.parent.resolve())
    else:
        raise UserError(f"--resume {setting}: no such directory; pass the path of a committed checkpoint "
                        "(RUN_DIR/checkpoints/step_NNNNNN) or a step_NNNNNN of this run")
    if int(m.group(1)) not in committed_steps(where):
        raise UserError(f"--resume {setting}: {where.describe(path.name)} has no {COMMITTED} marker (an "
                        "interrupted save) or does not exist; pick a committed checkpoint")
    return Target(where, path.name, own=where is storage or _same_place(where, storage))


def check_compatible(meta: dict, cfg: Config, where: str) -> None:
    """Refuse a checkpoint whose model or ZeRO stage differs, naming the fields (another world size is fine:
    `load` converts the checkpoint)."""
    theirs = (meta.get("config") or {}).get("model")
    ours = cfg.to_dict()["model"]
    if theirs != ours:
        diffs = diff_fields(theirs, ours, "model.")
        raise UserError(f"checkpoint {where} was written for another model ({'; '.join(diffs)}); "
                        "resume with the same model config or start fresh with --no-resume")
    if meta["config"]["zero"]["stage"] != cfg.zero.stage:
        raise UserError(f"checkpoint {where} was written with zero.stage={meta['config']['zero']['stage']}, "
                        f"this run has {cfg.zero.stage}; resume with the same stage")


def retention(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """The committed steps to delete: all but the newest keep_last and the multiples of keep_every."""
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


def rank_files(local_dir: Path, rank: int) -> list[str]:
    """The DeepSpeed files this rank wrote (rank 0 also owns the shared ones)."""
    names = []
    for p in sorted(local_dir.iterdir()):
        m = re.search(r"zero_pp_rank_(\d+)_", p.name)
        if m:
            if int(m.group(1)) == rank:
                names.append(p.name)
        elif rank == 0 and p.name not in (META, COMMITTED):
            names.append(p.name)
    return names


# ---------------------------------------------------------------------------------------------------------
# The save and load protocols (every rank calls them)


def save(engine, storage, cfg: Config, state: TrainState, faults: Optional[Faults] = None) -> Optional[str]:
    """Write the checkpoint of state.step: DeepSpeed shards from every rank, then meta.json (every rank's
    state_dict(), the config, the files' manifest), COMMITTED and latest from rank 0.

    A write that fails (a full disk, a quota, an I/O error) on any rank leaves no trace: the partial directory
    is removed, rank 0 prints one line, and training goes on. After a commit rank 0 applies the retention
    policy. Returns, on rank 0, why the checkpoint was not written (None: committed). faults: a rehearsal may
    kill this rank once its shard is written, before the commit.
    """
    from ctxtrain.engine import barrier, gather_objects

    tag, rank = tag_of(state.step), state.rank
    if rank == 0:
        if any(tag_of(step) == tag for step, _ in storage.list_steps()):
            storage.remove(tag)  # a save of this step that a crash interrupted (or an older run's)
    barrier()
    error, files = None, {}
    try:
        engine.save(str(storage.local_root), tag)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError, without errno
        if isinstance(e, RuntimeError) and not _disk_full(storage.local_root):
            raise
        error = f"rank {rank}: {_write_error(e, storage.local_root)}"
        barrier()  # DeepSpeed's closing barrier, where the ranks whose writes succeeded wait
    if faults is not None:
        faults.at_checkpoint(state.step)
    if error is None:
        try:
            names = rank_files(storage.local_root / tag, rank)
            files = manifest(storage.local_root / tag, names)
            storage.upload_rank_files(tag, names)
        except OSError as e:
            error = f"rank {rank}: {_write_error(e, storage.local_root)}"
    states = gather_objects({"state": state.state_dict(), "files": files, "error": error})  # also the barrier
    errors = [s["error"] for s in states if s["error"]]
    if rank == 0:
        if not errors:
            meta = {**meta_of([s["state"] for s in states]), "model_hash": section_hash(cfg.model),
                    "config": cfg.to_dict(), "time": time.time(),
                    "files": {name: entry for s in states for name, entry in s["files"].items()}}
            try:
                storage.put_text(f"{tag}/{META}", json.dumps(meta, indent=1) + "\n")
                storage.put_text(f"{tag}/{COMMITTED}", f"{time.time()}\n")
            except OSError as e:
                errors.append(f"rank 0: {_write_error(e, storage.local_root)}")
        if errors:
            storage.remove(tag)  # nothing half-written stays behind; the committed checkpoints are untouched
        else:
            try:
                storage.put_text("latest", tag + "\n")
            except OSError:
                pass  # informational only: resume lists the committed directories
    barrier()
    storage.drop_staged(tag)
    if rank != 0:
        return None
    if errors:
        newest = committed_steps(storage)
        print(f"ctxtrain: checkpoint {tag} not written ({errors[0]} writing {storage.describe(tag)}); the "
              f"newest committed one is {tag_of(newest[-1]) if newest else 'none'}; training goes on",
              flush=True)
        return errors[0]
    apply_retention(storage, cfg)
    return None


FULL_BELOW = 64 << 20  # bytes free under which a failed write is put down to a full disk


def _disk_full(where: Path) -> bool:
    try:
        return shutil.disk_usage(where).free < FULL_BELOW
    except OSError:
        return False


def _write_error(e: Exception, where: Path) -> str:
    """One line for a failed checkpoint write: the errno's text, or (torch.save gives a RuntimeError without
    one) what the disk says."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if _disk_full(where):
        return f"No space left on device ({shutil.disk_usage(where).free >> 20} MiB free)"
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


UNIVERSAL = "universal"  # inside a checkpoint directory: its conversion for other world sizes
CONVERSION_WAIT_S = 4 * 3600.0  # how long ranks wait for rank 0's universal conversion (a 1B model: minutes)


def load(engine, target: Target, cfg: Config, state: Optional[TrainState] = None) -> dict:
    """Check a verified committed checkpoint against this run, fetch it if remote, load it into the engine and
    hand its meta.json to the state (None: the weights and optimizer only); returns meta.json.

    Written by another number of workers under ZeRO 1-3, it is first converted into DeepSpeed's universal
    format (rank 0, once: the conversion is kept in the checkpoint's `universal/` folder and reused; the
    others wait), which loads on any number of workers with the fp32 master weights and Adam's moments and
    step."""
    from ctxtrain.engine import barrier, post_once, to_universal, wait_posted

    storage, tag, rank, world_size = target.storage, target.tag, engine.dist.rank, engine.dist.world_size
    meta = storage.read_meta(tag)
    check_compatible(meta, cfg, storage.describe(tag))
    universal = meta["world_size"] != world_size and deepspeed_zero_stage(cfg) > 0
    storage.fetch(tag, rank, every_rank=universal and rank == 0)
    try:
        if universal:
            # Rank 0 converts (minutes for a 1B model) while the others wait on the store, whose wait does not
            # count against the group's collective deadline; a failed conversion reaches every rank.
            key = f"ctxtrain/universal/{tag}"
            if rank == 0:
                try:
                    convert_once(storage, tag, to_universal)
                except Exception as e:  # noqa: BLE001  (every rank must hear of it, not wait)
                    post_once(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    raise
                post_once(key, "ok")
            else:
                outcome = wait_posted(key, CONVERSION_WAIT_S)
                if outcome != "ok":
                    raise RuntimeError(f"rank 0 could not convert it ({outcome})")
            storage.fetch_universal(tag)
            engine.load(str(storage.local_root / tag), UNIVERSAL, universal=True)
        else:
            engine.load(str(storage.local_root), tag)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError) as e:  # a damaged file
        raise UserError(f"checkpoint {storage.describe(tag)} could not be loaded"
                        f"{' on ' + str(world_size) + ' workers' if universal else ''} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); name an older "
                        "committed one with --resume, or start fresh with --no-resume") from None
    barrier()  # every rank has read its files: a URI storage's local copy can go (the store keeps it)
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        storage.drop_staged(tag)
    if state is not None:
        state.load_state_dict(meta, origin=None if target.own else target.describe())
    if rank == 0 and state is not None and meta["world_size"] != world_size:
        before, now = meta.get("global_batch"), state.global_batch
        print(f"ctxtrain: checkpoint {tag} was written by {meta['world_size']} workers, this run has "
              f"{world_size}: {'converted to the universal format; ' if universal else ''}micro-batch "
              f"{cfg.data.batch_size} x accumulation {cfg.train.grad_accum} per worker, global batch {now}"
              + (f" (was {before}; set train.global_batch to keep it)" if before and before != now else ""),
              flush=True)
    return meta


def convert_once(storage, tag: str, convert) -> Path:
    """The checkpoint's universal conversion: made once (into a temporary folder renamed into place, so that
    an interrupted conversion is never taken for one) and then reused; with a URI storage also uploaded."""
    out = storage.local_root / tag / UNIVERSAL
    if not (out / COMMITTED).is_file():
        tmp = storage.local_root / tag / f".{UNIVERSAL}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        convert(str(storage.local_root / tag), str(tmp))
        (tmp / COMMITTED).write_text(f"{time.time()}\n")
        os.replace(tmp, out)
    storage.share_universal(tag)
    return out


def apply_retention(storage, cfg: Config) -> list[int]:
    """Delete committed checkpoints beyond the retention policy (rank 0); returns the deleted steps."""
    doomed = retention(committed_steps(storage), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
    for step in doomed:
        storage.remove(tag_of(step))
    return doomed
