"""Stage 3: post-training static int8 quantization with a representative dataset, verified.

ONNX goes through onnxruntime's quantization tools (pre-processing, then QDQ with per-channel
weights); TFLite through onnx2tf's full-integer conversion. Both are calibrated on the same
class-stratified sample of the training split, with exactly the training preprocessing, and
both are then proven to be int8 (quantized operators counted) and evaluated on the full test
split through their own runtimes, next to their fp32 counterparts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import platform
import shutil
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd.checkpoint import load_model, save_checkpoint
from edgekd.files import read_json, staged_output
from edgekd.registry import Registry
from edgekd.timing import time_calls
from edgekd.data import Calibration, ImageData, calibration_sample
from edgekd.errors import EdgeKDError, first_line
from edgekd.convert import litert_torch_installed, onnx_to_tflite, to_onnx, torch_to_tflite, torch_to_tflite_int8
from edgekd.deployable import Deployable, deploy_net, model_input, rgb
from edgekd.export import Artifact, place_checked, check_onnx, check_samples, check_tflite, resolve_data
from edgekd.runtime import (count_tflite_ops, nhwc, onnx_int8_mac_share, onnx_session, run_onnx, TFLiteRunner,
                            tflite_int8_mac_share)
import edgekd.qat as qat
import edgekd.rundir as rundir
from edgekd.teachers import load_teacher

IO_TYPES = ("float32", "uint8", "int8")
QAT_CHECKPOINT = "model_qat.pt"  # the QAT-fine-tuned float checkpoint the int8 files were made from
FILE_NAMES = {"onnx": ("model.onnx", "model_int8.onnx"), "tflite": ("model_fp32.tflite", "model_int8.tflite")}
QUANTIZED_COMPUTE = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
# Where the int8 file will run decides its weight range, not the machine that quantizes it. x86 CPUs
# without VNNI multiply uint8 x int8 pairs into 16-bit sums (vpmaddubsw) that full-range weights can
# saturate, so they get 7-bit weights (onnxruntime's reduce_range); ARM's dot-product kernels and
# x86 VNNI (vpdpbusd) accumulate in 32 bits and keep all 8 bits. Phones are ARM: the default. On this
# project's VNNI CPU full-range weights lost nothing: seed 002's CIFAR-10 student 72.59% fp32, 72.72% int8
# ONNX (models/cifar10_seed002_student_kd/bench/bench.md).
TARGETS = {
    "arm": (False, "ARM phones: 32-bit dot-product accumulation, full 8-bit weights"),
    "x86-vnni": (False, "x86 with AVX512-VNNI or AVX-VNNI: 32-bit accumulation, full 8-bit weights"),
    "x86": (True, "x86 without VNNI: 16-bit intermediate sums saturate, 7-bit weights (reduce_range)"),
}


def host_target() -> str | None:
    """This CPU as a ``TARGETS`` name: arm, x86-vnni (AVX512-VNNI or AVX-VNNI in /proc/cpuinfo) or x86;
    None where it cannot be told."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm"
    if machine not in ("x86_64", "amd64"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "x86-vnni" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "x86"


@dataclass(frozen=True)
class QuantizedModel:
    format: str
    fp32: Artifact
    int8: Artifact
    fp32_test_acc: float
    int8_test_acc: float
    quantized_ops: int  # compute operators running in int8
    float_compute_ops: int  # compute operators left in float
    choice: dict = field(default_factory=dict)  # e.g. ONNX activation type and why
    # Share of the multiply-accumulates in int8: for ONNX, what onnxruntime's profiler says its kernels
    # ran; for TFLite, the operators LiteRT's interpreter holds on integer tensors (tflite_int8_mac_share).
    int8_mac_share: float | None = None

    @property
    def drop_pts(self) -> float:
        return self.fp32_test_acc - self.int8_test_acc


@dataclass(frozen=True)
class QuantizeResult:
    calibration: Calibration
    models: tuple[QuantizedModel, ...]
    max_drop: float | None
    checkpoint: Path | None = None  # the edgekd checkpoint that was quantized
    qat: dict | None = None  # edgekd.qat.QATReport.to_dict() when the int8 files come from QAT fine-tuning

    @property
    def passed(self) -> bool:
        return self.max_drop is None or all(m.drop_pts <= self.max_drop for m in self.models)


def quantize(
    model: str | Path,
    *,
    data: str | ImageData | None = None,
    formats: tuple[str, ...] = ("onnx", "tflite"),
    calib_size: int = 300,
    io: str = "float32",
    activation_type: str = "auto",
    max_drop: float | None = None,
    target: str = "arm",
    qat_epochs: int = 0,
    teacher: str | Path | None = None,
    out_dir: str | Path | None = None,
    on_step: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize an edgekd checkpoint, or the ``.onnx`` that ``edgekd.export`` made from one, to int8 and verify it.

    Given export's ``.onnx``, that file is what gets quantized (and converted to TFLite): it is
    checked against its checkpoint first, not exported again. Given a checkpoint, it is exported
    here first, the same way.

    With ``qat_epochs`` the int8 files come from a copy fine-tuned that many epochs with fake
    quantization (``edgekd.qat``), taught by ``teacher`` (default: the run's own teacher when its
    file exists, else the float model itself); the fp32 files, and the drop, stay the original's.
    The fine-tuned checkpoint is kept beside the files as ``model_qat.pt``.

    The files are kept even when the accuracy drop exceeds ``max_drop``; their sidecars then
    say ``"status": "failed"`` and ``QuantizeResult.passed`` is False. ``target`` is the CPU the
    files will run on (``TARGETS``): it sets the ONNX weight range and is recorded in every sidecar.

    Example (``runs/student`` from ``edgekd.distill``'s example):
        >>> from edgekd import quantize
        >>> res = quantize("runs/student/best.pt", max_drop=2.0)  # int8 ONNX and TFLite, calibrated on 300 images
        >>> [(m.format, m.int8.precision, m.drop_pts <= 2.0) for m in res.models], res.passed
        ([('onnx', 'int8', True), ('tflite', 'int8', True)], True)
    """
    if io not in IO_TYPES:
        raise EdgeKDError(f"unknown --io {io!r}; choose from {', '.join(IO_TYPES)}")
    if activation_type not in ("auto", "uint8", "int8"):
        raise EdgeKDError("--activation-type must be auto, uint8 or int8")
    if target not in TARGETS:
        raise EdgeKDError(f"unknown --target {target!r}; choose from {', '.join(TARGETS)}")
    for fmt in formats:
        BACKENDS.get(fmt)  # an unknown format fails here, before any work
    checkpoint = checkpoint_for(Path(model))
    exported = Path(model) if Path(model).suffix == ".onnx" else None
    net_model, meta = load_model(checkpoint)
    data = resolve_data(checkpoint, data)
    out = Path(out_dir) if out_dir else rundir.export_dir(checkpoint)
    calib = calibration_sample(data, calib_size)
    net, how = deploy_net(net_model, meta)
    meta = {**meta, "normalization": how}
    inputs = _prepare_inputs(net_model, meta, data, calib)
    qat_model, qat_report = _fine_tune(net_model, meta, checkpoint, data, qat_epochs, teacher, target, on_step)
    int8_net = deploy_net(qat_model, meta)[0] if qat_model is not None else net
    with staged_output(out, "quantize") as (tmp, journal):
        models = _quantize_formats(net, int8_net, inputs, tmp, formats, activation_type, io, target, max_drop, on_step,
                                   exported)
        if qat_model is not None:
            models = [dataclasses.replace(m, choice={**m.choice, "qat": qat_report}) for m in models]
            journal.put(out / QAT_CHECKPOINT, lambda t: save_checkpoint(t, qat_model, meta, qat=qat_report))
        else:
            journal.remove(out / QAT_CHECKPOINT)  # an earlier --qat's checkpoint no longer made these files
        kept = exported if exported and (out / FILE_NAMES["onnx"][0]).resolve() == exported.resolve() else None
        placed = [_place_pair(m, out, meta, checkpoint, journal, max_drop, kept) for m in models]
        result = QuantizeResult(calib, tuple(placed), max_drop, checkpoint, qat_report)
        summary = json.dumps(result_dict(result), indent=2) + "\n"
        journal.put(rundir.quantize_summary(out), lambda t: t.write_text(summary))
    return result


def _place_pair(m: QuantizedModel, out: Path, meta: dict, checkpoint: Path, journal, max_drop,
                kept: Path | None = None) -> QuantizedModel:
    """The fp32 and int8 files of one format moved into ``out`` with their sidecars; the int8 one marked by the gate.
    ``kept``: export's ONNX file that was quantized, already in place; it and its sidecar stay as they are."""
    status = "ok" if max_drop is None or m.drop_pts <= max_drop else "failed"
    fp32_name, int8_name = FILE_NAMES[m.format]
    if m.format == "onnx" and kept is not None:
        fp32 = dataclasses.replace(m.fp32, path=kept)
    else:
        fp32 = place_checked(m.fp32, out / fp32_name, meta, checkpoint, journal)
    int8 = place_checked(m.int8, out / int8_name, meta, checkpoint, journal, status, {"quantization_choice": m.choice})
    return dataclasses.replace(m, fp32=fp32, int8=int8)


def _prepare_inputs(net_model, meta: dict, data: ImageData, calib: Calibration) -> "_Inputs":
    """Every image set quantization reads, as the deployable model's input, and PyTorch's logits to check against."""
    check_x = model_input(meta, check_samples(data, 256))
    with torch.no_grad():
        reference = Deployable(net_model, meta["mean"], meta["std"]).eval()(check_x).numpy()
    return _Inputs(rgb(check_x), reference, rgb(model_input(meta, data.train_x[list(calib.indices)])),
                   rgb(model_input(meta, data.test_x)), data.test_y.numpy(),
                   rgb(model_input(meta, data.val_x)), data.val_y.numpy())


@dataclass(frozen=True)
class _Inputs:
    """The pixels quantization works on, all NCHW RGB [0, 1]."""

    check_x: torch.Tensor  # compared with PyTorch's ``reference`` logits
    reference: np.ndarray
    calib_x: torch.Tensor
    test_x: torch.Tensor
    test_y: np.ndarray
    val_x: torch.Tensor  # what the accuracy-aware fallback may choose on
    val_y: np.ndarray


@dataclass(frozen=True)
class _Job:
    """What every int8 backend works from: the fp32 network and the one int8 comes from (the same unless QAT
    fine-tuned a copy), the pixels, the fp32 ONNX file and its check, and the user's settings."""

    net: torch.nn.Module
    int8_net: torch.nn.Module
    inputs: _Inputs
    tmp: Path
    exported: Path | None
    onnx_fp32: Path
    fp32_art: Artifact
    activation_type: str
    io: str
    target: str
    max_drop: float | None


# format -> (what the progress line says, the backend); `quantize(formats=...)` names them
BACKENDS: Registry[tuple[str, Callable[[_Job], "QuantizedModel"]]] = Registry("int8 format")


def _onnx_backend(job: _Job) -> QuantizedModel:
    i = job.inputs
    source = job.onnx_fp32 if job.int8_net is job.net else to_onnx(job.int8_net, i.check_x, job.tmp / "model_qat.onnx")
    return _quantize_onnx(source, job.onnx_fp32, job.fp32_art, job.tmp, i, job.activation_type, job.target, job.max_drop)


def _tflite_backend(job: _Job) -> QuantizedModel:
    # TFLite has batch 1: export's file is fixed to it by onnx2tf, a fresh export is made with it
    i, tmp = job.inputs, job.tmp
    onnx_b1 = job.onnx_fp32 if job.exported else to_onnx(job.net, i.check_x, tmp / "model_b1.onnx", dynamic_batch=False)
    qat_b1 = None if job.int8_net is job.net else to_onnx(job.int8_net, i.check_x, tmp / "model_qat_b1.onnx",
                                                            dynamic_batch=False)
    return _quantize_tflite(onnx_b1, qat_b1, tmp, i, job.io, job.target, (job.net, job.int8_net), job.max_drop)


BACKENDS.register("onnx")(("onnx: static int8 quantization with onnxruntime", _onnx_backend))
BACKENDS.register("tflite")(("tflite: full-integer conversion with onnx2tf", _tflite_backend))


def _quantize_formats(net, int8_net, inputs: _Inputs, tmp: Path, formats, activation_type, io, target, max_drop,
                      on_step, exported: Path | None = None) -> list[QuantizedModel]:
    """Every requested int8 file and its fp32 counterpart, written and checked inside ``tmp`` by its backend."""
    step = on_step or (lambda _msg: None)
    onnx_fp32, fp32_art = _fp32_onnx(net, inputs, tmp, exported)
    job = _Job(net, int8_net, inputs, tmp, exported, onnx_fp32, fp32_art, activation_type, io, target, max_drop)
    models = []
    for fmt in (f for f in BACKENDS if f in formats):
        says, backend = BACKENDS.get(fmt)
        step(says)
        models.append(backend(job))
    return models


def _fp32_onnx(net, inputs: _Inputs, tmp: Path, exported: Path | None) -> tuple[Path, Artifact]:
    """The fp32 ONNX file in ``tmp`` and its check against PyTorch: a copy of ``exported`` (the user's
    file stays where it is), or a fresh export of ``net``."""
    if exported is None:
        path = to_onnx(net, inputs.check_x, tmp / "model.onnx")
        return path, check_onnx(path, inputs.check_x, inputs.reference, "fp32")
    path = tmp / "model.onnx"
    shutil.copyfile(exported, path)
    try:
        return path, check_onnx(path, inputs.check_x, inputs.reference, "fp32")
    except Exception as exc:  # noqa: BLE001 - a mismatch, or a file that does not take the model's input
        raise EdgeKDError(f"{exported} does not compute what its checkpoint does ({first_line(exc)}); export it "
                          "again (edgekd export CHECKPOINT) or quantize the checkpoint itself") from None


def _fine_tune(model, meta: dict, checkpoint: Path, data: ImageData, epochs: int, teacher, target: str, on_step):
    """The QAT-fine-tuned copy of ``model`` and its report, or (None, None) without ``epochs``."""
    if not epochs:
        return None, None
    step = on_step or (lambda _msg: None)
    fn, name = qat_teacher(checkpoint, data, teacher)
    step(f"qat: {epochs} epoch{'s' if epochs != 1 else ''} of quantization-aware fine-tuning, taught by {name}")
    folded = meta.get("normalization") == "folded into the first convolution"
    settings = qat.QATSettings(epochs=epochs, **recorded_augmentation(checkpoint, data),
                               weight_qmax=64 if TARGETS[target][0] else qat.WEIGHT_QMAX,  # onnxruntime's reduced range
                               first_conv_in_scale=tuple(1.0 / v for v in meta["std"]) if folded else None)
    progress = (lambda kind, e, n, info: step(f"qat: epoch {e}/{n}, validation {info['val_acc']:.2f}% (fake-quantized)"))
    tuned, report = qat.finetune(model, meta, data, fn, name, settings, on_step=progress)
    return tuned, report.to_dict()


def qat_teacher(checkpoint: Path, data: ImageData, teacher):
    """The teacher QAT learns from: ``teacher``, else the run's first teacher whose file exists, else the
    float model itself (its own checkpoint, loaded as any edgekd teacher is); and what to call it."""
    kd = rundir.recorded_config(checkpoint).get("kd", {})
    recorded = [Path(t) for t in kd.get("teachers", []) if Path(t).is_file()]
    path = Path(teacher) if teacher else (recorded[0] if recorded else None)
    if path is None:
        return load_teacher(checkpoint), "the float model itself"
    loaded = load_teacher(path, input_mean=tuple(kd.get("teacher_mean", (0.0,))),
                          input_std=tuple(kd.get("teacher_std", (1.0,))))
    if loaded.classes is not None and list(loaded.classes) != list(data.classes):
        raise EdgeKDError(f"the QAT teacher {path} knows classes {list(loaded.classes)[:5]}..., the model "
                          f"{list(data.classes)[:5]}...; give a teacher trained on the same classes")
    return loaded, str(path)


def recorded_augmentation(checkpoint: Path, data: ImageData) -> dict:
    """The run's own crop and flip augmentation (its defaults where the config left them unset, as
    ``edgekd.distill`` resolves them), for fine-tuning on the images it was trained on."""
    recipe = rundir.recorded_config(checkpoint).get("recipe", {})
    pad, flip = recipe.get("augment_pad"), recipe.get("augment_flip")
    return {"augment_pad": pad if pad is not None else data.image_size[0] // 8,
            "augment_flip": flip if flip is not None else data.channels == 3}


def result_dict(result: QuantizeResult) -> dict:
    return {
        "passed": result.passed,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "max_drop_pts": result.max_drop,
        "qat": result.qat,
        "calibration": {"size": len(result.calibration.indices), "sha256": result.calibration.sha256,
                        "per_class": list(result.calibration.per_class), "train_indices": list(result.calibration.indices)},
        "models": [{"format": m.format, "fp32": m.fp32.to_dict(), "int8": m.int8.to_dict(),
                    "fp32_test_acc": m.fp32_test_acc, "int8_test_acc": m.int8_test_acc, "drop_pts": m.drop_pts,
                    "size_ratio": m.int8.size_bytes / m.fp32.size_bytes, "quantized_ops": m.quantized_ops,
                    "float_compute_ops": m.float_compute_ops, "int8_mac_share": m.int8_mac_share,
                    "choice": m.choice} for m in result.models],
    }


def checkpoint_for(model: Path) -> Path:
    """The edgekd checkpoint to quantize: ``model`` itself, a run directory's best.pt, or the one an
    ``.onnx`` file's sidecar names (never a checkpoint that merely sits nearby)."""
    if not model.exists():
        raise EdgeKDError(f"model not found: {model}")
    if model.suffix == ".onnx":
        return _sidecar_checkpoint(model)
    if model.suffix == ".tflite":
        raise EdgeKDError("a .tflite file cannot be re-quantized; give the edgekd checkpoint (or its .onnx) instead")
    if model.is_dir():
        if rundir.is_training_run(model):
            return rundir.best(model)
        raise EdgeKDError(f"{model} holds no best.pt; give a checkpoint or a run directory")
    return model


def _sidecar_checkpoint(onnx_file: Path) -> Path:
    """The checkpoint named by ``<file>.json`` (``source_checkpoint``, relative to the file's folder)."""
    side = onnx_file.with_name(onnx_file.name + ".json")
    sidecar = read_json(side)
    named = sidecar.get("source_checkpoint")
    if named and sidecar.get("precision") not in (None, "fp32"):
        raise EdgeKDError(f"{onnx_file} is already {sidecar['precision']}; give the fp32 model.onnx that edgekd export "
                          "wrote, or the checkpoint")
    if not named:
        raise EdgeKDError(f"{onnx_file} has no edgekd sidecar ({side.name}) naming the checkpoint it was exported "
                          "from; pass that checkpoint instead: edgekd quantize path/to/best.pt")
    checkpoint = (onnx_file.parent / named).resolve()
    if not checkpoint.is_file():
        raise EdgeKDError(f"{side.name} says {onnx_file.name} came from {checkpoint}, which does not exist; "
                          "pass the checkpoint instead: edgekd quantize path/to/best.pt")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# ONNX


class _Reader:
    """onnxruntime CalibrationDataReader over NCHW [0, 1] images, one at a time; ``set_range`` lets
    onnxruntime calibrate a slice at a time."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.set_range(0, len(x))

    def __len__(self) -> int:
        return len(self.x)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.items = iter([{"input": self.x[i:i + 1]} for i in range(start_index, min(end_index, len(self.x)))])

    def get_next(self):
        return next(self.items, None)


def _stride(n: int, most: int = 16) -> int:
    """The largest divisor of ``n`` up to ``most``: onnxruntime's slice size must divide the sample."""
    return max(k for k in range(1, min(n, most) + 1) if n % k == 0)


class _Rank1AxisFilter(logging.Filter):
    """onnxruntime warns on the root logger for every 1-D weight (a bias, a batch-norm scale) that
    per-channel quantization's axis 1 does not apply to; such tensors get one scale, as they should."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextmanager
def _without_rank1_axis_warnings():
    root, quiet = logging.getLogger(), _Rank1AxisFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _quantize_onnx(onnx_source, onnx_fp32, fp32_art, tmp, inputs: _Inputs, activation_type, target, max_drop):
    """int8 from ``onnx_source`` (the fp32 file itself, or its QAT-fine-tuned twin), next to ``onnx_fp32``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "model.pre.onnx"
    quant_pre_process(str(onnx_source), str(pre))
    wanted = ["uint8", "int8"] if activation_type == "auto" else [activation_type]
    reduce_range, target_why = TARGETS[target]
    made = {act: _ort_int8(pre, tmp / f"model_int8_{act}.onnx", inputs, act, reduce_range) for act in wanted}
    timings = {act: onnx_latency_ms(path) for act, path in made.items()} if len(made) > 1 else {}
    best = min(timings, key=timings.get) if timings else wanted[0]
    host = host_target()
    choice = {"activation_type": best, "weight_type": "int8", "format": "QDQ", "per_channel": True,
              "target": target, "reduce_range": reduce_range, "target_why": target_why, "measured_on": host}
    if host == "x86" and not reduce_range:
        choice["caveat"] = (f"measured on an x86 CPU without VNNI, whose 16-bit sums can saturate the full-range weights "
                            f"made for {target}: the int8 accuracy here may be lower than on the target")
    if timings:
        choice["p50_ms_by_activation_type"] = timings
        choice["why"] = f"{best} activations ran fastest on this CPU (batch 1, 1 thread, p50)"
    else:
        choice["why"] = "chosen by the user"
    path, fallback = _float_fallback(pre, made[best], onnx_fp32, tmp, inputs, best, reduce_range, max_drop)
    share = onnx_int8_mac_share(path, inputs.check_x[:1].numpy(), tmp)
    if fallback:
        choice["float_fallback"] = fallback
    choice["calibration"] = (fallback or {}).get("calibration", "min/max")
    quantized, float_ops = count_onnx_ops(path)
    if quantized == 0:
        raise EdgeKDError("onnxruntime left every compute operator in float: the model was not quantized")
    if share < MIN_INT8_MAC_SHARE:
        raise EdgeKDError(f"onnxruntime ran only {100 * share:.0f}% of the multiply-accumulates in int8 kernels "
                          f"(at least {100 * MIN_INT8_MAC_SHARE:.0f}% expected): the int8 model would not be int8 where it counts")
    art = check_onnx(path, inputs.check_x, inputs.reference, "int8")
    fp32_acc = _accuracy(run_onnx(onnx_fp32, inputs.test_x.numpy()), inputs.test_y)
    int8_acc = _accuracy(run_onnx(path, inputs.test_x.numpy()), inputs.test_y)
    return QuantizedModel("onnx", fp32_art, art, fp32_acc, int8_acc, quantized, float_ops, choice, share)


def _ort_int8(pre: Path, path: Path, inputs: _Inputs, act: str, reduce_range: bool, exclude: tuple[str, ...] = (),
              percentile: float | None = None) -> Path:
    """onnxruntime's static QDQ quantization, per-channel int8 weights; ``exclude`` names nodes kept in float.
    Activation ranges are the calibration images' min/max, or with ``percentile`` the range that holds that share
    of the values (onnxruntime's percentile calibration: (100 - percentile) / 2 % cut at each end)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act_type = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[act]
    # A histogram calibrator keeps every activation of the images it is given until it bins them: given a few
    # at a time (CalibStridedMinMax), its memory stays that of a few images whatever the calibration size.
    calibration = {} if percentile is None else dict(
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": percentile, "CalibStridedMinMax": _stride(len(inputs.calib_x))})
    # onnxruntime's histogram calibrators print their settings to stdout: not the user's concern
    with _without_rank1_axis_warnings(), redirect_stdout(io.StringIO()):
        quantize_static(str(pre), str(path), _Reader(inputs.calib_x.numpy()), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=act_type, weight_type=QuantType.QInt8,
                        reduce_range=reduce_range, nodes_to_exclude=list(exclude), **calibration)
    return path


MIN_INT8_MAC_SHARE = 0.5  # below this, "int8" is a label: most arithmetic still runs in float
MAX_FALLBACK_LAYERS = 32  # layers probed one by one; a deeper network is probed on its first 32 compute layers
# Tried before any layer is kept in float, the one that loses least on validation kept: a few extreme values
# (an unbounded activation such as SiLU) stretch a min/max range until most values round to zero.
# EfficientNet-B0 on CIFAR-10 lost 4.36 validation points with min/max, 1.32 at the 99.99th percentile,
# 0.28 at the 99.9th (benchmarks/results/int8_activations_efficientnet_b0.md).
CALIBRATION_PERCENTILES = (99.99, 99.9)


def _float_fallback(pre: Path, path: Path, onnx_fp32: Path, tmp: Path, inputs: _Inputs, act: str, reduce_range: bool,
                    max_drop: float | None, min_int8_share: float = MIN_INT8_MAC_SHARE) -> tuple[Path, dict | None]:
    """Accuracy-aware fallback: when the int8 file loses more than ``max_drop`` on the validation split,
    activation ranges calibrated to a percentile instead of min/max (``CALIBRATION_PERCENTILES``), every layer
    still int8; where none fits, the fewest compute layers of the min/max file kept in float that bring the loss
    under it; where none do, the all-int8 file whose calibration lost least.

    Each layer's sensitivity is the validation accuracy won back by keeping it alone in float; layers
    are then kept in float in that order until the drop fits, unless that leaves less than
    ``min_int8_share`` of the multiply-accumulates in int8. The test split is not read here.
    """
    import onnx

    if max_drop is None or len(inputs.val_y) == 0:
        return path, None
    val = inputs.val_x.numpy()
    fp32_val = _accuracy(run_onnx(onnx_fp32, val), inputs.val_y)
    before = fp32_val - _accuracy(run_onnx(path, val), inputs.val_y)
    if before <= max_drop:
        return path, None
    by_percentile, files = {}, {}
    for p in CALIBRATION_PERCENTILES:
        files[p] = _ort_int8(pre, tmp / f"model_int8_p{p:g}.onnx", inputs, act, reduce_range, percentile=p)
        by_percentile[p] = fp32_val - _accuracy(run_onnx(files[p], val), inputs.val_y)
    pct = min(by_percentile, key=by_percentile.get) if by_percentile else None  # the one that loses least
    report = {"val_drop_before": before, "val_drop_by_percentile": by_percentile, "calibration": "min/max"}
    if pct is not None and by_percentile[pct] <= max_drop:
        return files[pct], {**report, "calibration": f"percentile {pct:g}", "probed_layers": 0, "float_layers": [],
                            "val_drop_after": by_percentile[pct]}
    # where nothing below fits either: the all-int8 file whose calibration lost least
    if pct is not None and by_percentile[pct] < before:
        all_int8 = files[pct], {"calibration": f"percentile {pct:g}", "val_drop_after": by_percentile[pct]}
    else:
        all_int8 = path, {"calibration": "min/max", "val_drop_after": before}
    layers = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in QUANTIZED_COMPUTE][:MAX_FALLBACK_LAYERS]

    def val_drop(exclude: tuple[str, ...]) -> float:
        probe = _ort_int8(pre, tmp / "model_int8_fallback.onnx", inputs, act, reduce_range, exclude)
        return fp32_val - _accuracy(run_onnx(probe, val), inputs.val_y)

    sensitivity = {name: before - val_drop((name,)) for name in layers}
    order = sorted(layers, key=lambda n: -sensitivity[n])
    report.update(probed_layers=len(layers), sensitivity_pts={n: sensitivity[n] for n in order})
    for k in range(1, len(order) + 1):
        drop = val_drop(tuple(order[:k]))
        if drop <= max_drop:
            kept = tmp / "model_int8_kept_float.onnx"
            os.replace(tmp / "model_int8_fallback.onnx", kept)
            share = onnx_int8_mac_share(kept, inputs.check_x[:1].numpy(), tmp)
            if share < min_int8_share:
                return all_int8[0], {**report, **all_int8[1], "float_layers": [],
                                     "why": f"the layers that fit max_drop would leave {100 * share:.0f}% of the "
                                            "multiply-accumulates in int8; all layers were kept int8"}
            cost = {"p50_ms_all_int8": onnx_latency_ms(path), "p50_ms_with_float_layers": onnx_latency_ms(kept)}
            return kept, {**report, "float_layers": order[:k], "val_drop_after": drop, **cost}
    return all_int8[0], {**report, **all_int8[1], "float_layers": [],
                         "why": "neither percentile calibration nor any set of float layers brought the validation "
                                "drop under max_drop"}


def count_onnx_ops(path: Path) -> tuple[int, int]:
    """Compute ops fed by DequantizeLinear (run as int8 by onnxruntime) vs. those left in float."""
    import onnx

    graph = onnx.load(str(path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in graph.node if n.op_type in QUANTIZED_COMPUTE]
    quantized = sum(1 for n in compute if n.input and n.input[0] in dq_outputs)
    return quantized, len(compute) - quantized


def onnx_latency_ms(path: Path, runs: int = 200) -> float:
    sess = onnx_session(path, threads=1)
    x = np.random.default_rng(0).random(tuple(d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape),
                                        dtype=np.float32)
    feed = {sess.get_inputs()[0].name: x}
    return time_calls(lambda: sess.run(None, feed), warmup=20, min_runs=runs, min_seconds=0.0).p50_ms


# ---------------------------------------------------------------------------------------------
# TFLite


LITERT = "litert-torch (PT2E static int8, symmetric per-channel weights)"


def _quantize_tflite(onnx_fp32, onnx_qat, tmp, inputs: _Inputs, io, target, nets, max_drop=None):
    """int8 from ``onnx_qat`` when QAT made one, else from ``onnx_fp32``; the fp32 file always from ``onnx_fp32``.
    Where litert-torch is installed it is the second converter, from ``nets`` (fp32, int8 source): used where
    onnx2tf fails, and chosen by measurement where onnx2tf's int8 file loses more than ``max_drop`` points on the
    validation split (the file that loses less there is kept; the test split is read once, by the gate)."""
    key = "integer_quant" if io == "float32" else "full_integer_quant"
    choose = max_drop is not None and len(inputs.val_y) > 0  # a gate and a validation split to choose on
    try:
        files = _onnx2tf_files(onnx_fp32, onnx_qat, tmp, inputs, io)
    except EdgeKDError as exc:
        if not litert_torch_installed():
            raise
        return _litert_instead(exc, nets, tmp, inputs, key, io, target, choose)
    if key not in files or "float32" not in files:
        raise EdgeKDError(f"onnx2tf wrote no {key} model; the conversion did not quantize")
    first = _val_acc(files["float32"], inputs) - _val_acc(files[key], inputs) if choose and litert_torch_installed() else None
    if first is None or first <= max_drop:
        return _tflite_model(files, key, inputs, io, target, {"converter": "onnx2tf", "calibration": "min/max"})
    return _better_converter(files, first, nets, tmp, inputs, key, io, target)


# PT2E's histogram observer, then ranges that cut 0.01% and 0.1% of the values at each end (convert.percentile_range;
# onnxruntime's "percentile P" cuts (100 - P) / 2 % at each end, so these are not the ONNX path's settings)
LITERT_CALIBRATIONS = (None, 99.99, 99.9)


def _litert_instead(onnx2tf_error: EdgeKDError, nets, tmp, inputs: _Inputs, key, io, target, choose: bool) -> QuantizedModel:
    """onnx2tf failed: litert-torch's files, with PT2E's histogram calibration, or, with a gate to meet, each
    calibration of ``LITERT_CALIBRATIONS`` and the int8 file that loses least on validation."""
    why = f"onnx2tf failed: {onnx2tf_error}"
    try:
        fp32 = torch_to_tflite(nets[0], inputs.check_x, tmp / "model_litert.tflite")
    except EdgeKDError as exc:
        raise EdgeKDError(f"{onnx2tf_error}; the litert-torch fallback too: {exc}") from None
    if not choose or io == "uint8":  # litert-torch makes no uint8 file: one conversion, whose types are checked
        try:
            int8 = torch_to_tflite_int8(nets[1], inputs.calib_x, tmp / "model_litert_int8.tflite", float_io=io == "float32")
        except EdgeKDError as exc:
            raise EdgeKDError(f"{onnx2tf_error}; the litert-torch fallback too: {exc}") from None
        _check_litert_io(int8, io, onnx2tf_error)
        return _tflite_model({"float32": fp32, key: int8}, key, inputs, io, target,
                             {"converter": LITERT, "calibration": "histogram", "converter_why": why})
    best, tried = _litert_calibrations(nets, fp32, tmp, inputs, io, onnx2tf_error)
    if best is None:
        raise EdgeKDError(f"{onnx2tf_error}; the litert-torch fallback too: " + "; ".join(tried))
    return _tflite_model({"float32": fp32, key: best[1]}, key, inputs, io, target,
                         {"converter": LITERT, "calibration": best[2],
                          "converter_why": f"{why}; litert-torch's with activations ranged by {', '.join(tried)}: "
                                           f"the {best[2]} kept"})


def _better_converter(files, onnx2tf_drop: float, nets, tmp, inputs: _Inputs, key, io, target) -> QuantizedModel:
    """onnx2tf's int8 file lost ``onnx2tf_drop`` validation points, more than the gate allows: litert-torch's
    files too, with each activation calibration of ``LITERT_CALIBRATIONS``, and the int8 file that loses least
    on validation is kept, with every drop recorded."""
    why = f"onnx2tf's int8 file lost {onnx2tf_drop:.2f} validation points, more than --max-drop"
    if io == "uint8":
        return _tflite_model(files, key, inputs, io, target, {"converter": "onnx2tf", "calibration": "min/max",
                                                              "converter_why": f"{why}; litert-torch makes no uint8 file"})
    try:
        fp32 = torch_to_tflite(nets[0], inputs.check_x, tmp / "model_litert.tflite")
    except EdgeKDError as exc:
        return _tflite_model(files, key, inputs, io, target, {"converter": "onnx2tf", "calibration": "min/max",
                                                              "converter_why": f"{why}; litert-torch: {exc}"})
    best, tried = _litert_calibrations(nets, fp32, tmp, inputs, io, EdgeKDError("onnx2tf's int8 file missed the gate"))
    why = f"{why}; litert-torch's with activations ranged by " + ", ".join(tried)
    if best is not None and best[0] < onnx2tf_drop:
        return _tflite_model({"float32": fp32, key: best[1]}, key, inputs, io, target,
                             {"converter": LITERT, "converter_why": f"{why}: the {best[2]} kept",
                              "calibration": best[2]})
    return _tflite_model(files, key, inputs, io, target, {"converter": "onnx2tf", "converter_why": f"{why}: onnx2tf's kept",
                                                          "calibration": "min/max"})


def _litert_calibrations(nets, fp32: Path, tmp: Path, inputs: _Inputs, io: str, onnx2tf_error: EdgeKDError):
    """litert-torch's int8 file with each calibration of ``LITERT_CALIBRATIONS``, scored against ``fp32`` (evaluated
    once) on the validation split: the best as (drop, file, name), or None when none converted, and what each did."""
    fp32_acc, best, tried = _val_acc(fp32, inputs), None, []
    for percentile in LITERT_CALIBRATIONS:
        name = "histogram" if percentile is None else f"percentiles {100 - percentile:.2g}-{percentile:g}"
        out = tmp / f"model_litert_int8_{'histogram' if percentile is None else f'p{percentile:g}'}.tflite"
        try:
            int8 = torch_to_tflite_int8(nets[1], inputs.calib_x, out, float_io=io == "float32", percentile=percentile)
            _check_litert_io(int8, io, onnx2tf_error)
        except EdgeKDError as exc:
            tried.append(f"{name}: {exc}")
            continue
        drop = fp32_acc - _val_acc(int8, inputs)
        tried.append(f"{name} lost {drop:.2f}")
        if best is None or drop < best[0]:
            best = (drop, int8, name)
    return best, tried


def _val_acc(file: Path, i: _Inputs) -> float:
    """Top-1 on the validation split, through LiteRT."""
    return _accuracy(TFLiteRunner(file)(nhwc(i.val_x)), i.val_y)


def _tflite_model(files: dict[str, Path], key: str, i: _Inputs, io: str, target: str, converter: dict) -> QuantizedModel:
    """The fp32 and int8 pair checked against PyTorch, proven int8 and evaluated on the test split."""
    fp32_art = check_tflite(files["float32"], i.check_x, i.reference, "fp32")
    fp32_art = dataclasses.replace(fp32_art, extra={**fp32_art.extra, **converter})
    art = check_tflite(files[key], i.check_x, i.reference, "int8")
    runner = TFLiteRunner(files[key])  # loaded once: the op count, the MAC share and the test split
    quantized, float_ops = count_tflite_ops(runner)
    if quantized == 0:
        raise EdgeKDError("the TFLite model's compute operators all stayed float: it was not quantized")
    share = tflite_int8_mac_share(runner)
    if share < MIN_INT8_MAC_SHARE:
        raise EdgeKDError(f"LiteRT would run only {100 * share:.0f}% of the multiply-accumulates on int8 tensors "
                          f"(at least {100 * MIN_INT8_MAC_SHARE:.0f}% expected): the int8 model would not be int8 where it counts")
    fp32_acc = _accuracy(TFLiteRunner(files["float32"])(nhwc(i.test_x)), i.test_y)
    int8_acc = _accuracy(runner(nhwc(i.test_x)), i.test_y)
    # TensorFlow Lite's int8 scheme has full-range symmetric weights on every target (its kernels
    # are built for it), so the target is recorded, not applied.
    choice = {"io": io, "activations": "int8", "weights": "int8 per-channel", "target": target, "reduce_range": False,
              "why": "float32 I/O loads in MediaPipe and the TFLite Task Library, which refuse int8 input tensors"
              if io == "float32" else f"{io} input and output tensors were asked for", **converter}
    return QuantizedModel("tflite", fp32_art, art, fp32_acc, int8_acc, quantized, float_ops, choice, share)


def _check_litert_io(int8_file: Path, io: str, onnx2tf_error: EdgeKDError) -> None:
    """litert-torch decides the file's input and output types itself (int8 where the first layer is quantized,
    float32 when asked through ``float_io``; it has no uint8): they are checked against ``io``."""
    runner = TFLiteRunner(int8_file)
    got = runner.input_dtype
    if got != io or runner.output_dtype != got:
        hint = " (MediaPipe and the TFLite Task Library refuse int8 input)" if got == "int8" else ""
        raise EdgeKDError(f"{onnx2tf_error}; litert-torch made this int8 file with {got} input, not {io}: "
                          f"quantize with --io {got}{hint}")


def _onnx2tf_files(onnx_fp32, onnx_qat, tmp, i: _Inputs, io) -> dict[str, Path]:
    calibration, io_dtype = nhwc(i.calib_x), "int8" if io == "float32" else io
    files = onnx_to_tflite(onnx_fp32, tmp / "tf", calibration=None if onnx_qat else calibration, io_dtype=io_dtype)
    if onnx_qat is not None:
        qat_files = onnx_to_tflite(onnx_qat, tmp / "tf-qat", calibration=calibration, io_dtype=io_dtype)
        files = {**{k: v for k, v in qat_files.items() if k in ("integer_quant", "full_integer_quant")},
                 "float32": files["float32"]}
    return files


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean() * 100.0)
