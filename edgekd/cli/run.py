"""`edgekd run` and `edgekd models`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd.cli.common import AsJson, _Bars, _guarded, _progress, app, err


@app.command("run")
def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="Pipeline TOML; the embedded default (digits) when omitted")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory; rerunning skips finished models and resumes the rest")] = Path("runs/default"),
    as_json: AsJson = False,
) -> None:
    """Run the whole experiment from one config: teachers, scratch student, KD from the best teacher and from all.

    Interrupted runs continue where they stopped when the same command is run again.
    """
    from edgekd.pipeline import load_pipeline_config, run_pipeline
    from edgekd.report import deploy_table, pipeline_table

    cfg = _guarded(lambda: load_pipeline_config(config))
    with _progress() as progress:
        bars = _Bars(progress)

        def stage(msg: str) -> None:
            bars.reset()
            progress.console.print(f"[bold]{msg}[/]")

        result = _guarded(lambda: run_pipeline(cfg, out, on_stage=stage, on_step=bars))
    err.print(pipeline_table(result.rows))
    if result.deployed:
        err.print(deploy_table(result.deployed))
    if as_json:
        sys.stdout.write(json.dumps({"models": [r.__dict__ for r in result.rows], "deployed": result.deployed}, indent=2) + "\n")


@app.command("models")
def models_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob filter, e.g. 'seed*' or 'torchvision:mobilenet*'")] = "*",
) -> None:
    """List the architectures edgekd can build (its own, the seeds', and torchvision's)."""
    from edgekd.zoo import ARCHS, list_architectures

    for name in list_architectures(pattern):
        doc = (ARCHS.get(name).__doc__ or "").strip().splitlines()[0] if name in ARCHS else "torchvision, new head"
        typer.echo(f"{name:32s} {doc}")
