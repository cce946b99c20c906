"""Rich tables for the terminal; rendering only, no computation."""

from __future__ import annotations

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
