"""`edgekd package`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgekd.cli.common import AsJson, _guarded, err
from edgekd.package import package


def package_cmd(
    source: Annotated[Path, typer.Argument(help="A run directory (edgekd run or train/distill), a checkpoint, or a .tflite file")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder: new, empty, or a bundle edgekd wrote (only the files it lists are replaced)")] = Path("bundle"),
    precision: Annotated[str, typer.Option(help="int8 (default: int8 inside, float32 input) or fp32")] = "int8",
    labels: Annotated[Optional[Path], typer.Option(help="labels.txt, one class per line \\[default: the classes edgekd recorded]")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset for the verification and benchmark \\[default: the run's]")] = None,
    make_zip: Annotated[bool, typer.Option("--zip", help="Also write <out>.zip (never over a zip edgekd did not make)")] = False,
    as_json: AsJson = False,
) -> None:
    """Write a bundle a mobile app loads as is, then load it back to prove it.

    The bundle: model.tflite with metadata (normalization, labels) that MediaPipe's ImageClassifier runs with no preprocessing code, model.onnx / model_int8.onnx, labels.txt, model.json (input, output, quantization, measured accuracy and latency), MODEL_CARD.md, README.md with Kotlin and Swift snippets, SHA256SUMS. Verified through LiteRT, MediaPipe and onnxruntime on real test images before it is reported as done; exits 1 when a check fails.

    Example: edgekd package runs/default --out bundle --zip
    """

    result = _guarded(lambda: package(source, out_dir=out, precision=precision, labels=labels, data=data,
                                      make_zip=make_zip, on_step=lambda m: err.print(f"[bold]{m}[/]")))
    table = Table(title=f"edgekd package: {result.out_dir}")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for c in result.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAILED[/]", escape(c.detail))
    err.print(table)
    err.print(f"files: {', '.join(result.files)}" + (f"; zip: {result.zip_path}" if result.zip_path else ""),
              highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.description(), indent=2) + "\n")
    if not result.passed:
        failed = [c for c in result.checks if not c.ok]
        err.print(f"[bold red]error:[/] the bundle failed its own check: {failed[0].name}: {escape(failed[0].detail)}",
                  highlight=False)
        raise typer.Exit(1)


COMMANDS = {"package": package_cmd}  # name -> command, registered by edgekd.cli
