"""Stage 2: an edgekd checkpoint becomes ONNX and TFLite files, each checked against PyTorch.

The file holds the deployable network (``edgekd.deployable``: RGB [0, 1] pixels in, the
normalization inside), converted by ``edgekd.convert``. Each file is written under a temporary
name, run on real images through its own runtime (``edgekd.runtime``), compared with PyTorch,
and only then renamed into place with a ``.json`` sidecar describing its input.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd.checkpoint import load_model
from edgekd.convert import litert_torch_installed, onnx_to_tflite, recorded_exporter, to_onnx, torch_to_tflite
from edgekd.data import ImageData, load_data
from edgekd.deployable import Deployable, deploy_net, model_input, preprocessing, rgb
from edgekd.errors import EdgeKDError
from edgekd.files import Journal, staged_output
from edgekd.runtime import nhwc, run_onnx, TFLiteRunner
import edgekd.rundir as rundir

FORMATS = ("onnx", "tflite")


@dataclass(frozen=True)
class Artifact:
    """One model file and how it was checked."""

    path: Path
    format: str  # onnx, tflite
    precision: str  # fp32, fp16, int8
    runtime: str  # onnxruntime, litert
    size_bytes: int
    layout: str  # NCHW or NHWC
    input_dtype: str
    max_abs_diff: float  # largest |logit - PyTorch logit| over the checked samples
    top1_agreement: float  # share of checked samples with PyTorch's top-1, in percent
    samples_checked: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}, "path": str(self.path), **self.extra}


@dataclass(frozen=True)
class ExportResult:
    checkpoint: Path
    artifacts: tuple[Artifact, ...]


def resolve_data(checkpoint: Path, data: str | ImageData | None) -> ImageData:
    """The dataset to check against: given, or the one recorded in the run's config.json."""
    if isinstance(data, ImageData):
        return data
    if data:
        return load_data(data)
    recorded = rundir.recorded_config(checkpoint)
    if recorded:
        d = recorded["data"]
        return load_data(d["dataset"], data_dir=d["data_dir"], val_fraction=d["val_fraction"],
                         test_fraction=d["test_fraction"], image_size=d["image_size"], seed=d["split_seed"])
    raise EdgeKDError(f"no dataset recorded beside {checkpoint}; pass --data SPEC with the images it was trained on")


def export(
    checkpoint: str | Path,
    formats: tuple[str, ...] = FORMATS,
    *,
    out_dir: str | Path | None = None,
    data: str | ImageData | None = None,
    fp16: bool = False,
    samples: int = 256,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX and/or TFLite and check every file against PyTorch.

    Example (``runs/student`` from ``edgekd.distill``'s example):
        >>> from edgekd import export
        >>> res = export("runs/student/best.pt", ("onnx",))  # writes runs/student/export/model.onnx
        >>> [(a.path.name, a.runtime, a.top1_agreement) for a in res.artifacts]
        [('model.onnx', 'onnxruntime', 100.0)]
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise EdgeKDError(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    model, meta = load_model(checkpoint)
    data = resolve_data(checkpoint, data)
    if list(data.classes) != list(meta["classes"]):
        raise EdgeKDError(f"{checkpoint} was trained on classes {meta['classes']}, the data has {list(data.classes)}")
    out = Path(out_dir) if out_dir else rundir.export_dir(checkpoint)
    net, how = deploy_net(model, meta)
    meta = {**meta, "normalization": how}
    x = model_input(meta, check_samples(data, samples))
    with torch.no_grad():
        reference = Deployable(model, meta["mean"], meta["std"]).eval()(x).numpy()
    x = rgb(x)
    with staged_output(out, "export") as (tmp, journal):
        checked = _export_checked(net, x, reference, formats, fp16, tmp, how, on_step)
        artifacts = [place_checked(art, out / name, meta, checkpoint, journal) for name, art in checked]
    return ExportResult(checkpoint, tuple(artifacts))


def _export_checked(net, x, reference, formats, fp16, tmp, how, on_step) -> list[tuple[str, Artifact]]:
    """Every requested file written and checked inside ``tmp``, with the name it will have."""
    step = on_step or (lambda _msg: None)
    step(f"onnx: exporting (normalization {how}) and checking with onnxruntime")
    onnx_art = check_onnx(to_onnx(net, x, tmp / "model.onnx"), x, reference, "fp32")
    checked = [("model.onnx", onnx_art)] if "onnx" in formats else []
    if "tflite" in formats:
        checked += _tflite_checked(net, x, reference, fp16, tmp, step)
    return checked


def _tflite_checked(net, x, reference, fp16, tmp, step) -> list[tuple[str, Artifact]]:
    """TFLite through onnx2tf; where onnx2tf fails and litert-torch is installed, fp32 through litert-torch
    (which makes no fp16 file). Each file's sidecar names its converter, and why."""
    step("tflite: converting with onnx2tf and checking with LiteRT")
    try:
        files = onnx_to_tflite(to_onnx(net, x, tmp / "model_b1.onnx", dynamic_batch=False), tmp / "tf")
    except EdgeKDError as exc:
        if not litert_torch_installed():
            raise
        step(f"tflite: {exc}; converting with litert-torch instead" + (" (fp32 only: it makes no fp16 file)" if fp16 else ""))
        try:
            art = check_tflite(torch_to_tflite(net, x, tmp / "model_litert.tflite"), x, reference, "fp32")
        except EdgeKDError as fallback:
            raise EdgeKDError(f"{exc}; the litert-torch fallback too: {fallback}") from None
        why = f"onnx2tf failed: {exc}" + ("; litert-torch makes no fp16 file" if fp16 else "")
        return [("model_fp32.tflite", _converted_by(art, "litert-torch", why))]
    wanted = [("fp32", files["float32"])] + ([("fp16", files["float16"])] if fp16 else [])
    return [(f"model_{p}.tflite", _converted_by(check_tflite(path, x, reference, p), "onnx2tf", "tried first"))
            for p, path in wanted]


def _converted_by(art: Artifact, converter: str, why: str) -> Artifact:
    return dataclasses.replace(art, extra={**art.extra, "converter": converter, "converter_why": why})


def check_samples(data: ImageData, n: int) -> torch.Tensor:
    """``n`` test images taken at an even stride over the whole test split (real pixels, not noise)."""
    step = max(1, len(data.test_y) // max(1, n))
    return data.test_x[::step][:n]


def _compare(out: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(out.astype(np.float64) - reference).max())
    agree = float((out.argmax(1) == reference.argmax(1)).mean() * 100.0)
    return diff, agree


def check_onnx(path: Path, x: torch.Tensor, reference: np.ndarray, precision: str) -> Artifact:
    out = run_onnx(path, x.numpy())
    diff, agree = _compare(out, reference)
    if precision == "fp32" and agree < 100.0:
        raise EdgeKDError(f"ONNX model disagrees with PyTorch on top-1 for {100 - agree:.1f}% of samples (max |diff| {diff:.2e})")
    return Artifact(path, "onnx", precision, "onnxruntime", path.stat().st_size, "NCHW", "float32", diff, agree, len(x),
                    recorded_exporter(path) if precision == "fp32" else {})


def check_tflite(path: Path, x: torch.Tensor, reference: np.ndarray, precision: str) -> Artifact:
    runner = TFLiteRunner(path)
    out = runner(nhwc(x))
    diff, agree = _compare(out, reference)
    if precision in ("fp32", "fp16") and agree < (100.0 if precision == "fp32" else 99.0):
        raise EdgeKDError(f"TFLite {precision} model disagrees with PyTorch on top-1 for {100 - agree:.1f}% of samples")
    return Artifact(path, "tflite", precision, "litert", path.stat().st_size, "NHWC", runner.input_dtype, diff, agree,
                    len(x), {"quantization": runner.quantization()})


def place_checked(art: Artifact, dest: Path, meta: dict, source: Path, journal: Journal, status: str = "ok",
           extra: dict | None = None) -> Artifact:
    """Move a checked file into place (atomic rename, recorded in ``journal``) and write its sidecar.

    The sidecar names the checkpoint the file came from, relative to the file's folder, so a
    run directory can be moved and still be traced."""
    journal.put(dest, lambda tmp: os.replace(art.path, tmp))
    placed = Artifact(**{**art.__dict__, "path": dest})
    sidecar = {**placed.to_dict(), "status": status, "source_checkpoint": os.path.relpath(source, dest.parent),
               "preprocessing": preprocessing(meta, art.layout), **(extra or {})}
    journal.put(dest.with_name(dest.name + ".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    return placed
