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
    rope = Rotary(model.head_dim, 1e4)(T, x.device, dtype) if model.pos == "rope" else None
    shared = [*block.parameters(), *(rope or ())]
    measured = saved_bytes(lambda: block(x, rope, None), shared)
    sh = shape_for(model, dtype, T)
    predicted = block_kept(sh) * T + math_attention_scores(sh, decoder=False)
    if model.dropout:  # dropout's masks on CPU are counted approximately (plan.residual_dropout_kept)
        assert predicted == pytest.approx(measured, rel=0.05)
    else:
        assert measured == predicted


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
    assert terms[0]["parameters"].device == 2 * P and terms[0]["optimizer state"].device == 12 * P
    assert terms[1]["optimizer state"].device == 12 * P // 8 and terms[1]["gradients"].device == 2 * P
    assert terms[2]["gradients"].device == 2 * P // 8
    # ZeRO-3: a 1/8 share, plus the gathered embedding (its largest module) and one prefetched
    cfg = lm().model
    assert terms[3]["parameters"].device == -(-P // 8) * 2 + 2 * cfg.vocab_size * cfg.d_model * 2
    offloaded = {t.name: t for t in plan(lm("--zero.offload_optimizer=true"), 8, "cuda").terms}["optimizer "
                                                                                                "state"]
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
    for row in ("parameters", "gradients", "optimizer state", "checkpointed activations", "peak layer "
                                                                                          "working set",
                "loss buffer", "attention workspace", "allocator margin (5%)", "predicted peak", "verdict: "
                                                                                                 "fits"):
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
