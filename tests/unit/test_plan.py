"""The memory planner: its activation formulas count exactly what autograd keeps for our blocks; its static
terms follow ZeRO's partitioning; its longest length is the boundary of what fits; `ctxtrain plan` prints the
table and `ctxtrain train` refuses what does not fit. (Its predictions against measured peaks:
tests/integration.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ctxtrain.config import load_config
from ctxtrain.model import ModelConfig, param_count
from ctxtrain.model.transformer import Block, DecoderBlock, Rotary
from ctxtrain.plan import (
    GIB,
    block_kept,
    cross_kv_kept,
    lever_that_fits,
    longest_seq_len,
    math_attention_scores,
    plan,
    shape_of,
)
from tests.conftest import CONFIGS, REPO

VARIANTS = {
    "llama": dict(),
    "llama-gqa": dict(n_kv_heads=2),
    "seed": dict(norm="layernorm", mlp="gelu", pos="sinusoidal", bias=True),
    "seed-dropout": dict(norm="layernorm", mlp="gelu", pos="sinusoidal", bias=True, dropout=0.1),
}


def saved_bytes(run, exclude) -> int:
    """Bytes of the distinct storages that autograd saves while `run()` builds its graph, less `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def shape_for(model: ModelConfig, dtype, T: int, S: int = 0):
    cfg = load_config(None, [f"--train.dtype={'bf16' if dtype == torch.bfloat16 else 'fp32'}",
                             "--data.batch_size=1"])
    cfg.model = model
    sh = shape_of(cfg, world=1, device="cpu", seq_len=T)
    return sh.__class__(**{**sh.__dict__, "src_len": S})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_formula_counts_exactly_what_autograd_keeps(variant, dtype):
    if variant == "seed-dropout" and dtype == torch.bfloat16:
        pytest.skip("the math kernel's bf16 upcasts of q, k, v under dropout are not modelled (CPU only)")
    T = 48
    model = ModelConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=48, **VARIANTS[variant])
    torch.manual_seed(0)
    block = Block(model, causal=True).to(dtype).train()
    x = torch.randn(1, T, 32, dtype=dtype, requires_grad=True)
    rope = Rotary(model)(T, x.device, dtype) if model.pos == "rope" else None
    shared = [*block.parameters(), *(rope or ())]
    measured = saved_bytes(lambda: block(x, rope, None), shared)
    sh = shape_for(model, dtype, T)
    predicted = block_kept(sh) * T + math_attention_scores(sh, decoder=False)
    if model.dropout:  # dropout's masks on CPU are counted approximately (plan.residual_dropout_kept)
        assert predicted == pytest.approx(measured, rel=0.05)
    else:
        assert measured == predicted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_document_mask_keeps_what_the_formula_counts(dtype):
    """data.doc_mask on a CPU: one SDPA call per document into one output, recomputed per document in the
    backward pass: what plain attention keeps but its log-sum-exp (and no [T, T] mask anywhere)."""
    T = 48
    model = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48)
    torch.manual_seed(0)
    block = Block(model, causal=True).to(dtype).train()
    x = torch.randn(1, T, 32, dtype=dtype, requires_grad=True)
    rope = Rotary(model)(T, x.device, dtype)
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 20, 1, 22]))[None]
    measured = saved_bytes(lambda: block(x, rope, None, None, docs), [*block.parameters(), *rope])
    sh = shape_for(model, dtype, T)
    masked = sh.__class__(**{**sh.__dict__, "doc_mask": True})
    assert measured == block_kept(masked) * T
    assert block_kept(sh) - block_kept(masked) == 4 * model.n_heads


def test_document_mask_on_a_gpu_counts_flexattentions_block_mask():
    masked = plan(lm("--data.doc_mask=true", "--data.seq_len=131072"), 8, "cuda")
    plain = plan(lm("--data.seq_len=131072"), 8, "cuda")
    term = next(t for t in masked.terms if t.name == "document block mask")
    assert term.device == 4 * (4 * 1024 ** 2 + 4 * 1024)  # ~16 MiB at 128k tokens, no [T, T] anywhere
    assert masked.device_peak - plain.device_peak == pytest.approx(term.device * (1 + masked.margin),
                                                                   rel=1e-6)
    assert next(t for t in plan(lm("--data.doc_mask=true"), 8, "cpu").terms
                if t.name == "document block mask").device == 0


def test_sequence_parallel_past_the_key_value_heads_counts_the_replicas():
    cfg = lm("--model.n_kv_heads=2", "--parallel.sp=8", "--cluster.workers=8")
    sh = shape_of(cfg, world=8, device="cuda")
    assert sh.kv_width == 8 * cfg.model.head_dim  # 8 replicas: one key/value head a rank
    assert shape_of(lm("--model.n_kv_heads=2"), world=8, device="cuda").kv_width == 2 * cfg.model.head_dim
    # 2 heads replicated over 8 ranks keep what 8 heads keep
    eight = shape_of(lm("--model.n_kv_heads=8", "--parallel.sp=8", "--cluster.workers=8"), 8, "cuda")
    assert block_kept(sh) == block_kept(eight) > block_kept(shape_of(lm("--model.n_kv_heads=2",
                                                                         "--cluster.workers=8"), 8, "cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoder_block_formula_counts_exactly_what_autograd_keeps(dtype):
    T, S = 40, 56
    model = ModelConfig(kind="encdec", vocab_size=50, d_model=32, n_heads=4, d_ff=64, mlp="gelu",
                        norm="layernorm",
                        pos="sinusoidal", bias=True)
    torch.manual_seed(0)
    block = DecoderBlock(model).to(dtype).train()
    x = torch.randn(1, T, 32, dtype=dtype, requires_grad=True)
    memory = torch.randn(1, S, 32, dtype=dtype, requires_grad=True)
    measured = saved_bytes(lambda: block(x, None, None, memory, None), [*block.parameters(), memory])
    sh = shape_for(model, dtype, T, S)
    assert measured == block_kept(sh, decoder=True) * T + cross_kv_kept(sh) * S


def lm(*overrides):
    return load_config(CONFIGS / "lm_1b.yaml", list(overrides))


def test_static_terms_follow_zero_partitioning():
    terms = {stage: {t.name: t for t in plan(lm(f"--zero.stage={stage}"), 8, "cuda").terms}
             for stage in (0, 1, 2, 3)}
    P = param_count(lm().model)
    assert terms[0] == terms[1]  # bf16 without ZeRO runs DeepSpeed's ZeRO-1
    fp32 = {t.name: t for t in plan(lm("--zero.stage=0", "--train.dtype=fp32"), 8, "cuda").terms}
    assert fp32["parameters"].device == 4 * P and fp32["optimizer state"].device == 8 * P
    assert terms[1]["optimizer state"].device == 12 * P // 8 and terms[1]["gradients"].device == 2 * P
    assert terms[2]["gradients"].device == 2 * P // 8
    # ZeRO-3: a 1/8 share, plus the gathered embedding (its largest module) and one prefetched
    cfg = lm().model
    assert terms[3]["parameters"].device == -(-P // 8) * 2 + 2 * cfg.vocab_size * cfg.d_model * 2
    offloaded = {t.name: t for t in plan(lm("--zero.offload_optimizer=true"), 8, "cuda").terms}
    offloaded = offloaded["optimizer state"]
    assert offloaded.device == 0 and offloaded.host == 12 * P // 8


def test_each_lever_lowers_the_predicted_peak_at_long_length():
    peaks = [plan(lm("--data.seq_len=65536", *extra), 1, "cuda").device_peak for extra in (
        ["--memory.checkpoint=none", "--memory.loss_chunk=0"],
        ["--memory.checkpoint=none", "--memory.loss_chunk=4096"],
        ["--memory.checkpoint=selective", "--memory.loss_chunk=4096"],
        ["--memory.checkpoint=full", "--memory.loss_chunk=4096"],
        ["--memory.checkpoint=full", "--memory.loss_chunk=4096", "--memory.mlp_chunk=4096"],
        ["--memory.checkpoint=offload", "--memory.loss_chunk=4096", "--memory.mlp_chunk=4096"])]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), [p / GIB for p in peaks]


def test_sequence_parallel_divides_activations_and_adds_the_all_to_all():
    one, two = (plan(lm("--data.seq_len=262144", "--memory.checkpoint=full", "--memory.loss_chunk=4096",
                        f"--parallel.sp={sp}"), 8, "cuda") for sp in (1, 2))
    t1, t2 = ({t.name: t for t in p.terms} for p in (one, two))
    assert t2["checkpointed activations"].device == pytest.approx(t1["checkpointed activations"].device / 2,
                                                                  rel=0.01)
    assert t2["peak layer working set"].device == pytest.approx(t1["peak layer working set"].device / 2,
                                                                rel=0.01)
    assert t1["all-to-all buffers"].device == 0 and t2["all-to-all buffers"].device > 0
    assert t2["optimizer state"].device == t1["optimizer state"].device  # ZeRO still partitions over all 8
    assert two.device_peak < one.device_peak


def test_longest_length_is_the_boundary_of_what_fits():
    cfg = lm("--memory.checkpoint=full", "--memory.loss_chunk=4096")
    budget = 80 * GIB
    longest = longest_seq_len(cfg, 1, "cuda", budget, None, "full")
    assert plan(cfg, 1, "cuda", longest).fits(budget, None)
    assert not plan(cfg, 1, "cuda", longest + 1).fits(budget, None)


def test_the_lever_offered_makes_it_fit():
    cfg = lm("--data.seq_len=131072", "--memory.checkpoint=none", "--memory.loss_chunk=0")
    assert not plan(cfg, 1, "cuda").fits(80 * GIB, None)
    flags, fitted = lever_that_fits(cfg, 1, "cuda", 80 * GIB, None)
    assert "--memory.loss_chunk=4096" in flags and fitted.fits(80 * GIB, None)


def ctxtrain(*args):
    return subprocess.run([sys.executable, "-m", "ctxtrain", *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PATH": "/usr/bin:/bin"})


def test_plan_verb_prints_the_table_and_says_whether_it_fits():
    r = ctxtrain("plan", str(CONFIGS / "lm_1b.yaml"), "--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr
    rows = ("parameters", "gradients", "optimizer state", "checkpointed activations", "peak layer working "
                                                                                      "set",
            "loss buffer", "attention workspace", "CUDA context", "NCCL buffers", "allocator margin (5%)",
            "predicted peak", "verdict: fits")
    for row in rows:
        assert row in r.stdout, row
    assert r.stdout.count("memory.checkpoint=") >= 5  # the header and one longest length per policy
    r = ctxtrain("plan", str(CONFIGS / "lm_1b.yaml"), "--gpus", "1", "--gpu-mem", "80",
                 "--data.seq_len=1048576")
    assert r.returncode == 1 and "does NOT fit" in r.stdout and "lever:" in r.stdout
    r = ctxtrain("plan", str(CONFIGS / "lm_1b.yaml"), "--gpus", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--gpus" in r.stderr


def test_train_refuses_a_config_predicted_not_to_fit(tmp_path, one_shard_lm):
    r = ctxtrain("train", str(CONFIGS / "lm_tiny.yaml"), f"--train.run_dir={tmp_path / 'run'}",
                 f"--data.path={one_shard_lm}", "--model.vocab_size=2048", "--data.seq_len=4000000",
                 "--cluster.launcher=local")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "predicted not to fit" in lines[0] and "--memory.force=true" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_gpu_terms_the_cuda_context_nccl_buffers_and_flash_attentions_dq_accumulator():
    from ctxtrain.plan import (
        CUDA_CONTEXT_BYTES,
        NCCL_BUFFSIZE,
        NCCL_CHANNELS,
        attention_dq_accumulator,
        communicators,
        nccl_buffers,
    )

    cfg = lm("--data.seq_len=32768")
    gpu, cpu = shape_of(cfg, 8, "cuda"), shape_of(cfg, 8, "cpu")
    assert attention_dq_accumulator(gpu, 32768) == 4 * cfg.model.d_model * 32768  # fp32 dq, per token
    assert attention_dq_accumulator(cpu, 32768) == 0
    one_comm = 2 * 2 * NCCL_CHANNELS * NCCL_BUFFSIZE
    assert nccl_buffers(gpu) == one_comm and nccl_buffers(cpu) == 0
    assert communicators(shape_of(cfg, 1, "cuda")) == 0
    assert communicators(shape_of(lm("--parallel.sp=2"), 8, "cuda")) == 3  # all, sp group, data-parallel
    assert communicators(shape_of(lm("--parallel.sp=8"), 8, "cuda")) == 2
    terms = {t.name: t.device for t in plan(cfg, 8, "cuda").terms}
    assert terms["CUDA context"] == CUDA_CONTEXT_BYTES and terms["NCCL buffers"] == one_comm
    assert {t.name: t.device for t in plan(cfg, 8, "cpu").terms}["CUDA context"] == 0
    # the dq accumulator is part of the peak layer's working set on a GPU (attention's gradients dominate
    # there once the MLP is chunked)
    chunked = lm("--data.seq_len=32768", "--memory.mlp_chunk=1024")
    on_gpu = {t.name: t.device for t in plan(chunked, 8, "cuda").terms}["peak layer working set"]
    on_cpu = {t.name: t.device for t in plan(chunked, 8, "cpu").terms}["peak layer working set"]
    assert on_gpu - on_cpu == 4 * cfg.model.d_model * 32768


def test_plan_says_which_usable_memory_it_assumed():
    r = ctxtrain("plan", str(CONFIGS / "lm_1b.yaml"), "--gpus", "1", "--gpu-mem", "141")
    assert r.returncode == 0, r.stderr
    assert "nameplate of an H200; assumed its usable 140.4 GiB" in r.stdout
    assert "140.40 GiB" in r.stdout.split("available", 2)[-1]
    r = ctxtrain("plan", str(CONFIGS / "lm_1b.yaml"), "--gpus", "1", "--gpu-mem", "70")
    assert "--gpu-mem 70 GiB taken as one GPU's usable memory" in r.stdout


def test_offload_pins_exactly_the_planners_host_term():
    """memory.checkpoint=offload pins one block of host memory per step of exactly the planner's host term
    (torch's pinned caching allocator would round every block input up to a power of two: 1.6x here), and
    every block input of a micro-batch fits in it, the next step reusing it from the start. (A CPU cannot pin:
    the arena is allocated unpinned, the arithmetic is the same.)"""
    from ctxtrain.engine.memory import PinnedArena
    from ctxtrain.plan import offload_host_bytes

    cfg = lm("--data.seq_len=5000", "--memory.checkpoint=offload")
    m = cfg.model
    capacity = offload_host_bytes(cfg, 1)
    term = {t.name: t for t in plan(cfg, 1, "cuda").terms}["checkpointed activations"].host
    assert capacity == term == m.n_layers * cfg.data.seq_len * m.d_model * 2
    arena = PinnedArena(capacity, pin=False)
    assert arena.buffer.numel() == capacity  # exact, not rounded
    rounded = m.n_layers * 2 ** (cfg.data.seq_len * m.d_model * 2 - 1).bit_length()
    assert rounded / capacity > 1.5
    for _ in range(2):  # two steps
        arena.reset()
        for _ in range(m.n_layers):
            assert arena.take(torch.Size((1, cfg.data.seq_len, m.d_model)), torch.bfloat16) is not None
        assert arena.offset >= 0.95 * capacity
    assert arena.take(torch.Size((1, 1024, m.d_model)), torch.bfloat16) is None  # a 17th input does not fit
