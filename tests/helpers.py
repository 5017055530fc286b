"""Running `ctxtrain` as a user does (a subprocess of the real CLI) and reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CONFIGS, REPO

# Small windows and batches, and W&B and TensorBoard off where a test does not look at them (house style 6;
# they cost ~4 s and ~1 s a run here). The tests that look at them turn them on.
BASE = ["--data.batch_size=4", "--data.seq_len=128", "--train.eval_every=0", "--train.eval_batches=2",
        "--train.log_every=5", "--cluster.workers=2", "--train.dtype=fp32", "--tracking.enabled=false",
        "--tracking.tensorboard=false"]
# lm_tiny narrowed: its layers and code paths (RoPE, RMSNorm, SwiGLU, the 8k vocabulary), 64 wide and 2 deep,
# a step ~0.2 s instead of ~0.7 s; a shorter warmup so that 20 steps still learn. Memory tests train the full
# width.
NARROW = ["--model.d_model=64", "--model.d_ff=128", "--model.n_layers=2", "--optim.warmup_steps=5"]
FAST = [*BASE, *NARROW]


def env(**extra: str) -> dict:
    # The checkout's own source first: a test runs the code beside it, whatever else is installed.
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", **extra}


def ctxtrain(*args: str, timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxtrain", *args], capture_output=True, text=True,
                          env=env(**(extra_env or {})), timeout=timeout)


def train(run_dir: Path, data: Path, *overrides: str, config: str = "lm_tiny.yaml", check: bool = True,
          launcher: str = "local", extra_env: dict | None = None, narrow: bool = True):
    """`ctxtrain train` on real shards; returns (completed process, metrics lines by step). narrow=False keeps
    the config's own width (a memory measurement)."""
    proc = ctxtrain("train", str(CONFIGS / config), f"--train.run_dir={run_dir}", f"--data.path={data}",
                    *(FAST if narrow else BASE), f"--cluster.launcher={launcher}", *overrides,
                    extra_env=extra_env)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, metrics(run_dir)


def metrics(run_dir: Path) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "starts.jsonl").read_text().splitlines()]


def make_hf_folder(path: Path, arch: str = "llama", rope: dict | None = None, tie: bool = False,
                   tokenizer: Path | None = None, noise: float = 0.05, **sizes):
    """A small random Hugging Face model saved with `save_pretrained` (every weight random, norms and biases
    too: `noise` on top of transformers' init), as a pretrained folder in tests. sizes: the config's own names
    (vocab_size, hidden_size, ...). tokenizer: a ctxtrain tokenizer.json to save beside the weights, with its
    <bos>/<eos>/<pad> ids in generation_config.json. Returns the transformers model (eval mode)."""
    import shutil

    import torch
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[arch])
    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=10000.0,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6)
    kwargs.update(sizes)
    if rope:
        kwargs["rope_scaling"] = dict(rope)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if tokenizer is not None:  # ctxtrain's specials: <pad>=0, <bos>=1, <eos>=2
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(path)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(path) / "tokenizer.json")
        transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    return model


def load_shipped(path: Path, tmp: Path):
    """A config of configs/ as a user loads it. One that starts from a pretrained folder (model.init_from)
    gets a small Qwen2 folder of the same head layout (14 heads over 2 key/value heads) made here instead of
    the model it names, which a test cannot download."""
    import yaml

    from ctxtrain.config import load_config

    if not (yaml.safe_load(Path(path).read_text()).get("model") or {}).get("init_from"):
        return load_config(path)
    folder = tmp / "pretrained"
    if not folder.is_dir():
        make_hf_folder(folder, "qwen2", tie=True, vocab_size=512, hidden_size=112, intermediate_size=160,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6)
    return load_config(path, [f"--model.init_from={folder}"])


# ---------------------------------------------------------------------------------------------------------
# Stores on 127.0.0.1 for data under a URI: an S3-protocol server (moto) and an HTTP server, in this process

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
_servers: dict = {}


def s3_endpoint() -> str:
    """http://127.0.0.1:PORT of moto's S3 server (started once per test process; nothing leaves the
    machine)."""
    if "s3" not in _servers:
        from moto.server import ThreadedMotoServer

        os.environ.update(S3_ENV)  # the clients of this process and of the subprocesses it starts
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        _servers["s3"] = f"http://{host}:{port}"
    return _servers["s3"]


def s3_endpoint_checking_credentials() -> str:
    """A second moto S3 server, in a subprocess, that checks credentials (IAM): the tests' keys are
    refused."""
    if "s3-auth" not in _servers:
        import socket
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import atexit

        atexit.register(proc.kill)
        _servers["s3-auth"] = url
    return _servers["s3-auth"]


def s3_uri(prefix: str) -> str:
    return f"s3://ctxtrain-test/{prefix}?endpoint_override={s3_endpoint()}"


def upload_to_s3(local: Path, prefix: str) -> str:
    """A local dataset directory copied to s3://ctxtrain-test/PREFIX; its data.path URI."""
    from ctxtrain.storage import ObjectStore

    os.environ.update(S3_ENV)
    store = ObjectStore(f"s3://ctxtrain-test?endpoint_override={s3_endpoint()}&allow_bucket_creation=true",
                        "test")
    store.fs.create_dir("ctxtrain-test")
    store.upload(local, prefix)
    return s3_uri(prefix)


def http_url(directory: Path, flaky: bool = False, served: dict | None = None) -> str:
    """http://127.0.0.1:PORT serving directory (a thread of this process). flaky: the first request for each
    path answers 503, as an overloaded server does. served: filled with the bytes sent for each path."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        failed: set = set()
        sizes: dict = {}

        def do_GET(self):
            if flaky and self.path not in Handler.failed:
                Handler.failed.add(self.path)
                self.send_error(503, "try again")
                return
            super().do_GET()
            if served is not None and self.path in Handler.sizes:
                served[self.path] = served.get(self.path, 0) + Handler.sizes[self.path]

        def send_head(self):
            f = super().send_head()
            if f is not None and hasattr(f, "fileno"):
                Handler.sizes[self.path] = os.fstat(f.fileno()).st_size
            return f

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"
