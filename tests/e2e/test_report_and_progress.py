"""What people look at: the HTML report rendered by headless Chromium, and the progress display of a run
started in a terminal (a pseudo-terminal here) against the plain lines of one started by CI."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.e2e.chromium import Chromium, find_binary
from tests.helpers import FAST, ctxtrain, env, train

pytestmark = pytest.mark.slow
BROWSER = find_binary()


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, stdlib_shards):
    run_dir = tmp_path_factory.mktemp("runs") / "zero1"
    train(run_dir, stdlib_shards, "--train.max_steps=8", "--zero.stage=1", "--checkpoint.every=4",
          "--train.eval_every=4", "--train.log_every=1")  # a point per step: a line long enough to find
    return run_dir


@pytest.mark.skipif(BROWSER is None, reason="Debian's chromium is not installed (launch/install.sh dev "
                                            "installs it)")
def test_report_renders_plots_in_headless_chromium(zero3_run, second_run, tmp_path):
    from PIL import Image

    from ctxtrain.report import COLORS, PLOTS

    run_a, _, _ = zero3_run
    out, png = tmp_path / "report.html", tmp_path / "png"
    r = ctxtrain("report", str(run_a), str(second_run), "--out", str(out), "--png", str(png))
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    # self-contained: nothing to fetch, no script
    assert "<script" not in page and "<link" not in page and not re.search(r"(src|href)=['\"]https?:", page)
    assert sorted(p.name for p in png.glob("*.png")) == sorted(f"{k}.png" for k, _, _ in PLOTS)
    assert "step_000020" in page and "d_model: 64" in page  # checkpoint list and config

    browser = Chromium(BROWSER, tmp_path / "profile")
    try:
        browser.load(out.as_uri())
        boxes = {b["id"]: b for b in browser.boxes("figure.plot")}
        assert sorted(boxes) == sorted(f"plot-{k}" for k, _, _ in PLOTS)
        shots = {key: Image.open(io.BytesIO(browser.screenshot(box))).convert("RGB") for key,
                 box in boxes.items()}
    finally:
        browser.close()

    run_colors = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in COLORS[:2]]
    for key, image in shots.items():
        assert image.size[0] > 800 and image.size[1] > 300, key
        assert share(image) > 0.03, f"{key} is blank"  # axes, labels, and lines or a note
        if key == "plot-mfu":  # CPU runs: MFU is null; the plot says so instead of drawing a line
            assert all(share(image, c) < 0.0005 for c in run_colors)
        else:
            for c in run_colors:  # both runs are drawn, overlaid
                assert share(image, c) > 0.001, (key, c)


def share(image, rgb=None) -> float:
    """The share of an image's pixels that are not white (rgb None) or close to rgb."""
    w, h = image.size
    px = image.load()
    pts = [px[x, y] for y in range(0, h, 2) for x in range(0, w, 2)]
    if rgb is None:
        hit = sum(1 for p in pts if p != (255, 255, 255))
    else:
        hit = sum(1 for p in pts if all(abs(a - b) < 40 for a, b in zip(p, rgb)))
    return hit / len(pts)


@pytest.mark.skipif(BROWSER is None, reason="Debian's chromium is not installed (launch/install.sh dev "
                                            "installs it)")
def test_report_grid_fits_a_laptop_and_a_narrow_window_with_hover_values_and_a_run_selector(zero3_run,
                                                                                            second_run,
                                                                                           tmp_path):
    """The plots are a grid: two columns on a 1366x768 laptop, one in an 800-pixel window, never wider than
    the window. Every series carries hover values (<title>, the browser's tooltip); the run selector hides a
    run."""
    from PIL import Image

    from ctxtrain.report import COLORS

    out = tmp_path / "report.html"
    assert ctxtrain("report", str(zero3_run[0]), str(second_run), "--out", str(out)).returncode == 0
    colors = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in COLORS[:2]]
    for width, height, columns in ((1366, 768, 2), (800, 1000, 1)):
        browser = Chromium(BROWSER, tmp_path / f"profile{width}", width=width, height=height)
        try:
            browser.load(out.as_uri())
            inner = browser.evaluate("window.innerWidth")
            boxes = browser.boxes("figure.plot")
            assert len({round(b["x"]) for b in boxes}) == columns, (width, boxes)
            assert all(b["x"] + b["width"] <= inner for b in boxes) and browser.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth"), width  # no sideways scrolling
            loss = next(b for b in boxes if b["id"] == "plot-loss")
            shot = Image.open(io.BytesIO(browser.screenshot(loss))).convert("RGB")
            shot.save(tmp_path / f"loss-{width}.png")
            assert shot.size[0] >= 0.4 * inner and all(share(shot, c) > 0.001 for c in colors), width
            titles = browser.evaluate("[...document.querySelectorAll('#plot-loss use > title')].map(t => "
                                      "t.textContent)")
            assert any(t.startswith("zero3 loss: step 20, ") for t in titles), titles[:5]
            axes = browser.evaluate("[...document.querySelectorAll('figure.plot svg')].length")
            assert axes == len(boxes)
            if columns == 2:  # the selector: uncheck the second run, its lines leave every plot
                browser.evaluate("document.querySelector(\"label[for='show-r1']\").click()")
                hidden = Image.open(io.BytesIO(browser.screenshot(loss))).convert("RGB")
                assert share(hidden, colors[1]) < 0.0005 < share(hidden, colors[0])
        finally:
            browser.close()


def test_report_bad_input_is_one_line(tmp_path):
    r = ctxtrain("report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "metrics.jsonl" in r.stderr


def _train_cmd(run_dir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "ctxtrain", "train", str(CONFIGS / "lm_tiny.yaml"),
            f"--train.run_dir={run_dir}",
            f"--data.path={data}", *FAST, "--cluster.launcher=local", "--train.max_steps=8", "--zero.stage=1",
            "--train.log_every=2", "--checkpoint.every=0"]


def in_pty(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run cmd with a pseudo-terminal as stdin/stdout/stderr; returns (exit status, everything it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env(), close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_in_a_terminal_plain_lines_without(stdlib_shards, tmp_path):
    # In a pseudo-terminal: a tqdm bar (step/total, loss, tokens/s, ETA), and no periodic log lines.
    code, tty_out = in_pty(_train_cmd(tmp_path / "tty", stdlib_shards))
    assert code == 0, tty_out[-3000:]
    assert re.search(r"train:\s+\d+%\|", tty_out), tty_out[-2000:]  # the bar
    assert "8/8" in tty_out and "loss=" in tty_out and "tokens/s=" in tty_out and "<" in tty_out  # ETA
    assert "step=2/8" not in tty_out

    # Without a terminal (CI, job logs): plain lines every train.log_every steps, no bar.
    r = subprocess.run(_train_cmd(tmp_path / "pipe", stdlib_shards), capture_output=True, text=True,
                       env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    for step in (1, 2, 4, 6, 8):
        assert f"step={step}/8 loss=" in r.stdout, r.stdout
    assert not re.search(r"\d+%\|", r.stdout + r.stderr)


def test_prepare_and_export_show_progress_in_a_terminal(zero3_run, tmp_path):
    from tests.conftest import ASSETS

    code, out = in_pty([sys.executable, "-m", "ctxtrain", "prepare", "--input",
                        str(ASSETS / "en_fr_slice.tsv"),
                        "--out", str(tmp_path / "pairs"), "--vocab-size", "1024"])
    assert code == 0 and re.search(r"prepare:\s+\d+%\|", out) and "tokens/s" in out, out[-2000:]
    run_dir, _, _ = zero3_run
    code, out = in_pty([sys.executable, "-m", "ctxtrain", "export", str(run_dir), "--out",
                        str(tmp_path / "x")])
    assert code == 0 and re.search(r"export:\s+100%\|", out), out[-2000:]


@pytest.mark.skipif(BROWSER is None, reason="Debian's chromium is not installed (launch/install.sh dev "
                                            "installs it)")
def test_probes_in_the_loop_survive_a_kill_and_show_in_the_report(stdlib_shards, tmp_path):
    """train.probe_every under ZeRO-3 on 2 workers: the probe's scalars at steps 3, 6 and the last, each step
    once in metrics.jsonl across a kill (step 7) and the resume from step 4; the training itself is the run's
    without probes; the report draws the loss-by-position curves and the passkey heat map."""
    from PIL import Image

    common = ["--train.max_steps=8", "--train.log_every=1", "--checkpoint.every=4", "--zero.stage=3",
              "--probe.lengths=96,128", "--probe.depths=0,0.5,1", "--probe.samples=2",
              "--probe.windows=2"]
    probing = [*common, "--train.probe_every=3"]
    run_dir = tmp_path / "probed"
    proc, m = train(run_dir, stdlib_shards, *probing, "--fault.kill_rank=1", "--fault.at_step=7", check=False)
    assert proc.returncode != 0 and [s for s in m if "probe_s" in m[s]] == [3, 6]
    proc, m = train(run_dir, stdlib_shards, *probing)
    assert "resumed from step_000004" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step once
    assert [s for s in m if "probe_s" in m[s]] == [3, 6, 8]
    record = m[8]
    assert {f"probe/passkey/L{n}/d{d}" for n in (96, 128) for d in ("0", "0.5", "1")} <= set(record)
    assert record["probe/loss/L128/64"] > 0 and "probe/effective_context/L96" in record
    _, plain = train(tmp_path / "plain", stdlib_shards, *common)
    assert [m[s]["loss"] for s in range(1, 9)] == [plain[s]["loss"] for s in range(1, 9)]

    out = tmp_path / "report.html"
    r = ctxtrain("report", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    browser = Chromium(BROWSER, tmp_path / "profile")
    try:
        browser.load(out.as_uri())
        boxes = {b["id"]: b for b in browser.boxes("figure.plot")}
        assert {"plot-probe-loss-0", "plot-probe-passkey-0"} <= set(boxes)
        shots = {k: Image.open(io.BytesIO(browser.screenshot(boxes[k]))).convert("RGB")
                 for k in ("plot-probe-loss-0", "plot-probe-passkey-0")}
    finally:
        browser.close()
    for key, image in shots.items():
        assert image.size[0] > 800 and share(image) > 0.03, key
    assert "passkey accuracy at step 8" in out.read_text()
