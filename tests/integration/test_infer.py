"""Using a trained model: `ctxtrain translate`, `generate` and `eval` on run directories and exports trained
here (real DeepSpeed checkpoints, consolidated on the fly), and BLEU as sacreBLEU computes it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import env

pytestmark = pytest.mark.slow


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxtrain", *args], capture_output=True, text=True,
                          env=env(),
                          input=stdin, timeout=300)


SENTENCES = ["Open the file.", "The file could not be saved.", "", "Print the document"]


def test_translate_reads_stdin_and_writes_one_line_per_line_deterministically(encdec_run, tmp_path):
    first = _run("translate", str(encdec_run), "--input", "-", stdin="\n".join(SENTENCES) + "\n")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == len(SENTENCES) and any(line.strip() for line in lines), first.stdout
    again = _run("translate", str(encdec_run), "--input", "-", stdin="\n".join(SENTENCES) + "\n")
    assert again.stdout == first.stdout
    # a beam, into a file; and an export folder gives the run directory's translations
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    beam = _run("translate", str(encdec_run), "--input", str(tmp_path / "in.txt"), "--beam", "3", "--out",
                str(tmp_path / "out.txt"))
    assert beam.returncode == 0 and len((tmp_path / "out.txt").read_text().splitlines()) == len(SENTENCES)
    r = _run("export", str(encdec_run), "--out", str(tmp_path / "export"), "--no-progress")
    assert r.returncode == 0, r.stderr
    exported = _run("translate", str(tmp_path / "export"), "--input", "-", stdin="\n".join(SENTENCES) + "\n")
    assert exported.returncode == 0 and exported.stdout == first.stdout, exported.stderr


def test_eval_prints_bleu_and_chrf_of_the_model_and_the_copy_baseline(encdec_run):
    r = _run("eval", str(encdec_run), "--limit", "40")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("val: 40 held-out pairs, greedy"), lines
    assert lines[1].startswith("model ") and "BLEU" in lines[1] and "chrF" in lines[1]
    assert lines[2].startswith("copy the source ") and "BLEU" in lines[2]
    copy_bleu = float(lines[2].split("BLEU")[1].split()[0])
    assert copy_bleu > 0  # English sources share words with French references (names, numbers, %s)


def test_training_scores_val_bleu_as_eval_does_on_its_checkpoint(encdec_run):
    """train.bleu_every under ZeRO-3 (weights gathered, pairs split over 2 ranks) gives the BLEU and chrF that
    `ctxtrain eval` computes from the consolidated checkpoint of the same step on the same pairs."""
    from tests.helpers import metrics

    rows = metrics(encdec_run)  # the fixture: train.bleu_every=50, train.bleu_pairs=32
    assert [step for step, r in sorted(rows.items()) if "val_bleu" in r] == [50, 100, 150]
    last = rows[150]
    r = _run("eval", str(encdec_run), "--limit", "32", "--max-len", "48")  # data.max_tgt_len of the run
    assert r.returncode == 0, r.stderr
    model = r.stdout.splitlines()[1].split()
    bleu, chrf = float(model[model.index("BLEU") + 1]), float(model[model.index("chrF") + 1])
    assert chrf > 1.0, r.stdout  # the model emits words by step 150: a real comparison, not 0 against 0
    assert last["val_bleu"] == pytest.approx(bleu, abs=0.006)
    assert last["val_chrf"] == pytest.approx(chrf, abs=0.006)


def test_bleu_is_sacrebleus_corpus_bleu():
    import sacrebleu

    from ctxtrain.infer import bleu_chrf

    hyps = ["le chat est sur le tapis", "il fait beau aujourd'hui", "ouvrir le fichier"]
    refs = ["le chat est sur le tapis rouge", "il fait très beau aujourd'hui", "ouvrez le fichier"]
    bleu, chrf = bleu_chrf(hyps, refs)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert 0 < bleu < 100


def test_eval_of_an_lm_reads_limit_windows_at_the_runs_length(zero3_run):
    """`eval` of an LM scores the first --limit val windows at the run's data.seq_len (or --seq-len): the 16
    windows of 128 tokens that the run's final evaluation read (2 ranks x 2 batches x 4) give its val_loss."""
    run_dir, whole, _ = zero3_run
    r = _run("eval", str(run_dir), "--limit", "16")
    assert r.returncode == 0, r.stderr
    assert "16 windows of 128 tokens" in r.stdout, r.stdout
    loss = float(re.search(r"loss (\d+\.\d+)", r.stdout).group(1))
    assert abs(loss - whole[20]["val_loss"]) <= 1e-4, (loss, whole[20]["val_loss"])
    r = _run("eval", str(run_dir), "--limit", "3", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert "3 windows of 64 tokens" in r.stdout and "192 tokens" in r.stdout, r.stdout


def test_generate_continues_a_prompt_with_an_lm(zero3_run):
    run_dir, _, _ = zero3_run
    r = _run("generate", str(run_dir), "--prompt", "def main(", "--max-new", "12")
    assert r.returncode == 0, r.stderr
    # the continuation itself (after 20 steps the narrowed LM continues with indentation: whitespace is text
    # too)
    assert r.stdout.startswith("def main(") and r.stdout.endswith("\n")
    assert len(r.stdout) - 1 > len("def main(")
    sampled = [_run("generate", str(run_dir), "--prompt", "import ", "--max-new", "8", "--temperature", "1",
                    "--top-p", "0.9", "--seed", "5").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


def test_probe_prints_the_tables_and_writes_the_numbers_into_the_run(zero3_run, tmp_path):
    """`ctxtrain probe RUN`: loss by position on the run's held-out windows (recombining to `eval`'s loss) and
    the passkey grid; the JSON lands in the run directory."""
    import json

    run_dir, _, _ = zero3_run
    r = _run("probe", str(run_dir), "--lengths", "96,128", "--depths", "0,1", "--samples", "2", "--windows",
             "4")
    assert r.returncode == 0, r.stderr
    assert "loss by position, 128-token windows" in r.stdout and "passkey retrieval" in r.stdout
    result = json.loads((run_dir / "probe.json").read_text())
    assert result["passkey"]["lengths"] == [96, 128] and len(result["passkey"]["accuracy"][1]) == 2
    ev = _run("eval", str(run_dir), "--limit", "4", "--seq-len", "128")
    loss = float(re.search(r"loss (\d+\.\d+)", ev.stdout).group(1))
    assert result["loss_by_position"]["128"]["mean"] == pytest.approx(loss, abs=1e-4)
