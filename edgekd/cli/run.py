"""`edgekd run` and `edgekd models`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from edgekd.cli.common import AsJson, _Bars, _guarded, _progress, err
import edgekd.rundir as rundir
from edgekd.pipeline import run
from edgekd.report import comparison_table, deploy_table, kd_gain_lines, pipeline_table
from edgekd.zoo import ARCHS, list_architectures


def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="Pipeline TOML; the embedded default (digits) when omitted")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory (new or empty unless --resume)")] = Path("runs/default"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out: skip finished stages whose config is unchanged, resume an interrupted training from its last epoch")] = False,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override one config key, e.g. --set student_recipe.epochs=3 (repeatable)")] = None,
    as_json: AsJson = False,
) -> None:
    """Run the whole experiment from one config: teachers, scratch student, KD from the best teacher and from all, int8 ONNX/TFLite of the best student, a benchmark report and an app bundle.

    An interrupted run (even a killed process) continues where it stopped when the same command is run again with --resume: finished models are skipped, an interrupted one resumes from its last epoch. Writes <out>/bench/report.html, <out>/bundle/ and <out>/manifest.json.

    Example: edgekd run    (the embedded default: digits, about 1.5 minutes)
    Example: edgekd run --resume    (after an interruption, or to redo only what a config change touched)
    Example: edgekd run configs/seed002_cifar10.toml --out runs/seed002 --set student_recipe.epochs=3
    """

    with _progress() as progress:
        bars = _Bars(progress)

        def stage(msg: str) -> None:
            bars.reset()
            progress.console.print(f"[bold]{msg}[/]")

        result = _guarded(lambda: run(config, out, overrides=tuple(overrides or ()), resume=resume, on_stage=stage,
                                       on_step=bars))
    err.print(pipeline_table(result.rows))
    for line in kd_gain_lines(result.kd_gain):
        err.print(line, highlight=False)
    if result.deployed:
        err.print(deploy_table(result.deployed))
    if result.bench is not None:
        err.print(comparison_table(result.bench))
        for r in result.bench.rows:
            for w in r.warnings:
                err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        err.print(f"report: {rundir.report_html(out)}", highlight=False)
    if result.bundle is not None:
        state = "verified" if result.bundle.passed else "FAILED its checks"
        err.print(f"bundle: {result.bundle.out_dir} ({state}: "
                  + ", ".join(f"{c.name} {'ok' if c.ok else 'FAILED'}" for c in result.bundle.checks) + ")", highlight=False)
    _print_qat(result.deployed)
    err.print(f"manifest: {rundir.manifest_file(out)}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps({"models": [r.__dict__ for r in result.rows], "kd_gain": result.kd_gain,
                                     "deployed": result.deployed,
                                     "bench": result.bench.to_dict() if result.bench else None}, indent=2) + "\n")
    if result.deployed and not result.deployed["passed"]:
        worst = max(result.deployed["models"], key=lambda m: m["drop_pts"])
        err.print(f"[bold red]error:[/] int8 {worst['format']} lost {worst['drop_pts']:.2f} top-1 points, more than "
                  f"deploy.max_drop {result.deployed['max_drop_pts']}; not packaged (files kept in {out / 'deploy'}, "
                  "marked failed). Raise deploy.max_drop or deploy.qat_epochs, or keep the fp32 files", highlight=False)
        raise typer.Exit(2)
    if result.bundle is not None and not result.bundle.passed:
        raise typer.Exit(1)


def _print_qat(deployed: dict | None) -> None:
    """Say so when the int8 files come from quantization-aware fine-tuning, and why."""
    if not deployed or not deployed.get("qat"):
        return
    q, first = deployed["qat"], deployed["post_training"]
    worst = max(first["models"], key=lambda m: m["drop_pts"])
    err.print(f"int8: post-training {worst['format']} lost {worst['drop_pts']:.2f} points, over deploy.max_drop; "
              f"the int8 files come from {q['epochs']} epochs of quantization-aware fine-tuning taught by "
              f"{q['teacher']} (deploy/model_qat.pt)", highlight=False)


def models_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob filter, e.g. 'seed*' or 'torchvision:mobilenet*'")] = "*",
) -> None:
    """List the architectures edgekd can build (its own, the seeds', and torchvision's)."""

    for name in list_architectures(pattern):
        doc = ((ARCHS.get(name).__doc__ or "").strip().splitlines()[0] if name in ARCHS
               else f"{name.split(':')[0]}, new head")
        typer.echo(f"{name:32s} {doc}")


COMMANDS = {"run": run_cmd, "models": models_cmd}  # name -> command, registered by edgekd.cli
