"""Starting from a pretrained Hugging Face folder (made here with `transformers`, random weights, and a
tokenizer trained by ctxtrain saved in it): `prepare --tokenizer` keeps its vocabulary, `train` with
model.init_from continues from its weights under ZeRO-3 on 2 workers with a new RoPE scaling, `export` gives a
folder transformers loads with the engine's logits, a resume continues from the run's own checkpoint, and
`generate` on the folder decodes what transformers decodes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import REPO
from tests.helpers import ctxtrain, make_hf_folder, train

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

ORIGINAL = 64  # the folder's context; training extends it to 128 with yarn


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_shard_lm, email_pkg_files):
    """A Llama folder (64 wide, 2 layers, 4 heads over 2 key/value heads, 64-token context) whose tokenizer is
    one_shard_lm's, and the email package prepared with that folder's tokenizer."""
    base = tmp_path_factory.mktemp("pretrained")
    vocab = json.loads((one_shard_lm / "index.json").read_text())["vocab_size"]
    folder = base / "llama"
    make_hf_folder(folder, tokenizer=one_shard_lm / "tokenizer.json", vocab_size=vocab, intermediate_size=128,
                   max_position_embeddings=ORIGINAL)
    data = base / "data"
    r = ctxtrain("prepare", "--input", *email_pkg_files[:20], "--tokenizer", str(folder), "--out", str(data),
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    return folder, data


def write_config(path, folder, **extra) -> str:
    model = {"init_from": str(folder), "max_position": 2 * ORIGINAL,
             "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position": ORIGINAL}, **extra}
    path.write_text(json.dumps({"model": model}))  # YAML is a superset of JSON
    return str(path)


def test_prepare_keeps_the_folders_tokenizer_and_special_ids(pretrained):
    folder, data = pretrained
    index = json.loads((data / "index.json").read_text())
    assert (data / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert index["special"]["eos"] == 2 and index["special"]["bos"] == 1


def test_init_from_trains_exports_and_resumes_from_its_own_checkpoint(pretrained, tmp_path):
    folder, data = pretrained
    config = write_config(tmp_path / "extend.yaml", folder)
    run_dir = tmp_path / "run"
    proc, m = train(run_dir, data, "--train.max_steps=3", "--zero.stage=3", "--checkpoint.every=3",
                    "--train.log_every=1", config=config, narrow=False)
    assert f"weights from {folder}" in proc.stdout, proc.stdout
    assert sorted(m) == [1, 2, 3]

    out = tmp_path / "export"
    r = ctxtrain("export", str(run_dir), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["max_position_embeddings"] == 2 * ORIGINAL
    rope = hf_config["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / "hf" / name).read_bytes() == (folder / name).read_bytes(), name

    # the trained engine's own logits (the checkpoint restored into a fresh 2-rank ZeRO-3 engine) are what
    # transformers computes from the export, at the new context length
    from ctxtrain.config import load_config
    from ctxtrain.local_launch import launch
    cfg = load_config(run_dir / "config.yaml", resolve=False)
    os.environ["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    tokens = torch.arange(2 * 2 * ORIGINAL).reshape(2, 2 * ORIGINAL) * 37 % cfg.model.vocab_size
    torch.save(tokens, run_dir / "probe_tokens.pt")
    assert launch(cfg, entry="tests.integration.probes:engine_logits") == 0
    probe = torch.load(run_dir / "probe_logits.pt")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, probe["logits"], rtol=1e-5, atol=1e-5)
    # trained from the folder's weights: every weight moved by three Adam steps (about lr each), no more
    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs, ours = original.state_dict(), exported.state_dict()
    moved = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert 0 < moved <= 3 * 2 * cfg.optim.lr, (moved, cfg.optim.lr)

    # A resume continues from the run's checkpoint: the folder's weights are not read again
    weights = folder / "model.safetensors"
    kept = tmp_path / "model.safetensors"
    shutil.move(weights, kept)
    try:
        proc, m = train(run_dir, data, "--train.max_steps=5", "--zero.stage=3", "--checkpoint.every=5",
                        "--train.log_every=1", config=config, narrow=False)
    finally:
        shutil.move(kept, weights)
    assert "resumed from step_000003" in proc.stdout, proc.stdout
    assert sorted(m) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 16}], ids=["plain", "yarn"])
def test_generate_on_a_folder_decodes_what_transformers_decodes(pretrained, tmp_path, rope):
    """Greedy decoding through ctxtrain's KV cache, past the original context (yarn: 16 tokens)."""
    folder, _ = pretrained
    theirs = make_hf_folder(tmp_path / "m", tokenizer=folder / "tokenizer.json", rope=rope, noise=0.3,
                            vocab_size=transformers.AutoConfig.from_pretrained(folder).vocab_size,
                            max_position_embeddings=64 if rope is None else 16)
    prompt = "def parse(self, fp, headersonly=False):\n    "
    from ctxtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(folder / "tokenizer.json")
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        want = theirs.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = [t for t in want[0, ids.shape[1]:].tolist() if t != 2]
    r = ctxtrain("generate", str(tmp_path / "m"), "--prompt", prompt, "--max-new", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + tok.decode(new) + "\n"
    assert len(set(new)) > 3  # a continuation that says something about the model, not one repeated token

    from ctxtrain import infer
    from ctxtrain.model.decode import greedy

    loaded = infer.load_source(tmp_path / "m")
    assert greedy(loaded.model, ids, 40, 2)[0] == new


def test_eval_on_a_folder_scores_what_transformers_scores(pretrained):
    """`eval HF_FOLDER --data DIR --seq-len T`: the loss of the first windows as transformers computes it
    (the before of a before/after comparison)."""
    import re

    import torch.nn.functional as F

    from ctxtrain.data.loader import StreamingLoader

    folder, data = pretrained
    r = ctxtrain("eval", str(folder), "--data", str(data), "--split", "train", "--seq-len", "64", "--limit",
                 "4")
    assert r.returncode == 0, r.stderr
    assert "4 windows of 64 tokens" in r.stdout, r.stdout
    loss = float(re.search(r"loss (\d+\.\d+)", r.stdout).group(1))
    windows = next(iter(StreamingLoader(data, split="train", seq_len=64, batch_size=4, shuffle=False,
                                        loop=False)))["tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert loss == pytest.approx(float(want), abs=1e-4)
