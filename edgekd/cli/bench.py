"""`edgekd bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from edgekd.cli.common import AsJson, _guarded, _progress, err
import edgekd.rundir as rundir
from edgekd.bench import bench
from edgekd.report import bench_table, write_bench_report


def bench_cmd(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints (.pt), .onnx and .tflite files, or run directories")],
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset whose test split is used \\[default: the one in the models' run config]")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Reference model for the deltas \\[default: a run's best teacher]")] = None,
    threads: Annotated[int, typer.Option(help="Runtime threads, fixed for every model (1 keeps batch-1 tails short on small CPUs)")] = 1,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput column")] = 32,
    runs: Annotated[int, typer.Option("--runs", help="Minimum timed batch-1 runs per model")] = 50,
    min_seconds: Annotated[float, typer.Option(help="Minimum timed seconds per model")] = 1.0,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs before timing")] = 10,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for bench.json, bench.md, PNG plots and report.html \\[default: <run>/bench, or ./bench]")] = None,
    as_json: AsJson = False,
) -> None:
    """Size, latency and accuracy of every model against the teacher, each through its own runtime.

    Accuracy (top-1, top-5, per class, confusion matrix, agreement with the teacher) is measured on the whole test split; latency is p50/p90/p99/mean/std of single-image runs after warm-up. Writes a JSON file (schema edgekd.bench/1), a Markdown table, PNG plots and a self-contained HTML report. Models that cannot be benchmarked are reported as failed; the command then exits 1.

    Example: edgekd bench runs/default            (everything a run produced)
    Example: edgekd bench teacher.pt model_int8.tflite model.onnx --teacher teacher.pt --data digits
    """

    folder = out or (rundir.bench_dir(models[0]) if models and models[0].is_dir() else Path("bench"))
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=None, info="")

        def on_step(stage, done, total, info):
            progress.update(task, completed=done, total=total, info=info.get("name", ""))

        report = _guarded(lambda: bench(models, data=data, teacher=teacher, threads=threads, batch=batch, min_runs=runs,
                                        min_seconds=min_seconds, warmup=warmup, on_step=on_step))
    files = _guarded(lambda: write_bench_report(report, folder))
    err.print(bench_table(report))
    for r in report.rows:
        for w in r.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    err.print(f"report: {files['html']}  (also {files['json'].name}, {files['markdown'].name} and "
              f"{len(files) - 3} plots in {folder})", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    for r in report.failed:
        err.print(f"[bold red]error:[/] {escape(r.name)}: {escape(r.error or '')}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


COMMANDS = {"bench": bench_cmd}  # name -> command, registered by edgekd.cli
