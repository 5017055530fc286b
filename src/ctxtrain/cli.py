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
