"""The long-sequence benchmark runs (a smoke run at small lengths; the README has the full one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_longseq_cpu_smoke(tmp_path):
    out = tmp_path / "longseq.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "longseq.py"), "--cpu", "--lengths",
                           "256,512",
                           "--arms", "full+loss+mlp,hf", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["arm"] for r in result["rows"]} == {"full+loss+mlp", "hf"} and len(result["rows"]) == 4
    for arm, summary in result["summary"].items():
        assert summary["bytes_per_token"] > 0 and summary["longest"] > 0, (arm, summary)
    table = proc.stdout.splitlines()
    assert any(line.startswith("full+loss+mlp") for line in table) and "bytes/token vs hf" in proc.stdout


def test_keeping_documents_apart_costs_under_a_tenth_of_the_memory_slope(tmp_path):
    """data.doc_mask with the levers on (bench/longseq.py --cpu, documents of 300 tokens): bytes per token
    within 10% of the same levers without the mask; no [T, T] mask, no per-document copy of the window."""
    out = tmp_path / "docs.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "longseq.py"), "--cpu", "--lengths",
                           "6144,12288,18432", "--arms", "full+loss+mlp,full+loss+mlp+docs", "--json",
                           str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    plain, masked = (summary[arm]["bytes_per_token"] for arm in ("full+loss+mlp", "full+loss+mlp+docs"))
    assert abs(masked - plain) <= 0.10 * plain, (masked, plain)


def test_longseq_gpu_dry_run_exercises_every_gpu_arm(tmp_path):
    """`bench/longseq.py --gpu --dry-run`: the GPU bench's arms on this CPU at tiny lengths with lm_1b's
    shapes (one layer): ctxtrain under `full` and, with an engine of its own, `offload`, transformers' Llama,
    and the Liger arm (measured, or missing with its reason); each arm a subprocess under a timeout."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "longseq.py"), "--gpu", "--dry-run", "--json",
                           str(out)], capture_output=True, text=True, timeout=900, env={**os.environ,
                                                                                        "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result) == ["ctxtrain-full", "ctxtrain-offload", "hf", "hf+liger"], result
    for arm in ("ctxtrain-full", "ctxtrain-offload", "hf"):
        r = result[arm]
        assert r["model"]["d_model"] == 2048 and r["model"]["vocab_size"] == 32000, r
        assert [row["T"] for row in r["rows"]] == [64, 128] and all(row["tok_s"] > 0 for row in r["rows"]), r
        assert all("predicted_GiB" in row for row in r["rows"]) == arm.startswith("ctxtrain"), r
    planned = result["ctxtrain-offload"]["planned_longest"]
    assert planned["full"] > 0 and planned["offload"] > 0, planned  # (on one layer offload saves nothing)
    liger = result["hf+liger"]
    assert liger.get("rows") or "liger-kernel is not installed" in liger.get("missing", ""), liger
    assert "ctxtrain-offload" in proc.stdout and "tokens/s" in proc.stdout


def test_pretrained_load_bench_compares_both_loaders(tmp_path):
    """`bench/pretrained_load.py` on the test suite's folder shape: both arms load it and the ratios print."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pretrained_load.py"), "--shapes", "test",
                           "--runs", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())["test"]["summary"]
    assert all(summary[arm]["seconds"] > 0 and summary[arm]["peak_growth"] > 0 for arm in summary)
    assert "ratio ctxtrain / transformers" in proc.stdout


def test_context_extension_bench_runs_every_scheme_before_and_after(tmp_path):
    """`bench/context_extension.py` at toy size (a few stdlib files, a few steps, 96 -> 192 tokens): both
    stage-1 models, the three stage-2 continuations, every probe before and after, the tables and the two
    pictures."""
    out = tmp_path / "ext"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "context_extension.py"), "--files", "40",
                           "--steps", "6,3", "--short", "96", "--factor", "2", "--samples", "1", "--out",
                           str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    for scheme in ("rope", "rope+yarn", "sinusoidal"):
        for when in ("before", "after"):
            r = result[scheme][when]
            assert r["passkey"]["lengths"] == [96, 192] and set(r["loss_by_position"]) == {"96", "192"}
    assert (out / "loss_by_position.png").stat().st_size > 10_000 and (out / "passkey.png").is_file()
    assert "rope+yarn    after" in proc.stdout
    # the training filler is held out from the probes': none of the classic sentences' words
    from ctxtrain.probes import FILLER, INTRO, NEEDLE, QUESTION

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower()))

    classic = words(FILLER) - words(INTRO + NEEDLE + QUESTION)  # grass, green, sky, ... go, back, again
    passkey_docs = [json.loads(line)["text"] for line in (out / "corpus-short.jsonl").open()
                    if line.startswith('{"text": "' + INTRO[:20])]
    assert len(passkey_docs) > 100
    assert all(not classic & words(d) for d in passkey_docs)


def test_data_scale_bench_reads_each_shard_about_once_and_resumes_on_other_rank_counts(many_shards):
    """`bench/data_scale.py` (ctxtrain's arm: Mosaic Streaming is installed for the bench alone) on ~40 small
    shards through moto's S3 server: the table prints, 2 ranks fetch the data about once (twice in the layout
    before partitions), and a resume from 2 ranks on 4 and on 1 gives every global batch of the uninterrupted
    run."""
    bench = str(REPO / "bench" / "data_scale.py")
    proc = subprocess.run([sys.executable, bench, "--data", str(many_shards),
                           "--systems", "ctxtrain", "--ranks", "2", "--seq-len", "128", "--resume-after", "5",
                           "--resume-steps", "5"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[3].strip().rstrip("x"))
            for line in proc.stdout.splitlines() if line.startswith("| ctxtrain")}
    assert rows["ctxtrain"] <= 1.1 and rows["ctxtrain (one partition)"] >= 1.9, proc.stdout
    assert "on 4 / on 1, the same global batches as the uninterrupted 2-rank run: 5/5 / 5/5" in proc.stdout
