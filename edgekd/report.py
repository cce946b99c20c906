"""Rich tables for the terminal; rendering only, no computation."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from edgekd.files import atomic_write_bytes, atomic_write_json, atomic_write_text, clean_stale_temps


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.2f}%"


def train_table(result) -> Table:
    """One training run: params, best validation and test accuracy, time, throughput."""
    table = Table(title=f"edgekd: {result.arch} -> {result.out_dir}")
    for col in ("params", "best val acc", "test acc", "best epoch", "time", "images/s", "device"):
        table.add_column(col, justify="right")
    tta = getattr(result, "test_acc_flip_tta", None)
    test = _pct(result.test_acc) + (f" ({_pct(tta)} with flip TTA)" if tta is not None else "")
    table.add_row(f"{result.params:,}", _pct(result.best_val_acc), test,
                  f"{result.best_epoch}/{result.epochs}", f"{result.train_s:.1f} s", f"{result.images_per_s:,.0f}",
                  result.device)
    return table


def teacher_table(reports) -> Table:
    table = Table(title="teachers (checked on the validation split)")
    for col in ("teacher", "format", "val acc", "outputs"):
        table.add_column(col)
    for t in reports:
        table.add_row(t.name, t.kind, _pct(t.val_acc), "probabilities (log taken)" if t.outputs_probabilities else "logits")
    return table


def pipeline_table(rows) -> Table:
    """The seeds' comparison table: every model of a run, by test accuracy, with size ratios."""
    teachers = [r for r in rows if r.role == "teacher"]
    ref = max(teachers, key=lambda r: r.test_acc) if teachers else None
    table = Table(title="edgekd run: all models, by test accuracy")
    for col in ("model", "role", "arch", "params", "val acc", "test acc", "vs teacher", "reduction", "ratio", "time"):
        table.add_column(col, justify="right" if col not in ("model", "role", "arch") else "left")
    for r in sorted(rows, key=lambda r: -r.test_acc):
        delta = f"{r.test_acc - ref.test_acc:+.2f} pts" if ref else "-"
        reduction = f"{100 * (1 - r.params / ref.params):.1f}%" if ref else "-"
        ratio = f"{ref.params / r.params:.2f}x" if ref else "-"
        table.add_row(r.name, r.role, r.arch, f"{r.params:,}", _pct(r.val_acc), _pct(r.test_acc), delta,
                      reduction, ratio, f"{r.train_s:.1f} s")
    return table


def kd_gain_lines(gains: dict) -> list[str]:
    """Plain words on what distillation did against its fair control (test top-1, points)."""
    lines = []
    for name, g in gains.items():
        n = len(g["per_seed"])
        spread = f" +- {g['sd']:.2f}" if g["sd"] is not None else ""
        seeds = ", ".join(f"{v:+.2f}" for v in g["per_seed"])
        verdict = ("beat its matched scratch twin on every seed" if min(g["per_seed"]) > 0 else
                   "did not beat its matched scratch twin on every seed" if g["mean"] > 0 else
                   "did NOT help: the matched scratch twin did as well or better")
        lines.append(f"{name}: KD gain over matched scratch {g['mean']:+.2f}{spread} points over {n} seed"
                     f"{'s' if n > 1 else ''} ({seeds}); distillation {verdict}")
    return lines


def deploy_table(deployed: dict) -> Table:
    """fp32 and int8 files of the deployed student, each measured through its own runtime."""
    folder = Path(deployed["models"][0]["int8"]["path"]).parent if deployed["models"] else ""
    table = Table(title=f"deployable files of student {deployed['student']} in {folder} (top-1 on the test split, own runtime)")
    for col in ("file", "runtime", "precision", "size", "top-1", "int8 ops", "size ratio", "top-1 change"):
        table.add_column(col, justify="left" if col in ("file", "runtime", "precision") else "right")
    for m in deployed["models"]:
        fp32, int8 = m["fp32"], m["int8"]
        table.add_row(Path(fp32["path"]).name, fp32["runtime"], "fp32", f"{fp32['size_bytes'] / 1024:,.1f} KiB",
                      _pct(m["fp32_test_acc"]), "-", "-", "-")
        table.add_row(Path(int8["path"]).name, int8["runtime"], "int8", f"{int8['size_bytes'] / 1024:,.1f} KiB",
                      _pct(m["int8_test_acc"]), str(m["quantized_ops"]), f"{m['size_ratio']:.2f}x",
                      f"{-m['drop_pts']:+.2f} pts")
    return table


# ---------------------------------------------------------------------------------------------
# edgekd bench: terminal table, Markdown, PNG plots and one self-contained HTML report.

BENCH_COLUMNS = ("model", "role", "format", "precision", "status", "size", "params", "MMACs", "top-1", "top-5",
                 "agree", "p50 ms", "p90 ms", "p99 ms", "img/s", "vs teacher", "speed-up", "size -%", "vs fp32")


def _num(x, fmt: str, none: str = "-") -> str:
    return none if x is None or x != x else format(x, fmt)


def bench_cells(r) -> list[str]:
    """One row of the bench table as strings (shared by the terminal, Markdown and HTML)."""
    if r.status != "ok":
        return [r.name, r.role, r.format or "-", r.precision or "-", "failed"] + ["-"] * (len(BENCH_COLUMNS) - 5)
    t, f, lat = r.vs_teacher, r.vs_fp32, r.latency
    return [r.name, r.role, r.format, r.precision, "ok", f"{r.size_bytes / 1024:,.1f} KiB", _num(r.params, ","),
            _num(None if r.macs is None else r.macs / 1e6, ".2f"), _num(r.top1, ".2f"), _num(r.top5, ".2f"),
            _num(r.agreement, ".1f"), f"{lat.p50_ms:.3f}", f"{lat.p90_ms:.3f}", f"{lat.p99_ms:.3f}",
            f"{r.throughput_ips:,.0f}", "-" if t is None else f"{t.acc_pts:+.2f} pts",
            "-" if t is None or t.speedup is None else f"{t.speedup:.2f}x",
            "-" if t is None else f"{t.size_reduction_pct:.1f}%",
            "-" if f is None else f"{f.acc_pts:+.2f} pts, {f.speedup:.2f}x, {f.compression:.2f}x smaller"]


def bench_table(report) -> Table:
    """The terminal view: fewer, combined columns than the Markdown table so it fits 140 characters."""
    s = report.settings
    table = Table(title=f"edgekd bench: {report.data['name']} test split ({report.data['test_images']:,} images), "
                        f"batch 1 on {s['threads']} thread(s), img/s at batch {s['batch']}",
                  caption="agree: % of test images with the teacher's top-1; vs teacher: accuracy points, speed-up "
                          "(p50; '-' when the teacher ran in another runtime), size change; vs fp32: the same-format "
                          "fp32 file (or source checkpoint)")
    for col in ("model", "runtime", "size", "top-1", "agree", "p50 ms", "p99 ms", "img/s", "vs teacher", "vs fp32"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right", no_wrap=True)
    for r in report.rows:
        if r.status != "ok":
            table.add_row(r.name, "failed", *["-"] * 8, style="red")
            continue
        t, f, lat = r.vs_teacher, r.vs_fp32, r.latency
        table.add_row(
            r.name, f"{r.format} {r.precision}", f"{r.size_bytes / 1024:,.1f} KiB", _num(r.top1, ".2f"),
            _num(r.agreement, ".1f"), f"{lat.p50_ms:.3f}", f"{lat.p99_ms:.3f}", f"{r.throughput_ips:,.0f}",
            "-" if t is None else f"{t.acc_pts:+.2f} {_num(t.speedup, '.1f')}x {-t.size_reduction_pct:+.0f}%",
            "-" if f is None else f"{f.acc_pts:+.2f} {f.speedup:.2f}x",
            style="bold" if r.name == report.teacher else None)
    return table


def bench_markdown(report) -> str:
    s, env = report.settings, report.env
    lines = [f"# edgekd bench: {report.data['name']}", "",
             f"Test split: {report.data['test_images']:,} images, {len(report.data['classes'])} classes. "
             f"Latency: batch 1, {s['threads']} thread(s), {s['warmup']} warm-up runs, then at least {s['min_runs']} runs "
             f"and {s['min_seconds']} s; throughput at batch {s['batch']}. Reference teacher: {report.teacher or 'none'}.",
             f"CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}); "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "| " + " | ".join(BENCH_COLUMNS) + " |", "|" + "---|" * len(BENCH_COLUMNS)]
    lines += ["| " + " | ".join(bench_cells(r)) + " |" for r in report.rows]
    notes = [f"- failed: {r.name}: {r.error}" for r in report.failed] + [f"- warning: {w}" for r in report.rows for w in r.warnings]
    notes += [f"- {r.name}: {r.init}" for r in report.rows if r.init]
    gaps = training_gaps(report)
    if gaps:
        lines += ["", "Training (train accuracy is measured on augmented batches during the epoch):", "",
                  "| " + " | ".join(GAP_COLUMNS) + " |", "|" + "---|" * len(GAP_COLUMNS)]
        lines += ["| " + " | ".join(g) + " |" for g in gaps]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


GAP_COLUMNS = ("model", "epochs", "best epoch", "train acc", "val acc", "gap (train - val)")


def training_gaps(report) -> list[tuple[str, ...]]:
    """Per trained model, at its best-validation epoch: train and validation accuracy and their gap
    (seed 001's over-fitting check; a large positive gap means the model memorises its training set)."""
    rows = []
    for name, hist in report.histories.items():
        best = max(hist, key=lambda h: h["val_acc"])
        rows.append((name, str(len(hist)), str(best["epoch"]), f"{best['train_acc']:.2f}%", f"{best['val_acc']:.2f}%",
                     f"{best['train_acc'] - best['val_acc']:+.2f} pts"))
    return rows


def plot_series(report) -> dict:
    """The numbers every plot draws (also written as plots.json, so plots can be checked and redrawn)."""
    ok = [r for r in report.rows if r.status == "ok"]
    pair = [r for r in (report.row(report.teacher), report.row(report.focus)) if r is not None and r.status == "ok"]
    return {
        "accuracy": [{"model": r.name, "top1": r.top1} for r in ok],
        "tradeoff": [{"model": r.name, "p50_ms": r.latency.p50_ms, "top1": r.top1, "size_bytes": r.size_bytes} for r in ok],
        "confusion": [{"model": r.name, "matrix": [list(row) for row in r.confusion]} for r in pair],
        "per_class": [{"model": r.name, "accuracy": list(r.per_class)} for r in pair],
        "curves": {name: {"epoch": [h["epoch"] for h in hist], "train_acc": [h["train_acc"] for h in hist],
                          "val_acc": [h["val_acc"] for h in hist]} for name, hist in report.histories.items()},
    }


def bench_plots(report, folder: Path) -> dict[str, Path]:
    """Write the PNG plots and plots.json; returns section name -> file. Drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in report.rows if r.status == "ok"]
    if not ok:
        return {}
    series = plot_series(report)
    atomic_write_json(folder / "plots.json", series)
    colors = ["#444444" if r.name == report.teacher else ("#2a9d8f" if r.precision == "int8" else "#457b9d") for r in ok]
    files = {"accuracy": _accuracy_plot(ok, series, colors, folder / "accuracy.png"),
             "tradeoff": _tradeoff_plot(ok, series, colors, folder / "tradeoff.png")}
    pair = [r for r in (report.row(report.teacher), report.row(report.focus)) if r is not None and r.status == "ok"]
    if pair:
        classes = report.data["classes"]
        files["confusion"] = _confusion_plot(pair, series, classes, folder / "confusion.png")
        files["per_class"] = _per_class_plot(pair, series, classes, folder / "per_class.png")
    if report.histories:
        files["curves"] = _curves_plot(series, folder / "curves.png")
    return files


def _accuracy_plot(ok, series, colors, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4))
    ax.bar(range(len(ok)), [e["top1"] for e in series["accuracy"]], color=colors)
    for i, r in enumerate(ok):
        ax.text(i, r.top1, f"{r.top1:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ok)), [r.name for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(max(0, min(r.top1 for r in ok) - 10), 100)
    ax.set_ylabel("top-1 on the test split (%)")
    ax.set_title("accuracy of every variant (dark: teacher, green: int8)")
    return _save(fig, path)


def _tradeoff_plot(ok, series, colors, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = np.array([e["size_bytes"] for e in series["tradeoff"]], dtype=float)
    area = 40 + 400 * sizes / sizes.max()
    ax.scatter([e["p50_ms"] for e in series["tradeoff"]], [e["top1"] for e in series["tradeoff"]], s=area, c=colors,
               alpha=0.8)
    for r in ok:
        ax.annotate(f"{r.name}\n{r.size_bytes / 1024:,.0f} KiB", (r.latency.p50_ms, r.top1), fontsize=7,
                    xytext=(5, 5), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("size (marker area), latency and accuracy")
    return _save(fig, path)


def _confusion_plot(pair, series, classes, path: Path) -> Path:
    """Confusion matrices of the teacher and the focus model, and their difference when both are there."""
    import matplotlib.pyplot as plt
    import numpy as np

    panels = len(pair) + (len(pair) == 2)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.8))
    axes = np.atleast_1d(axes)
    mats = [np.array(entry["matrix"]) for entry in series["confusion"]]
    for ax, r, m in zip(axes, pair, mats):
        im = ax.imshow(m, cmap="Blues")
        ax.set_title(f"{r.name}\n(rows: true class)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if len(pair) == 2:
        diff = mats[1] - mats[0]
        lim = max(1, np.abs(diff).max())
        im = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[2].set_title(f"{pair[1].name} minus {pair[0].name}", fontsize=9)
        fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
        ax.set_xlabel("predicted")
    return _save(fig, path)


def _per_class_plot(pair, series, classes, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) + 2), 4))
    width = 0.8 / len(pair)
    for i, entry in enumerate(series["per_class"]):
        acc = [np.nan if v is None else v for v in entry["accuracy"]]
        ax.bar(np.arange(len(classes)) + i * width, acc, width, label=entry["model"])
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per-class accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _curves_plot(series, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, curve) in enumerate(series["curves"].items()):
        c = f"C{i % 10}"
        ax.plot(curve["epoch"], curve["train_acc"], "--", color=c, label=f"{name} train")
        ax.plot(curve["epoch"], curve["val_acc"], "-", color=c, label=f"{name} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("training curves: train (dashed) vs validation (solid)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt


    fig.tight_layout()
    try:
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


HTML_SECTIONS = ("summary", "table", "accuracy", "tradeoff", "confusion", "per_class", "curves", "environment")


def bench_html(report, plots: dict[str, Path]) -> str:
    """One self-contained page: every plot embedded as base64, no external files or scripts."""
    import base64
    import html
    import json as _json

    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in BENCH_COLUMNS)
    body = "".join("<tr class='{}'>{}</tr>".format("failed" if r.status != "ok" else "",
                                                   "".join(f"<td>{esc(c)}</td>" for c in bench_cells(r)))
                   for r in report.rows)
    notes = "".join(f"<li class='failed'>failed: {esc(r.name)}: {esc(r.error or '')}</li>" for r in report.failed)
    notes += "".join(f"<li>warning: {esc(w)}</li>" for r in report.rows for w in r.warnings)
    notes += "".join(f"<li>{esc(r.name)}: {esc(r.init)}</li>" for r in report.rows if r.init)
    titles = {"accuracy": "Accuracy of every variant", "tradeoff": "Size, latency and accuracy",
              "confusion": "Confusion matrices: teacher, student, difference", "per_class": "Per-class accuracy",
              "curves": "Training curves"}
    figures = ""
    for key in ("accuracy", "tradeoff", "confusion", "per_class", "curves"):
        if key in plots:
            data = base64.b64encode(Path(plots[key]).read_bytes()).decode()
            figures += (f"<section id='{key}'><h2>{titles[key]}</h2>"
                        f"<img alt='{key}' src='data:image/png;base64,{data}'></section>")
    gaps = training_gaps(report)
    if gaps:
        figures += ("<section id='gap'><h2>Train-validation gap at the best epoch</h2><table><tr>"
                    + "".join(f"<th>{esc(c)}</th>" for c in GAP_COLUMNS) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in g) + "</tr>" for g in gaps)
                    + "</table></section>")
    s = report.settings
    summary = (f"{esc(report.data['name'])} test split, {report.data['test_images']:,} images, "
               f"{len(report.data['classes'])} classes; reference teacher: {esc(report.teacher or 'none')}; "
               f"latency at batch 1 with {s['threads']} thread(s), at least {s['min_runs']} runs and "
               f"{s['min_seconds']} s after {s['warmup']} warm-up runs; throughput at batch {s['batch']}.")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:nth-child(-n+5),th:nth-child(-n+5){text-align:left}tr.failed,li.failed{color:#b00020}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgekd bench: {esc(report.data['name'])}</title>"
            f"<style>{style}</style></head><body><h1>edgekd bench: {esc(report.data['name'])}</h1>"
            f"<section id='summary'><p>{summary}</p><ul>{notes}</ul></section>"
            f"<section id='table'><h2>Every model</h2><table><tr>{head}</tr>{body}</table></section>{figures}"
            f"<section id='environment'><h2>Environment</h2><pre>{esc(_json.dumps(report.env, indent=2))}</pre></section>"
            "</body></html>")


def write_bench_report(report, folder: Path) -> dict[str, Path]:
    """bench.json, bench.md, the PNG plots and report.html in ``folder``, each written atomically."""

    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    plots = bench_plots(report, folder)
    atomic_write_json(folder / "bench.json", report.to_dict())
    atomic_write_text(folder / "bench.md", bench_markdown(report))
    atomic_write_text(folder / "report.html", bench_html(report, plots))
    return {"json": folder / "bench.json", "markdown": folder / "bench.md", "html": folder / "report.html", **plots,
            **({"plots_json": folder / "plots.json"} if plots else {})}


def comparison_table(report) -> Table:
    """The seeds' comparison table for a whole run: every model and file, best top-1 first."""
    teacher = report.row(report.teacher)
    table = Table(title=f"edgekd run: every model the run produced, by test top-1 (reference: {report.teacher or 'none'})")
    for col in ("model", "role", "runtime", "params", "size", "top-1", "p50 ms", "size reduction", "compression",
                "speed-up"):
        table.add_column(col, justify="left" if col in ("model", "role", "runtime") else "right", no_wrap=True)
    ok = sorted((r for r in report.rows if r.status == "ok"), key=lambda r: -r.top1)
    for r in ok + [r for r in report.rows if r.status != "ok"]:
        if r.status != "ok":
            table.add_row(r.name, r.role, "failed", *["-"] * 7, style="red")
            continue
        t = r.vs_teacher
        table.add_row(r.name, r.role, f"{r.format} {r.precision}", _num(r.params, ","),
                      f"{r.size_bytes / 1024:,.1f} KiB", f"{r.top1:.2f}%", f"{r.latency.p50_ms:.3f}",
                      "-" if t is None else f"{t.size_reduction_pct:.1f}%", "-" if t is None else f"{t.compression:.2f}x",
                      "-" if t is None or t.speedup is None else f"{t.speedup:.1f}x",
                      style="bold" if teacher is not None and r.name == teacher.name else None)
    return table
