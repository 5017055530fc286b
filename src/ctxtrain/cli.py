"""The `ctxtrain` command: parse the verb, then call one function for it.

    ctxtrain config show configs/lm_tiny.yaml --model.n_layers=3

Config overrides (`--section.field=value`) may follow any verb that takes a config. Bad input ends with one
line on stderr and exit status 2. Heavy libraries are imported inside the verb that needs them, so that
`ctxtrain --help` and `config show` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from ctxtrain.errors import UserError

VERBS = {
    "config": "show the resolved config of an experiment (config show CFG [--section.field=value ...])",
    "prepare": "turn a corpus into tokenizer + WebDataset shards",
    "data": "inspect shards (data bench SHARDS: loader vs plain tar read)",
    "train": "train a config (embedded Ray here, or a Ray cluster with --address)",
    "export": "consolidate a run's ZeRO shards into safetensors (+ a Hugging Face Llama folder)",
    "submit": "submit a training job to a Ray cluster",
    "jobs": "list the jobs of a Ray cluster",
    "status": "show a job's state, latest step, loss, tokens/s and ETA",
    "logs": "print (or --follow) a job's logs",
    "stop": "stop a running job",
    "report": "write a self-contained HTML report of one or more runs",
    "plan": "estimate memory per GPU before launch",
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
            raise UserError(f"unrecognized argument {arg!r}; config overrides are written --section.field=value")
    return overrides


def _not_built(verb: str) -> Callable[[argparse.Namespace, list[str]], int]:
    def run(args: argparse.Namespace, overrides: list[str]) -> int:
        raise UserError(f"`ctxtrain {verb}` is not built yet; see the README for what runs today")

    return run


# ---------------------------------------------------------------------------------------------------------
# Verbs


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.config import load_config, to_yaml

    cfg = load_config(args.config, overrides)
    sys.stdout.write(to_yaml(cfg, comments=args.comments))
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise UserError(f"prepare takes no config overrides (got {overrides[0]})")
    from ctxtrain.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(**{k: v for k, v in vars(args).items() if k in PrepareOptions.__dataclass_fields__})
    opts.inputs = args.input or []
    opts.progress = not args.no_progress
    prepare(opts)
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from ctxtrain.data.bench import format_bench, run_bench

    if overrides:
        raise UserError(f"data bench takes no config overrides (got {overrides[0]})")
    result = run_bench(args.shards, args.seq_len, args.batch_size, args.workers, args.epochs, args.repeats)
    print(format_bench(result))
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
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
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

    for verb in VERBS:
        if verb in sub.choices:
            continue
        p = sub.add_parser(verb, help=VERBS[verb])
        p.set_defaults(func=_not_built(verb))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
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
        print("ctxtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
