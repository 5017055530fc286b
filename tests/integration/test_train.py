"""The training engine on real DeepSpeed (CPU, gloo), 2 worker processes, real shards: ZeRO stages, exact
resume, the checkpoint commit protocol, export to transformers, and the encoder-decoder learning."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.helpers import env, train

pytestmark = pytest.mark.slow


def test_zero3_run_layout(zero3_run):
    run_dir, m, proc = zero3_run
    assert sorted(m) == list(range(1, 21))
    for step in m:  # the contract's fields, and issue 6's, on every line
        for field in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_worker",
                      "step_time_s", "data_wait_s", "mem_bytes", "mem_rss_bytes", "restarts", "epoch"):
            assert m[step][field] is not None, (step, field)
        assert m[step]["mfu"] is None  # CPU: no honest peak, so null rather than invented
        assert all(k in m[step] for k in ("mem_allocated_bytes", "mem_reserved_bytes", "mem_peak_bytes"))
    assert {s for s in m if "ckpt_save_s" in m[s]} == {5, 10, 15, 20}
    assert m[20]["val_loss"] > 0 and m[20]["val_ppl"] == pytest.approx(math.exp(m[20]["val_loss"]))
    assert m[20]["tokens"] == 20 * 2 * 4 * 128
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    ckpts = run_dir / "checkpoints"
    # retention: the last 2 (15, 20) and every 10th (10); step 5 was deleted
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000010", "step_000015", "step_000020"]
    assert (ckpts / "latest").read_text().strip() == "step_000020"
    newest = ckpts / "step_000020"
    assert (newest / "COMMITTED").is_file()
    optim = sorted(p.name for p in newest.glob("*optim_states.pt"))
    assert optim == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["step"] == 20 and meta["world_size"] == 2
    assert len(meta["loader"]) == 2 and len(meta["rng"]) == 2
    assert meta["loader"][0]["consumed"] == 20 * 2 * 4
    run_id = meta["tracker_run_id"]
    assert run_id and list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert meta["tokens"] == m[20]["tokens"]


@pytest.mark.parametrize("extra", [
    pytest.param(("--zero.stage=1", "--memory.checkpoint=full"), id="z1-ckpt-full", marks=pytest.mark.heavy),
    pytest.param(("--zero.stage=2", "--zero.offload_optimizer=true"), id="z2-offload-opt"),
    pytest.param(("--zero.stage=3", "--zero.offload_optimizer=true", "--zero.offload_params=true"),
                 id="z3-offload-all", marks=pytest.mark.heavy),
])
def test_zero_stages_agree_and_learn(zero3_run, stdlib_shards, tmp_path, extra):
    """Stages 1 and 2 (with activation checkpointing, optimizer offload) and 3 with parameter offload give
    ZeRO-3's first loss and learn (the schedule of a 20-step run, so the steps match the reference too).
    CI runs the offloaded optimizer; activation checkpointing has its own tests (test_memory)."""
    _, m3, _ = zero3_run
    _, m = train(tmp_path / "run", stdlib_shards, "--train.max_steps=20", "--train.stop_at_step=6", *extra)
    assert m[6]["loss"] < m[1]["loss"] - 0.1, [m[s]["loss"] for s in sorted(m)]
    assert abs(m[1]["loss"] - m3[1]["loss"]) < 1e-6, (m[1]["loss"], m3[1]["loss"])
    for step in range(2, 7):  # same maths, reductions in another order
        assert abs(m[step]["loss"] - m3[step]["loss"]) < 1e-4, step
    assert m3[20]["loss"] < m3[1]["loss"] - 1.0


def test_bf16_trains_and_nothing_in_deepspeed_waits_on_the_device_per_step(stdlib_shards, tmp_path):
    """bf16 without ZeRO and with two micro-batches a step learns; its generated DeepSpeed config and the
    engine DeepSpeed builds from it have no per-step synchronizing feature: the throughput timer off, bf16's
    overflow check off, DeepSpeed's ZeRO-1 bf16 optimizer on flat partitions with fp32 accumulation instead of
    its unfused stage-0 wrapper."""
    from ctxtrain.config import load_config
    from ctxtrain.local_launch import launch

    run = tmp_path / "bf16"
    _, m = train(run, stdlib_shards, "--train.max_steps=20", "--train.stop_at_step=6", "--zero.stage=0",
                 "--train.dtype=bf16", "--model.n_layers=2", "--data.batch_size=2", "--train.grad_accum=2")
    assert all(math.isfinite(m[s]["loss"]) for s in m) and m[6]["loss"] < m[1]["loss"] - 0.1
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["stage"] == 1 and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    os.environ["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    assert launch(load_config(run / "config.yaml"), entry="tests.integration.probes:engine_settings") == 0
    settings = json.loads((run / "engine_settings.json").read_text())
    assert settings == {"optimizer": "BF16_Optimizer", "check_grad_overflow": False,
                        "throughput_timer": {"enabled": False, "synchronized": False},
                        "grad_accum_dtype": "torch.float32"}, settings


def test_a_diverging_run_ends_in_one_line_naming_its_first_nonfinite_step(stdlib_shards, tmp_path):
    """With DeepSpeed's per-step overflow check off, the loop checks what it reads every log_every steps: an
    absurd learning rate makes the gradient norm infinite, and the run ends in one line naming the first such
    step and the checkpoint to go back to; nothing is committed after it."""
    run = tmp_path / "diverge"
    proc, m = train(run, stdlib_shards, "--train.max_steps=20", "--optim.lr=1e30", "--optim.grad_clip=0",
                    "--optim.warmup_steps=0", "--checkpoint.every=1", "--train.log_every=4",
                    "--cluster.workers=1",
                    check=False)
    first = min(s for s, r in m.items() if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ctxtrain: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"ctxtrain: error: step {first}: ") and "training diverged" in errors[0]
    assert f"resume from the newest committed checkpoint, step_{first - 1:06d}" in errors[0], errors[0]
    assert not (run / "checkpoints" / f"step_{first:06d}").exists()


def test_gradient_accumulation_matches_a_larger_batch(zero3_run, stdlib_shards, tmp_path):
    """2 micro-batches of 2 per rank take the same 8 windows per step as one batch of 4: the same losses."""
    _, m3, _ = zero3_run
    _, m = train(tmp_path / "accum", stdlib_shards, "--train.max_steps=20", "--train.stop_at_step=4",
                 "--zero.stage=3", "--data.batch_size=2", "--train.grad_accum=2")
    for step in range(1, 5):
        assert abs(m[step]["loss"] - m3[step]["loss"]) < 1e-5, (step, m[step]["loss"], m3[step]["loss"])
    assert m[4]["tokens"] == m3[4]["tokens"]


def test_stop_and_resume_continue_exactly(zero3_run, stdlib_shards, tmp_path):
    _, whole, _ = zero3_run
    run_dir = tmp_path / "stopped"
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5",
                    "--train.stop_at_step=10")
    assert max(m) == 10 and "stopped (stop_at_step) at step 10" in proc.stdout
    assert (run_dir / "checkpoints" / "step_000010" / "COMMITTED").is_file()
    # the schedule still follows max_steps=20: the lr at step 10 is the 20-step run's
    assert m[10]["lr"] == whole[10]["lr"]
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5")
    assert "resumed from step_000010" in proc.stdout
    assert sorted(m) == list(range(1, 21))  # every step once in metrics.jsonl
    for step in range(11, 21):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6, (step, m[step]["loss"],
                                                                    whole[step]["loss"])


def test_uncommitted_checkpoint_is_never_used(zero3_run, stdlib_shards, tmp_path):
    src, whole, _ = zero3_run
    run_dir = tmp_path / "uncommitted"
    shutil.copytree(src, run_dir)
    (run_dir / "checkpoints" / "step_000020" / "COMMITTED").unlink()
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5")
    assert "resumed from step_000015" in proc.stdout
    for step in range(16, 21):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6
    # the interrupted step_000020 was replaced by a committed one
    assert (run_dir / "checkpoints" / "step_000020" / "COMMITTED").is_file()


def test_damaged_checkpoints_are_passed_over(zero3_run, stdlib_shards, tmp_path):
    """Committed checkpoints damaged after their commit — the newest with a truncated model-states file, the
    one before with a corrupt meta.json: export names the damage in one line; train says so in one line each,
    resumes from the newest sound one and reproduces the uninterrupted losses."""
    src, whole, _ = zero3_run
    run_dir = tmp_path / "damaged"
    shutil.copytree(src, run_dir)
    ckpts = run_dir / "checkpoints"
    victim = sorted((ckpts / "step_000020").glob("*model_states.pt"))[-1]
    os.truncate(victim, victim.stat().st_size // 2)
    (ckpts / "step_000015" / "meta.json").write_text('{"step": 15, "tokens": 4')
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "export", str(run_dir), "--out",
                        str(tmp_path / "x")],
                       capture_output=True, text=True, env=env())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "step_000020 is damaged" in r.stderr and "--step 10" in r.stderr, r.stderr
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=5")
    notices = [line for line in proc.stdout.splitlines() if "is damaged" in line]
    assert len(notices) == 2 and "step_000020" in notices[0] and "truncated" in notices[0], notices
    assert "step_000015" in notices[1] and "resuming from step_000010" in notices[1], notices
    assert "resumed from step_000010" in proc.stdout
    for step in range(11, 21):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6, step
    assert (ckpts / "step_000020" / "COMMITTED").is_file()  # the damaged saves were replaced by sound ones


def test_checkpoints_in_an_object_store_uri(zero3_run, stdlib_shards, tmp_path):
    """checkpoint.storage as a URI (file:// here: the same pyarrow path as s3:// or gs://): the commit order
    holds in the store, local staging is dropped after the commit, and a fresh machine resumes from the
    store."""
    _, whole, _ = zero3_run
    store = tmp_path / "bucket"
    uri = f"file://{store}"
    common = ["--train.max_steps=20", "--zero.stage=3", "--checkpoint.every=3", f"--checkpoint.storage={uri}"]
    train(tmp_path / "node_a", stdlib_shards, *common, "--train.stop_at_step=6")
    assert sorted(p.name for p in store.glob("step_*")) == ["step_000003", "step_000006"]  # keep_last=2
    newest = store / "step_000006"
    assert (newest / "COMMITTED").is_file() and (newest / "meta.json").is_file()
    assert len(list(newest.glob("*optim_states.pt"))) == 2
    assert (store / "latest").read_text().strip() == newest.name
    assert not list((tmp_path / "node_a" / "checkpoints").glob("step_*"))  # staging dropped after upload
    # another machine, another (empty) run dir: resumes from the store, losses as if never stopped
    proc, m = train(tmp_path / "node_b", stdlib_shards, *common, "--train.stop_at_step=9")
    assert "resumed from step_000006" in proc.stdout
    for step in (7, 8, 9):
        assert abs(m[step]["loss"] - whole[step]["loss"]) <= 1e-6
    # export and report read the checkpoints where the run stored them (nothing is left in
    # RUN_DIR/checkpoints)
    assert not list((tmp_path / "node_b" / "checkpoints").glob("step_*"))
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "export", str(tmp_path / "node_b"), "--out",
                        str(tmp_path / "export"), "--no-progress"], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "export" / "config.json").read_text())["step"] == 9
    assert not list((tmp_path / "node_b" / "checkpoints").glob("step_*"))  # the staged copy is dropped again
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "report", str(tmp_path / "node_b"), "--out",
                        str(tmp_path / "report.html")], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    assert "step_000009" in page and "step_000006" in page


def test_resume_flag_loads_exactly_the_named_checkpoint_and_no_resume_starts_fresh(zero3_run, stdlib_shards,
                                                                                   tmp_path):
    """--resume PATH of another run loads that checkpoint, although this run has its own of the same step, and
    starts a trajectory of this run's own: a new W&B run whose config names the checkpoint, and metrics.jsonl
    and TensorBoard holding this run's steps only (not its earlier steps 1-10 spliced with the other run's).
    Then --no-resume starts fresh."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ctxtrain.tracking import read_history, read_records

    src, whole, _ = zero3_run
    here = tmp_path / "here"
    tracked = ["--tracking.enabled=true", "--tracking.tensorboard=true"]
    train(here, stdlib_shards, "--train.max_steps=10", "--zero.stage=3", "--checkpoint.every=10",
          "--optim.lr=0.01", *tracked)  # its own step_000010, with other weights
    first_id = json.loads((here / "tracker.json").read_text())["run_id"]
    named = src / "checkpoints" / "step_000010"
    proc, m = train(here, stdlib_shards, "--train.max_steps=20", "--train.stop_at_step=11", "--zero.stage=3",
                    "--checkpoint.every=0", f"--resume={named}", *tracked)
    assert f"resumed from {named}" in proc.stdout
    assert abs(m[11]["loss"] - whole[11]["loss"]) <= 1e-6
    assert sorted(m) == [11]  # one trajectory: from the named checkpoint on

    theirs = json.loads((named / "meta.json").read_text())["tracker_run_id"]
    run_id = json.loads((here / "tracker.json").read_text())["run_id"]
    assert run_id not in (theirs, first_id)  # a new W&B run, neither the other run's nor this dir's first
    assert [step for step, _ in read_history(here, run_id)] == [11]
    meta = json.loads((here / "checkpoints" / "step_000011" / "meta.json").read_text())
    assert meta["tracker_run_id"] == run_id
    config = {}
    for path in (here / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert config.get("resumed_from") == str(named), sorted(config)
    acc = EventAccumulator(str(here / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(11, pytest.approx(m[11]["loss"], rel=1e-6))]

    proc, m = train(here, stdlib_shards, "--train.max_steps=2", "--zero.stage=3", "--no-resume")
    assert "resumed" not in proc.stdout and sorted(m) == [1, 2]
    assert abs(m[1]["loss"] - whole[1]["loss"]) <= 1e-6


def test_export_zero3_loads_in_transformers_with_engine_logits(zero3_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _, _ = zero3_run
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "ctxtrain", "export", str(run_dir), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "hf" / "config.json").is_file()

    # The trained engine's own logits: the last checkpoint restored into a fresh 2-rank ZeRO-3 engine.
    from ctxtrain.config import load_config
    from ctxtrain.local_launch import launch
    from tests.integration.probes import PROBE_TOKENS

    cfg = load_config(run_dir / "config.yaml")
    os.environ["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    assert launch(cfg, entry="tests.integration.probes:engine_logits") == 0
    probe = torch.load(run_dir / "probe_logits.pt")
    assert probe["tag"] == "step_000020"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(PROBE_TOKENS).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)


def test_stop_after_minutes_ends_cleanly(stdlib_shards, tmp_path):
    proc, m = train(tmp_path / "timed", stdlib_shards, "--train.max_steps=100000", "--zero.stage=1",
                    "--train.stop_after_minutes=0.15")
    assert "stopped (stop_after_minutes)" in proc.stdout
    last = max(m)
    assert 1 <= last < 100000
    meta = json.loads((tmp_path / "timed" / "checkpoints" / f"step_{last:06d}" / "meta.json").read_text())
    assert meta["stop_reason"] == "stop_after_minutes"
    # the schedule is still the one laid out over 100000 steps
    from ctxtrain.config import load_config
    from ctxtrain.engine import lr_at

    optim = load_config(tmp_path / "timed" / "config.yaml").optim
    assert m[last]["lr"] == pytest.approx(lr_at(last, optim, 100000), rel=1e-12)
    assert m[last]["lr"] != pytest.approx(lr_at(last, optim, last), rel=1e-6) or last <= optim.warmup_steps


def test_encoder_decoder_learns_translation(en_fr_shards, tmp_path):
    _, m = train(tmp_path / "mt", en_fr_shards, "--train.max_steps=60", "--train.eval_every=15",
                 "--train.eval_batches=4", "--data.batch_size=16", "--model.vocab_size=4096",
                 "--checkpoint.every=0", config="translate_tiny.yaml")
    val = [m[s]["val_loss"] for s in (15, 30, 45, 60)]
    assert val == sorted(val, reverse=True) and val[-1] < val[0] - 0.5, val
    assert all(m[s]["tokens"] > 0 for s in m)


@pytest.mark.gpu
def test_mfu_is_a_number_on_gpu(stdlib_shards, tmp_path):
    _, m = train(tmp_path / "gpu", stdlib_shards, "--train.max_steps=3", "--cluster.workers=1",
                 "--train.dtype=bf16",
                 "--train.device=cuda", "--zero.stage=2")
    assert all(isinstance(m[s]["mfu"], float) and 0 < m[s]["mfu"] < 1 for s in (2, 3))
    assert m[3]["mem_peak_bytes"] > 0 and m[3]["mem_reserved_bytes"] >= m[3]["mem_allocated_bytes"]


def test_metrics_are_read_every_log_every_steps(stdlib_shards, tmp_path):
    """No host sync per step: losses stay on the device and reach metrics.jsonl in one read every log_every
    steps (step 1 alone, then 2-4). A worker killed during step 7 takes the unread steps 5-6 with it."""
    run_dir = tmp_path / "batched"
    proc, m = train(run_dir, stdlib_shards, "--train.max_steps=20", "--train.log_every=4",
                    "--checkpoint.every=0",
                    "--cluster.workers=1", "--fault.kill_rank=0", "--fault.at_step=7", check=False)
    assert proc.returncode != 0 and "fault injection" in proc.stdout
    assert sorted(m) == [1, 2, 3, 4]
    assert m[2]["step_time_s"] == m[3]["step_time_s"] == m[4]["step_time_s"]  # the interval's average


def test_tensorboard_holds_each_step_once_across_a_kill_and_resume(stdlib_shards, tmp_path):
    """tracking.tensorboard (default on): RUN_DIR/tensorboard read back with TensorBoard's own
    EventAccumulator holds every step of metrics.jsonl once, with its values. The killed start logged steps
    6-7 past its checkpoint (step 5); the resumed start recomputes them, and TensorBoard keeps the recomputed
    ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ctxtrain.tracking import event_steps

    run_dir = tmp_path / "tb"
    narrow = ["--train.max_steps=12", "--train.log_every=1", "--checkpoint.every=5", "--cluster.workers=1",
              "--tracking.tensorboard=true"]
    proc, m = train(run_dir, stdlib_shards, *narrow, "--fault.kill_rank=0", "--fault.at_step=8", check=False)
    assert proc.returncode != 0 and sorted(m) == list(range(1, 8))
    # flushed as logged: nothing lost to the kill
    assert event_steps(run_dir / "tensorboard") == set(range(1, 8))
    proc, m = train(run_dir, stdlib_shards, *narrow)
    assert "resumed from step_000005" in proc.stdout and sorted(m) == list(range(1, 13))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per start

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "restarts"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(1, 13)), (tag, [e.step for e in events])
        for e in events:
            assert e.value == pytest.approx(m[e.step][tag], rel=1e-6, abs=1e-12), (tag, e.step)
    assert [e.value for e in acc.Scalars("restarts")][-1] == 1
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text


def test_translation_losses_weigh_every_target_token_the_same(tmp_path):
    """Two workers, two micro-batches each, targets of 2 to 30 tokens: with length buckets (the engine's
    tokens_per_step set, as training sets it from the epoch's mean) the gradient DeepSpeed reduces is that of
    the step's summed token losses over that count, so every target token weighs the same; without (pairs in
    random order) it is the plain mean of the micro-batches' means, as before buckets. The two differ here."""
    from ctxtrain.config import load_config
    from ctxtrain.local_launch import launch
    from ctxtrain.model import build_model
    from tests.integration.probes import TARGET_LENGTHS, TOKENS_PER_STEP, pair_batch

    cfg = load_config(REPO / "configs" / "translate_tiny.yaml",
                      [f"--train.run_dir={tmp_path}", "--cluster.workers=2", "--train.grad_accum=2",
                       "--data.batch_size=2", "--model.dropout=0", "--model.d_model=64", "--model.n_layers=1",
                       "--model.d_ff=128", "--model.vocab_size=256", "--zero.stage=1"])
    os.environ["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    assert launch(cfg, entry="tests.integration.probes:token_weighted_steps") == 0
    plain, fixed = json.loads((tmp_path / "grad_norms.json").read_text())

    torch.manual_seed(0)
    model = build_model(cfg.model)
    batches = [pair_batch(lengths, i) for i, lengths in enumerate(TARGET_LENGTHS)]

    def grad_norm(weights) -> float:
        model.zero_grad()
        loss = sum(w * model(b["src"], b["tgt"], src_mask=b["src_mask"], tgt_mask=b["tgt_mask"],
                             targets=b["targets"]) for w, b in zip(weights, batches))
        loss.backward()
        return float(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).norm())

    counts = [int(b["n_tokens"]) for b in batches]
    token_mean = grad_norm([n / sum(counts) for n in counts])
    batch_mean = grad_norm([1 / len(batches)] * len(batches))
    assert abs(plain - batch_mean) < 1e-4 * batch_mean, (plain, batch_mean)
    assert abs(fixed - token_mean * sum(counts) / TOKENS_PER_STEP) < 1e-4 * fixed, (fixed, token_mean)
    assert abs(batch_mean - token_mean) > 0.05 * token_mean  # the two weightings are told apart here


def test_packed_pairs_train_translation_as_the_padded_batches_do(en_fr_shards, tmp_path):
    """data.pack_pairs on 2 workers (ZeRO-2, dropout off): the same pairs in each step, packed into rows of
    96 ids a side, give the unpacked run's losses and gradient norms step by step (to float rounding), at
    far fewer FLOPs a step."""
    from tests.conftest import ENCDEC_SMALL

    common = [*ENCDEC_SMALL, "--model.dropout=0", "--train.max_steps=6", "--checkpoint.every=6",
              "--train.log_every=1", "--train.peak_tflops=1"]  # a peak: mfu / tokens_per_s is FLOPs a token
    _, padded = train(tmp_path / "padded", en_fr_shards, *common, config="translate_tiny.yaml")
    _, packed = train(tmp_path / "packed", en_fr_shards, *common, "--data.pack_pairs=96",
                      config="translate_tiny.yaml")
    assert sorted(packed) == sorted(padded) == list(range(1, 7))
    for step in padded:
        for key in ("loss", "grad_norm"):
            assert abs(packed[step][key] - padded[step][key]) < 2e-4 * padded[step][key], (step, key)
    # and each step computed far fewer FLOPs (little padding): the FLOPs a trained token, from the mfu
    flops = [sum(m[s]["mfu"] / m[s]["tokens_per_s"] for s in m) for m in (packed, padded)]
    assert flops[0] < 0.6 * flops[1], flops


def test_length_buckets_train_translation_and_keep_their_layout_across_a_resume(en_fr_shards, tmp_path):
    """data.length_buckets on 2 workers: training reads length-bucketed batches (the cursor records their run
    length), and a resume on 1 worker continues in that layout from the cursor's position."""
    from tests.conftest import ENCDEC_SMALL

    common = [*ENCDEC_SMALL, "--data.length_buckets=true", "--data.shuffle_buffer=1024",
              "--train.max_steps=8", "--checkpoint.every=4", "--train.log_every=1"]
    train(tmp_path / "run", en_fr_shards, *common, "--train.stop_at_step=4", config="translate_tiny.yaml")
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000004" / "meta.json").read_text())
    cursor = meta["loader"][0]
    assert cursor["buckets"] == 16 and cursor["partitions"] == 2 and cursor["consumed"] == 4 * 32, cursor
    _, m = train(tmp_path / "run", en_fr_shards, *common, "--cluster.workers=1", config="translate_tiny.yaml")
    assert sorted(m) == list(range(1, 9)) and all(math.isfinite(m[s]["loss"]) for s in m)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000008" / "meta.json").read_text())
    cursor = meta["loader"][0]
    assert cursor["buckets"] == 16 and cursor["consumed"] == 4 * 32 + 4 * meta["global_batch"], (cursor, meta)
