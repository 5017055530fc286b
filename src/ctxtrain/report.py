"""`ctxtrain report RUN_DIR [RUN_DIR ...] --out report.html [--png DIR]`: a view of runs without W&B;
`--serve [--port P]` serves it on 127.0.0.1, rebuilt as the runs' metrics.jsonl grow (runs still going).

One self-contained HTML file (inline SVG, inline CSS, no script, nothing fetched): a summary row per run;
plots of loss and val loss, learning rate, tokens/s, MFU, memory, and step time / data wait against step,
several runs overlaid (one colour per run); a run's context probes (train.probe_every): its loss by position
per probe step and its passkey heat map; each run's config and checkpoint list. With --png, the same plots as
PNG files.
"""

from __future__ import annotations

import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ctxtrain.errors import UserError, interruptible
from ctxtrain.rundir import RunDir, read_metrics

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
GIB = 1024**3


@dataclass
class Run:
    path: Path
    name: str
    rows: list[dict]
    config_text: str
    checkpoints: list[dict] = field(default_factory=list)
    restarts: int = 0
    tracker_run_id: Optional[str] = None

    def series(self, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key] / scale) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


def load_run(path: str | Path) -> Run:
    p = Path(path)
    run = RunDir(p)
    if not run.metrics.is_file():
        raise UserError(f"{p} has no metrics.jsonl; pass the train.run_dir of a run")
    rows = read_metrics(run.metrics)  # torn, non-UTF-8 or non-record lines are skipped
    if not rows:
        raise UserError(f"{run.metrics} holds no step records (empty, or every line damaged); pass a run "
                        "that has trained at least one step")
    config_text = _text(run.config, "(no config.yaml)")
    tracker = (_json(run.tracker) or {}).get("run_id")
    restarts = max((r.get("restarts") or 0 for r in rows), default=0)
    return Run(p, p.name, rows, config_text, _checkpoints(p), restarts, tracker)


def _checkpoints(run_dir: Path) -> list[dict]:
    """The run's checkpoints wherever it stored them (checkpoint.storage of its config.yaml;
    RUN_DIR/checkpoints when the config cannot be read), each with its meta.json's facts or a note that
    meta.json is damaged."""
    from ctxtrain.checkpoint import LocalStorage, open_storage, tag_of
    from ctxtrain.config import load_config

    try:
        cfg = load_config(RunDir(run_dir).config, resolve=False)
        cfg.train.run_dir = str(run_dir)
        storage = open_storage(cfg)
        steps = storage.list_steps()
    except (UserError, OSError, ValueError):
        storage = LocalStorage(RunDir(run_dir).checkpoints)
        steps = storage.list_steps()
    out = []
    for step, committed in steps:
        tag = tag_of(step)
        sizes = storage.sizes(tag)
        try:
            meta = storage.read_meta(tag)
        except (OSError, ValueError, UnicodeDecodeError):
            meta = None
        meta = meta if isinstance(meta, dict) else None
        note = " (meta.json damaged)" if meta is None and "meta.json" in sizes else ""
        out.append({
            "name": tag + note,
            "committed": committed,
            "bytes": sum(sizes.values()),
            "time": (meta or {}).get("time"),
            "tokens": (meta or {}).get("tokens"),
            "world_size": (meta or {}).get("world_size"),
        })
    return out


def _text(path: Path, missing: str) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return missing


def _json(path: Path) -> Optional[dict]:
    """A small JSON file of the run (meta.json, tracker.json), or None when missing or damaged."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------------------
# Plots


PLOTS = [
    ("loss", "Loss", "cross-entropy (nats/token)"),
    ("lr", "Learning rate", "learning rate (per step)"),
    ("throughput", "Tokens/s (job)", "tokens/s"),
    ("mfu", "MFU", "fraction of peak FLOP/s"),
    ("memory", "Memory", "GiB"),
    ("timing", "Step time and data wait", "seconds per step"),
]
BLEU_PLOT = ("bleu", "Held-out BLEU and chrF (greedy, train.bleu_pairs pairs)", "sacreBLEU score (0-100)")
HOVER_POINTS = 300  # most points per series that carry a hover value (evenly spaced), to keep the page small


@dataclass
class _Hover:
    """The hover values of one figure: per series (its SVG group id), the text of each marker."""
    texts: dict[str, list[str]] = field(default_factory=dict)


def _figure(key: str, title: str, ylabel: str, runs: list[Run]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=100)
    hover = _Hover()
    drawn = 0
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]

        def line(series, label, style="-", unit=""):
            return _line(ax, series, color, label, style, hover, f"r{i}-{key}-{len(hover.texts)}", unit)

        if key == "loss":
            drawn += line(run.series("loss"), f"{run.name} loss")
            x, y = run.series("val_loss")
            if x:
                ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=4, label=f"{run.name} val "
                                                                                           "loss",
                        gid=f"r{i}-{key}-val")
                drawn += 1
        elif key == "lr":
            drawn += line(run.series("lr"), run.name)
        elif key == "throughput":
            drawn += line(run.series("tokens_per_s"), run.name, unit=" tokens/s")
        elif key == "mfu":
            drawn += line(run.series("mfu"), run.name)
        elif key == "memory":
            gpu = run.series("mem_peak_bytes", GIB)
            if gpu[0]:
                drawn += line(gpu, f"{run.name} GPU peak", unit=" GiB")
                drawn += line(run.series("mem_reserved_bytes", GIB), f"{run.name} GPU reserved", ":", " GiB")
            else:
                drawn += line(run.series("mem_rss_bytes", GIB), f"{run.name} RSS (CPU run)", unit=" GiB")
        elif key == "bleu":
            drawn += line(run.series("val_bleu"), f"{run.name} BLEU")
            drawn += line(run.series("val_chrf"), f"{run.name} chrF", ":")
        elif key == "timing":
            drawn += line(run.series("step_time_s"), f"{run.name} step", unit=" s")
            drawn += line(run.series("data_wait_s"), f"{run.name} data wait", ":", " s")
    if not drawn:
        why = "MFU is null: CPU runs have no honest peak to divide by" if key == "mfu" else "no data"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#555555")
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig, drawn, hover


def probe_records(run: Run) -> list[dict]:
    """The run's records that carry a context probe (train.probe_every), in step order."""
    return [r for r in run.rows if r.get("probe/passkey_effective_length") is not None]


def _probe_grid(record: dict) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, accuracy[length][depth]) of one probe record's passkey cells."""
    cells = {}
    for key, value in record.items():
        if key.startswith("probe/passkey/L"):
            length, depth = key[len("probe/passkey/L"):].split("/d")
            cells[(int(length), float(depth))] = value
    lengths, depths = sorted({n for n, _ in cells}), sorted({d for _, d in cells})
    return lengths, depths, [[cells.get((n, d), float("nan")) for d in depths] for n in lengths]


def probe_figures(run: Run, index: int) -> list[tuple[str, object]]:
    """A run's context probes: the loss by position at its longest probe length, one line per probe step
    (light to dark), and the passkey accuracy of the last probe (length x depth heat map)."""
    import matplotlib.pyplot as plt

    rows = probe_records(run)
    if not rows:
        return []
    lengths = sorted({int(k.split("/")[2][1:]) for k in rows[-1] if k.startswith("probe/loss/L")})
    figures = []
    if lengths:
        n = lengths[-1]
        fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=100)
        cmap = plt.get_cmap("viridis")
        for j, r in enumerate(rows):
            pts = sorted((int(k.rsplit("/", 1)[1]), v) for k,
                         v in r.items() if k.startswith(f"probe/loss/L{n}/"))
            ax.plot([a + 1 for a, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                    color=cmap(j / max(1, len(rows) - 1)), label=f"step {r['step']}",
                    gid=f"r{index}-probe-{j}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{run.name}: held-out loss by position ({n:,}-token windows)")
        ax.set_xlabel("position in the window (bucket start + 1)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2)
        fig.tight_layout()
        figures.append(("probe-loss", fig))
    lens, depths, acc = _probe_grid(rows[-1])
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.5 * len(lens)), dpi=100)
    ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for y, row in enumerate(acc):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lens)), [f"{n:,}" for n in lens])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt length")
    scoring = rows[-1].get("probe_scoring", "greedy")
    ax.set_title(f"{run.name}: passkey accuracy at step {rows[-1]['step']} ({scoring} scoring, effective "
                 f"length {rows[-1]['probe/passkey_effective_length']:,})")
    fig.tight_layout()
    figures.append(("probe-passkey", fig))
    return figures


def _line(ax, series, color, label, style="-", hover: Optional[_Hover] = None, gid: str = "",
          unit: str = "") -> int:
    x, y = series
    if not x:
        return 0
    ax.plot(x, y, color=color, linestyle=style, linewidth=1.6, label=label, gid=gid)
    if hover is not None:
        every = max(1, -(-len(x) // HOVER_POINTS))
        xs, ys = x[::every], y[::every]
        # invisible markers that carry the values: <title> children, the browser's own tooltip (no script)
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=7, alpha=0.0, gid=f"{gid}-hover")
        hover.texts[f"{gid}-hover"] = [f"{label}: step {a}, {b:.6g}{unit}" for a, b in zip(xs, ys)]
    return 1


def _svg(fig, hover: Optional[_Hover] = None) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    for gid, titles in (hover.texts.items() if hover else ()):
        text = _add_titles(text, gid, titles)
    return text


def _add_titles(svg: str, gid: str, titles: list[str]) -> str:
    """Give each marker (<use>) of the group `gid` its <title>: what a browser shows on hover."""
    start = svg.find(f'<g id="{gid}"')
    if start < 0:
        return svg
    head = svg[:start]
    rest = svg[start:]
    parts, pos, n = [], 0, 0
    while n < len(titles):
        i = rest.find("<use ", pos)
        if i < 0:
            break
        j = rest.find("/>", i)
        parts.append(rest[pos:j] + f"><title>{html.escape(titles[n])}</title></use>")
        pos, n = j + 2, n + 1
    return head + "".join(parts) + rest[pos:]


# ---------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
div.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 10px 18px; }
figure.plot { margin: 0; min-width: 0; } figure.plot svg { width: 100%; height: auto; display: block; }
figure.plot use:hover { fill-opacity: 1 !important; stroke-opacity: 1 !important; }
div.selector { margin: 6px 0 10px; font-size: 13px; }
div.selector label { margin-right: 14px; cursor: pointer; }
input.run { display: none; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; max-height: 420px; overflow: auto; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle; }
"""


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def build_report(run_dirs: list[str], out: str, png_dir: Optional[str] = None) -> Path:
    if not run_dirs:
        raise UserError("report needs at least one RUN_DIR")
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"--out {out} is a directory; name the HTML file to write, e.g. --out "
                        f"{out_path / 'report.html'}")
    for where in (out_path.parent, Path(png_dir) if png_dir else None):
        if where is not None and where.exists() and not where.is_dir():
            raise UserError(f"{where} is a file, not a directory; choose another --out/--png")
    page = render(run_dirs, png_dir)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(page)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e}); pick a writable place") from None
    return out_path


def render(run_dirs: list[str], png_dir: Optional[str] = None, refresh_s: Optional[float] = None) -> str:
    """The report's HTML; with refresh_s, the page asks the browser to reload itself that often (--serve)."""
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # two runs with the same directory name stay apart in legends
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({i + 1})"
    reload = f"<meta http-equiv='refresh' content='{refresh_s:g}'>" if refresh_s else ""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>{reload}<title>ctxtrain report</title>"
             f"<style>{CSS}</style></head><body>", "<h1>ctxtrain report</h1>",
             f"<p>{len(runs)} run(s), written {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]

    parts.append("<h2>Runs</h2><table id='runs'><tr><th class='name'>run</th><th>steps</th><th>loss</th>"
                 "<th>val loss</th><th>val ppl</th><th>val "
                 "BLEU</th><th>tokens</th><th>tokens/s</th><th>MFU</th><th>restarts</th><th "
                 "class='name'>W&amp;B run</th></tr>")
    for i, run in enumerate(runs):
        last = run.rows[-1] if run.rows else {}
        val = next((r for r in reversed(run.rows) if r.get("val_loss") is not None), {})
        scored = next((r for r in reversed(run.rows) if r.get("val_bleu") is not None), {})
        parts.append(
            f"<tr><td class='name'><span class='swatch' style='background:{COLORS[i % len(COLORS)]}'></span>"
            f"{html.escape(run.name)}</td><td>{_fmt(last.get('step'))}</td>"
            f"<td>{_fmt(last.get('loss'), '.4f')}</td>"
            f"<td>{_fmt(val.get('val_loss'), '.4f')}</td><td>{_fmt(val.get('val_ppl'), '.2f')}</td>"
            f"<td>{_fmt(scored.get('val_bleu'), '.2f')}</td>"
            f"<td>{_fmt(last.get('tokens'), ',')}</td><td>{_fmt(last.get('tokens_per_s'), ',.0f')}</td>"
            f"<td>{_fmt(last.get('mfu'), '.3f')}</td><td>{run.restarts}</td>"
            f"<td class='name'>{html.escape(run.tracker_run_id or '–')}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Plots</h2>")
    if png_dir:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
    # a run selector without script: a checkbox per run hides that run's lines (CSS :checked)
    if len(runs) > 1:
        parts.append("<style>" + "".join(
            f"#show-r{i}:not(:checked) ~ div.plots g[id^='r{i}-'] {{ display: none; }} "
            f"#show-r{i}:not(:checked) ~ div.selector label[for='show-r{i}'] {{ opacity: 0.35; "
            "text-decoration: line-through; }" for i in range(len(runs)))
            + "</style>")
        parts.append("".join(f"<input type='checkbox' class='run' id='show-r{i}' checked>"
                             for i in range(len(runs))))
        parts.append("<div class='selector'>runs shown: " + "".join(
            f"<label for='show-r{i}'><span class='swatch' "
            f"style='background:{COLORS[i % len(COLORS)]}'></span>{html.escape(run.name)}</label>" for i,
                                                                    run in enumerate(runs)) + "</div>")
    parts.append("<div class='plots'>")
    plots = PLOTS + ([BLEU_PLOT] if any(r.get("val_bleu") is not None for run in runs for r in run.rows)
                     else [])
    for key, title, ylabel in plots:
        fig, _, hover = _figure(key, title, ylabel, runs)
        parts.append(f"<figure class='plot' id='plot-{key}'>{_svg(fig, hover)}</figure>")
        if png_dir:
            fig.savefig(Path(png_dir) / f"{key}.png", dpi=100)
        plt.close(fig)
    parts.append("</div>")
    for i, run in enumerate(runs):
        figures = probe_figures(run, i)
        if figures:
            parts.append(f"<h2>Context probes: {html.escape(run.name)}</h2><div class='plots'>")
        for key, fig in figures:
            parts.append(f"<figure class='plot' id='plot-{key}-{i}'>{_svg(fig)}</figure>")
            if png_dir:
                fig.savefig(Path(png_dir) / f"{key}-{i}.png", dpi=100)
            plt.close(fig)
        if figures:
            parts.append("</div>")

    for run in runs:
        parts.append(f"<h2>{html.escape(run.name)}</h2><p>{html.escape(str(run.path.resolve()))}</p>")
        parts.append("<table class='checkpoints'><tr><th class='name'>checkpoint</th><th>committed</th>"
                     "<th>size</th><th>tokens</th><th>ranks</th><th class='name'>written</th></tr>")
        for c in run.checkpoints:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"])) if c["time"] else "–"
            parts.append(f"<tr><td class='name'>{c['name']}</td><td>{'yes' if c['committed'] else 'NO'}</td>"
                         f"<td>{c['bytes'] / 2**20:,.1f} MiB</td><td>{_fmt(c['tokens'], ',')}</td>"
                         f"<td>{_fmt(c['world_size'])}</td><td class='name'>{when}</td></tr>")
        if not run.checkpoints:
            parts.append("<tr><td class='name' colspan='6'>no checkpoints</td></tr>")
        parts.append("</table>")
        parts.append("<details open><summary>config.yaml</summary>"
                     f"<pre>{html.escape(run.config_text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def serve(run_dirs: list[str], port: int, refresh_s: float) -> int:
    """`report --serve`: the report on http://127.0.0.1:PORT/ (this machine only; an SSH tunnel brings it
    elsewhere), rebuilt when a run's metrics.jsonl or state changes, the page reloading itself every
    refresh_s. Ctrl-C (SIGINT) stops it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if not run_dirs:
        raise UserError("report needs at least one RUN_DIR")
    if not 0 <= port <= 65535 or refresh_s <= 0:
        raise UserError(f"--port {port} --refresh {refresh_s:g}: the port must lie in 0..65535 (0: any free "
                        "one) and the refresh be a positive number of seconds")
    def fingerprint():
        out = []
        for d in run_dirs:
            for p in (RunDir(d).metrics, RunDir(d).state):
                try:
                    st = p.stat()
                    out.append((st.st_size, st.st_mtime_ns))
                except OSError:
                    out.append(None)
        return tuple(out)

    # The first render now: a run that cannot be read fails here, in one line, not in the browser; it is also
    # the first request's page (the fingerprint is taken before, so a step written meanwhile rebuilds it).
    key = fingerprint()
    lock, cache = threading.Lock(), {"key": key, "page": render(run_dirs, refresh_s=refresh_s).encode()}

    def page() -> bytes:
        with lock:
            key = fingerprint()
            if key != cache["key"]:
                cache["page"], cache["key"] = render(run_dirs, refresh_s=refresh_s).encode(), key
            return cache["page"]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/index.html"):
                self.send_error(404)
                return
            try:
                body = page()
            except UserError as e:  # a run directory removed while serving
                self.send_error(500, str(e))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); pick another "
                        "port, or 0 for any free one") from None
    interruptible()
    print(f"serving the report of {len(run_dirs)} run(s) on http://127.0.0.1:{server.server_port}/ (rebuilt "
          f"when metrics.jsonl grows, the page reloads every {refresh_s:g} s); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("report server stopped", flush=True)
    return 0
