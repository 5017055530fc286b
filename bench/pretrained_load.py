"""Loading a pretrained Hugging Face folder: ctxtrain's `model.init_from` under ZeRO-3 on 2 workers against
`transformers`' from_pretrained in one process, measured in the same run.

    python bench/pretrained_load.py                     # the test suite's folder and a ~1B one, made here
    python bench/pretrained_load.py --folder PATH       # a Llama/Qwen2/Mistral folder of yours
    python bench/pretrained_load.py --shapes test --runs 1    # CI's smoke run

The folders are Llama-shaped models with random weights saved by `save_pretrained`: "test" is the integration
tests' (64 wide, 2 layers, vocabulary 2048, fp32 on disk), "1b" is configs/lm_1b.yaml's shape (2048 wide, 16
layers, SwiGLU 5632, vocabulary 32000: 1.1B parameters, bf16 on disk as published checkpoints are). Each arm
is a fresh process (ctxtrain: the local launcher's 2 workers), run --runs times in turn:
  - ctxtrain: `ctxtrain.engine.build(cfg, pretrained=True)` as `ctxtrain train` calls it: under ZeRO-3 the
  model
    is built partitioned (deepspeed.zero.Init) and filled one gathered parameter at a time from rank 0's
    memory-mapped read of the safetensors; fp32 weights, as training holds them;
  - transformers: `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)`, the whole model in one
    process.
Reported: the load's seconds (from before the model is built to after the last weight is in place; the
medians) and its peak RSS growth over the process's RSS before the load (the largest worker's for ctxtrain;
the largest run's), and the wall time of the whole process (interpreter, imports, process group and all).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "test": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, dtype="float32"),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, dtype="bfloat16"),
}


def make_folder(path: Path, shape: str) -> None:
    """A Llama folder of this shape with random weights (transformers' init), saved by save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(SHAPES[shape])
    dtype = getattr(torch, sizes.pop("dtype"))
    config = LlamaConfig(**sizes, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)


def _peak_growth(before: int) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def ctxtrain_worker(cfg) -> None:
    """Entry of each worker: build the model from the folder as `ctxtrain train` does; rank 0 prints the
    ranks' figures."""
    from ctxtrain.engine import init_distributed, shutdown
    from ctxtrain.engine.core import build, gather_objects
    from ctxtrain.metrics import rss_bytes

    info = init_distributed(cfg)
    try:
        before = rss_bytes()
        t0 = time.perf_counter()
        build(cfg, info, pretrained=True)
        seconds = time.perf_counter() - t0
        figures = gather_objects({"seconds": seconds, "peak_growth": _peak_growth(before)})
        if info.rank == 0:
            print(json.dumps({"seconds": max(f["seconds"] for f in figures),
                              "peak_growth": max(f["peak_growth"] for f in figures)}), flush=True)
    finally:
        shutdown(info)


def run_ctxtrain(folder: Path) -> None:
    from ctxtrain.config import load_config
    from ctxtrain.local_launch import launch

    cfg = load_config(None, [f"--model.init_from={folder}", "--zero.stage=3", "--cluster.workers=2",
                             "--train.dtype=fp32", "--cluster.launcher=local", "--tracking.enabled=false"])
    os.environ["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    sys.exit(launch(cfg, entry="bench.pretrained_load:ctxtrain_worker"))


def run_transformers(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ctxtrain.metrics import rss_bytes

    before = rss_bytes()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_growth": _peak_growth(before),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)


def measure(arm: str, folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, f"--{arm}", str(folder)], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"pretrained_load: {arm} on {folder} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "wall": wall}


def compare(folder: Path, runs: int) -> dict:
    rows: dict[str, list[dict]] = {"ctxtrain": [], "transformers": []}
    for _ in range(runs):
        for arm in rows:  # in turn, so that drift touches both
            rows[arm].append(measure(arm, folder))
    summary = {arm: {"seconds": statistics.median(r["seconds"] for r in rs),
                     "wall": statistics.median(r["wall"] for r in rs),
                     "peak_growth": max(r["peak_growth"] for r in rs)} for arm, rs in rows.items()}
    return {"folder": str(folder), "runs": rows, "summary": summary,
            "bytes_on_disk": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def print_result(name: str, result: dict) -> None:
    s = result["summary"]
    c, t = s["ctxtrain"], s["transformers"]
    print(f"\n{name}: {result['folder']} ({result['bytes_on_disk'] / 2**20:,.0f} MiB of safetensors)")
    print(f"{'':34} {'load s':>8} {'peak growth':>12} {'process wall s':>15}")
    print(f"{'ctxtrain, ZeRO-3, 2 workers':34} {c['seconds']:>8.2f} {c['peak_growth'] / 2**20:>8,.0f} MiB "
          f"{c['wall']:>15.1f}")
    print(f"{'transformers, 1 process':34} {t['seconds']:>8.2f} {t['peak_growth'] / 2**20:>8,.0f} MiB "
          f"{t['wall']:>15.1f}")
    print(f"{'ratio ctxtrain / transformers':34} {c['seconds'] / t['seconds']:>8.2f} "
          f"{c['peak_growth'] / t['peak_growth']:>12.2f} {c['wall'] / t['wall']:>15.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", help="a pretrained folder to load instead of the made ones")
    p.add_argument("--shapes", default="test,1b", help="the folders to make: test, 1b (comma-separated)")
    p.add_argument("--runs", type=int, default=3, help="runs of each arm (medians of the times)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--ctxtrain", metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--transformers", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ctxtrain:
        run_ctxtrain(Path(args.ctxtrain))
        return 0
    if args.transformers:
        run_transformers(Path(args.transformers))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="pretrained-load-") as tmp:
        folders = {"folder": Path(args.folder)} if args.folder else {}
        for shape in ([] if args.folder else args.shapes.split(",")):
            folders[shape] = Path(tmp) / shape
            make_folder(folders[shape], shape)
        for name, folder in folders.items():
            results[name] = compare(folder, args.runs)
            print_result(name, results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
