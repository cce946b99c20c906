"""Rich tables for the terminal; rendering only, no computation."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.2f}%"


def train_table(result) -> Table:
    """One training run: params, best validation and test accuracy, time, throughput."""
    table = Table(title=f"edgekd: {result.arch} -> {result.out_dir}")
    for col in ("params", "best val acc", "test acc", "best epoch", "time", "images/s", "device"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.params:,}", _pct(result.best_val_acc), _pct(result.test_acc),
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


def deploy_table(deployed: dict) -> Table:
    """fp32 and int8 files of the deployed student, each measured through its own runtime."""
    folder = Path(deployed["models"][0]["int8"]["path"]).parent if deployed["models"] else ""
    table = Table(title=f"deployable files of student {deployed['student']} in {folder} (top-1 on the test split, own runtime)")
    for col in ("file", "runtime", "precision", "size", "top-1", "int8 ops", "size ratio", "drop"):
        table.add_column(col, justify="left" if col in ("file", "runtime", "precision") else "right")
    for m in deployed["models"]:
        fp32, int8 = m["fp32"], m["int8"]
        table.add_row(Path(fp32["path"]).name, fp32["runtime"], "fp32", f"{fp32['size_bytes'] / 1024:,.1f} KiB",
                      _pct(m["fp32_test_acc"]), "-", "-", "-")
        table.add_row(Path(int8["path"]).name, int8["runtime"], "int8", f"{int8['size_bytes'] / 1024:,.1f} KiB",
                      _pct(m["int8_test_acc"]), str(m["quantized_ops"]), f"{m['size_ratio']:.2f}x",
                      f"{m['drop_pts']:+.2f} pts")
    return table
