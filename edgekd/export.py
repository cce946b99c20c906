"""Stage 2: an edgekd checkpoint becomes ONNX and TFLite files, each checked against PyTorch.

Every exported model takes RGB pixels scaled to [0, 1] (what a camera frame divided by 255 is),
so an app only resizes and divides by 255. The training normalization (per-channel mean/std)
and, for grayscale models, the RGB-to-luma conversion are folded into the first convolution's
weights: no extra operators, and MediaPipe's single mean/std metadata can describe the input.
ONNX keeps PyTorch's NCHW layout with a dynamic batch; TFLite takes NHWC with batch 1, the
mobile convention (onnx2tf does the transposition). Each file is written under a temporary
name, run on real images through its own runtime, compared with PyTorch, and only then renamed
into place with a ``.json`` sidecar describing its input.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.checkpoint import load_model
from edgekd.files import Journal, staged_output
from edgekd.native import captured_output, quiet_native_logs
from edgekd.data import ImageData, load_data, to_unit
from edgekd.errors import EdgeKDError, first_line
from edgekd.zoo import fit_input

ONNX_OPSET = 17
FORMATS = ("onnx", "tflite")


class Deployable(nn.Module):
    """The trained network with its input normalization in front: [0, 1] pixels in, logits out."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) * self.inv_std)


# ITU-R 601-2 luma, Pillow's RGB -> L conversion: how grayscale training images were made from RGB.
LUMA = (0.299, 0.587, 0.114)


class FoldedConv(nn.Module):
    """A convolution that absorbed the input normalization, plus a constant border map.

    With zero padding, padded taps of the original convolution saw the normalized value 0, i.e.
    the raw pixel ``mean``; after folding they see raw 0. The difference does not depend on the
    input, so one constant (1, C_out, H_out, W_out) tensor added after the convolution makes the
    folded layer exact, at the cost of fixing the input size (which deployed models have anyway).
    Without padding, or with a zero mean, there is nothing to correct and no constant is added.
    """

    def __init__(self, conv: nn.Conv2d, border: torch.Tensor | None) -> None:
        super().__init__()
        self.conv = conv
        self.has_border = border is not None  # a Python bool: traced as a constant, not a tensor test
        self.register_buffer("border", border if border is not None else torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.border if self.has_border else y


def fold_input_normalization(model: nn.Module, mean, std, channels: int, size: tuple[int, int]) -> nn.Module:
    """A copy of ``model`` taking RGB [0, 1] pixels, with ``(x - mean) / std`` (and, for 1-channel
    models, the RGB-to-luma conversion) folded into its first convolution.

    We write this ourselves: converters fold normalization only when it is a separate op in the
    graph, which is exactly what MediaPipe's one-mean/one-std metadata cannot describe per channel.
    """
    model = copy.deepcopy(model).eval()
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != channels or conv.groups != 1 or conv.padding_mode != "zeros":
        raise EdgeKDError("the model does not start with a plain convolution; normalization cannot be folded")
    w = conv.weight.detach()  # (O, C, kh, kw)
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
    mean_t, std_t = torch.tensor(mean, dtype=w.dtype), torch.tensor(std, dtype=w.dtype)
    w_raw = w / std_t.view(1, -1, 1, 1)
    b_raw = b - (w * (mean_t / std_t).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    border = border_map(conv, mean_t / std_t, size)
    if channels == 1:
        w_raw = w_raw * torch.tensor(LUMA, dtype=w.dtype).view(1, 3, 1, 1)  # (O, 1, k, k) -> (O, 3, k, k)
    new = nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True)
    with torch.no_grad():
        new.weight.copy_(w_raw)
        new.bias.copy_(b_raw)
    folded = FoldedConv(new, border)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, folded)
    return model


def border_map(conv: nn.Conv2d, shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """What the zero-padded taps of ``conv`` add once ``shift`` (= mean / std, per input channel) is
    folded into its bias: (1, C_out, H_out, W_out), exactly zero where a tap window lies inside the
    image. None when nothing is padded or every entry is zero (e.g. a zero mean): no constant at all.
    """
    if conv.padding == "valid" or (not isinstance(conv.padding, str) and not any(conv.padding)):
        return None
    with torch.no_grad():
        weight = conv.weight.detach()
        shifted = shift.view(1, -1, 1, 1).expand(1, conv.in_channels, *size)
        all_taps = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        inside = F.conv2d(shifted, weight, None, conv.stride, conv.padding, conv.dilation)
        taps = F.conv2d(torch.ones(1, 1, *size), torch.ones(1, 1, *conv.kernel_size), None, conv.stride,
                        conv.padding, conv.dilation)  # in-image taps per output position (exact small integers)
        full = conv.kernel_size[0] * conv.kernel_size[1]
        border = (all_taps - inside) * (taps < full).to(weight.dtype)
    return border if bool(border.abs().max() > 0) else None


class RGBInput(nn.Module):
    """Fallback when folding is impossible: RGB [0, 1] in, luma for 1-channel models, then ``Deployable``."""

    def __init__(self, net: Deployable, channels: int) -> None:
        super().__init__()
        self.net, self.channels = net, channels
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        return self.net(x)


def deploy_net(model: nn.Module, meta: dict) -> tuple[nn.Module, str]:
    """The network every exported file holds, and how its input normalization is done.

    Folding is verified against ``Deployable`` on random pixels; a model it does not fit keeps the
    normalization as graph operators instead.
    """
    channels, size = int(meta["in_channels"]), tuple(meta["input_size"])
    reference = Deployable(model, meta["mean"], meta["std"]).eval()
    x = torch.rand(4, channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x)
        try:
            folded = fold_input_normalization(model, meta["mean"], meta["std"], channels, size)
            got = folded(rgb(x))
            if (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())):
                return folded, "folded into the first convolution"
        except EdgeKDError:
            pass
    return RGBInput(reference, channels).eval(), "operators at the start of the graph"


def rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) gray -> (B, 3, H, W) with R = G = B; RGB batches unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
    cfg_file = Path(checkpoint).parent / "config.json"
    if cfg_file.is_file():
        d = json.loads(cfg_file.read_text())["data"]
        return load_data(d["dataset"], data_dir=d["data_dir"], val_fraction=d["val_fraction"],
                         test_fraction=d["test_fraction"], image_size=d["image_size"], seed=d["split_seed"])
    raise EdgeKDError(f"no dataset recorded beside {checkpoint}; pass --data SPEC with the images it was trained on")


def model_input(meta: dict, x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images to the deployable model's input: [0, 1], the model's channels and size, NCHW."""

    return fit_input(to_unit(x_u8), int(meta["in_channels"]), tuple(meta["input_size"]))


def preprocessing(meta: dict, layout: str) -> dict:
    """What an app must do to an image before this file sees it (recorded beside every file)."""
    h, w = meta["input_size"]
    c = int(meta["in_channels"])
    shape = [1, 3, h, w] if layout == "NCHW" else [1, h, w, 3]
    note = {"grayscale_model": "trained on 1-channel images; RGB is converted to luma (ITU-R 601) inside"} if c == 1 else {}
    return {"layout": layout, "shape": shape, "resize": [h, w], "channel_order": "RGB",
            "scale": "divide 0-255 pixels by 255 (input range [0, 1])",
            "normalization_inside_model": {"mean": meta["mean"], "std": meta["std"],
                                           "how": meta.get("normalization", "operators at the start of the graph")},
            **note,
            "classes": meta["classes"], "output": "logits"}


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
    out = Path(out_dir) if out_dir else checkpoint.parent / "export"
    net, how = deploy_net(model, meta)
    meta = {**meta, "normalization": how}
    x = model_input(meta, check_samples(data, samples))
    with torch.no_grad():
        reference = Deployable(model, meta["mean"], meta["std"]).eval()(x).numpy()
    x = rgb(x)
    with staged_output(out, "export") as (tmp, journal):
        checked = _export_checked(net, x, reference, formats, fp16, tmp, how, on_step)
        artifacts = [_place(art, out / name, meta, checkpoint, journal) for name, art in checked]
    return ExportResult(checkpoint, tuple(artifacts))


def _export_checked(net, x, reference, formats, fp16, tmp, how, on_step) -> list[tuple[str, Artifact]]:
    """Every requested file written and checked inside ``tmp``, with the name it will have."""
    step = on_step or (lambda _msg: None)
    step(f"onnx: exporting (normalization {how}) and checking with onnxruntime")
    onnx_art = check_onnx(to_onnx(net, x, tmp / "model.onnx"), x, reference, "fp32")
    checked = [("model.onnx", onnx_art)] if "onnx" in formats else []
    if "tflite" in formats:
        step("tflite: converting with onnx2tf and checking with LiteRT")
        files = onnx_to_tflite(to_onnx(net, x, tmp / "model_b1.onnx", dynamic_batch=False), tmp / "tf")
        wanted = [("fp32", files["float32"])] + ([("fp16", files["float16"])] if fp16 else [])
        checked += [(f"model_{p}.tflite", check_tflite(path, x, reference, p)) for p, path in wanted]
    return checked


def check_samples(data: ImageData, n: int) -> torch.Tensor:
    """``n`` test images taken at an even stride over the whole test split (real pixels, not noise)."""
    step = max(1, len(data.test_y) // max(1, n))
    return data.test_x[::step][:n]


def to_onnx(net: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool = True) -> Path:
    """TorchScript-based export (dynamo=False): named input/output, dynamic or fixed batch 1, checker-clean."""
    try:
        import onnx
    except ImportError:
        raise EdgeKDError("ONNX export needs onnx and onnxruntime: pip install 'edgekd[onnx]'") from None
    try:
        torch.onnx.export(net, x[:1], str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
                          opset_version=ONNX_OPSET,
                          dynamo=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - report which step failed, not a traceback
        raise EdgeKDError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    return path


def onnx_session(path: Path, threads: int = 1):
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeKDError("running ONNX models needs onnxruntime: pip install 'edgekd[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle intra-op threads that spin steal the other core of a small machine and stretch the latency tail; never spin.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        reason = first_line(exc).split(" : ")[-1]
        raise EdgeKDError(f"onnxruntime could not load {Path(path).name} ({reason}); export it again if it is "
                          "truncated or damaged, or update onnxruntime if it names an unsupported operator") from None


def run_onnx(path_or_session, x_nchw: np.ndarray, batch: int = 256) -> np.ndarray:
    sess = onnx_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x_nchw[i:i + batch]})[0] for i in range(0, len(x_nchw), batch)])


def _compare(out: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(out.astype(np.float64) - reference).max())
    agree = float((out.argmax(1) == reference.argmax(1)).mean() * 100.0)
    return diff, agree


def check_onnx(path: Path, x: torch.Tensor, reference: np.ndarray, precision: str) -> Artifact:
    out = run_onnx(path, x.numpy())
    diff, agree = _compare(out, reference)
    if precision == "fp32" and agree < 100.0:
        raise EdgeKDError(f"ONNX model disagrees with PyTorch on top-1 for {100 - agree:.1f}% of samples (max |diff| {diff:.2e})")
    return Artifact(path, "onnx", precision, "onnxruntime", path.stat().st_size, "NCHW", "float32", diff, agree, len(x))


def onnx_to_tflite(onnx_path: Path, folder: Path, calibration: np.ndarray | None = None,
                   io_dtype: str = "int8") -> dict[str, Path]:
    """Convert with onnx2tf; with ``calibration`` (NHWC, [0, 1]) also write the int8 variants."""
    try:
        with quiet_native_logs():
            import onnx2tf
    except ImportError:
        raise EdgeKDError("TFLite conversion needs onnx2tf, tf_keras and TensorFlow: pip install 'edgekd[tf]'") from None
    onnx_path, folder = Path(onnx_path).resolve(), Path(folder).resolve()  # onnx2tf runs in its own cwd
    kwargs = {}
    if calibration is not None:
        npy = folder.parent / "calibration.npy"
        np.save(npy, calibration.astype(np.float32))
        c = calibration.shape[-1]
        # Calibration pixels are already the model's [0, 1] input: onnx2tf must not renormalize them.
        kwargs = dict(output_integer_quantized_tflite=True, quant_type="per-channel",
                      custom_input_op_name_np_data_path=[["input", str(npy), np.zeros((1, 1, 1, c)), np.ones((1, 1, 1, c))]],
                      input_quant_dtype=io_dtype, output_quant_dtype=io_dtype)
    log = folder.parent / "onnx2tf.log"
    try:
        with captured_output(log), _offline_sample_data(folder.parent / "onnx2tf-cwd"):
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(folder), non_verbose=True,
                            copy_onnx_input_output_names_to_tflite=True, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - onnx2tf exits via sys.exit on unsupported ops
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = first_line(exc)
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln][-1:]
        raise EdgeKDError(f"TFLite conversion (onnx2tf) failed: {(errors or [reason])[0].strip()}") from None
    stem = onnx_path.stem
    files = {kind: folder / f"{stem}_{kind}.tflite"
             for kind in ("float32", "float16", "integer_quant", "full_integer_quant")}
    return {k: v for k, v in files.items() if v.is_file()}


ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


@contextmanager
def _offline_sample_data(workdir: Path):
    """Run onnx2tf in a folder holding its sample-image file, so it never downloads it.

    For static 3-channel image inputs (our batch-1 TFLite files), onnx2tf fetches 20 sample images
    from GitHub for its internal dummy-inference checks, and fails without a network. It looks
    for the file in the working directory first; seeded uniform pixels of the same shape serve
    those checks (calibration uses our own images, passed explicitly).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sample = workdir / ONNX2TF_SAMPLE
    if not sample.is_file():
        np.save(sample, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(previous)


class TFLiteRunner:
    """Runs a .tflite file one image at a time, quantizing/dequantizing integer I/O."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise EdgeKDError("running TFLite models needs LiteRT: pip install 'edgekd[tf]'") from None
        try:
            with quiet_native_logs():
                self.interp = Interpreter(model_path=str(path), num_threads=threads)
                self.interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise EdgeKDError(f"LiteRT could not load {path}: {str(exc).splitlines()[0]}") from None
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    @property
    def input_dtype(self) -> str:
        return np.dtype(self.inp["dtype"]).name

    def quantization(self) -> dict:
        return {"input": _qparams(self.inp), "output": _qparams(self.out)}

    def set_input(self, x_nhwc: np.ndarray) -> None:
        arr = x_nhwc
        if self.inp["dtype"] != np.float32:
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            arr = np.clip(np.round(arr / scale + zero), info.min, info.max).astype(self.inp["dtype"])
        self.interp.set_tensor(self.inp["index"], arr)

    def get_output(self) -> np.ndarray:
        res = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            return (res.astype(np.float32) - zero) * scale
        return res

    def __call__(self, x_nhwc: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(len(x_nhwc)):
            self.set_input(x_nhwc[i:i + 1])
            self.interp.invoke()
            outs.append(self.get_output().copy())
        return np.concatenate(outs)


def _qparams(detail: dict) -> dict | None:
    scale, zero = detail["quantization"]
    return None if detail["dtype"] == np.float32 else {"dtype": np.dtype(detail["dtype"]).name, "scale": float(scale), "zero_point": int(zero)}


def nhwc(x: torch.Tensor) -> np.ndarray:
    return nhwc_array(x.numpy())


def nhwc_array(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


def check_tflite(path: Path, x: torch.Tensor, reference: np.ndarray, precision: str) -> Artifact:
    runner = TFLiteRunner(path)
    out = runner(nhwc(x))
    diff, agree = _compare(out, reference)
    if precision in ("fp32", "fp16") and agree < (100.0 if precision == "fp32" else 99.0):
        raise EdgeKDError(f"TFLite {precision} model disagrees with PyTorch on top-1 for {100 - agree:.1f}% of samples")
    return Artifact(path, "tflite", precision, "litert", path.stat().st_size, "NHWC", runner.input_dtype, diff, agree,
                    len(x), {"quantization": runner.quantization()})


def _place(art: Artifact, dest: Path, meta: dict, source: Path, journal: Journal, status: str = "ok",
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
