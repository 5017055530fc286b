"""The bad-input catalogue: every foreseeable mistake of a user, from the real CLI, ends in one line on stderr
(`ctxtrain: error: ...`), exit status 2 and no traceback; and a mistake aimed at an existing run directory
changes nothing in it (every file's bytes are compared before and after).

Each case builds its input in a scratch directory (a copy of a small committed run when it damages one) and
returns the command line and the run directory to watch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.helpers import (
    ctxtrain,
    env,
    make_hf_folder,
    s3_endpoint_checking_credentials,
    s3_uri,
    train,
    upload_to_s3,
)

pytestmark = pytest.mark.slow

CFG = str(CONFIGS / "lm_tiny.yaml")
SMALL = ["--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=64",
         "--data.batch_size=2",
         "--cluster.workers=1", "--tracking.enabled=false", "--data.num_workers=0", "--train.log_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_shard_lm):
    """A committed run of a very small model: steps 1-4, checkpoints step_000002 and step_000004 (ZeRO-1)."""
    run_dir = tmp_path_factory.mktemp("runs") / "small"
    train(run_dir, one_shard_lm, *SMALL, "--train.max_steps=4", "--checkpoint.every=2", "--zero.stage=1")
    return {"run": run_dir, "data": one_shard_lm}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# The cases: name -> builder(tmp, base) returning (argv, watched run dir or None)


def _run_copy(tmp: Path, base: dict) -> Path:
    run = tmp / "run"
    shutil.copytree(base["run"], run)
    # the copy's config.yaml points at the base run dir; keep the copy self-contained
    return run


def _train(base: dict, run: Path, *extra: str) -> list[str]:
    return ["train", CFG, f"--train.run_dir={run}", f"--data.path={base['data']}", *SMALL,
            "--cluster.launcher=local", "--train.max_steps=6", "--checkpoint.every=2", "--zero.stage=1",
            *extra]


def _data_copy(tmp: Path, base: dict) -> Path:
    data = tmp / "data"
    shutil.copytree(base["data"], data)
    return data


def _index(data: Path, edit) -> None:
    index = json.loads((data / "index.json").read_text())
    edit(index)
    (data / "index.json").write_text(json.dumps(index))


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _model_states(run: Path, step: int) -> Path:
    return next((run / "checkpoints" / f"step_{step:06d}").glob("*model_states.pt"))


CASES = {
    # --- config ------------------------------------------------------------------------------------------
    "config-missing-file": lambda t, b: (["train", str(t / "nope.yaml")], None),
    "config-yaml-syntax": lambda t, b: (["train", str(_write(t / "c.yaml", "model: [1, 2\n"))], None),
    "config-not-a-mapping": lambda t, b: (["config", "show", str(_write(t / "c.yaml", "- 1\n- 2\n"))], None),
    "config-unknown-section": lambda t, b: (["config", "show", str(_write(t / "c.yaml",
                                                                          "nosuch:\n  a: 1\n"))], None),
    "config-not-utf8": lambda t, b: (["config", "show", str(_write(t / "c.yaml",
                                                                   b"model:\n  d_model: \xff\xfe\n"))],
                                     None),
    "config-is-a-directory": lambda t, b: (["train", str(t)], None),
    "config-unknown-field": lambda t, b: (["config", "show", CFG, "--model.nope=1"], None),
    "config-bad-type": lambda t, b: (["config", "show", CFG, "--model.d_model=abc"], None),
    "config-out-of-range": lambda t, b: (["config", "show", CFG, "--train.max_steps=0"], None),
    "config-override-without-value": lambda t, b: (["config", "show", CFG, "--model.d_model"], None),
    "config-sp-divisibility": lambda t, b: (["config", "show", CFG, "--parallel.sp=3"], None),
    "config-global-batch-no-exact-split": lambda t, b: (["config", "show", CFG, "--cluster.workers=1..3",
                                                         "--train.global_batch=10", "--data.batch_size=6"],
                                                        None),
    "config-worker-range-reversed": lambda t, b: (["config", "show", CFG, "--cluster.workers=3..1"], None),
    "config-global-batch-and-grad-accum": lambda t, b: (["config", "show", CFG, "--train.global_batch=12",
                                                         "--train.grad_accum=2"], None),
    "config-worker-range-with-sp": lambda t, b: (["config", "show", CFG, "--cluster.workers=2..4",
                                                  "--parallel.sp=2"], None),
    "config-bleu-for-an-lm": lambda t, b: (["config", "show", CFG, "--train.bleu_every=10"], None),
    "config-resume-and-no-resume": lambda t, b: (_train(b, b["run"], "--resume", "step_000002",
                                                        "--no-resume"),
                                                 b["run"]),
    "config-unknown-verb-argument": lambda t, b: (["export", str(b["run"]), "--out", str(t / "x"), "--bogus"],
                                                  b["run"]),
    # --- data --------------------------------------------------------------------------------------------
    "data-path-missing": lambda t, b: (_train(b, t / "r", f"--data.path={t / 'nodata'}"), None),
    "data-path-is-a-file": lambda t, b: (_train(b, t / "r", f"--data.path={_write(t / 'f', 'x')}"), None),
    "data-index-not-json": lambda t, b: (
        _train(b, t / "r", f"--data.path={_write(_data_copy(t, b) / 'index.json', '{nope').parent}"), None),
    "data-index-without-fields": lambda t, b: (
        _train(b, t / "r", f"--data.path={_write(_data_copy(t, b) / 'index.json', '{}').parent}"), None),
    "data-index-malformed-shards": lambda t, b: (
        _train(b, t / "r",
               f"--data.path={_edited(t, b, lambda i: i['splits']['train'].update(shards=[{}]))}"),
        None),
    "data-shard-missing": lambda t, b: (_train(b, t / "r", f"--data.path={_without_shard(t, b)}"), None),
    "data-shard-truncated": lambda t, b: (_train(b, t / "r", f"--data.path={_truncated_shard(t, b)}"), None),
    "data-token-ids-past-vocab": lambda t, b: (
        _train(b, t / "r", f"--data.path={_edited(t, b, lambda i: i.update(vocab_size=100))}",
               "--model.vocab_size=128"), None),
    "data-token-ids-past-vocab-under-ray": lambda t, b: (
        _train(b, t / "r", f"--data.path={_edited(t, b, lambda i: i.update(vocab_size=100))}",
               "--model.vocab_size=128", "--cluster.launcher=ray", "--cluster.max_failures=3"), None),
    "data-vocab-larger-than-model": lambda t, b: (_train(b, t / "r", "--model.vocab_size=16"), None),
    "data-task-mismatch": lambda t, b: (_train(b, t / "r", "--model.kind=encdec"), None),
    "prepare-out-is-a-file": lambda t, b: (["prepare", "--input", CFG, "--out", str(_write(t / "f", "x"))],
                                           None),
    "prepare-binary-input": lambda t, b: (["prepare", "--input", str(_binary(t)), "--out", str(t / "o")],
                                          None),
    "prepare-input-matches-nothing": lambda t, b: (["prepare", "--input", str(t / "*.none"), "--out",
                                                    str(t / "o")],
                                                   None),
    "prepare-not-utf8-tsv": lambda t, b: (
        ["prepare", "--input", str(_write(t / "p.tsv", b"hello\tbonjour\n\xff\xfe\tx\n")), "--out",
         str(t / "o")],
        None),
    "prepare-bad-jsonl": lambda t, b: (["prepare", "--input", str(_write(t / "p.jsonl", "{nope\n")), "--out",
                                        str(t / "o")], None),
    "prepare-out-not-empty": lambda t, b: (["prepare", "--input", CFG, "--out", str(b["run"])], b["run"]),
    "prepare-unknown-recipe": lambda t, b: (["prepare", "--recipe", "nope", "--out", str(t / "o")], None),
    "data-bench-not-a-dataset": lambda t, b: (["data", "bench", str(t)], None),
    # --- checkpoints -------------------------------------------------------------------------------------
    "resume-path-missing": lambda t, b: (
        _train(b, (r := _run_copy(t, b)), "--resume", str(t / "other" / "checkpoints" / "step_000002")), r),
    "resume-not-a-step-dir": lambda t, b: (_train(b, (r := _run_copy(t, b)), "--resume", str(t)), r),
    "resume-uncommitted": lambda t, b: (_train(b, (r := _uncommitted(t, b)), "--resume", "step_000004"), r),
    "resume-other-model": lambda t, b: (
        _train(b, (r := _run_copy(t, b)), "--resume", str(b["run"] / "checkpoints" / "step_000002"),
               "--model.d_model=64"), r),
    "resume-named-damaged": lambda t, b: (
        _train(b, (r := _damaged_meta(t, b, 2)), "--resume", "step_000002"), r),
    "resume-every-checkpoint-damaged": lambda t, b: (_train(b, (r := _all_damaged(t, b))), r),
    "resume-other-zero-stage": lambda t, b: (_train(b, (r := _run_copy(t, b)), "--zero.stage=3"), r),
    "export-not-a-run-dir": lambda t, b: (["export", str(t), "--out", str(t / "x")], None),
    "export-no-checkpoint": lambda t, b: (["export", str(_no_checkpoints(t, b)), "--out", str(t / "x")],
                                          None),
    "export-step-not-committed": lambda t, b: (["export", str(b["run"]), "--out", str(t / "x"), "--step",
                                                "3"],
                                               b["run"]),
    "export-truncated-model-states": lambda t, b: (
        ["export", str(r := _truncated_states(t, b, 4)), "--out", str(t / "x")], r),
    "export-corrupt-meta": lambda t, b: (["export", str(r := _damaged_meta(t, b, 4)), "--out", str(t / "x")],
                                         r),
    "export-damaged-config": lambda t, b: (
        ["export", str(r := _damaged_config(t, b)), "--out", str(t / "x")], r),
    # --- cluster addresses -------------------------------------------------------------------------------
    "address-closed-host-port": lambda t, b: (
        _train(b, t / "r", "--cluster.launcher=ray", "--address", f"127.0.0.1:{closed_port()}"), None),
    "address-closed-ray-client": lambda t, b: (
        _train(b, t / "r", "--cluster.launcher=ray", "--address", f"ray://127.0.0.1:{closed_port()}"), None),
    "address-not-an-address": lambda t, b: (_train(b, t / "r", "--cluster.launcher=ray", "--address",
                                                   "ray://:x"),
                                            None),
    "submit-closed-job-server": lambda t, b: (
        ["submit", CFG, f"--train.run_dir={t / 'r'}", f"--data.path={b['data']}", "--address",
         f"http://127.0.0.1:{closed_port()}"], None),
    "submit-relative-run-dir": lambda t, b: (["submit", CFG, "--train.run_dir=runs/x",
                                              f"--data.path={b['data']}"],
                                             None),
    "status-closed-job-server": lambda t, b: (["status", "job1", "--address", f"127.0.0.1:{closed_port()}"],
                                              None),
    "jobs-closed-job-server": lambda t, b: (["jobs", "--address", f"http://127.0.0.1:{closed_port()}"], None),
    "logs-closed-job-server": lambda t, b: (["logs", "job1", "--address",
                                             f"http://127.0.0.1:{closed_port()}"], None),
    "stop-closed-job-server": lambda t, b: (["stop", "job1", "--address",
                                             f"http://127.0.0.1:{closed_port()}"], None),
    "embedded-ray-too-many-workers": lambda t, b: (
        _train(b, t / "r", "--cluster.launcher=ray", "--cluster.workers=64"), None),
    # --- translate, generate, eval ------------------------------------------------------------------------
    "translate-source-not-a-run": lambda t, b: (["translate", str(t / "nothing"), "--input",
                                                 str(_write(t / "in.txt", "Open the file.\n"))], None),
    "translate-an-lm-run": lambda t, b: (["translate", str(b["run"]), "--input",
                                          str(_write(t / "in.txt", "Open the file.\n"))], b["run"]),
    "translate-empty-input": lambda t, b: (["translate", str(b["run"]), "--input", str(_write(t / "e.txt",
                                                                                              ""))],
                                           b["run"]),
    "eval-source-not-a-run": lambda t, b: (["eval", str(t)], None),
    # --- report and plan ---------------------------------------------------------------------------------
    "report-not-a-run": lambda t, b: (["report", str(t / "nope"), "--out", str(t / "r.html")], None),
    "report-metrics-only-garbage": lambda t, b: (
        ["report", str(_garbage_metrics(t, b)), "--out", str(t / "r.html")], None),
    "report-out-is-a-directory": lambda t, b: (["report", str(b["run"]), "--out", str(t)], b["run"]),
    "plan-zero-gpus": lambda t, b: (["plan", CFG, "--gpus", "0"], None),
    # --- pretrained folders, RoPE scaling, documents --------------------------------------------------------
    "pretrained-folder-without-weights": lambda t, b: (_init_from(t, b, _pretrained(t, b, weights=False)),
                                                       None),
    "pretrained-unsupported-architecture": lambda t, b: (
        _init_from(t, b, _pretrained(t, b, architectures=["GPT2LMHeadModel"])), None),
    "pretrained-tokenizer-past-model-vocabulary": lambda t, b: (
        ["prepare", "--input", str(_write(t / "doc.txt", "def f():\n    return 1\n")), "--tokenizer",
         str(_pretrained(t, b, vocab_size=100)), "--out", str(t / "x")], None),
    "pretrained-data-of-another-tokenizer": lambda t, b: (
        _init_from(t, b, _pretrained(t, b, other_tokenizer=True)), None),
    "config-unknown-rope-scaling": lambda t, b: (["config", "show", CFG,
                                                  "--model.rope_scaling.type=longrope"],
                                                 None),
    "config-doc-mask-on-translation": lambda t, b: (["config", "show", str(CONFIGS / "translate_tiny.yaml"),
                                                     "--data.doc_mask=true"], None),
    # --- probe ---------------------------------------------------------------------------------------------
    "probe-length-past-positions": lambda t, b: (["probe", str(b["run"]), "--lengths", "32,128"], b["run"]),
    "probe-depth-outside-0-1": lambda t, b: (["probe", str(b["run"]), "--lengths", "64", "--depths",
                                              "0.5,1.5"],
                                             b["run"]),
    "probe-filler-corpus-too-short": lambda t, b: (["probe", str(b["run"]), "--lengths", "64,400000",
                                                    "--extrapolate", "--filler", "corpus"], b["run"]),
    "probe-a-translation-model": lambda t, b: (["probe", str(_translation_export(t, b)), "--lengths", "64"],
                                               None),
    "train-probe-length-too-short-for-the-prompt": lambda t, b: (
        _train(b, t / "r", "--train.probe_every=2", "--probe.lengths=32"), None),
    "plan-negative-memory": lambda t, b: (["plan", CFG, "--gpu-mem", "-1"], None),
    # --- data under a URI
    # ------------------------------------------------------------------------------------
    "data-url-unreachable": lambda t, b: (
        _train(b, t / "r", f"--data.path=http://127.0.0.1:{closed_port()}/data", "--data.fetch_deadline_s=2",
               f"--data.cache_dir={t / 'cache'}"), None),
    "data-bucket-without-index": lambda t, b: (
        _train(b, t / "r", f"--data.path={s3_uri('nothing/here')}", f"--data.cache_dir={t / 'cache'}"), None),
    "data-shard-missing-from-store": lambda t, b: (
        _train(b, t / "r", f"--data.path={_store_without_a_shard(b)}", f"--data.cache_dir={t / 'cache'}"),
        None),
    "data-credentials-refused": lambda t, b: (
        _train(b, t / "r", f"--data.path=s3://data/lm?endpoint_override={s3_endpoint_checking_credentials()}",
               f"--data.cache_dir={t / 'cache'}"), None),
    "data-cache-dir-not-writable": lambda t, b: (
        _train(b, t / "r", f"--data.path=http://127.0.0.1:{closed_port()}/data",
               "--data.cache_dir=/etc/hostname/cache"), None),
}


def _store_without_a_shard(base: dict) -> str:
    from ctxtrain.storage import ObjectStore

    uri = upload_to_s3(base["data"], "one-shard-less")
    ObjectStore(uri, "test").fs.delete_file("ctxtrain-test/one-shard-less/train-000000.tar")
    return uri


# What some lines must say, beyond being one line.
EXPECT = {
    "translate-source-not-a-run": "neither a run directory",
    "translate-an-lm-run": "is a language model",
    "translate-empty-input": "no sentence to translate",
    "eval-source-not-a-run": "neither a run directory",
    "config-global-batch-no-exact-split": "train.global_batch=10 does not split exactly over 3 workers",
    "config-worker-range-reversed": "1 <= MIN <= MAX",
    "config-global-batch-and-grad-accum": "set only one of them",
    "config-worker-range-with-sp": "elastic range is for data parallelism only",
    "config-bleu-for-an-lm": "BLEU scores translations",
    "resume-other-model": "model.d_model 32->64",
    "resume-path-missing": "no such directory",
    "export-truncated-model-states": "is damaged",
    "data-token-ids-past-vocab": "past the vocabulary",
    "data-token-ids-past-vocab-under-ray": "past the vocabulary",
    "prepare-binary-input": "binary file",
    "address-closed-host-port": "cannot reach the Ray cluster at 127.0.0.1:",
    "pretrained-folder-without-weights": "holds no weights",
    "pretrained-unsupported-architecture": "GPT2LMHeadModel is not supported; ctxtrain loads "
                                           "LlamaForCausalLM",
    "pretrained-tokenizer-past-model-vocabulary": "vocabulary",
    "pretrained-data-of-another-tokenizer": "tokenized with another tokenizer",
    "config-unknown-rope-scaling": "longrope",
    "config-doc-mask-on-translation": "data.doc_mask",
    "probe-length-past-positions": "past the 64 positions of the run's data.seq_len",
    "probe-depth-outside-0-1": "lies in [0, 1]",
    "probe-filler-corpus-too-short": "fewer than a 400,000-token prompt needs",
    "probe-a-translation-model": "is an encoder-decoder",
    "train-probe-length-too-short-for-the-prompt": "probe.lengths: length 32",
    "data-url-unreachable": "tried",
    "data-bucket-without-index": "holds no index.json",
    "data-shard-missing-from-store": "is missing from the store",
    "data-credentials-refused": "the store refused",
    "data-cache-dir-not-writable": "data.cache_dir=/etc/hostname/cache is not writable",
}


def _edited(tmp: Path, base: dict, edit) -> Path:
    data = _data_copy(tmp, base)
    _index(data, edit)
    return data


def _without_shard(tmp: Path, base: dict) -> Path:
    data = _data_copy(tmp, base)
    next(data.glob("train-*.tar")).unlink()
    return data


def _truncated_shard(tmp: Path, base: dict) -> Path:
    data = _data_copy(tmp, base)
    shard = next(data.glob("train-*.tar"))
    os.truncate(shard, shard.stat().st_size // 2)
    return data


def _binary(tmp: Path) -> Path:
    exe = tmp / "prog"
    shutil.copyfile("/bin/true", exe)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _uncommitted(tmp: Path, base: dict) -> Path:
    run = _run_copy(tmp, base)
    (run / "checkpoints" / "step_000004" / "COMMITTED").unlink()
    return run


def _damaged_meta(tmp: Path, base: dict, step: int) -> Path:
    run = _run_copy(tmp, base)
    _write(run / "checkpoints" / f"step_{step:06d}" / "meta.json", '{"step": 4, "tok')
    return run


def _truncated_states(tmp: Path, base: dict, step: int) -> Path:
    run = _run_copy(tmp, base)
    states = _model_states(run, step)
    os.truncate(states, states.stat().st_size // 3)
    return run


def _all_damaged(tmp: Path, base: dict) -> Path:
    run = _damaged_meta(tmp, base, 2)
    states = _model_states(run, 4)
    os.truncate(states, 100)
    return run


def _damaged_config(tmp: Path, base: dict) -> Path:
    run = _run_copy(tmp, base)
    _write(run / "config.yaml", "model: {d_model: [\n")
    return run


def _no_checkpoints(tmp: Path, base: dict) -> Path:
    run = _run_copy(tmp, base)
    shutil.rmtree(run / "checkpoints")
    return run


def _pretrained(tmp: Path, base: dict, weights: bool = True, other_tokenizer: bool = False, **config) -> Path:
    """A small Llama folder (save_pretrained) with the base data's tokenizer, edited: without its weights,
    with other config.json values, or with another tokenizer (one token renamed)."""
    folder = tmp / "llama"
    vocab = json.loads((base["data"] / "index.json").read_text())["vocab_size"]
    make_hf_folder(folder, tokenizer=base["data"] / "tokenizer.json", vocab_size=vocab, hidden_size=32,
                   intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    if not weights:
        (folder / "model.safetensors").unlink()
    if config:
        _write(folder / "config.json", json.dumps({**json.loads((folder / "config.json").read_text()),
                                                   **config}))
    if other_tokenizer:
        tok = json.loads((folder / "tokenizer.json").read_text())
        vocab_map = tok["model"]["vocab"]
        name = next(k for k, v in vocab_map.items() if v == 1000)
        vocab_map["renamed"] = vocab_map.pop(name)
        _write(folder / "tokenizer.json", json.dumps(tok))
    return folder


def _translation_export(tmp: Path, base: dict) -> Path:
    """A ctxtrain export of a small (untrained) encoder-decoder: what `export` writes for a translation
    run."""
    import torch
    from safetensors.torch import save_file

    from ctxtrain.model import ModelConfig, build_model

    folder = tmp / "encdec"
    folder.mkdir()
    model = ModelConfig(kind="encdec",
                        vocab_size=json.loads((base["data"] / "index.json").read_text())["vocab_size"],
                        d_model=32, n_layers=1, n_heads=2, d_ff=64)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_model(model).state_dict().items()},
              str(folder / "model.safetensors"))
    meta = {"ctxtrain_model": dataclasses.asdict(model),
            "data": {"special": {"pad": 0, "bos": 1, "eos": 2}, "max_src_len": 64}}
    _write(folder / "config.json", json.dumps(meta))
    shutil.copyfile(base["data"] / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _init_from(tmp: Path, base: dict, folder: Path) -> list[str]:
    config = _write(tmp / "extend.yaml", f"model:\n  init_from: {folder}\n")
    return ["train", str(config), f"--train.run_dir={tmp / 'r'}", f"--data.path={base['data']}",
            "--data.seq_len=64", "--data.batch_size=2", "--cluster.workers=1", "--cluster.launcher=local",
            "--tracking.enabled=false", "--data.num_workers=0", "--train.max_steps=2"]


def _garbage_metrics(tmp: Path, base: dict) -> Path:
    run = tmp / "garbage"
    _write(run / "metrics.jsonl", b"null\n\xff\xfe not utf-8\n[1, 2]\n")
    return run


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


def in_process(argv: list[str], capfd) -> tuple[int, str, str]:
    """The CLI's main() in this process (the same code path as the console script, without the ~4 s of a
    fresh interpreter importing torch): exit status, stdout and stderr at the file-descriptor level, so the
    output of worker processes it starts is captured too. An exception escaping main() fails the test."""
    from ctxtrain.cli import main

    environ, handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    os.environ["PYTHONPATH"] = env()["PYTHONPATH"]  # workers it starts run this checkout's code too
    try:
        code = main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)
        os.environ.clear()
        os.environ.update(environ)
    out, err = capfd.readouterr()
    return code, out, err


def through_ray(argv: list[str]) -> bool:
    """Cases that reach Ray run as a real subprocess: Ray's settings are read once per process."""
    return argv[0] in ("submit", "status", "jobs", "logs", "stop") or "--cluster.launcher=ray" in argv


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, base, tmp_path, capfd):
    argv, watched = CASES[name](tmp_path, base)
    before = snapshot(watched) if watched else None
    capfd.readouterr()
    t0 = time.time()
    if through_ray(argv):
        proc = ctxtrain(*argv, timeout=120)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        code, stdout, stderr = in_process(argv, capfd)
    took = time.time() - t0
    out = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ctxtrain: error: ")]
    assert code == 2, f"{name}: exit {code}\n{out[-3000:]}"
    assert "Traceback" not in out, f"{name}:\n{out[-3000:]}"
    assert len(errors) == 1, f"{name}: {len(errors)} error lines\n{out[-3000:]}"
    assert len(errors[0]) < 600, errors[0]
    assert EXPECT.get(name, "") in errors[0], errors[0]
    if name.startswith("address-") or name.endswith("-under-ray"):
        # a closed or bad address never hangs; a worker's bad input under Ray ends the run at once, not after
        # cluster.max_failures restarts of the worker group
        assert took < 30, took
    if watched:
        assert snapshot(watched) == before, f"{name}: files of {watched} changed"


def test_report_survives_damage_that_leaves_steps_to_show(base, tmp_path, capfd):
    """A report reads what it can: a null line, a non-UTF-8 line and a line torn by a crash are skipped, a
    checkpoint whose meta.json is damaged is listed as such; the run directory is left as it was."""
    run = _damaged_meta(tmp_path, base, 2)
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b"null\n\xff\xfe not utf-8\n{\"step\": 9, \"lo")
    before = snapshot(run)
    out = tmp_path / "report.html"
    code, _, err = in_process(["report", str(run), "--out", str(out)], capfd)
    assert code == 0 and "Traceback" not in err, err
    page = out.read_text()
    assert "step_000002 (meta.json damaged)" in page and "step_000004" in page
    assert snapshot(run) == before
