"""The `ctxtrain` command: parse the verb, then call one function for it.

    ctxtrain config show configs/lm_tiny.yaml --model.n_layers=3

Config overrides (`--section.field=value`) may follow any verb that takes a config. Bad input ends with one
line on stderr and exit status 2. Heavy libraries are imported inside the verb that needs them, so that
`ctxtrain --help` and `config show` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from ctxtrain.errors import PREEMPTED_EXIT, UserError
from ctxtrain.rundir import RunDir

VERBS = {
    "config": "show the resolved config of an experiment (config show CFG [--section.field=value ...])",
    "prepare": "turn a corpus into tokenizer + WebDataset shards",
    "data": "inspect shards (data bench SHARDS: loader vs plain tar read)",
    "train": "train a config (embedded Ray here, or a Ray cluster with --address)",
    "export": "consolidate a run's ZeRO shards into safetensors (+ a Hugging Face Llama folder)",
    "submit": "submit a training job to a Ray cluster",
    "jobs": "list the jobs of a Ray cluster",
    "status": "a job's state, step, loss, tokens/s and ETA; every job (or run: --runs DIR) in one table "
              "[--watch]",
    "logs": "print (or --follow) a job's logs",
    "stop": "stop a running job",
    "report": "write a self-contained HTML report of one or more runs",
    "plan": "predict one worker's peak memory before launch, and the longest sequence that fits",
    "translate": "translate sentences (one a line) with a run's encoder-decoder or an export",
    "generate": "continue a prompt with a run's LM or an export",
    "eval": "score a run on its held-out split: BLEU and chrF against the copy baseline, or perplexity",
    "probe": "how much of its context an LM uses: loss by position and passkey retrieval",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (exit 2) instead of a usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _split_overrides(extra: list[str]) -> list[str]:
    overrides = []
    for arg in extra:
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in head and "=" in arg:
            overrides.append(arg)
        else:
            raise UserError(f"unrecognized argument {arg!r}; config overrides are written "
                            "--section.field=value")
    return overrides


# ---------------------------------------------------------------------------------------------------------
# Verbs


def _no_overrides(verb: str, overrides: list[str]) -> None:
    if overrides:
        raise UserError(f"{verb} takes no config overrides (got {overrides[0]})")


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.config import load_config, to_yaml

    cfg = load_config(args.config, overrides)
    sys.stdout.write(to_yaml(cfg, comments=args.comments))
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("prepare", overrides)
    from ctxtrain.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(**{k: v for k, v in vars(args).items() if k in PrepareOptions.__dataclass_fields__})
    opts.inputs = args.input or []
    opts.progress = not args.no_progress
    prepare(opts)
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.data.bench import format_bench, run_bench

    _no_overrides("data bench", overrides)
    result = run_bench(args.shards, args.seq_len, args.batch_size, args.workers, args.epochs, args.repeats)
    print(format_bench(result))
    return 0


def _train_config(args: argparse.Namespace, overrides: list[str]):
    from ctxtrain.config import load_config

    extra = []
    if args.resume and args.no_resume:
        raise UserError("--resume and --no-resume contradict each other; pass one")
    if args.resume:
        extra.append(f"--checkpoint.resume={args.resume}")
    if args.no_resume:
        extra.append("--checkpoint.resume=never")
    if getattr(args, "address", None):
        extra.append(f"--cluster.address={args.address}")
    return load_config(args.config, overrides + extra)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    if os.environ.get("CTXTRAIN_SECRETS_FILE"):  # a job that `ctxtrain submit` started
        from ctxtrain.launcher import load_job_secrets

        load_job_secrets()
    cfg = _train_config(args, overrides)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        from ctxtrain import train  # started by torchrun or similar: this process is one worker

        result = train.run(cfg)
        return PREEMPTED_EXIT if result.get("stop_reason") == "preempted" else 0
    from ctxtrain.preflight import preflight, runs_here
    from ctxtrain.progress import ProgressBar, want_bar

    preflight(cfg)
    # A bar needs a terminal here and the run dir visible here (not so for a remote cluster's workers).
    bar = want_bar() and runs_here(cfg)
    os.environ["CTXTRAIN_PROGRESS"] = "bar" if bar else "lines"
    global _preemptible
    request = RunDir(cfg.train.run_dir).preempt_request
    request.unlink(missing_ok=True)  # a request that an earlier driver left behind
    _preemptible = (request, cfg.cluster.preempt_grace_s)
    try:
        with ProgressBar(cfg.train.run_dir, cfg.train.max_steps) if bar else contextlib.nullcontext():
            if cfg.cluster.launcher == "local":
                from ctxtrain import local_launch

                code = local_launch.launch(cfg)
            else:
                from ctxtrain.launcher import train_on_ray

                code = train_on_ray(cfg)
    finally:
        _preemptible = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        request.unlink(missing_ok=True)
    if code == PREEMPTED_EXIT or (code == 0 and _preempting):
        from ctxtrain import checkpoint as ckpt

        steps = ckpt.committed_steps(ckpt.open_storage(cfg))
        print("ctxtrain: preempted (SIGTERM); newest committed checkpoint "
              f"{ckpt.tag_of(steps[-1]) if steps else 'none'}; run the same command again to resume",
              file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    return code


def cmd_submit(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.config import load_config
    from ctxtrain.launcher import submit

    cfg = load_config(args.config, overrides)
    job_id = submit(cfg, args.address, args.env or [], ship_package=not args.no_ship)
    print(job_id)
    return 0


def cmd_jobs(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.launcher import list_jobs

    jobs = list_jobs(args.address)
    print(f"{'JOB':40} {'STATUS':10} {'STARTED':19} RUN DIR")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S",
                                time.localtime(j["start_time"] / 1000)) if j["start_time"] else "-"
        print(f"{j['job_id']:40} {j['status']:10} {started:19} {j['run_dir']}")
    return 0


def cmd_status(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("status", overrides)
    if args.job is None:
        from ctxtrain import status

        if args.interval <= 0:
            raise UserError(f"--interval {args.interval}: must be a positive number of seconds")
        if args.runs:
            status.find_runs(args.runs)  # a missing directory: one line before any refresh
            render = lambda: status.runs_table(args.runs)  # noqa: E731
        else:
            render = lambda: status.jobs_table(args.address)  # noqa: E731
        if args.watch:
            return status.watch(render, args.interval)
        sys.stdout.write(render())
        return 0
    if args.runs or args.watch:
        raise UserError(f"status {args.job}: --runs and --watch are for the table of every job or run; drop "
                        "the job id")
    from ctxtrain.launcher import job_status

    s = job_status(args.job, args.address)
    print(f"job {s['job_id']}: {s['status']}" + (f" ({s['message']})" if s["message"] else ""))
    if "step" in s:
        eta = f"{s['eta_s']:,.0f} s" if s.get("eta_s") is not None else "-"
        total = f"/{s['max_steps']}" if s.get("max_steps") else ""
        print(f"step {s['step']}{total}  loss {s['loss']:.4f}  tokens/s {s['tokens_per_s']:,.0f}  eta {eta}")
    if s.get("run_dir"):
        print(f"run dir {s['run_dir']}")
    print(f"dashboard {s['dashboard']}")
    return 0


def cmd_logs(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.launcher import job_logs

    job_logs(args.job, args.address, args.follow)
    return 0


def cmd_stop(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.launcher import stop_job

    print(f"job {args.job}: {stop_job(args.job, args.address)}")
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("export", overrides)
    from ctxtrain.export import export

    out = export(args.run_dir, args.out, step=args.step, progress=not args.no_progress)
    print(f"exported to {out}")
    return 0


def cmd_translate(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("translate", overrides)
    from ctxtrain import infer

    if args.beam < 1 or args.max_len < 1:
        raise UserError(f"--beam {args.beam} --max-len {args.max_len}: both must be at least 1")
    lines = infer.read_lines(args.input)
    loaded = infer.load_source(args.source)
    infer.write_lines(infer.translate_lines(loaded, lines, args.beam, args.max_len), args.out)
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("generate", overrides)
    from ctxtrain import infer

    if args.max_new < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--max-new >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1 are required")
    loaded = infer.load_source(args.source)
    print(infer.generate(loaded, args.prompt, args.max_new, args.temperature, args.top_k, args.top_p,
                         args.seed))
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("eval", overrides)
    from ctxtrain import infer

    for name in ("limit", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    loaded = infer.load_source(args.source)
    if args.data:
        loaded.data_path = infer.matching_data(loaded, args.data)
    if loaded.kind == "lm":
        r = infer.evaluate_lm(loaded, args.split, args.seq_len, args.limit)
        print(f"{args.split}: {r['windows']:,} windows of {r['seq_len']:,} tokens ({r['tokens']:,} tokens), "
              f"loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}")
        return 0
    r = infer.evaluate_translation(loaded, args.split, args.beam, args.max_len, args.limit)
    print(f"{args.split}: {r['pairs']:,} held-out pairs, "
          f"{'beam ' + str(args.beam) if args.beam > 1 else 'greedy'}")
    print(f"model           BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}")
    print(f"copy the source BLEU {r['copy_bleu']:6.2f}  chrF {r['copy_chrf']:6.2f}")
    for src, hyp, ref in r["examples"]:
        print(f"  src: {src}\n  out: {hyp}\n  ref: {ref}")
    return 0


def cmd_probe(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("probe", overrides)
    import json

    from ctxtrain import infer
    from ctxtrain.probes import format_tables
    from ctxtrain.rundir import RunDir, write_atomic

    lengths, depths = _numbers("--lengths", args.lengths, int), _numbers("--depths", args.depths, float)
    if min(lengths) < 1 or args.samples < 1 or args.windows < 1:
        raise UserError("--lengths, --samples and --windows must be at least 1")
    loaded = infer.load_source(args.source)
    if args.data:
        loaded.data_path = infer.matching_data(loaded, args.data)
    result = infer.run_probes(loaded, lengths, depths, args.samples, args.filler, args.scoring,
                              args.extrapolate,
                              args.seed, args.windows)
    print(format_tables(result))
    run = RunDir(args.source)
    out = Path(args.out) if args.out else (run.path / "probe.json" if run.is_run() else Path("probe.json"))
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _numbers(flag: str, text: str, kind) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated numbers") from None
    if not values:
        raise UserError(f"{flag} {text}: give at least one number")
    return values


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.config import load_config
    from ctxtrain.devices import usable_gib
    from ctxtrain.plan import GIB, available_here, format_plan, plan

    cfg = load_config(args.config, overrides)
    world = args.gpus or cfg.cluster.workers
    for name in ("gpus", "gpu_mem", "host_mem"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')}={value}: must be positive")
    assumed = None
    if args.gpu_mem or args.gpus:
        device, device_bytes = "cuda", None
        if args.gpu_mem:
            usable, assumed = usable_gib(args.gpu_mem)
            device_bytes = usable * GIB
        host_bytes = args.host_mem * GIB if args.host_mem else None
        if device_bytes is None:
            here, here_bytes, _ = available_here(1, want_gpu=True)
            device_bytes = here_bytes if here == "cuda" else None
            assumed = f"this machine's GPU: {here_bytes / GIB:.1f} GiB" if device_bytes else None
    else:
        device, device_bytes, host_bytes = available_here(world)
        if args.host_mem:
            host_bytes = args.host_mem * GIB / world
            device_bytes = device_bytes if device == "cuda" else host_bytes
    result = plan(cfg, world, device)
    print(format_plan(cfg, result, device_bytes, host_bytes, assumed))
    return 0 if device_bytes is None or result.fits(device_bytes, host_bytes) else 1


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("report", overrides)
    from ctxtrain.report import build_report, serve

    if args.serve:
        return serve(args.run_dirs, args.port, args.refresh)
    out = build_report(args.run_dirs, args.out, args.png)
    print(f"wrote {out}" + (f" and PNGs in {args.png}" if args.png else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctxtrain",
        description="Long-context Transformer training: Ray + DeepSpeed ZeRO + WebDataset + W&B.",
        epilog="Verbs: " + "; ".join(f"{k}: {v}" for k, v in VERBS.items()),
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    p = sub.add_parser("config", help=VERBS["config"])
    p.add_argument("action", choices=["show"])
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    p.add_argument("--comments", action="store_true", help="print each field's docstring above it")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help=VERBS["prepare"],
                       description="Tokenize a corpus into WebDataset shards: "
                                   "ctxtrain prepare --recipe stdlib --out data/stdlib")
    p.add_argument("--input", nargs="+", metavar="GLOB", help="text files, JSONL (LM or pairs) or TSV pairs")
    p.add_argument("--recipe", help="stdlib | debian-gettext-fr (fetch a real corpus instead of --input)")
    p.add_argument("--out", required=True, help="output directory (data.path of a config)")
    p.add_argument("--task", default="auto", choices=["auto", "lm", "translation"])
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (default 8192)")
    p.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json, or a pretrained model "
                                                       "folder's (its vocabulary and special ids), instead "
                                                       "of training one")
    p.add_argument("--shard-size", default="64MB", help="target size of each tar shard (default 64MB)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle and the val split")
    p.add_argument("--text-field", default="text", help="JSONL field holding LM text")
    p.add_argument("--src-field", default="src", help="JSONL field of the translation source")
    p.add_argument("--tgt-field", default="tgt", help="JSONL field of the translation target")
    p.add_argument("--src-lang", help="source language code (translation)")
    p.add_argument("--tgt-lang", help="target language code; adds a <2xx> tag to every source")
    p.add_argument("--packages", nargs="+", help="debian-gettext-fr: the Debian packages to read")
    p.add_argument("--cache", help="debian-gettext-fr: where downloaded packages are kept")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help=VERBS["data"])
    p.add_argument("action", choices=["bench"])
    p.add_argument("shards", help="a directory made by `ctxtrain prepare`")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the loader")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data on each side")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is kept")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help=VERBS["train"],
                       description="Train a config: ctxtrain train configs/lm_tiny.yaml --cluster.workers=2")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--resume", metavar="PATH", help="resume from this committed checkpoint (default: the "
                                                    "newest)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else embedded Ray)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help=VERBS["export"])
    p.add_argument("run_dir", help="train.run_dir of a run")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest committed)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("translate", help=VERBS["translate"],
                       description="ctxtrain translate RUN_DIR|EXPORT --input FILE|- [--beam K] [--out FILE]")
    p.add_argument("source", help="a run directory (its newest committed checkpoint) or an export folder")
    p.add_argument("--input", required=True, help="text file, one sentence a line, or - for stdin")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--max-len", type=int, default=128, help="longest translation, in tokens")
    p.add_argument("--out", help="write the translations here (default: stdout)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("generate", help=VERBS["generate"])
    p.add_argument("source", help="a run directory, an export folder or a Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new", type=int, default=64, help="tokens to add")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help=VERBS["eval"])
    p.add_argument("source", help="a run directory, an export folder or a Hugging Face model folder")
    p.add_argument("--split", default="val")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--limit", type=int, help="score only the first N pairs (LM: windows)")
    p.add_argument("--seq-len", type=int, help="LM: tokens per window (default: the run's data.seq_len)")
    p.add_argument("--data", metavar="DIR", help="the prepared data to score (default: the run's data.path; "
                                                 "needed for an export or a Hugging Face folder)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("probe", help=VERBS["probe"])
    p.add_argument("source", help="a run directory, an export folder or a Hugging Face model folder")
    p.add_argument("--lengths", default="256,1024,4096", help="prompt and window lengths, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="the needle's depths in [0, 1]")
    p.add_argument("--samples", type=int, default=8, help="keys per (length, depth) cell")
    p.add_argument("--filler", choices=["sentences", "corpus"], default="sentences",
                   help="the classic repeated sentences, or held-out text of the data")
    p.add_argument("--scoring", choices=["greedy", "forced"], default="greedy",
                   help="greedy decoding through the KV cache, or the argmax at the key's positions in one "
                        "forward pass")
    p.add_argument("--extrapolate", action="store_true", help="allow lengths past the positions the model "
                                                              "knows")
    p.add_argument("--windows", type=int, default=8, help="held-out windows per length for the loss by "
                                                          "position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="DIR", help="held-out data for the loss by position and the corpus "
                                                 "filler (default: a run's data.path)")
    p.add_argument("--out", help="the numbers as JSON (default: RUN_DIR/probe.json for a run, else "
                                 "./probe.json)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("submit", help=VERBS["submit"],
                       description="Submit `ctxtrain train` to a Ray cluster: "
                                   "ctxtrain submit configs/lm_1b.yaml --address http://HEAD:8265")
    p.add_argument("config", help="experiment YAML (resolved here, shipped with the job)")
    p.add_argument("--address", help="Ray job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--env", action="append", metavar="NAME", help="also pass this environment variable")
    p.add_argument("--no-ship", action="store_true", help="use the cluster's installed ctxtrain, not this "
                                                          "one")
    p.set_defaults(func=cmd_submit)
    for verb, fn in (("jobs", cmd_jobs), ("status", cmd_status), ("logs", cmd_logs), ("stop", cmd_stop)):
        p = sub.add_parser(verb, help=VERBS[verb])
        if verb == "status":
            p.add_argument("job", nargs="?", help="job id; none: every job of the cluster, or every run of "
                                                  "--runs")
            p.add_argument("--runs", metavar="DIR", help="every run directory under DIR instead of the "
                                                         "cluster's jobs")
            p.add_argument("--watch", action="store_true", help="refresh the table (in place in a terminal)")
            p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (--watch)")
        elif verb != "jobs":
            p.add_argument("job", help="job id (from `ctxtrain submit` or `ctxtrain jobs`)")
        if verb == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing as the job writes")
        p.add_argument("--address", help="Ray job server, http://HEAD:8265 (default: "
                                         "$RAY_API_SERVER_ADDRESS)")
        p.set_defaults(func=fn)

    p = sub.add_parser("plan", help=VERBS["plan"],
                       description="Predict one worker's peak memory before launch, and the longest sequence "
                                   "that fits: ctxtrain plan configs/lm_1b.yaml --gpus 8 --gpu-mem 80. Exit "
                                   "status 0 when it fits, 1 when it does not.")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--gpus", type=int, help="GPU workers (default: cluster.workers; implies a GPU plan)")
    p.add_argument("--gpu-mem", type=float, metavar="GiB", help="memory of one GPU (default: this machine's "
                                                                "GPU)")
    p.add_argument("--host-mem", type=float, metavar="GiB",
                   help="host memory of one node for offloaded state (default: this machine's available "
                        "memory)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help=VERBS["report"])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--png", metavar="DIR", help="also write each plot as DIR/NAME.png")
    p.add_argument("--serve", action="store_true", help="serve it on 127.0.0.1, rebuilt as the runs go on")
    p.add_argument("--port", type=int, default=8050, help="--serve: port on 127.0.0.1 (default 8050; 0: any "
                                                          "free)")
    p.add_argument("--refresh", type=float, default=5.0, help="--serve: seconds between page reloads "
                                                              "(default 5)")
    p.set_defaults(func=cmd_report)
    return parser


_terminated = False
# (RUN_DIR/preempt.request, grace) while `train` has workers
_preemptible: Optional[tuple[Path, float]] = None
_preempting = False


def _on_sigterm(signum, frame):
    """SIGTERM to `train` while its workers run: a preemption (Slurm's --signal, a Kubernetes eviction). The
    workers are asked for a checkpoint at the next step boundary (RUN_DIR/preempt.request) and the run ends
    with status 75; past cluster.preempt_grace_s, or on a second SIGTERM, it is terminated.

    Otherwise SIGTERM unwinds every verb like Ctrl-C (workers stopped, Ray shut down in order). A
    KeyboardInterrupt, because Ray's waits pass that one through and swallow other exceptions raised by
    handlers."""
    global _terminated, _preempting
    if _preemptible is not None and not _preempting:
        request, grace = _preemptible
        _preempting = True
        try:
            request.write_text(f"{time.time()}\n")
        except OSError:
            pass  # the run directory is not reachable from here: terminate
        else:
            print(f"ctxtrain: SIGTERM: the workers write a checkpoint at the next step boundary (grace "
                  f"{grace:g} s, cluster.preempt_grace_s)", file=sys.stderr, flush=True)
            signal.signal(signal.SIGALRM, _on_sigterm)
            signal.setitimer(signal.ITIMER_REAL, grace)
            return
    _terminated = True
    raise KeyboardInterrupt()


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.verb is None:
            parser.print_help()
            return 2
        overrides = _split_overrides(extra)
        return int(args.func(args, overrides) or 0)
    except UserError as e:
        print(f"ctxtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _terminated:
            print("ctxtrain: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("ctxtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
