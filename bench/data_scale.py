"""Data at cluster scale: ctxtrain's loader beside MosaicML Streaming, both reading the same windows from a
real S3-protocol server (moto, on 127.0.0.1) with 1, 2 and 4 ranks, each rank a process with a cache of its
own (nodes that share no cache).

    ctxtrain prepare --recipe stdlib --out data/stdlib
    pip install --no-deps --target .venv/mosaic mosaicml-streaming==0.13.0 Brotli python-snappy cramjam \\
        zstd catalogue xxhash
    python bench/data_scale.py [--data data/stdlib] [--ranks 1,2,4] [--seq-len 256] [--global-batch 16]

Mosaic Streaming runs from `--mosaic-site` (default .venv/mosaic), installed without its dependencies beside
this environment's CPU torch (its pins would replace torch and downgrade transformers; ../shared/STACK.md);
its `streaming.vision` package (image datasets, which import torchvision: the wheels here are CUDA builds that
do not load beside a CPU torch) is not imported. Each Mosaic rank runs in a mount namespace with a /dev/shm of
its own (`unshare`, as root): Mosaic keeps a node's state in shared memory, so ranks on one machine that are
to be separate nodes must not share it. Nothing else of it is changed.

The same data for both: the train split of a `ctxtrain prepare` directory as ctxtrain reads it (tar shards,
windows of seq_len + 1 ids packed from the documents when read), and the same windows written as MDS shards
(one sample a window: its ids and its number) of about the tar shards' size. Both shuffle with their defaults
(ctxtrain: data.shuffle_buffer 1,024 windows unless --shuffle-buffer, partitions = the first start's ranks;
Mosaic: py1e, its default canonical nodes and block size). Per system and rank count, one epoch (Mosaic's,
which pads a rank's share with repeats; ctxtrain's, which drops the last partial global batch):

- bytes fetched / data: the shard bytes that reached the ranks' caches (each file once, nothing evicted)
  over the format's shard bytes: how many times the store served the dataset;
- first batch: seconds from creating the dataset object to the first batch (the slowest rank);
- tokens/s: the whole job's window tokens per second after each rank's first batch (ranks share this
  machine's cores, so it does not grow with ranks here);
- batch diversity, the measure of shuffle quality: the distinct tar shards (stretches of the corpus in
  prepare's order) that a global batch's windows come from, over what as many windows drawn uniformly from
  the epoch give: 1.0 is a uniform shuffle, a batch of neighbouring windows is near 0 (the MDS windows map to
  the tar shards they were cut from). ctxtrain with one partition, the layout before partitions, is a third
  arm at 2 ranks;
- resume: 2 ranks read `--resume-after` global batches and save their state; 4 ranks (then 1) continue from
  it with the same global batch; "same" when every following global batch (the union of the ranks' batches)
  holds the windows the uninterrupted 2-rank epoch held at that step, over the steps compared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
# A Mosaic rank as a node of its own on this one machine: a private /dev/shm (Mosaic's per-node shared
# memory), in a mount namespace of its own (root, or a user namespace, is needed)
NODE = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount -t tmpfs -o size=1g tmpfs /dev/shm && exec "$0" "$@"']


# ---------------------------------------------------------------------------------------------------------
# One rank (a subprocess): read, time, record the global positions' windows


def ctxtrain_rank(job: dict) -> dict:
    from ctxtrain.data.loader import StreamingLoader
    from ctxtrain.data.remote import CacheSettings

    t0 = time.perf_counter()
    loader = StreamingLoader(job["uri"], seq_len=job["seq_len"], batch_size=job["batch"], rank=job["rank"],
                             world_size=job["world"], seed=job["seed"], shuffle_buffer=job["shuffle_buffer"],
                             loop=False,
                             cache=CacheSettings(dir=job["cache"]), partitions=job.get("partitions"))
    if job.get("state"):
        loader.load_state_dict(job["state"])
    return _consume(job, t0, ((b["unit"].tolist(), b["tokens"][:, 1:].numel()) for b in loader),
                    lambda: loader.state_dict())


def mosaic_rank(job: dict) -> dict:
    import types

    os.environ.update(RANK=str(job["rank"]), WORLD_SIZE=str(job["world"]), LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["master_port"]),
                      S3_ENDPOINT_URL=job["endpoint"])
    sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")  # see the module's docstring
    from streaming import StreamingDataset

    t0 = time.perf_counter()
    ds = StreamingDataset(remote=f"s3://{BUCKET}/mds", local=job["cache"], shuffle=True,
                          shuffle_seed=job["seed"], batch_size=job["batch"])
    if job.get("state"):
        ds.load_state_dict(job["state"])

    def batches():
        units, tokens = [], 0
        for sample in ds:
            units.append(int(sample["unit"]))
            tokens += len(sample["ids"]) // 2 - 1
            if len(units) == job["batch"]:
                yield units, tokens
                units, tokens = [], 0

    seen = {"n": 0}

    def state():
        return ds.state_dict(num_samples=seen["n"], from_beginning=True)

    def counted():
        for units, tokens in batches():
            seen["n"] += job["batch"] * job["world"]
            yield units, tokens

    start = job.get("state", {}) or {}
    seen["n"] = start.get("sample_in_epoch", 0)
    return _consume(job, t0, counted(), state)


def _consume(job: dict, t0: float, batches, state) -> dict:
    steps, tokens, first, saved, first_tokens = [], 0, None, None, 0
    for units, n in batches:
        if first is None:
            first, first_tokens = time.perf_counter(), n
        steps.append(units)
        tokens += n
        if job.get("save_after") == len(steps):
            saved = state()
        if job.get("steps") and len(steps) == job["steps"]:
            break
    end = time.perf_counter()
    cached = sum(p.stat().st_size for p in Path(job["cache"]).rglob("*")
                 if p.is_file() and (p.name.startswith("train-") or p.name.endswith(".mds")))
    return {"steps": steps, "first_s": (first or end) - t0, "tokens": tokens - first_tokens,
            "steady_s": end - (first or end), "cached": cached, "state": saved}


# ---------------------------------------------------------------------------------------------------------
# The driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_store() -> str:
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def upload(endpoint: str, files: list[Path], prefix: str) -> int:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    for f in files:
        s3.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
    return sum(f.stat().st_size for f in files if f.name != "index.json" and f.name != "tokenizer.json")


def write_mds(data: Path, seq_len: int, out: Path, shard_bytes: int) -> None:
    """The train split's windows (its stream in shard order, cut as the loader cuts it) as MDS samples."""
    from ctxtrain.data.loader import StreamingLoader, read_stream_tokens

    sys.modules["streaming.vision"] = __import__("types").ModuleType("streaming.vision")
    from streaming import MDSWriter

    stream = read_stream_tokens(StreamingLoader(data, seq_len=seq_len, shuffle=False), epoch=0)
    n = (len(stream) - 1) // seq_len
    with MDSWriter(out=str(out), columns={"ids": "bytes", "unit": "int"}, size_limit=shard_bytes) as w:
        for u in range(n):
            w.write({"ids": stream[u * seq_len : u * seq_len + seq_len + 1].astype(np.uint16).tobytes(),
                     "unit": u})


def run_ranks(system: str, world: int, common: dict, work: Path, tag: str, mosaic_site: str,
              **extra) -> list[dict]:
    """`world` rank processes at once; their results in rank order."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if system == "mosaic":
        env["PYTHONPATH"] = os.pathsep.join([mosaic_site, env.get("PYTHONPATH", "")])

    def one(rank: int) -> dict:
        job = {**common, **extra, "system": system, "rank": rank, "world": world, "master_port": port,
               "batch": common["global_batch"] // world, "cache": str(work / f"cache-{tag}-{rank}")}
        out = work / f"result-{tag}-{rank}.json"
        cmd = [sys.executable, __file__, "--rank-job", json.dumps(job), "--result", str(out)]
        if system == "mosaic":  # a node of its own: Mosaic keeps a node's state in /dev/shm
            cmd = [*NODE, *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{system} rank {rank} of {world} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(one, range(world)))


def global_batches(results: list[dict]) -> list[list[int]]:
    n = min(len(r["steps"]) for r in results)
    return [sorted(u for r in results for u in r["steps"][s]) for s in range(n)]


class ShardOf:
    """Which tar shard (in prepare's order) a window comes from: windows are numbered in a stream of the
    shards in some order (ctxtrain: the epoch's seeded order; the MDS copy: prepare's order)."""

    def __init__(self, data: Path, seq_len: int, seed: int):
        from ctxtrain.data.loader import StreamingLoader

        loader = StreamingLoader(data, seq_len=seq_len, seed=seed)
        names = [s.name for s in loader.shards]
        self.seq_len = seq_len
        self.orders = {"mosaic": list(range(len(names))),
                       "ctxtrain": [names.index(s.name) for s in loader.epoch_shards(0)]}
        self.sizes = np.array([s.tokens + s.docs for s in loader.shards])

    def __call__(self, system: str, units: list[int]) -> np.ndarray:
        order = self.orders["mosaic" if system == "mosaic" else "ctxtrain"]
        ends = np.cumsum(self.sizes[order])
        return np.asarray(order)[np.searchsorted(ends, np.asarray(units) * self.seq_len, side="right")]

    def diversity(self, system: str, batches: list[list[int]]) -> float:
        """Distinct shards per global batch over what G windows drawn uniformly from the epoch give (1.0: as
        mixed as a uniform shuffle; a batch of neighbouring windows, from one or two shards, is near 0)."""
        G = len(batches[0])
        p = self.sizes / self.sizes.sum()
        expected = float(np.sum(1 - (1 - p) ** G))
        return float(np.mean([len(set(self(system, b).tolist())) for b in batches])) / expected


def measure(system: str, world: int, common: dict, work: Path, total_bytes: int, site: str,
            shard_of: ShardOf, **extra) -> dict:
    res = run_ranks(system, world, common, work, f"{system}-{world}-p{extra.get('partitions', '')}", site,
                    **extra)
    units = [u for r in res for s in r["steps"] for u in s]
    steady = max(r["steady_s"] for r in res)
    return {"bytes": sum(r["cached"] for r in res) / total_bytes, "first_s": max(r["first_s"] for r in res),
            "tokens_per_s": sum(r["tokens"] for r in res) / steady if steady else 0.0,
            "units": len(units), "distinct": len(set(units)),
            "diversity": shard_of.diversity(system, global_batches(res))}


def resume_check(system: str, common: dict, work: Path, site: str, k: int, span: int) -> dict:
    whole = global_batches(run_ranks(system, 2, common, work, f"{system}-whole", site, steps=k + span))
    first = run_ranks(system, 2, common, work, f"{system}-first", site, steps=k, save_after=k)
    state = first[0]["state"]
    out = {}
    for world in (4, 1):
        rest = global_batches(run_ranks(system, world, common, work, f"{system}-resume{world}", site,
                                        state=state, steps=span))
        same = sum(a == b for a, b in zip(rest, whole[k:]))
        out[world] = f"{same}/{min(len(rest), len(whole) - k)}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/stdlib")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--shuffle-buffer", type=int, default=1024, help="ctxtrain's data.shuffle_buffer")
    ap.add_argument("--resume-after", type=int, default=20)
    ap.add_argument("--resume-steps", type=int, default=20)
    ap.add_argument("--mosaic-site", default=".venv/mosaic")
    ap.add_argument("--systems", default="ctxtrain,mosaic")
    ap.add_argument("--rank-job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_job:
        job = json.loads(args.rank_job)
        result = (ctxtrain_rank if job["system"] == "ctxtrain" else mosaic_rank)(job)
        Path(args.result).write_text(json.dumps(result))
        return
    data = Path(args.data)
    if not (data / "index.json").is_file():
        sys.exit(f"{data}: no prepared data; run ctxtrain prepare --recipe stdlib --out {data}")
    systems = args.systems.split(",")
    if "mosaic" in systems and not (Path(args.mosaic_site) / "streaming").is_dir():
        sys.exit(f"{args.mosaic_site}: no mosaicml-streaming there; install it as this file's docstring "
                 "says, or --systems ctxtrain")
    sys.path.insert(0, args.mosaic_site)
    endpoint = start_store()
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    index = json.loads((data / "index.json").read_text())
    shards = [data / s["name"] for s in index["splits"]["train"]["shards"]]
    meta = [data / "index.json", data / "tokenizer.json"]
    total = {"ctxtrain": upload(endpoint, [*meta, *shards], "ctxtrain")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "mosaic" in systems:
            write_mds(data, args.seq_len, work / "mds", int(np.mean([s.stat().st_size for s in shards])))
            total["mosaic"] = upload(endpoint, sorted((work / "mds").iterdir()), "mds")
        common = {"uri": f"s3://{BUCKET}/ctxtrain?endpoint_override={endpoint}", "endpoint": endpoint,
                  "seq_len": args.seq_len, "global_batch": args.global_batch, "seed": args.seed,
                  "shuffle_buffer": args.shuffle_buffer}
        print(f"data: {data} train split, {len(shards)} tar shards ({total['ctxtrain'] / 1e6:.1f} MB)"
              + (f", MDS {total['mosaic'] / 1e6:.1f} MB" if "mosaic" in total else "")
              + f"; windows of {args.seq_len + 1} ids, global batch {args.global_batch}", flush=True)
        rows = []
        shard_of = ShardOf(data, args.seq_len, args.seed)
        arms = [(system, world, {}) for system in systems for world in map(int, args.ranks.split(","))]
        if "ctxtrain" in systems:  # the layout before partitions: every rank reads the whole stream
            arms.insert(len(args.ranks.split(",")), ("ctxtrain", 2, {"partitions": 1}))
        for system, world, extra in arms:
            m = measure(system, world, common, work, total[system], args.mosaic_site, shard_of, **extra)
            name = system + (" (one partition)" if extra else "")
            rows.append((name, world, m))
            print(f"  {name} {world} ranks: {json.dumps({k: round(v, 3) for k, v in m.items()})}", flush=True)
        for system in systems:
            resume = resume_check(system, common, work, args.mosaic_site, args.resume_after,
                                  args.resume_steps)
            rows.append((system, "resume", resume))
            print(f"  {system} resume 2 -> 4 / 2 -> 1: same global batches {resume[4]} / {resume[1]}",
                  flush=True)
    print("\n| loader | ranks | bytes fetched / data | first batch (s) | tokens/s (job) | batch diversity "
          "| windows read (distinct) |\n|---|---|---|---|---|---|---|")
    for system, world, m in rows:
        if world != "resume":
            print(f"| {system} | {world} | {m['bytes']:.2f}x | {m['first_s']:.2f} | {m['tokens_per_s']:,.0f} "
                  f"| {m['diversity']:.2f} | {m['units']:,} ({m['distinct']:,}) |")
    for system, world, m in rows:
        if world == "resume":
            print(f"{system}: resume from 2 ranks on 4 / on 1, the same global batches as the uninterrupted "
                  f"2-rank run: {m[4]} / {m[1]} steps")
    ratio = {w: m["bytes"] for s, w, m in rows if s == "ctxtrain" and w != "resume"}
    peer = {w: m["bytes"] for s, w, m in rows if s == "mosaic" and w != "resume"}
    if peer:
        print("bytes ctxtrain / mosaic: " + ", ".join(f"{w} ranks {ratio[w] / peer[w]:.2f}x" for w in ratio
                                                      if w in peer))


if __name__ == "__main__":
    main()
