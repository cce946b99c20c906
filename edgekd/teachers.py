"""Teachers from any file: an edgekd checkpoint, TorchScript, ONNX, Keras or TFLite, each a function
from ``(B, C, H, W)`` float images in [0, 1] to ``(B, K)`` logits, with outputs that are probabilities
(Keras models ending in softmax, quantized or not) detected and turned into log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.checkpoint import chosen_input_size, load_model
from edgekd.errors import EdgeKDError
from edgekd.native import quiet_native_logs
from edgekd.registry import Registry
from edgekd.zoo import fit_input, grouped_convolutions
from edgekd.convert import to_onnx
from edgekd.deployable import Deployable
from edgekd.runtime import onnx_session, open_keras, open_torchscript, TFLiteRunner

TEACHER_LOADERS: Registry[Callable[..., "Teacher"]] = Registry("teacher format")


class Teacher(Protocol):
    """A frozen model: ``(B, C, H, W)`` float images in [0, 1] to ``(B, K)`` logits on the CPU."""

    name: str
    classes: tuple[str, ...] | None

    def __call__(self, x_unit: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ForeignInput:
    """How a model from another framework wants its input: layout, size, channels, normalization."""

    layout: str  # "NCHW" or "NHWC"
    size: tuple[int, int] | None  # fixed (H, W), or None when dynamic
    channels: int | None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def prepare(self, x_unit: torch.Tensor) -> np.ndarray:
        """A [0, 1] batch ``(B, C, H, W)`` on any device as the float32 numpy array the model reads."""
        x = x_unit.detach().cpu().float()  # the runtimes are numpy-based; a CUDA batch cannot meet CPU constants
        if self.channels and x.shape[1] != self.channels:
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.channels == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise EdgeKDError(f"teacher expects {self.channels} input channels, the data has {x.shape[1]}")
        if self.size and tuple(x.shape[2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        for name, values in (("--teacher-mean", self.mean), ("--teacher-std", self.std)):
            if len(values) not in (1, x.shape[1]):
                raise EdgeKDError(f"{name} has {len(values)} values and the teacher reads {x.shape[1]} channel(s); "
                                  f"give 1 value or {x.shape[1]}")
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def guess_layout(shape) -> tuple[str, tuple[int, int] | None, int | None]:
    """Read layout, fixed spatial size and channels from a 4-D input shape (dims may be None)."""
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in list(shape)[1:]]
    if len(dims) != 3:
        raise EdgeKDError(f"teacher input has shape {[d if d is None or isinstance(d, str) else int(d) for d in shape]}; "
                          "edgekd needs a 4-D image input")
    if dims[0] in (1, 3) and dims[2] not in (1, 3):
        layout, (c, h, w) = "NCHW", dims
    elif dims[2] in (1, 3):
        layout, (h, w, c) = "NHWC", dims
    else:
        layout, (c, h, w) = "NCHW", dims
    return layout, ((h, w) if h and w else None), c


@dataclass
class OutputsAsLogits:
    """Turns a model's outputs into logits, detecting probability outputs on the first batch.

    A model ending in softmax (the seeds' Keras models) gives rows in [0, 1] that sum to 1;
    its logits are ``log(p)`` up to a per-row constant, which softmax ignores. Applying
    softmax to such outputs a second time is the bug seeds 000 and 003 have. A softmax output
    quantized to 8 bits sums to 1 only up to rounding: each of the K entries is off by up to
    half a quantization step, so the row sum may miss 1 by ``K * scale / 2``.
    """

    probabilities: bool | None = None
    eps: float = 1e-7
    output_scale: float | None = None  # quantization step of the output, when the file says

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self.probabilities is None:
            self.probabilities = looks_like_probabilities(out, self.output_scale)
        return torch.log(out.clamp_min(self.eps)) if self.probabilities else out


# Row-sum tolerance for probabilities of unknown quantization: covers 8-bit softmax outputs of up to
# 10 classes (10 * (1/256) / 2 = 0.0195); logits of a real classifier are not all in [0, 1] anyway.
PROBABILITY_SUM_TOL = 0.02


def looks_like_probabilities(out: torch.Tensor, output_scale: float | None = None) -> bool:
    """Whether (B, K) outputs are probabilities: all in [0, 1] and every row summing to 1, within the
    rounding of the output's quantization (``output_scale``) or ``PROBABILITY_SUM_TOL`` when unknown."""
    if out.ndim != 2 or not ((out >= 0).all() and (out <= 1).all()):
        return False
    tol = 1e-3 + out.shape[1] * output_scale / 2 if output_scale else PROBABILITY_SUM_TOL
    return bool(((out.sum(-1) - 1).abs() <= tol).all())


@dataclass
class FunctionTeacher:
    """A teacher around any batch function returning framework outputs as numpy or torch."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    classes: tuple[str, ...] | None = None
    kind: str = ""
    as_logits: OutputsAsLogits = field(default_factory=OutputsAsLogits)
    input_size: tuple[int, int] | None = None  # (H, W) the model was built for; other data is resized to it

    def __call__(self, x_unit: torch.Tensor) -> torch.Tensor:
        out = self.fn(x_unit)
        out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.array(out, dtype=np.float32))
        out = out.float().cpu()
        return self.as_logits(out)

    @property
    def outputs_probabilities(self) -> bool | None:
        return self.as_logits.probabilities


def load_teacher(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    input_mean: tuple[float, ...] = (0.0,),
    input_std: tuple[float, ...] = (1.0,),
    bf16: bool = False,
) -> FunctionTeacher:
    """Load a frozen teacher from an edgekd checkpoint, TorchScript, ONNX, Keras or TFLite file.

    ``input_mean``/``input_std`` describe the normalization that a model from another framework
    expects on [0, 1] pixels (edgekd checkpoints carry their own). ``bf16``: an edgekd checkpoint on
    the CPU answers in PyTorch under bf16 autocast (what a run training in bf16 on a CPU with AMX asks
    for) instead of through onnxruntime in fp32.

    Example:
        >>> t = load_teacher("runs/teacher/best.pt")  # doctest: +SKIP
        >>> t(torch.rand(4, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([4, 10])
    """
    path = Path(path)
    if not path.exists():
        raise EdgeKDError(f"teacher file not found: {path}")
    suffix = path.suffix.lower()
    kind = {".pt": "torch", ".pth": "torch", ".ckpt": "torch", ".ts": "torchscript", ".torchscript": "torchscript",
            ".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".tflite": "tflite"}.get(suffix)
    if kind is None:
        raise EdgeKDError(
            f"unknown teacher format {suffix or path.name!r}; use .pt (edgekd checkpoint or TorchScript), "
            ".onnx, .keras/.h5 or .tflite"
        )
    foreign = dict(mean=tuple(input_mean), std=tuple(input_std))
    options = {"bf16": True} if bf16 and kind == "torch" else {}
    return TEACHER_LOADERS.get(kind)(path, device=torch.device(device), **foreign, **options)


@TEACHER_LOADERS.register("torch")
def _load_torch_teacher(path: Path, device, mean, std, bf16: bool = False) -> FunctionTeacher:
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return _load_torchscript_teacher(path, device, mean, std)
    model, meta = load_model(path, device=device)
    model.eval().requires_grad_(False)
    channels_last = device.type == "cpu"  # NHWC convolutions: 1.6x the eval throughput on this CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm_mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    norm_std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    size = tuple(meta["input_size"])
    channels = int(meta["in_channels"])

    bf16 = bf16 and device.type == "cpu" and not grouped_convolutions(model)

    @torch.no_grad()
    def run(x_unit: torch.Tensor) -> torch.Tensor:
        x = x_unit.to(device)
        x = (fit_input(x, channels, size) - norm_mean) / norm_std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x).float().cpu()

    # bf16 on AMX answered 2.9x (fastcnn) and 1.6x (seed 002's teacher) as fast as onnxruntime fp32, batch 512
    # (benchmarks/results/teacher_inference.md)
    fast = _onnxruntime_forward(model, meta, run) if device.type == "cpu" and not bf16 else None
    kind = "edgekd (onnxruntime)" if fast else "edgekd (bf16)" if bf16 else "edgekd"
    return FunctionTeacher(path.name, fast or run, tuple(meta["classes"]), kind=kind,
                           as_logits=OutputsAsLogits(probabilities=False),
                           input_size=None if chosen_input_size(path) == tuple(size) else size)  # resizing was chosen


def _onnxruntime_forward(model: nn.Module, meta: dict, eager) -> Callable | None:
    """On the CPU, the same teacher through onnxruntime: 1.4-1.5x PyTorch eager's batch throughput
    on seed 002's teacher here (channels_last eager 185-203 vs 275-305 images/s, batch 512, one
    thread), which is what the teacher-output cache costs. Checked against eager on random
    pixels; None (stay eager) when onnxruntime is missing or the export or the check fails."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    import tempfile


    channels, size = int(meta["in_channels"]), tuple(meta["input_size"])
    net = Deployable(model, meta["mean"], meta["std"]).eval()
    probe = torch.rand(4, channels, *size, generator=torch.Generator().manual_seed(0))
    try:
        with tempfile.TemporaryDirectory(prefix="edgekd-teacher-") as tmp:
            path = to_onnx(net, probe, Path(tmp) / "teacher.onnx", internal=True)
            sess = onnx_session(path, threads=torch.get_num_threads())
        name = sess.get_inputs()[0].name

        def run(x_unit: torch.Tensor) -> torch.Tensor:
            x = fit_input(x_unit.cpu(), channels, size).contiguous().numpy()
            return torch.from_numpy(sess.run(None, {name: x})[0])

        want, got = eager(probe), run(probe)
        if not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
            return None
        return run
    except Exception:  # noqa: BLE001 - any export or runtime failure: the eager teacher is correct, just slower
        return None


@TEACHER_LOADERS.register("torchscript")
def _load_torchscript_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    module = open_torchscript(path, device)
    spec = ForeignInput("NCHW", None, None, mean, std)

    @torch.no_grad()
    def run(x_unit):
        return module(torch.from_numpy(spec.prepare(x_unit)).to(device)).float().cpu()

    return FunctionTeacher(path.name, run, kind="torchscript")


@TEACHER_LOADERS.register("onnx")
def _load_onnx_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    try:
        session = onnx_session(path, threads=torch.get_num_threads())
    except EdgeKDError as exc:
        raise EdgeKDError(f"could not load ONNX teacher {path}: {exc}") from None
    inp = session.get_inputs()[0]
    layout, size, channels = guess_layout(inp.shape)
    spec = ForeignInput(layout, size, channels, mean, std)
    fixed_batch = isinstance(inp.shape[0], int) and inp.shape[0] > 0

    def run(x_unit):
        arr = spec.prepare(x_unit)
        if fixed_batch:  # a model exported with batch 1 is run one image at a time
            return np.concatenate([session.run(None, {inp.name: arr[i:i + 1]})[0] for i in range(len(arr))])
        return session.run(None, {inp.name: arr})[0]

    scale = _onnx_output_scale(path)
    return FunctionTeacher(path.name, run, kind="onnx", as_logits=OutputsAsLogits(output_scale=scale), input_size=spec.size)


def _onnx_output_scale(path: Path) -> float | None:
    """The scale of the DequantizeLinear producing a QDQ model's output (e.g. a quantized softmax), if any."""
    try:
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnx missing or unreadable: the generic tolerance applies
        return None
    producer = next((n for n in graph.node if graph.output[0].name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = next((t for t in graph.initializer if t.name == producer.input[1]), None)
    return float(np.max(numpy_helper.to_array(scale))) if scale is not None else None


@TEACHER_LOADERS.register("keras")
def _load_keras_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    model = open_keras(path)
    layout, size, channels = guess_layout(model.input_shape)
    spec = ForeignInput(layout, size, channels, mean, std)

    def run(x_unit):
        out = model(spec.prepare(x_unit), training=False)
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)  # a tensor's own copy: numpy's __array__ call warns

    return FunctionTeacher(path.name, run, kind="keras", input_size=spec.size)


@TEACHER_LOADERS.register("tflite")
def _load_tflite_teacher(path: Path, device, mean, std) -> FunctionTeacher:

    runner = TFLiteRunner(path)
    layout, size, channels = guess_layout(runner.inp["shape"])
    spec = ForeignInput(layout, size, channels, mean, std)
    quant = runner.quantization()["output"]  # None for float outputs
    return FunctionTeacher(path.name, lambda x_unit: runner(spec.prepare(x_unit)), kind="tflite", input_size=spec.size,
                           as_logits=OutputsAsLogits(output_scale=quant["scale"] if quant else None))
