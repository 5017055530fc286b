"""Long sequences on one device: ctxtrain's memory levers against Hugging Face Llama, measured in the same
run.

    python bench/longseq.py --cpu                        # the README's CPU table (~30 min, 2 cores)
    python bench/longseq.py --cpu --lengths 256,512 --arms plain,full+loss+mlp,hf   # CI's smoke run
    python bench/longseq.py --cpu --sp 1,2,4             # bytes per token per worker, sequence parallelism
    python bench/longseq.py --cpu --docs 300,3000        # tokens/s with data.doc_mask against without
    python bench/longseq.py --gpu                        # one GPU (needs transformers, liger-kernel)

--cpu: a Llama-shaped model (d 256, 4 layers, 4 heads, SwiGLU 704, vocab 32000, RoPE, RMSNorm), batch 1, fp32.
Every (arm, length) runs in a fresh process: a 16-token step (so that the optimizer's state exists), then one
training step at the length; it reports the process's peak RSS growth over its RSS before the model was built:
weights, gradients, optimizer state and the step's activations, as GNU `time -f %M` would see it less the
interpreter and its libraries. Arms:
  - ctxtrain with each lever combination, through its own engine (DeepSpeed ZeRO-0 on one rank, fused AdamW,
    `ctxtrain.engine.apply_levers` as `ctxtrain train` applies them);
  - full+loss+mlp+docs: full+loss+mlp with data.doc_mask, on windows of documents of 300 tokens
    (CTXTRAIN_BENCH_DOC_TOKENS): what keeping documents apart costs in memory;
  - hf: `transformers.LlamaForCausalLM` with SDPA and `gradient_checkpointing_enable()`, the same shapes,
    fused AdamW, in a plain loop.
Both processes give freed memory back to the OS the same way (`return_freed_host_memory`), so RSS follows live
tensors in both. From the lengths: the slope in bytes per sequence token (least squares) and the intercept,
and from those the longest length whose growth stays under --budget-gib (extrapolated: a CPU takes hours to
run a 200k-token step; the fit's largest residual is printed to show how straight the line is). Ratios against
hf. With --sp 1,2,4 it runs `ctxtrain train` itself on sp workers instead (no lever, ZeRO-1, 2k-8k tokens) and
reports one worker's bytes per token at each degree. With --docs it times full+loss+mlp with and
without data.doc_mask on windows (--lengths, default 2k and 8k) of documents of each given length:
tokens/s, the median of --steps (at least 3) steps after a warm-up step, and their ratio.

--gpu: the ~1B model of configs/lm_1b.yaml in bf16 on one GPU: ctxtrain (full checkpointing, chunked loss and
MLP, and offload at the longest lengths) against hf and hf + Liger (fused linear cross-entropy, RMSNorm, RoPE,
SwiGLU), as ../shared/peers measured them: tokens/s, causal MFU (ctxtrain.model.flops, the same formula for
every arm), peak GiB (max_memory_allocated) and out-of-memory, at 8k-512k and at the longest length the
planner gives ctxtrain; each length is skipped when its step would not finish inside --budget-min. Writes JSON
to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lm_tiny.yaml"
CPU_MODEL = dict(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, d_ff=704)
CHUNK = 256  # tokens per chunk of the loss and the MLP: their constant buffers stay small next to 8k+ tokens

# ctxtrain's arms: memory.* settings
ARMS = {
    "plain": {},
    "loss": {"loss_chunk": CHUNK},
    "full+loss": {"checkpoint": "full", "loss_chunk": CHUNK},
    "selective+loss+mlp": {"checkpoint": "selective", "loss_chunk": CHUNK, "mlp_chunk": CHUNK},
    "full+loss+mlp": {"checkpoint": "full", "loss_chunk": CHUNK, "mlp_chunk": CHUNK},
    "offload+loss+mlp": {"checkpoint": "offload", "loss_chunk": CHUNK, "mlp_chunk": CHUNK},
    # data.doc_mask on windows of documents of DOC_TOKENS tokens each
    "full+loss+mlp+docs": {"checkpoint": "full", "loss_chunk": CHUNK, "mlp_chunk": CHUNK},
}
PEER = "hf"
DOCS = "+docs"  # an arm whose name ends so trains with data.doc_mask
DOC_TOKENS = int(os.environ.get("CTXTRAIN_BENCH_DOC_TOKENS", 300))


# ---------------------------------------------------------------------------------------------------------
# One measurement (a child process): build, one training step, report the peak


def ctxtrain_config(model: dict, seq_len: int, memory: dict, dtype: str, device: str, doc_mask: bool = False):
    from ctxtrain.config import load_config

    overrides = [f"--model.{k}={v}" for k, v in model.items()] + [f"--memory.{k}={v}" for k,
                                                                  v in memory.items()]
    overrides.append(f"--data.doc_mask={str(doc_mask).lower()}")
    return load_config(CONFIG, overrides + [f"--data.seq_len={seq_len}", "--data.batch_size=1",
                                            "--zero.stage=0",
                                            f"--train.dtype={dtype}", "--cluster.workers=1",
                                            f"--train.device={device}",
                                            "--tracking.enabled=false"])


def ctxtrain_stepper(cfg):
    """A function that runs one ctxtrain training step on a given token batch (the engine `ctxtrain train`
    uses)."""
    import torch

    from ctxtrain.engine import Engine, apply_levers, init_distributed
    from ctxtrain.model import build_model
    from ctxtrain.plan import offload_host_bytes

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    info = init_distributed(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_levers(model, cfg.memory, info.device,
                 offload_host_bytes(cfg, 1) if info.device.type == "cuda" else None)  # as `ctxtrain train`
    engine = Engine(cfg, model, info)

    def step(tokens, docs=None):
        batch = {"tokens": tokens} if docs is None else {"tokens": tokens, "docs": docs}
        loss, _ = engine.train_step([batch], 1e-4)
        return loss

    return step, info.device


def hf_stepper(model: dict, dtype, device: str, liger: bool = False):
    """One plain training step of transformers' Llama with SDPA and gradient checkpointing (the peer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    cfg = LlamaConfig(vocab_size=model["vocab_size"], hidden_size=model["d_model"],
                      intermediate_size=model["d_ff"],
                      num_hidden_layers=model["n_layers"], num_attention_heads=model["n_heads"],
                      num_key_value_heads=model["n_heads"], max_position_embeddings=1 << 22,
                      tie_word_embeddings=False, rope_theta=model.get("rope_theta", 10000.0))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype)
    m.config.use_cache = False
    m.gradient_checkpointing_enable()
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    def step(tokens):
        loss = m(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def child(arm: str, seq_len: int, steps: int = 1) -> None:
    """Print {"arm", "seq_len", "growth", "step_s"} for training steps at this length (the CPU mode): the
    peak's growth, and the median time of `steps` steps. An arm ending in +docs trains with data.doc_mask on
    windows of documents of DOC_TOKENS tokens."""
    import resource

    import torch
    import torch._dynamo  # noqa: F401  (loaded by torch.optim on first use: code, not training memory)

    from ctxtrain.engine.memory import return_freed_host_memory
    from ctxtrain.metrics import rss_bytes

    return_freed_host_memory()
    if arm == PEER:
        import transformers  # noqa: F401
    else:
        import deepspeed  # noqa: F401
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    before = rss_bytes()
    if arm == PEER:
        step = hf_stepper(CPU_MODEL, torch.float32, "cpu")
    else:
        step, _ = ctxtrain_stepper(ctxtrain_config(CPU_MODEL, seq_len, ARMS[arm], "fp32", "cpu",
                                                   doc_mask=arm.endswith(DOCS)))
    g = torch.Generator().manual_seed(1)
    # the optimizer's state exists from here on
    step(torch.randint(0, CPU_MODEL["vocab_size"], (1, 17), generator=g))
    tokens = torch.randint(0, CPU_MODEL["vocab_size"], (1, seq_len + 1), generator=g)
    docs = (torch.arange(seq_len + 1) // DOC_TOKENS)[None] if arm.endswith(DOCS) else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(tokens) if docs is None else step(tokens, docs)
        times.append(time.perf_counter() - t0)
    elapsed = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"arm": arm, "seq_len": seq_len, "growth": peak - before, "step_s": elapsed,
                      "loss": float(loss)}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# --cpu


def fit(points: list[tuple[int, int]]) -> tuple[float, float, float]:
    """Least squares growth = intercept + slope x length; returns (slope, intercept, largest relative
    residual)."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(g for _, g in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    slope = sum((t - mx) * (g - my) for t, g in points) / sxx
    intercept = my - slope * mx
    worst = max(abs(g - (intercept + slope * t)) / g for t, g in points)
    return slope, intercept, worst


def run_child(arm: str, seq_len: int, steps: int = 1, doc_tokens: int = DOC_TOKENS) -> dict:
    """One measurement in a fresh process."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore",
           "MASTER_PORT": str(29000 + (os.getpid() + seq_len + steps + doc_tokens) % 2000),
           "CTXTRAIN_BENCH_DOC_TOKENS": str(doc_tokens)}
    proc = subprocess.run([sys.executable, __file__, "--child", arm, str(seq_len), "--steps", str(steps)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"longseq: {arm} at {seq_len} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_cpu(arms: list[str], lengths: list[int], budget_gib: float) -> dict:
    rows = []
    for arm in arms:
        for seq_len in lengths:
            rows.append(run_child(arm, seq_len))
            r = rows[-1]
            print(f"  {arm:20} {seq_len:>7,} tokens: growth {r['growth'] / 2**20:8.1f} MiB, step "
                  f"{r['step_s']:6.1f} s",
                  flush=True)
    budget = budget_gib * 2**30
    summary = {}
    for arm in arms:
        points = [(r["seq_len"], r["growth"]) for r in rows if r["arm"] == arm]
        slope, intercept, worst = fit(points)
        summary[arm] = {"bytes_per_token": slope, "intercept": intercept, "worst_residual": worst,
                        "longest": max(0, int((budget - intercept) / slope)) if slope > 0 else None}
    return {"rows": rows, "summary": summary, "budget_gib": budget_gib, "lengths": lengths}


def print_cpu(result: dict) -> None:
    s = result["summary"]
    peer = s.get(PEER)
    print(f"\nCPU, fp32, batch 1, d 256 x 4 layers, vocab 32000; lengths {result['lengths']}; "
          f"budget {result['budget_gib']:g} GiB")
    print(f"{'arm':20} {'bytes/token':>12} {'intercept':>12} {'fit resid.':>10} {'longest':>12}"
          + (f" {'bytes/token vs hf':>18} {'longest vs hf':>14}" if peer else ""))
    for arm, r in s.items():
        line = (f"{arm:20} {r['bytes_per_token']:>12,.0f} {r['intercept'] / 2**20:>9,.0f} MiB "
                f"{r['worst_residual']:>10.1%} {r['longest'] or 0:>12,}")
        if peer:
            line += (f" {r['bytes_per_token'] / peer['bytes_per_token']:>18.3f}"
                     f" {(r['longest'] or 0) / max(peer['longest'] or 1, 1):>14.2f}")
        print(line)


def run_docs(doc_lengths: list[int], lengths: list[int], steps: int) -> dict:
    """Tokens/s of full+loss+mlp with data.doc_mask against without, on windows of documents of each length
    (the median of `steps` steps after a warm-up step, each in a fresh process)."""
    rows = []
    for doc_tokens in doc_lengths:
        for seq_len in lengths:
            for arm in ("full+loss+mlp", "full+loss+mlp" + DOCS):
                r = run_child(arm, seq_len, steps, doc_tokens)
                rows.append({**r, "doc_tokens": doc_tokens, "tokens_per_s": seq_len / r["step_s"]})
                print(f"  {arm:20} {seq_len:>7,} tokens, documents of {doc_tokens:,}: "
                      f"{rows[-1]['tokens_per_s']:8.0f} tokens/s", flush=True)
    return {"rows": rows, "steps": steps}


def print_docs(result: dict) -> None:
    print(f"\nCPU, fp32, batch 1, d 256 x 4 layers, full+loss+mlp; median of {result['steps']} steps")
    print(f"{'window':>8} {'documents':>10} {'tokens/s':>10} {'with doc_mask':>14} {'ratio':>7}")
    rows = result["rows"]
    for plain, masked in zip(rows[0::2], rows[1::2]):
        print(f"{plain['seq_len']:>8,} {plain['doc_tokens']:>10,} {plain['tokens_per_s']:>10,.0f} "
              f"{masked['tokens_per_s']:>14,.0f} {masked['tokens_per_s'] / plain['tokens_per_s']:>7.2f}")


def run_sp(sps: list[int], lengths: list[int], data: str) -> dict:
    """Sequence parallelism on this CPU: `ctxtrain train` itself (local launcher, sp workers, ZeRO-1, two
    steps) per degree and length; rank 0's peak RSS growth per worker. No lever, so that activations dominate
    at lengths a CPU runs quickly (with the levers a worker's activations at 16k tokens are smaller than the
    constant terms and their run-to-run noise)."""
    rows = []
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    memory = ARMS["plain"]
    for sp in sps:
        for seq_len in lengths:
            with tempfile.TemporaryDirectory() as run_dir:
                cmd = [sys.executable, "-m", "ctxtrain", "train", str(CONFIG), f"--train.run_dir={run_dir}",
                       f"--data.path={data}", "--cluster.launcher=local", f"--cluster.workers={sp}",
                       f"--parallel.sp={sp}", f"--data.seq_len={seq_len}", "--data.batch_size=1",
                       "--data.num_workers=0", "--train.max_steps=2", "--train.eval_every=0",
                       "--train.eval_batches=1",
                       "--checkpoint.every=0", "--tracking.enabled=false", "--zero.stage=1",
                       "--train.dtype=fp32",
                       *[f"--model.{k}={v}" for k, v in CPU_MODEL.items()],
                       *[f"--memory.{k}={v}" for k, v in memory.items()]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"longseq: sp={sp} at {seq_len} failed:\n{proc.stderr[-3000:]}")
                lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
            growth = max(r["mem_peak_bytes"] for r in lines)
            rows.append({"sp": sp, "seq_len": seq_len, "growth": growth})
            print(f"  sp={sp} {seq_len:>7,} tokens: worker growth {growth / 2**20:8.1f} MiB", flush=True)
    summary = {}
    for sp in sps:
        slope, intercept, worst = fit([(r["seq_len"], r["growth"]) for r in rows if r["sp"] == sp])
        summary[sp] = {"bytes_per_token": slope, "intercept": intercept, "worst_residual": worst}
    return {"rows": rows, "summary": summary, "lengths": lengths}


def print_sp(result: dict) -> None:
    s = result["summary"]
    base = s[min(s)]["bytes_per_token"]
    print(f"\nSequence parallelism on CPU, one worker's peak RSS growth; lengths {result['lengths']}")
    print(f"{'sp':>3} {'bytes/token/worker':>19} {'intercept':>12} {'vs sp=' + str(min(s)):>9}")
    for sp, r in s.items():
        print(f"{sp:>3} {r['bytes_per_token']:>19,.0f} {r['intercept'] / 2**20:>9,.0f} MiB "
              f"{r['bytes_per_token'] / base:>9.2f}")


# ---------------------------------------------------------------------------------------------------------
# --gpu

GPU_CONFIG = REPO / "configs" / "lm_1b.yaml"
GPU_ARMS = ("ctxtrain-full", "ctxtrain-offload", "hf", "hf+liger")
# ctxtrain's chunks at every length; the policy is the arm's
GPU_MEMORY = {"loss_chunk": 8192, "mlp_chunk": 8192}


def gpu_model(dry_run: bool) -> dict:
    """lm_1b's model section; the dry run keeps its shapes (width, heads, MLP, vocabulary) on one layer."""
    from ctxtrain.config import load_config

    m = load_config(GPU_CONFIG).model
    model = {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "rope_theta")}
    return {**model, "n_layers": 1} if dry_run else model


def gpu_config(model: dict, seq_len: int, policy: str, device: str):
    """lm_1b as ctxtrain trains it on one GPU: bf16, ZeRO-0 (DeepSpeed runs bf16 as ZeRO-1), the chunks, the
    arm's checkpoint policy."""
    from ctxtrain.config import load_config

    overrides = [f"--model.{k}={v}" for k, v in model.items()]
    overrides += [f"--memory.{k}={v}" for k, v in {**GPU_MEMORY, "checkpoint": policy}.items()]
    return load_config(GPU_CONFIG, overrides + [f"--data.seq_len={seq_len}", "--data.batch_size=1",
                                                "--zero.stage=0", "--train.dtype=bf16", "--cluster.workers=1",
                                                f"--train.device={device}", "--tracking.enabled=false"])


class Device:
    """What a GPU arm asks of its device, answered on a GPU by CUDA and on a CPU (the dry run) by the
    process: synchronize, peak memory since the last reset, capacity, the dense bf16 peak for MFU."""

    def __init__(self, kind: str):
        import torch

        self.torch, self.kind = torch, kind
        self.device = torch.device(kind)

    def sync(self) -> None:
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int:
        from ctxtrain.metrics import peak_rss_bytes

        return self.torch.cuda.max_memory_allocated() if self.kind == "cuda" else peak_rss_bytes()

    def capacity(self) -> int:
        from ctxtrain.plan import available_here

        kind, device_bytes, _ = available_here(1, want_gpu=self.kind == "cuda")
        return int(device_bytes)

    def peak_flops(self, configured_tflops) -> float:
        """The card's dense bf16 peak from its name (or train.peak_tflops); the dry run's CPU has none, so MFU
        there is against a nominal 1 TFLOP/s (it only exercises the arithmetic)."""
        from ctxtrain.metrics import peak_flops

        return peak_flops(self.device, configured_tflops) or 1e12

    def out_of_memory(self) -> type:
        return self.torch.OutOfMemoryError


def run_gpu(budget_min: float, lengths: list[int], dry_run: bool = False) -> dict:
    """The four arms, one process each with a timeout (a hung arm costs its share of the budget, not the
    run), ascending lengths until out of memory or out of time. Writes $OUT/longseq_gpu.json after each."""
    out_dir = Path(os.environ.get("OUT", tempfile.gettempdir()))
    results: dict = {}
    t_end = time.time() + 60 * budget_min
    for n, arm in enumerate(GPU_ARMS):
        left = (t_end - time.time()) / 60
        if left < 0.5:
            results[arm] = {"skipped": "budget"}
            continue
        share = left / (len(GPU_ARMS) - n)  # what is left, split over the arms still to run
        cmd = [sys.executable, __file__, "--gpu-arm", arm, "--budget-min", f"{share:.2f}",
               "--lengths", ",".join(map(str, lengths)), *(["--dry-run"] if dry_run else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 * share + 60,
                                  env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            results[arm] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            results[arm] = {"error": f"timeout after {60 * share + 60:.0f} s"}
        (out_dir / "longseq_gpu.json").write_text(json.dumps(results, indent=1))
    return results


def gpu_arm(arm: str, budget_min: float, lengths: list[int], dry_run: bool) -> None:
    """One arm (a process): ctxtrain with `full` checkpointing up to the planner's longest `full` length,
    ctxtrain with `offload` at the lengths past it up to the planner's longest `offload` length (its own
    engine), transformers' Llama, or that Llama with Liger's kernels. Prints one JSON line."""
    dev = Device("cpu" if dry_run else "cuda")
    torch = dev.torch
    from ctxtrain.model import ModelConfig
    from ctxtrain.model.flops import lm_train_flops_per_token
    from ctxtrain.plan import host_memory_bytes, longest_seq_len, plan

    model = gpu_model(dry_run)
    mcfg = ModelConfig(**model)
    capacity = dev.capacity()
    planned, steps_lengths = {}, list(lengths)
    if arm.startswith("ctxtrain"):
        policy = arm.split("-")[1]
        for p in ("full", "offload"):
            cfg = gpu_config(model, max(lengths), p, dev.kind)
            planned[p] = longest_seq_len(cfg, 1, "cuda", capacity, host_memory_bytes(), p,
                                         multiple=min(8192, min(lengths)))
        longest = planned[policy]
        low = 0 if policy == "full" else planned["full"]
        steps_lengths = sorted({T for T in lengths if low < T <= longest} | ({longest} if longest > low
                                                                             else set()))
        if dry_run:
            steps_lengths = lengths  # the dry run's lengths are tiny: every one, under both policies
        cfg = gpu_config(model, max(steps_lengths or lengths), policy, dev.kind)
        peak = dev.peak_flops(cfg.train.peak_tflops)
        step, _ = ctxtrain_stepper(cfg)
    else:
        peak = dev.peak_flops(None)
        if arm == "hf+liger":
            try:
                import liger_kernel  # noqa: F401
            except ImportError as e:
                print(json.dumps({"arm": arm, "missing": f"liger-kernel is not installed ({e}); "
                                                         "pip install liger-kernel"}), flush=True)
                return
        step = hf_stepper(model, torch.bfloat16, dev.kind, liger=arm == "hf+liger")
    rows, t_end = [], time.time() + 60 * budget_min
    s_per_token_sq = None  # step time per token^2 at the last length, to skip what would not finish in time
    for T in steps_lengths:
        if s_per_token_sq and s_per_token_sq * T * T * 2 > t_end - time.time():
            rows.append({"T": T, "skipped": "budget"})
            continue
        tokens = torch.randint(0, model["vocab_size"], (1, T + 1), device=dev.device)
        dev.reset_peak()
        try:
            t0 = time.perf_counter()
            step(tokens)
            dev.sync()
            first = time.perf_counter() - t0
            timed = T <= 131072 and time.time() + 2 * first < t_end
            if timed:  # a second step: the first one's compile and allocator warm-up left out
                t0 = time.perf_counter()
                step(tokens)
                dev.sync()
            s = time.perf_counter() - t0 if timed else first
            row = {"T": T, "s_per_step": s, "tok_s": T / s,
                   "mfu": lm_train_flops_per_token(mcfg, T) * T / s / peak,
                   "peak_GiB": dev.peak_bytes() / 2**30, "timed": timed}
            if arm.startswith("ctxtrain"):
                row["predicted_GiB"] = plan(gpu_config(model, T, policy, dev.kind), 1,
                                            "cuda").device_peak / 2**30
            rows.append(row)
            s_per_token_sq = s / (T * T)
        except dev.out_of_memory():
            rows.append({"T": T, "oom": True})
            break
        finally:
            del tokens
            if dev.kind == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"arm": arm, "model": model, "rows": rows, "planned_longest": planned,
                      "peak_tflops": peak / 1e12}), flush=True)


def print_gpu(results: dict) -> None:
    print(f"\n{'arm':18} {'tokens':>9} {'s/step':>8} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} "
          f"{'plan GiB':>9}")
    for arm, r in results.items():
        if "rows" not in r:
            print(f"{arm:18} {r.get('missing') or r.get('error') or r.get('skipped')}")
            continue
        for row in r["rows"]:
            if "s_per_step" not in row:
                print(f"{arm:18} {row['T']:>9,} {'out of memory' if row.get('oom') else row.get('skipped')}")
                continue
            plan_gib = f"{row['predicted_GiB']:9.1f}" if "predicted_GiB" in row else f"{'-':>9}"
            print(f"{arm:18} {row['T']:>9,} {row['s_per_step']:8.2f} {row['tok_s']:>10,.0f} "
                  f"{row['mfu']:6.3f} {row['peak_GiB']:9.1f} {plan_gib}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="peak memory per token on this CPU (the README's "
                                                         "table)")
    mode.add_argument("--gpu", action="store_true", help="tokens/s, MFU and peak memory on one GPU")
    mode.add_argument("--child", nargs=2, metavar=("ARM", "SEQ_LEN"), help=argparse.SUPPRESS)
    mode.add_argument("--gpu-arm", metavar="ARM", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="with --gpu: every GPU arm on this CPU at tiny "
                                                          "lengths, lm_1b's shapes on one layer (the test "
                                                          "suite's check)")
    p.add_argument("--lengths", help="comma-separated sequence lengths")
    p.add_argument("--arms", help=f"comma-separated arms (--cpu): {', '.join([*ARMS, PEER])}")
    p.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the longest length "
                                                                 "(--cpu)")
    p.add_argument("--budget-min", type=float, default=11.0, help="time budget of the whole run (--gpu)")
    p.add_argument("--sp", help="with --cpu: sequence-parallel degrees to compare instead (e.g. 1,2,4)")
    p.add_argument("--docs", help="with --cpu: tokens/s with data.doc_mask against without instead, on "
                                  "documents of these lengths (e.g. 300,3000)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per measurement (their median)")
    p.add_argument("--data", default=str(REPO / "data" / "stdlib"), help="shards for --sp (ctxtrain prepare)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps)
        return 0
    if args.gpu_arm:
        gpu_arm(args.gpu_arm, args.budget_min, [int(x) for x in args.lengths.split(",")], args.dry_run)
        return 0
    if args.gpu:
        default = "64,128" if args.dry_run else "8192,32768,131072,262144,393216,524288"
        result = run_gpu(args.budget_min, [int(x) for x in (args.lengths or default).split(",")],
                         args.dry_run)
        print_gpu(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    if args.sp:
        result = run_sp([int(x) for x in args.sp.split(",")],
                        [int(x) for x in (args.lengths or "2048,4096,8192").split(",")], args.data)
        print_sp(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    if args.docs:
        result = run_docs([int(x) for x in args.docs.split(",")],
                          [int(x) for x in (args.lengths or "2048,8192").split(",")], max(args.steps, 3))
        print_docs(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    lengths = [int(x) for x in (args.lengths or "8192,16384,24576").split(",")]
    arms = (args.arms or ",".join([*ARMS, PEER])).split(",")
    unknown = [a for a in arms if a not in ARMS and a != PEER]
    if unknown or len(lengths) < 2:
        p.error(f"unknown arm {unknown[0]}" if unknown else "--lengths needs two or more lengths for a slope")
    result = run_cpu(arms, lengths, args.budget_gib)
    print_cpu(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
