"""`edgekd export` and `edgekd quantize`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from edgekd.cli.common import AsJson, _guarded, err
from edgekd.export import export
from edgekd.quantize import quantize, result_dict

DataOpt = Annotated[Optional[str], typer.Option("--data", help="Dataset to check and calibrate on \\[default: the one in the run's config.json]")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="Output directory \\[default: <run>/export]")]


def _status(message: str) -> None:
    err.print(f"[bold]{message}[/]")


def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="edgekd checkpoint (e.g. runs/distill-x/best.pt)")],
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="onnx and/or tflite, repeatable \\[default: both]")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write a float16 TFLite file")] = False,
    data: DataOpt = None,
    out: OutDir = None,
    as_json: AsJson = False,
) -> None:
    """Export a checkpoint to ONNX and TFLite (fp32), each checked against PyTorch on real images.

    Exported models take [0, 1] pixels (RGB, or grayscale for 1-channel data) and normalize inside; ONNX is NCHW, TFLite is NHWC. A .json file beside each model records its preprocessing and check.

    Example: edgekd export runs/distill-edge_resnet_s/best.pt -f onnx -f tflite
    """

    result = _guarded(lambda: export(checkpoint, tuple(fmt or ("onnx", "tflite")), out_dir=out, data=data, fp16=fp16,
                                     on_step=_status))
    table = Table(title=f"edgekd export: {checkpoint}")
    for col in ("file", "runtime", "precision", "layout", "size", "max |diff| vs PyTorch", "top-1 agreement"):
        table.add_column(col, justify="right" if col in ("size", "max |diff| vs PyTorch", "top-1 agreement") else "left")
    for a in result.artifacts:
        table.add_row(str(a.path), a.runtime, a.precision, a.layout, f"{a.size_bytes / 1024:,.1f} KiB",
                      f"{a.max_abs_diff:.2e}", f"{a.top1_agreement:.1f}% of {a.samples_checked}")
    err.print(table)
    if as_json:
        sys.stdout.write(json.dumps([a.to_dict() for a in result.artifacts], indent=2) + "\n")


def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="edgekd checkpoint, its run directory, or an .onnx edgekd exported (its .json sidecar names the checkpoint)")],
    data: DataOpt = None,
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="onnx and/or tflite \\[default: both]")] = None,
    calib_size: Annotated[int, typer.Option(help="Calibration images, class-stratified from the training split")] = 300,
    max_drop: Annotated[Optional[float], typer.Option(help="Fail (exit 2) when int8 top-1 drops more than this many points; files are kept, marked failed")] = None,
    io: Annotated[str, typer.Option("--io", help="TFLite input/output type: float32 (MediaPipe/Task Library), uint8 or int8")] = "float32",
    activation_type: Annotated[str, typer.Option(help="ONNX activations: auto (measure uint8 and int8 on this CPU, keep the faster), uint8, int8")] = "auto",
    target: Annotated[str, typer.Option("--target", help="CPU the int8 files will run on: arm (phones; full 8-bit weights), x86-vnni (full 8-bit), x86 (no VNNI: 7-bit ONNX weights); recorded in each sidecar")] = "arm",
    qat: Annotated[int, typer.Option("--qat", metavar="EPOCHS", help="Fine-tune this many epochs with fake int8 quantization first, taught by --teacher (quantization-aware training); 0: post-training only")] = 0,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher for --qat \\[default: the run's own teacher when its file exists, else the float model]")] = None,
    out: OutDir = None,
    as_json: AsJson = False,
) -> None:
    """Quantize to int8 (weights and activations) with a representative dataset, and prove it.

    Counts the quantized operators (fails if the model silently stayed float) and evaluates fp32 and int8 on the whole test split through their own runtimes.
    With --qat N the int8 files come from a copy fine-tuned N epochs with fake quantization (kept as model_qat.pt); the drop is still measured against the original fp32 model.

    Example: edgekd quantize runs/distill-edge_resnet_s/best.pt --max-drop 1.0

    Example: edgekd quantize runs/distill-edge_resnet_s/best.pt --max-drop 0.5 --qat 3
    """

    result = _guarded(lambda: quantize(model, data=data, formats=tuple(fmt or ("onnx", "tflite")), calib_size=calib_size,
                                       io=io, activation_type=activation_type, max_drop=max_drop, target=target, qat_epochs=qat,
                                       teacher=teacher, out_dir=out, on_step=_status))
    table = Table(title=f"edgekd quantize: checkpoint {result.checkpoint} (calibration: "
                        f"{len(result.calibration.indices)} images, sha256 {result.calibration.sha256[:12]})")
    for col in ("format", "int8 file", "size fp32 -> int8", "ratio", "int8 ops", "float ops", "MACs run in int8",
                "top-1 fp32", "top-1 int8", "drop"):
        table.add_column(col, justify="left" if col in ("format", "int8 file") else "right")
    for m in result.models:
        table.add_row(m.format, str(m.int8.path), f"{m.fp32.size_bytes / 1024:,.0f} -> {m.int8.size_bytes / 1024:,.0f} KiB",
                      f"{m.int8.size_bytes / m.fp32.size_bytes:.2f}x", str(m.quantized_ops), str(m.float_compute_ops),
                      "-" if m.int8_mac_share is None else f"{100 * m.int8_mac_share:.0f}%",
                      f"{m.fp32_test_acc:.2f}%", f"{m.int8_test_acc:.2f}%", f"{m.drop_pts:+.2f} pts")
    err.print(table)
    _print_choices(result)
    if as_json:
        sys.stdout.write(json.dumps(result_dict(result), indent=2) + "\n")
    if not result.passed:
        worst = max(result.models, key=lambda m: m.drop_pts)
        err.print(f"[bold red]error:[/] int8 {worst.format} lost {worst.drop_pts:.2f} points, more than --max-drop "
                  f"{max_drop}; files kept and marked failed", highlight=False)
        raise typer.Exit(2)


def _print_choices(result) -> None:
    """What quantize chose beyond the table: QAT, the activation type, a float fallback, target caveats."""
    if result.qat:
        q = result.qat
        err.print(f"qat: {q['epochs']} epoch{'s' if q['epochs'] != 1 else ''} taught by {q['teacher']}, "
                  f"weights in [-{q['weight_range']}, {q['weight_range']}]; validation (fake-quantized) {q['val_acc_before']:.2f}% -> "
                  f"{q['val_acc_after']:.2f}% (epoch {q['best_epoch']} kept), {q['seconds']:.0f} s", highlight=False)
    for m in result.models:
        err.print(f"{m.format}: {m.choice.get('why', '')}", highlight=False)
        if m.choice.get("converter_why"):  # TFLite: which converter, and the calibration, made the file
            err.print(f"{m.format}: {m.choice['converter']}: {m.choice['converter_why']}", highlight=False)
        fb = m.choice.get("float_fallback")
        if fb and fb["calibration"] != "min/max":
            err.print(f"{m.format}: activation ranges calibrated to the {fb['calibration'].split()[-1]}th percentile "
                      f"instead of min/max: validation drop {fb['val_drop_before']:.2f} -> {fb['val_drop_after']:.2f} "
                      "points, every layer int8", highlight=False)
        if fb and fb["float_layers"]:
            err.print(f"{m.format}: {len(fb['float_layers'])} of {fb['probed_layers']} layers kept in float "
                      f"({', '.join(fb['float_layers'])}): validation drop {fb['val_drop_before']:.2f} -> "
                      f"{fb['val_drop_after']:.2f} points, p50 {fb['p50_ms_all_int8']:.3f} -> "
                      f"{fb['p50_ms_with_float_layers']:.3f} ms", highlight=False)
        elif fb and fb.get("why"):
            err.print(f"{m.format}: {fb['why']} ({fb['probed_layers']} layers probed)", highlight=False)
        if m.choice.get("caveat"):
            err.print(f"[yellow]warning:[/] {m.format}: {m.choice['caveat']}", highlight=False)


COMMANDS = {"export": export_cmd, "quantize": quantize_cmd}  # name -> command, registered by edgekd.cli
