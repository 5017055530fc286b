"""Tracking behind a small interface (`log`, `log_config`, `summary`, `finish`): W&B and TensorBoard, only
here.

Rank 0 creates the W&B run; every other rank gets the no-op `Tracker`. The mode: `WANDB_MODE` when set,
else `tracking.mode`; `auto` means online when this machine is logged in (`wandb login`, i.e. ~/.netrc) or
`WANDB_API_KEY` is set, offline otherwise (the run lands in RUN_DIR/wandb/ and `wandb sync` uploads it).

One W&B run per job, across restarts. The run id is chosen at the first start (RUN_DIR/tracker.json), stored
in every checkpoint's meta.json and reused on resume with W&B's resume mode — after Ray restarted the workers
or after a re-run driver. A resumed job recomputes the steps after its checkpoint; W&B expects monotonic
steps, so steps that W&B already holds are not sent again (their recomputed values are the same: resume is
exact). What W&B holds is read from W&B itself, not assumed: online, the resumed run's step counter; offline,
the history records in this run's files under RUN_DIR/wandb (`read_history`). W&B writes asynchronously, so a
process killed by Ray can lose its last records: on resume, the steps that metrics.jsonl keeps (up to the
checkpoint) and W&B lacks are sent again from metrics.jsonl, then training continues. Each step reaches the
history once.
"""

from __future__ import annotations

import json
import netrc
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Optional

from ctxtrain.config import Config
from ctxtrain.rundir import RunDir, write_atomic


class Tracker:
    """The interface, and the no-op used on ranks other than 0 and when tracking is off."""

    run_id: Optional[str] = None
    last_step: int = 0  # the newest step the backend already holds (resumed runs)

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(cfg: Config) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.tracking.mode != "auto":
        return cfg.tracking.mode
    return "online" if logged_in() else "offline"


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


class WandbTracker(Tracker):
    def __init__(self, cfg: Config, run_id: str, run_dir: Path):
        import wandb

        self.mode = wandb_mode(cfg)
        t = cfg.tracking
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=t.project,
            entity=t.entity,
            group=t.group,
            tags=t.tags or None,
            name=t.name or run_dir.name,
            dir=str(RunDir(run_dir).path),
            mode=self.mode,
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.run_id = self.run.id
        if self.mode == "offline":
            self.last_step = max((step for step, _ in read_history(run_dir, self.run_id)), default=0)
        else:
            self.last_step = max(0, int(getattr(self.run, "step", 0) or 0) - 1) if self.run.resumed else 0

    def log(self, metrics: dict, step: int) -> None:
        if step <= self.last_step:
            return  # W&B already holds this step (recomputed after a resume, with the same values)
        self.run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=step)
        self.last_step = step

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            if v is not None:
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def choose_run_id(run_dir: Path, from_checkpoint: Optional[str], launch_id: Optional[str]) -> str:
    """The W&B run id of this start: the checkpoint's; else this launch's earlier start's (a restart before
    the first checkpoint); else a new one. Recorded in RUN_DIR/tracker.json."""
    path = RunDir(run_dir).tracker
    try:
        known = json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, or damaged: a new W&B run id, not a traceback
        known = {}
    known = known if isinstance(known, dict) else {}
    if from_checkpoint:
        run_id = from_checkpoint
    elif launch_id and known.get("launch_id") == launch_id and known.get("run_id"):
        run_id = known["run_id"]
    else:
        run_id = new_run_id()
    write_atomic(path, json.dumps({"run_id": run_id, "launch_id": launch_id}) + "\n")
    return run_id


class TensorBoardTracker(Tracker):
    """RUN_DIR/tensorboard/: every numeric metric of metrics.jsonl as a scalar under its own name
    (tensorboardX's writer), and the resolved config as text. One events file per start. A resumed start
    writes TensorBoard's purge marker at the step after its checkpoint, so what a killed start wrote past the
    checkpoint (recomputed now) is dropped by every TensorBoard reader; steps up to the checkpoint that the
    earlier files hold are not written again, and those they lost are sent again from metrics.jsonl like
    W&B's."""

    def __init__(self, run_dir: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        folder = RunDir(run_dir).tensorboard
        earlier = event_steps(folder)
        self.fresh = not earlier
        self.last_step = max((s for s in earlier if s <= resume_step), default=0)
        self.writer = SummaryWriter(str(folder), purge_step=None if self.fresh else resume_step + 1)

    def log(self, metrics: dict, step: int) -> None:
        if step <= self.last_step:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed process loses nothing logged before it (the writer buffers otherwise)
        self.last_step = step

    def log_config(self, config: dict) -> None:
        if self.fresh:
            import yaml

            dumped = yaml.safe_dump(config, sort_keys=False)
            text = "".join("    " + line + "\n" for line in dumped.splitlines())  # markdown: a code block
            self.writer.add_text("config", text, 0)
            self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


def event_steps(folder: Path) -> set[int]:
    """The steps of the scalars in the TensorBoard event files under folder (torn tails of killed writers end
    a file's reading)."""
    from tensorboardX.proto import event_pb2

    steps: set[int] = set()
    for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            if len(payload) < length or pos + 16 + length > len(data):
                break
            pos += 16 + length
            event = event_pb2.Event()
            try:
                event.ParseFromString(payload)
            except Exception:  # a damaged record: what came before it still counts
                break
            if event.HasField("summary") and any(v.HasField("simple_value") for v in event.summary.value):
                steps.add(int(event.step))
    return steps


class Trackers(Tracker):
    """Several trackers behind the one interface: W&B and TensorBoard side by side."""

    def __init__(self, members: list[Tracker]):
        self.members = members
        wandb_run = next((m for m in members if isinstance(m, WandbTracker)), None)
        self.run_id = wandb_run.run_id if wandb_run else None
        self.mode = wandb_run.mode if wandb_run else None

    def log(self, metrics: dict, step: int) -> None:
        for m in self.members:
            m.log(metrics, step)

    def log_config(self, config: dict) -> None:
        for m in self.members:
            m.log_config(config)

    def summary(self, values: dict) -> None:
        for m in self.members:
            m.summary(values)

    def finish(self) -> None:
        for m in self.members:
            m.finish()


def make_tracker(cfg: Config, rank: int, run_dir: Path, checkpoint_run_id: Optional[str],
                 launch_id: Optional[str], resume_step: int = 0, extra: tuple[Tracker, ...] = ()) -> Tracker:
    """Rank 0's trackers (W&B, TensorBoard, and `extra`: the launcher's, e.g. Ray's gauges); a no-op
    elsewhere. resume_step: the last step of earlier starts that this start keeps (0: its files start
    afresh)."""
    if rank != 0:
        return Tracker()
    members: list[Tracker] = []
    if cfg.tracking.enabled and os.environ.get("WANDB_MODE") != "disabled":
        members.append(WandbTracker(cfg, choose_run_id(run_dir, checkpoint_run_id, launch_id), run_dir))
    if cfg.tracking.tensorboard:
        members.append(TensorBoardTracker(run_dir, resume_step))
    return Trackers(members + list(extra))


def resend_lost_steps(tracker: Tracker, metrics_file) -> None:
    """After a resume: the steps up to the checkpoint that the tracker lost with a killed process (W&B writes
    asynchronously) are sent again from metrics.jsonl (a rundir.MetricsWriter's kept lines); the tracker skips
    every step it already holds."""
    for record in metrics_file.kept:
        tracker.log(record, record["step"])


# ---------------------------------------------------------------------------------------------------------
# Reading W&B's run files (offline runs): records framed like a LevelDB log after a 7-byte ":W&B" header


_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[object]:
    """The protobuf Records of one .wandb file, stopping at a torn or corrupt tail (a killed writer)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left  # block trailer padding
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk,
                                                          zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_history(run_dir: Path, run_id: str) -> list[tuple[int, dict]]:
    """(step, metrics) of every history record of run_id under RUN_DIR/wandb, all process starts together."""
    out = []
    for path in sorted(RunDir(run_dir).wandb.glob(f"*run-*{run_id}*/run-{run_id}.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            values = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
            step = values.get("_step", record.history.step.num)
            out.append((int(step), values))
    return out
