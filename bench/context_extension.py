"""A context extension on this machine, before and after, for three positional schemes: a small LM trained at
a short length, then continued at a 4x longer one — with plain RoPE, with RoPE under YaRN scaling, and with
the seed's sinusoidal positions — probed (loss by position, passkey retrieval) before and after.

    python bench/context_extension.py                   # the README's result (budget printed at the end)
    python bench/context_extension.py --steps 40,20 --short 128 --out /tmp/ext   # a quick smoke run

The corpus: the Python standard library's files and synthetic passkey documents (--passkey-fraction of the
text) — the standard prompt with held-in keys (seed 1) and filler sentences made of ~3,000 words from the
stdlib's comments, followed by the key — so that retrieval is something the data teaches; each stage's passkey
documents fit its windows. The probes use other keys (seed 0) and the classic filler sentences, none of whose
words the training filler uses: text the model never trained on.

Stage 1 trains each scheme at --short tokens (RoPE and sinusoidal: two runs); stage 2 continues each from its
stage-1 export (`model.init_from`) at --factor x --short tokens: RoPE as it is, RoPE with YaRN (factor
--factor over the short context), and sinusoidal. Before (the stage-1 exports, probed with --extrapolate) and
after (the stage-2 runs): the loss by position out to the long length (on held-out text: the stdlib files the
corpus left out) and the passkey table. Writes JSON, two
PNG pictures (loss by position; passkey accuracy) and prints the tables; everything runs through the real CLI.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctxtrain.probes import FILLER, INTRO, NEEDLE, QUESTION  # noqa: E402

MODEL = ["--model.d_model=128", "--model.d_ff=352", "--model.n_layers=4", "--model.n_heads=4",
         "--model.vocab_size=4096"]
DEPTHS = "0,0.25,0.5,0.75,1"


def ctxtrain(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore",
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"$ ctxtrain {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "ctxtrain", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env)
    with open(log.parent / "timings.jsonl", "a") as fh:  # the budget, summed across re-runs in one --out
        fh.write(json.dumps({"command": args[0], "seconds": time.time() - t0}) + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"context_extension: `ctxtrain {args[0]}` failed; see {log}")


# Training filler: sentences made of English words from the standard library's comments (~3,000 words), in
# two shapes — "The <word> is <word>." (the needle's own shape, so that the model learns to find "The pass key
# is" among many "... is ...") and 3-6 words in a row — never the probes' classic sentences (" The grass is
# green. The sky is blue. The sun is yellow. Here we go. There and back again."): none of their words, nor
# "pass" or "key", is in the pool. A model trained on a few fixed nouns and adjectives retrieved 96% of keys
# inside its own filler and 42% inside the classic one (words it never saw there); a wide pool of words
# teaches it to ignore whatever the filler says.
HELD_OUT = set(re.findall(r"[a-z]+", (FILLER + NEEDLE + QUESTION).lower()))


def filler_words() -> list[str]:
    """Lower-case words of 3-9 letters seen at least 5 times in the stdlib's `# ` comments, the probes'
    words left out; sorted, so that the sentences drawn from them are a function of the seed."""
    from ctxtrain.data.corpora import stdlib_files

    counts: collections.Counter = collections.Counter()
    for f in stdlib_files():
        for line in f.read_text(errors="replace").splitlines():
            if line.strip().startswith("# "):
                counts.update(re.findall(r"(?<![\w.'])[a-z]{3,9}(?![\w.(']|\.\w)", line.strip()[2:]))
    return sorted(w for w, n in counts.items() if n >= 5 and w not in HELD_OUT)


def sentence(rng: random.Random, words: list[str]) -> str:
    if rng.random() < 0.5:
        return f" The {rng.choice(words)} is {rng.choice(words)}."
    said = [rng.choice(words) for _ in range(rng.randint(3, 6))]
    return " " + " ".join(said).capitalize() + "."


def passkey_documents(n: int, most_sentences: int, seed: int) -> list[str]:
    """n passkey documents (prompt + key): 2..most_sentences filler sentences (`sentence`), the needle among
    them, keys drawn with `seed`."""
    rng = random.Random(seed)
    words = filler_words()
    docs = []
    for _ in range(n):
        key = str(rng.randint(10_000, 99_999))
        filler = [sentence(rng, words) for _ in range(rng.randint(2, most_sentences))]
        at = rng.randint(0, len(filler))
        docs.append(INTRO + "".join(filler[:at]) + NEEDLE.format(key=key) + "".join(filler[at:]) + QUESTION
                    + " " + key + ".")
    return docs


def make_corpus(corpus: Path, fraction: float, window: int, files: int = 0) -> Path:
    """The stdlib's first `files` files (0: all) and passkey documents of up to about `window` tokens (2
    sentences of filler to as many as fill the window) as `fraction` of the text, shuffled, as JSONL."""
    from ctxtrain.data.corpora import stdlib_files

    texts = [f.read_text(errors="replace") for f in stdlib_files()[:files or None]]
    most = max(2, (window - 64) // 9)  # instruction, needle, question: ~60 tokens; a sentence ~9
    sample = passkey_documents(100, most, 2)
    per_doc = sum(map(len, sample)) / len(sample)
    n = int(sum(map(len, texts)) * fraction / (1 - fraction) / per_doc)  # `fraction` of the characters
    docs = texts + passkey_documents(n, most, 1)
    random.Random(0).shuffle(docs)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    return corpus


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", type=int, default=128, help="stage 1's training length")
    p.add_argument("--factor", type=int, default=4, help="stage 2's length: factor x short")
    p.add_argument("--steps", default="3000,600", help="optimizer steps of stage 1 and stage 2")
    p.add_argument("--tokens", type=int, default=4096, help="tokens a step (both stages; 2 workers)")
    p.add_argument("--passkey-fraction", type=float, default=0.8, help="passkey documents' share of the text")
    p.add_argument("--samples", type=int, default=10, help="passkey keys per (length, depth) cell")
    p.add_argument("--files", type=int, default=1000, help="stdlib files in the corpus (0: all; a smoke run: "
                                                        "few)")
    p.add_argument("--out", default=str(REPO / "runs" / "context_extension"), help="working directory")
    args = p.parse_args()
    steps1, steps2 = (int(x) for x in args.steps.split(","))
    short, long = args.short, args.short * args.factor
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    # each stage's corpus: passkey documents that fit its windows (their filler up to ~half the window)
    datasets = {}
    for stage, length in (("short", short), ("long", long)):
        data = datasets[stage] = out / f"data-{stage}"
        if not (data / "index.json").is_file():
            corpus = make_corpus(out / f"corpus-{stage}.jsonl", args.passkey_fraction, length, args.files)
            ctxtrain("prepare", "--input", str(corpus), "--out", str(data), "--vocab-size", "4096",
                     "--overwrite", "--no-progress", *(["--tokenizer",
                                                        str(datasets["short"] / "tokenizer.json")]
                                                       if stage == "long" else []), log=log)
    # held-out text for the loss by position: stdlib files the corpus left out (text, not passkey documents,
    # whose random filler words no context predicts); all files in the corpus: the long data's held-out split
    text = out / "data-text"
    if args.files and not (text / "index.json").is_file():
        from ctxtrain.data.corpora import stdlib_files

        held_out = [f.read_text(errors="replace") for f in stdlib_files()[args.files:]]
        (out / "corpus-text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out
                                                       if t.strip()))
        ctxtrain("prepare", "--input", str(out / "corpus-text.jsonl"), "--out", str(text), "--overwrite",
                 "--no-progress", "--val-fraction", "0.25", "--tokenizer",
                 str(datasets["short"] / "tokenizer.json"), log=log)
    held_out = text if args.files else datasets["long"]
    data = datasets["short"]
    # documents kept apart (data.doc_mask): a passkey document never sees another's key
    common = [f"--data.path={data}", "--cluster.workers=2", "--cluster.launcher=local", "--train.dtype=fp32",
              "--tracking.enabled=false", "--train.eval_every=0", "--train.log_every=50",
              "--data.doc_mask=true", "--data.num_workers=1", *MODEL]
    batch1, batch2 = (max(1, args.tokens // 2 // n) for n in (short, long))
    lengths = ",".join(str(short * f) for f in sorted({1, 2, args.factor}) if f <= args.factor)
    probe = ["--lengths", lengths, "--depths", DEPTHS, "--samples", str(args.samples), "--windows", "16",
             "--data", str(held_out)]
    results: dict = {"short": short, "long": long, "steps": [steps1, steps2], "tokens_per_step": args.tokens,
                     "passkey_fraction": args.passkey_fraction}
    stage1 = {"rope": ["--model.pos=rope"], "sinusoidal": ["--model.pos=sinusoidal"]}
    for name, pos in stage1.items():
        run = out / f"stage1-{name}"
        if not (out / f"export-{name}" / "model.safetensors").is_file():
            ctxtrain("train", str(REPO / "configs" / "lm_tiny.yaml"), f"--train.run_dir={run}", *common, *pos,
                     f"--data.seq_len={short}", f"--data.batch_size={batch1}", f"--train.max_steps={steps1}",
                     "--optim.warmup_steps=50",
                     f"--checkpoint.every={steps1}", "--optim.lr=2e-3", "--optim.min_lr=2e-4", log=log)
            ctxtrain("export", str(run), "--out", str(out / f"export-{name}"), "--no-progress", log=log)
        if not (out / f"probe-before-{name}.json").is_file():
            ctxtrain("probe", str(out / f"export-{name}"), *probe, "--extrapolate", "--out",
                     str(out / f"probe-before-{name}.json"), log=log)
    stage2 = {"rope": ("rope", []),
              "rope+yarn": ("rope", ["--model.rope_scaling.type=yarn",
                                     f"--model.rope_scaling.factor={args.factor}",
                                     f"--model.rope_scaling.original_max_position={short}",
                                     f"--model.max_position={long}"]),
              "sinusoidal": ("sinusoidal", [])}
    for name, (base, scaling) in stage2.items():
        before = out / f"probe-before-{base}.json"  # the stage-1 model the scheme starts from
        run = out / f"stage2-{name.replace('+', '-')}"
        cfg = out / f"stage2-{name.replace('+', '-')}.yaml"
        cfg.write_text(json.dumps({"model": {"init_from": str(out / f"export-{base}")}}))
        after = out / f"probe-after-{name}.json"
        # (a re-run in the same --out picks up where the last one stopped)
        if not (run / "checkpoints" / f"step_{steps2:06d}").is_dir():
            ctxtrain("train", str(cfg), f"--train.run_dir={run}", *common[:-len(MODEL)], *scaling,
                     f"--data.path={datasets['long']}", f"--data.seq_len={long}",
                     f"--data.batch_size={batch2}",
                     f"--train.max_steps={steps2}", "--optim.warmup_steps=20",
                     f"--checkpoint.every={steps2}", "--optim.lr=5e-4", "--optim.min_lr=5e-5", log=log)
        if not after.is_file():
            ctxtrain("probe", str(run), *probe, "--extrapolate", "--out", str(after), log=log)
        results[name] = {"before": json.loads(before.read_text()), "after": json.loads(after.read_text())}
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    results["minutes"] = sum(t["seconds"] for t in timings) / 60
    (out / "result.json").write_text(json.dumps(results, indent=1))
    report(results, out)
    return 0


def report(results: dict, out: Path) -> None:
    """The tables on stdout and the two pictures (PNG) in out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = results["long"]
    schemes = [k for k in ("rope", "rope+yarn", "sinusoidal") if k in results]
    print(f"\ncontext extension {results['short']} -> {long} tokens, steps {results['steps']}, passkey "
          f"documents {results['passkey_fraction']:.0%} of the corpus; {results['minutes']:.0f} min on this "
          "machine")
    print(f"{'scheme':12} {'':7} {'loss@' + str(long):>10} {'ctx gain':>9} {'eff. ctx':>9} "
          + " ".join(f"{'pk@' + n:>8}"
                     for n in map(str, results[schemes[0]]['before']['passkey']['lengths'])))
    for name in schemes:
        for when in ("before", "after"):
            r = results[name][when]
            lp = r["loss_by_position"][str(long)]
            pk = r["passkey"]
            cells = " ".join(f"{min(row):>8.0%}" for row in pk["accuracy"])
            print(f"{name:12} {when:7} {lp['mean']:>10.3f} {lp['context_gain']:>9.3f} "
                  f"{lp['effective_context']:>9,} {cells}")
    print("(pk@L: the worst depth's passkey accuracy at length L)")
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.4), dpi=100, sharey=True)
    for ax, name in zip(axes, schemes):
        for when, style in (("before", "--"), ("after", "-")):
            lp = results[name][when]["loss_by_position"][str(long)]
            ax.plot([a + 1 for a, _ in lp["buckets"]], lp["loss"], style, marker="o", markersize=3,
                    label=when)
        ax.axvline(results["short"], color="#999999", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("position (bucket start + 1)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (nats/token)")
    fig.suptitle(f"Loss by position in {long:,}-token windows, before and after extension")
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png")
    fig, axes = plt.subplots(2, len(schemes), figsize=(4.2 * len(schemes), 4.6), dpi=100)
    for col, name in enumerate(schemes):
        for row, when in enumerate(("before", "after")):
            pk = results[name][when]["passkey"]
            ax = axes[row][col]
            ax.imshow(pk["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for y, cells in enumerate(pk["accuracy"]):
                for x, v in enumerate(cells):
                    ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]], fontsize=7)
            ax.set_yticks(range(len(pk["lengths"])), [f"{n:,}" for n in pk["lengths"]], fontsize=7)
            ax.set_title(f"{name}, {when}", fontsize=9)
    fig.suptitle("Passkey accuracy (length x depth)")
    fig.tight_layout()
    fig.savefig(out / "passkey.png")
    print(f"pictures: {out / 'loss_by_position.png'}, {out / 'passkey.png'}")


if __name__ == "__main__":
    sys.exit(main())
