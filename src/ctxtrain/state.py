"""TrainState: everything a resume restores, in one object with `state_dict()` / `load_state_dict()`
(torchtitan's `Stateful` idea).

    step, tokens      optimizer steps done, training tokens seen
    restarts          starts of this run since it last started fresh, minus one (RUN_DIR/starts.jsonl)
    launch_id         the `ctxtrain train` that started these workers: Ray's restarts within it resume its
                      newest checkpoint whatever --resume said
    tracker_run_id    the W&B run of this trajectory
    origin            another run's checkpoint that this trajectory started from (--resume PATH), or None
    loader, rng       this rank's data cursor and RNG states: per rank in meta.json

`checkpoint.save` gathers every rank's `state_dict()` into meta.json (`meta_of`), `checkpoint.load` hands
meta.json back to `load_state_dict`; the DeepSpeed files hold the weights and the optimizer. The engine's
weights are not in here: DeepSpeed owns them.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported where RNG states are read: the driver reads meta.json without it
    import torch

PER_RANK = ("loader", "rng")  # gathered from every rank into lists; the other fields are rank 0's


class TrainState:
    def __init__(self, loader, device: torch.device, rank: int, world: int, launch_id: Optional[str] = None,
                 global_batch: Optional[int] = None):
        self.loader, self.device, self.rank, self.world = loader, device, rank, world
        self.step = 0
        self.tokens = 0
        self.restarts = 0
        self.launch_id = launch_id
        self.tracker_run_id: Optional[str] = None
        self.origin: Optional[str] = None
        self.stop_reason: Optional[str] = None
        self.global_batch = global_batch
        # the steps of earlier starts this trajectory keeps (metrics.jsonl, W&B, TensorBoard)
        self.kept_through = 0

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint's meta.json."""
        return {"step": self.step, "tokens": self.tokens, "restarts": self.restarts,
                "launch_id": self.launch_id,
                "tracker_run_id": self.tracker_run_id, "origin": self.origin, "stop_reason": self.stop_reason,
                "global_batch": self.global_batch, "loader": self.loader.state_dict(),
                "rng": rng_state(self.device)}

    def load_state_dict(self, meta: dict, origin: Optional[str] = None) -> None:
        """Continue from a checkpoint's meta.json. origin: where that checkpoint lives when it is another
        run's; this run then starts a trajectory of its own (a new tracker run), else it continues the
        checkpoint's.

        Every rank's cursor is the same global position, so any rank's serves on another world size; the RNG
        states are restored where the world size is the same (elsewhere a rank has no predecessor)."""
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.loader.load_state_dict(meta["loader"][0])
        if meta["world_size"] == self.world:
            set_rng_state(meta["rng"][self.rank], self.device)
        if origin is None:  # continuing: the steps up to the checkpoint are this trajectory's
            self.tracker_run_id, self.origin = meta.get("tracker_run_id"), meta.get("origin")
            self.kept_through = self.step
        else:  # another run's steps are not: this run's files start after the checkpoint
            self.tracker_run_id, self.origin, self.kept_through = None, origin, 0


def meta_of(states: list[dict]) -> dict:
    """meta.json's state fields from every rank's state_dict(): rank 0's scalars, the per-rank lists."""
    meta = {k: v for k, v in states[0].items() if k not in PER_RANK}
    meta.update({k: [s[k] for s in states] for k in PER_RANK}, world_size=len(states))
    return meta


def rng_state(device: torch.device) -> str:
    """The CPU (and this device's CUDA) RNG state, as text for meta.json (dropout draws from it)."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def set_rng_state(blob: str, device: torch.device) -> None:
    import torch

    state = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
