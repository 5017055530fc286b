"""Ray, and only here: embedded or remote clusters, Ray Train workers with a failure policy, job submission.

    ctxtrain train configs/lm_tiny.yaml --cluster.workers=2           # Ray embedded on this machine
    ctxtrain train configs/lm_1b.yaml --address ray://HEAD:10001       # join a cluster
    ctxtrain submit configs/lm_1b.yaml --address http://HEAD:8265     # a job on a cluster; returns its id

Training: a `TorchTrainer` whose workers each call `ctxtrain.train.run(cfg)`, the same function the local
launcher and torchrun call. Ray forms the process group (gloo on CPU, nccl on GPU); DeepSpeed joins it.
When a worker dies, Ray restarts the whole group (up to `cluster.max_failures` times) and every worker
resumes from the newest committed checkpoint of this launch. Checkpoints are written by the workers
straight into `checkpoint.storage` (RUN_DIR/checkpoints by default) with ctxtrain's own commit protocol,
not through `ray.train.report`: no second copy of large files, and the COMMITTED semantics stay ctxtrain's.
Ray keeps its own run state under RUN_DIR/ray (or the storage URI's `ray/`).

Embedded Ray listens on 127.0.0.1 (dashboard and job server) unless `cluster.dashboard_host` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ctxtrain.config import Config, to_yaml
from ctxtrain.errors import UserError
from ctxtrain.processes import free_port
from ctxtrain.rundir import RunDir, eta_seconds, last_record
from ctxtrain.tracking import Tracker

# Environment variables a job may need on the cluster. Never in a Ray runtime env (Ray 2.60 logs every
# runtime env it creates, env_vars included, in the session's runtime_env_agent.log): a submitted job gets
# them in a 0600 file of its working-directory package, Ray Train workers in their train-loop config (Ray's
# object store); never written to the run dir, the config or the logs.
SECRET_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "HF_TOKEN",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS")
# Passed to every worker (not secrets): how DeepSpeed and torch behave there.
WORKER_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "WANDB_SILENT", "PYTHONPATH",
              "PYTORCH_CUDA_ALLOC_CONF", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG",
              "CTXTRAIN_PROGRESS", "CTXTRAIN_MEMORY_CHECKED", "CTXTRAIN_LOADER_CHUNK_TOKENS",
              "CTXTRAIN_JOB_ID")


def redact(text: str) -> str:
    """Replace the values of secret environment variables in a message (Ray's errors quote runtime envs)."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _absolute(cfg: Config) -> Config:
    """Paths resolved on the driver, so that workers (whatever their working directory) see the same ones."""
    from ctxtrain.config import from_dict

    d = cfg.to_dict()
    d["train"]["run_dir"] = str(Path(d["train"]["run_dir"]).resolve())
    d["data"]["path"] = str(Path(d["data"]["path"]).resolve())
    storage = d["checkpoint"]["storage"]
    if storage and "://" not in storage:
        d["checkpoint"]["storage"] = str(Path(storage).resolve())
    resume = d["checkpoint"]["resume"]
    if resume not in ("auto", "never"):
        d["checkpoint"]["resume"] = str(Path(resume).resolve()) if "://" not in resume else resume
    return from_dict(d)


def _shortfall(cfg: Config, workers: int, gpus: float, have: dict, where: str) -> list[str]:
    """What `workers` workers of cluster.cpus_per_worker CPUs and `gpus` GPUs need beyond `have` (Ray's
    resource names), one phrase each."""
    need = {"CPU": workers * cfg.cluster.cpus_per_worker, "GPU": workers * gpus}
    return [f"{need[k]:g} {k}s ({where} has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]


def _check_fits_here(cfg: Config) -> None:
    """Embedded Ray has this machine's CPUs and GPUs; say so before starting it when the workers won't fit."""
    import torch

    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    gpus = cfg.cluster.gpus_per_worker if cfg.cluster.gpus_per_worker is not None else (1.0 if have["GPU"]
                                                                                        else 0.0)
    short = _shortfall(cfg, cfg.cluster.workers, gpus, have, "this machine")
    if short:
        raise UserError(f"cluster.workers={cfg.cluster.workers} needs {' and '.join(short)}; lower "
                        "cluster.workers or cluster.cpus_per_worker/gpus_per_worker, or join a cluster with "
                        "--address")


def probe(address: str, timeout_s: float) -> None:
    """One TCP connection to a Ray address (ray://host:port, host:port, http://host:port) before Ray is asked:
    Ray itself retries a closed port without end. `auto` is left to Ray (it reads the local session)."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    default = {"ray": 10001, "http": 8265, "https": 443}.get(parsed.scheme, 6379)
    try:
        host, port = parsed.hostname, parsed.port or default
    except ValueError:
        host = port = None
    if not host:
        raise UserError(f"--address {address}: not a Ray address; write ray://HOST:10001 or HOST:6379")
    try:
        with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({host}:{port}: {e.strerror or e}); "
                        "check --address / RAY_ADDRESS and that the head runs (`ray status` on it)") from None


class _Late(BaseException):
    """Raised in the main thread when a network step passes its deadline."""


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """End a blocking step (Ray's connection retries) after `seconds` with one line; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def late(signum, frame):
        raise _Late()

    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Late:
        raise UserError(f"{what}: no answer after {seconds:g} s (cluster.connect_timeout_s); check the "
                        "address and that the cluster is up") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker_loop(config: dict) -> None:
    """What each Ray Train worker runs: the per-worker entry point, unchanged (rank 0 also sets Ray's
    gauges)."""
    from ray.train import get_context

    from ctxtrain import faults, train
    from ctxtrain.config import from_dict

    os.environ["CTXTRAIN_LAUNCH_ID"] = config["launch_id"]
    os.environ.update(config.get("secrets") or {})
    cfg = from_dict(config["cfg"])
    _sigterm_preempts(faults.request_preemption)
    rank = get_context().get_world_rank()
    if config.get("gpus"):  # the GPU Ray Train gave this worker (CUDA_VISIBLE_DEVICES may list the node's)
        from ray.train.torch import get_device

        os.environ["CTXTRAIN_CUDA_DEVICE"] = str(get_device().index or 0)
    job = os.environ.get("CTXTRAIN_JOB_ID") or f"launch-{config['launch_id']}"
    gauges = (RayGauges(cfg.tracking.name or Path(cfg.train.run_dir).name, job, rank),) if rank == 0 else ()
    try:
        if config.get("loopback"):
            from ctxtrain.engine import leave_process_group

            _loopback_process_group(cfg)
            try:
                result = train.run(cfg, trackers=gauges)
            finally:
                leave_process_group()
        else:
            result = train.run(cfg, trackers=gauges)
    except UserError as e:
        _report_user_error(config["launch_id"], e)
        raise
    if result.get("stop_reason") == "preempted" and result.get("sigterm"):
        # This worker was signalled (its node is going away): its checkpoint is committed; a failure makes Ray
        # restart the group (within cluster.max_failures), which resumes from that checkpoint.
        raise RuntimeError(f"preempted (SIGTERM) at step {result['step']}, checkpoint committed; restarting")


def _sigterm_preempts(request) -> None:
    """In a Ray Train worker the training function runs in a thread; SIGTERM reaches Ray's handler in the main
    thread, which ends the process through `raise_sys_exit_with_custom_error_message`. Route that SIGTERM to
    `request` (a preemption: checkpoint at the next step boundary) instead; other exits go through
    unchanged."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    if original is None or getattr(original, "ctxtrain_preempts", False):
        return

    def preempt_instead(message, exit_code=1):
        if "SIGTERM" in str(message):
            request()
            return
        original(message, exit_code)

    preempt_instead.ctxtrain_preempts = True
    ray_worker.raise_sys_exit_with_custom_error_message = preempt_instead


def _loopback_process_group(cfg: Config) -> None:
    """The workers' process group for embedded Ray, on 127.0.0.1 only. Ray Train's own rendezvous (env:// or
    tcp://) makes torch's TCPStore listen on every interface; here rank 0 binds the store's socket to the
    loopback address itself, Ray Train's broadcast hands its port to the other ranks, and gloo's pairs use the
    loopback interface."""
    from ray.train import get_context
    from ray.train.collective import broadcast_from_rank_zero

    from ctxtrain.engine import join_loopback_group
    from ctxtrain.processes import LOOPBACK_ENV

    ctx = get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update(LOOPBACK_ENV)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(ctx.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()), MASTER_ADDR="127.0.0.1")
    listener = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
    port = broadcast_from_rank_zero(listener.getsockname()[1] if listener else None)
    os.environ["MASTER_PORT"] = str(port)  # DeepSpeed's CPU shared-memory comm names its buffers after it
    join_loopback_group(cfg, rank, world, port, listener.detach() if listener else None)


# ---------------------------------------------------------------------------------------------------------
# Training metrics as Ray gauges (rank 0 of a Ray Train run)

# metrics.jsonl name -> Ray gauge (Prometheus shows them as ray_<gauge>; cluster/grafana_ctxtrain.json plots
# them)
RAY_GAUGES = {
    "step": ("ctxtrain_step", "newest logged training step"),
    "loss": ("ctxtrain_loss", "training loss (mean of the step's micro-batches)"),
    "val_loss": ("ctxtrain_val_loss", "held-out loss at the newest evaluation"),
    "val_bleu": ("ctxtrain_val_bleu", "held-out greedy BLEU at the newest score (translation)"),
    "tokens_per_s": ("ctxtrain_tokens_per_s", "tokens per second, whole job"),
    "mfu": ("ctxtrain_mfu", "model FLOPs utilisation, fraction of the accelerators' dense bf16 peak"),
    "mem_bytes": ("ctxtrain_memory_bytes", "peak memory of rank 0 in the step (GPU allocation or RSS "
                                           "growth)"),
    "data_wait_s": ("ctxtrain_data_wait_seconds", "seconds per step spent waiting for data"),
    "step_time_s": ("ctxtrain_step_time_seconds", "seconds per training step"),
    "restarts": ("ctxtrain_restarts", "restarts of the worker group in this run"),
}


class RayGauges(Tracker):
    """Rank 0's metrics as Ray gauges (`ray.util.metrics`), labelled by run name, job id and rank: Ray's
    metrics agent exports them to Prometheus beside Ray's own (the dashboard's Grafana panels read them)."""

    def __init__(self, run_name: str, job_id: str, rank: int):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name, "job_id": job_id, "rank": str(rank)}
        self.gauges = {key: Gauge(name, description=doc, tag_keys=("run", "job_id", "rank"))
                       for key, (name, doc) in RAY_GAUGES.items()}

    def log(self, metrics: dict, step: int) -> None:
        for key, gauge in self.gauges.items():
            value = step if key == "step" else metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.set(float(value), tags=self.tags)


def _ray_storage(cfg: Config) -> str:
    """Where Ray Train keeps its own run state (RunConfig name "ray"): beside the checkpoints in a URI
    storage, else RUN_DIR/ray."""
    root = RunDir(cfg.train.run_dir).checkpoint_root(cfg.checkpoint.storage)
    return root if isinstance(root, str) else cfg.train.run_dir


def train_on_ray(cfg: Config) -> int:
    """Run training on Ray (embedded here, or the cluster at cluster.address / $RAY_ADDRESS)."""
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        # Ray turns a 127.0.0.1 node address into the machine's external one (so that other nodes could join)
        # unless this is off, read when ray is imported; embedded Ray is one node: its processes then bind
        # 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfg = _absolute(cfg)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    embedded = not address
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                                       "0.5"))
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # Ray Train's print patch echoes every worker line twice
    # Ray Train's PreemptionWatcher actor reads node drains for ray.train.get_preemption_info(), which
    # ctxtrain does not use (SIGTERM is its preemption signal); the actor's creation logs an error-level line
    # in every run.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ctx = _start_ray(cfg, address, env)
    try:
        dashboard = getattr(ctx, "dashboard_url", None)
        if dashboard:
            dashboard = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
        resources = ray.cluster_resources()
        gpus = cfg.cluster.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        c = cfg.cluster
        elastic = c.min_workers is not None and c.min_workers < c.workers
        fewest = c.min_workers if elastic else c.workers  # an elastic range starts on what it can place
        short = _shortfall(cfg, fewest, gpus, resources, "the cluster")
        if short and not embedded:  # an autoscaling cluster may add the nodes; Ray Train waits for them
            print(f"ctxtrain: the Ray cluster has too few resources right now: {'; '.join(short)}; "
                  "training starts when its autoscaler adds nodes", flush=True)
        print(f"ctxtrain: Ray {'embedded' if embedded else 'cluster ' + str(address)}: "
              f"{f'{c.min_workers}..{c.workers} (elastic)' if elastic else c.workers} workers x "
              f"({cfg.cluster.cpus_per_worker:g} CPU, {gpus:g} GPU), "
              f"placement {cfg.cluster.placement}, max_failures {cfg.cluster.max_failures}"
              + (f"; dashboard {dashboard}" if dashboard else "")
              + (f"; metrics http://127.0.0.1:{_metrics_port()}/metrics" if embedded and _metrics_port()
                 else ""),
              flush=True)
        launch_id = uuid.uuid4().hex[:12]
        # on the driver's node: a lost worker node must not take the sink with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        errors = ray.remote(num_cpus=0)(ErrorSink).options(name=f"ctxtrain-errors-{launch_id}",
                                                          scheduling_strategy=here).remote()
        _fit(_trainer(cfg, embedded, gpus, env, launch_id), errors, cfg)
        return 0
    finally:
        if embedded:
            ray.shutdown()


def _start_ray(cfg: Config, address: Optional[str], env: dict):
    """ray.init: an embedded cluster on this machine's loopback (on free ports: another user's embedded run
    may hold Ray's defaults), or the cluster at `address`; one line when neither answers."""
    import ray

    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if not address:
            _check_fits_here(cfg)
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            port = cfg.cluster.dashboard_port or _free_or(8265)
            # Ray Train's own actors ask the state API for this cluster; with two embedded clusters on one
            # machine its auto-detection finds both and fails: name ours.
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # Token auth stays on for the embedded cluster; its notice about how to turn it off is noise here.
            token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
            token_notice.setLevel(logging.ERROR)
            with _dynamic_agent_port():
                ctx = ray.init(address="local", include_dashboard=True,
                               dashboard_host=cfg.cluster.dashboard_host,
                               dashboard_port=port, _node_ip_address="127.0.0.1",
                               _metrics_export_port=cfg.cluster.metrics_port,
                               runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=True)
        else:
            # Inside a submitted job the job's runtime env (shipped package) meets ours: merge them.
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            probe(address, cfg.cluster.connect_timeout_s)
            with deadline(cfg.cluster.connect_timeout_s, f"joining the Ray cluster at {address}"):
                ctx = ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "an embedded cluster"
        raise UserError(redact(f"cannot start or reach Ray at {where} ({str(e).splitlines()[0][:300]}); "
                               "check --address / RAY_ADDRESS, or cluster.dashboard_port")) from None
    # ray.init replaces the SIGTERM handler (with sys.exit, and its core worker with a C-level one that
    # aborts); the CLI's handler, an exception that unwinds and shuts Ray down in order, is put back.
    if threading.current_thread() is threading.main_thread() and callable(on_sigterm):
        signal.signal(signal.SIGTERM, on_sigterm)
    return ctx


def _free_or(port: int) -> int:
    """port when nothing listens on it here, else a free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


@contextlib.contextmanager
def _dynamic_agent_port():
    """Embedded Ray's dashboard agent on a free port: ray.init offers no setting for it and Ray's default
    (52365) is taken by another embedded run, or by a `ray start` head, on the same machine. Private: Ray
    2.60's RayParams, whose listen port 0 means "any free one"."""
    from ray._private import parameter

    original = parameter.RayParams

    class RayParams(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _trainer(cfg: Config, embedded: bool, gpus: float, env: dict, launch_id: str):
    """Ray Train's trainer whose workers run `_worker_loop`."""
    from ray.train import BackendConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    c = cfg.cluster
    elastic = c.min_workers is not None and c.min_workers < c.workers
    resources_per_worker = {"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    secrets = {k: os.environ[k] for k in SECRET_ENV if k in os.environ}
    # Embedded: the workers form their process group on 127.0.0.1 (see _loopback_process_group), so Ray Train
    # gets no torch backend; on a cluster its TorchConfig rendezvous spans the nodes.
    trainer_cls, backend = ((DataParallelTrainer, {"backend_config": BackendConfig()}) if embedded else
                            (TorchTrainer, {"torch_config": TorchConfig(backend="nccl" if gpus else "gloo")}))
    return trainer_cls(
        _worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "launch_id": launch_id, "loopback": embedded,
                           "secrets": secrets, "gpus": bool(gpus)},
        **backend,
        # An elastic range: Ray Train starts as many workers as it can place, and restarts the group with
        # another size when workers are lost or resources appear; each start resumes on its own size.
        scaling_config=ScalingConfig(num_workers=(c.min_workers, c.workers) if elastic else c.workers,
                                     use_gpu=bool(gpus), resources_per_worker=resources_per_worker,
                                     placement_strategy=c.placement.upper()),
        run_config=RunConfig(name="ray", storage_path=_ray_storage(cfg),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             worker_runtime_env={"env_vars": {**env, "CTXTRAIN_LAUNCH_ID": launch_id}}),
    )


class ErrorSink:
    """A worker's bad input (a UserError: corrupt shard, ids past the vocabulary ...), told to the driver at
    once. Retrying cannot mend it: the driver ends the run with the worker's one line instead of letting Ray
    restart the group cluster.max_failures times, each restart printing a traceback."""

    def __init__(self):
        self.message: Optional[str] = None

    def report(self, message: str) -> None:
        if self.message is None:
            self.message = message

    def get(self) -> Optional[str]:
        return self.message


def _fit(trainer, errors, cfg: Config) -> None:
    """trainer.fit() in a thread while this one watches the error sink: a worker's bad input ends the run with
    its line (the workers are stopped with Ray); a failure Ray gave up on ends it with a summary."""
    import ray

    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001  (also what Ray raises when it is shut down under it)
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ctxtrain-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        try:
            message = ray.get(errors.get.remote())
        except ray.exceptions.RayActorError:  # the driver's node is going away: fit() ends with it
            message = None
        if message:
            raise UserError(redact(message))
    if "error" in outcome:  # TrainingFailedError and friends, after the failure policy gave up
        raise UserError(redact(_failure_summary(cfg, outcome["error"]))) from None


def _report_user_error(launch_id: str, error: UserError) -> None:
    """In a worker: hand a bad input to the driver, which stops the run; wait to be stopped (a driver that
    never stops it, after a minute: the error goes its ordinary way through Ray's failure policy)."""
    import ray

    try:
        sink = ray.get_actor(f"ctxtrain-errors-{launch_id}")
        ray.get(sink.report.remote(str(error)))
    except Exception:  # noqa: BLE001  (no sink: Ray's failure policy reports it)
        return
    time.sleep(60)


def _metrics_port() -> Optional[int]:
    """The embedded Ray's Prometheus port (its metrics agent's), or None when Ray does not say."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)  # private: no public accessor in Ray 2.60
    return getattr(node, "metrics_export_port", None) if node is not None else None


def _failure_summary(cfg: Config, error: Exception) -> str:
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    text = str(first).strip().splitlines()
    user = [line for line in text if "UserError:" in line or "DataError:" in line or "ConfigError:" in line]
    detail = (user[-1].split("Error:",
                             1)[1].strip() if user else (text[-1] if text else type(error).__name__))
    return (f"training failed after {cfg.cluster.max_failures} restarts: {detail[:400]}; "
            f"see the worker logs above and {cfg.train.run_dir}")


# ---------------------------------------------------------------------------------------------------------
# Jobs on a cluster (Ray job submission)


def job_server_address(address: Optional[str]) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else http://127.0.0.1:8265."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        address = os.environ["RAY_ADDRESS"]
    address = address or "http://127.0.0.1:8265"
    return address if "://" in address else f"http://{address}"


def _client(address: Optional[str]):
    # Ray 2.60 clusters use token auth by default; Ray's client sends the token only in token mode.
    if "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    url = job_server_address(address)
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 8265)
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray job server at {url} ({e.strerror or e}); start the head with "
                        "`ray start --head` (dashboard on port 8265) or pass --address "
                        "http://HEAD:8265") from None
    try:
        return JobSubmissionClient(url), url
    except Exception as e:  # ConnectionError, RuntimeError from a non-Ray server
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "authentication" in str(e).lower() or "401" in str(e) or "403" in str(e):
            raise UserError(f"the Ray job server at {url} wants an auth token ({first}); export "
                            "RAY_AUTH_TOKEN (or copy the head's ~/.ray/auth_token) and "
                            "RAY_AUTH_MODE=token") from None
        raise UserError(f"{url} does not answer as a Ray job server ({first}); check --address") from None


def _job_call(fn, job_id: str, url: str):
    try:
        return fn()
    except RuntimeError as e:
        msg = str(e)
        if "does not exist" in msg or "404" in msg:
            raise UserError(f"no job {job_id} at {url}; list them with "
                            f"`ctxtrain jobs --address {url}`") from None
        raise UserError(f"the job server at {url} refused: {msg.splitlines()[0]}") from None


SECRETS_FILE = "secrets.json"


def load_job_secrets() -> None:
    """In a submitted job's driver: the secrets that `submit` packed into the working directory."""
    path = os.environ.get("CTXTRAIN_SECRETS_FILE")
    if path and Path(path).is_file():
        for name, value in json.loads(Path(path).read_text()).items():
            os.environ.setdefault(name, value)


def submit(cfg: Config, address: Optional[str], env_names: list[str], ship_package: bool = True) -> str:
    """Submit `ctxtrain train` with this resolved config as a Ray job; returns the job id."""
    for field, value in (("train.run_dir", cfg.train.run_dir), ("data.path", cfg.data.path)):
        if not Path(value).is_absolute() and "://" not in value:
            raise UserError(f"{field}={value} is relative: on the cluster it would resolve inside the job's "
                            f"temporary working directory; pass an absolute path on shared storage, e.g. "
                            f"--{field}=/shared/{Path(value).name}")
    client, url = _client(address)
    env = {}
    for name in list(SECRET_ENV) + list(env_names):
        if name in os.environ:
            env[name] = os.environ[name]
        elif name in env_names:
            raise UserError(f"--env {name}: not set in this environment; export it first")
    work = Path(tempfile.mkdtemp(prefix="ctxtrain-job-"))
    (work / "config.yaml").write_text(to_yaml(cfg))
    submission_id = f"ctxtrain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    runtime_env: dict = {"working_dir": str(work), "env_vars": {"CTXTRAIN_SECRETS_FILE": SECRETS_FILE,
                                                                "CTXTRAIN_JOB_ID": submission_id}}
    if env:
        fd = os.open(work / SECRETS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(env, fh)
    if ship_package:
        import ctxtrain

        runtime_env["py_modules"] = [str(Path(ctxtrain.__file__).parent)]
    metadata = {"ctxtrain_run_dir": cfg.train.run_dir, "ctxtrain_max_steps": str(cfg.train.max_steps)}
    # A head that has just started has no job agent yet ("No available agent to submit job, please try again
    # later"): ask again for up to cluster.connect_timeout_s, as Ray asks.
    deadline_s = time.time() + cfg.cluster.connect_timeout_s
    while True:
        try:
            job_id = client.submit_job(entrypoint="python -m ctxtrain train config.yaml",
                                       runtime_env=runtime_env,
                                       metadata=metadata, submission_id=submission_id)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.time() > deadline_s:
                raise UserError(f"the Ray job server at {url} has no job agent ready after "
                                f"{cfg.cluster.connect_timeout_s:g} s; wait until the head is up and submit "
                                "again, or raise cluster.connect_timeout_s") from None
            time.sleep(2)
    if env:
        print(f"passed from the environment: {', '.join(sorted(env))}", file=sys.stderr)
    return job_id


def list_jobs(address: Optional[str]) -> list[dict]:
    client, _ = _client(address)
    out = []
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        out.append({"job_id": job.submission_id or job.job_id, "status": str(job.status.value),
                    "start_time": job.start_time, "entrypoint": job.entrypoint,
                    "run_dir": (job.metadata or {}).get("ctxtrain_run_dir", "")})
    return out


_LOG_LINE = re.compile(r"step=(\d+)/(\d+) loss=([\d.]+).*?tokens/s=([\d,]+).*?eta=([\d,]+)s")


def job_status(job_id: str, address: Optional[str]) -> dict:
    """State of a job plus its latest step, loss, tokens/s and ETA (from its metrics.jsonl when this machine
    sees the run dir, else from its log lines)."""
    client, url = _client(address)
    info = _job_call(lambda: client.get_job_info(job_id), job_id, url)
    out = {"job_id": job_id, "status": str(info.status.value), "message": info.message or "",
           "dashboard": url,
           "run_dir": (info.metadata or {}).get("ctxtrain_run_dir")}
    latest = _latest_from_run_dir(out["run_dir"], int((info.metadata or {}).get("ctxtrain_max_steps",
                                                                                0) or 0))
    if latest is None:
        logs = _job_call(lambda: client.get_job_logs(job_id), job_id, url)
        matches = _LOG_LINE.findall(logs)
        if matches:
            step, total, loss, tps, eta = matches[-1]
            latest = {"step": int(step), "max_steps": int(total), "loss": float(loss),
                      "tokens_per_s": float(tps.replace(",", "")), "eta_s": float(eta.replace(",", ""))}
    if latest:
        out.update(latest)
    return out


def _latest_from_run_dir(run_dir: Optional[str], max_steps: int) -> Optional[dict]:
    last = last_record(run_dir) if run_dir else None
    if last is None:
        return None
    return {"step": last["step"], "max_steps": max_steps, "loss": last["loss"],
            "tokens_per_s": last["tokens_per_s"],
            "eta_s": eta_seconds(last, max_steps)}


def job_logs(job_id: str, address: Optional[str], follow: bool) -> None:
    client, url = _client(address)
    if not follow:
        sys.stdout.write(_job_call(lambda: client.get_job_logs(job_id), job_id, url))
        return

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    _job_call(lambda: client.get_job_info(job_id), job_id, url)
    asyncio.run(tail())


def stop_job(job_id: str, address: Optional[str], wait_s: float = 60) -> str:
    client, url = _client(address)
    _job_call(lambda: client.stop_job(job_id), job_id, url)
    deadline = time.time() + wait_s
    status = ""
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("STOPPED", "SUCCEEDED", "FAILED"):
            break
        time.sleep(0.5)
    return status
