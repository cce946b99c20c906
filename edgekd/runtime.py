"""The one way edgekd loads and runs a model file: PyTorch checkpoints, TorchScript, ONNX, TFLite and Keras.

``load_runtime`` gives the deployable formats (checkpoints, ONNX, TFLite) the same small interface (``Loaded``:
predict on NCHW [0, 1] batches, a timed single-image call, what the file is); export's parity checks, quantize's
proofs, bench and package all run files through it. Teachers in any format (``edgekd.teachers``) open their files
with the loaders here too (``open_torchscript``, ``open_keras``, ``onnx_session``, ``TFLiteRunner``) and add only
what a teacher needs: the input layout and normalization a foreign file expects, and logits from probabilities.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd.checkpoint import load_model
from edgekd.deployable import Deployable
from edgekd.errors import EdgeKDError, first_line
from edgekd.files import read_json
from edgekd.native import quiet_native_logs
from edgekd.registry import Registry
from edgekd.zoo import model_cost

RUNTIMES: Registry[Callable[..., "Loaded"]] = Registry("model format")
SUFFIX_FORMAT = {".pt": "pytorch", ".pth": "pytorch", ".onnx": "onnx", ".tflite": "tflite"}
# The operators whose multiply-accumulates decide whether a TFLite model computes in int8.
TFLITE_COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


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


def open_torchscript(path: Path, device) -> torch.jit.ScriptModule:
    """A TorchScript file in eval mode on ``device``."""
    try:
        with warnings.catch_warnings():
            # Users' TorchScript files are what this is for; PyTorch's notice that TorchScript is deprecated
            # is not theirs to act on here.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"could not load TorchScript file {path}: {first_line(exc)}") from None


def open_keras(path: Path):
    """A Keras model (.keras, .h5), uncompiled, with TensorFlow's start-up lines held back."""
    try:
        with quiet_native_logs():
            import tensorflow as tf  # noqa: F401 - keras needs its backend
            import keras
    except ImportError:
        raise EdgeKDError("Keras files need TensorFlow: pip install 'edgekd[tf]'") from None
    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"could not load Keras file {path}: {first_line(exc)}") from None


def run_onnx(path_or_session, x_nchw: np.ndarray, batch: int = 256) -> np.ndarray:
    sess = onnx_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x_nchw[i:i + batch]})[0] for i in range(0, len(x_nchw), batch)])


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

    @property
    def output_dtype(self) -> str:
        return np.dtype(self.out["dtype"]).name

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


def nhwc(x) -> np.ndarray:
    """A (B, C, H, W) torch tensor as a contiguous (B, H, W, C) array."""
    return nhwc_array(x.numpy())


def nhwc_array(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


def count_tflite_ops(path_or_runner: Path | TFLiteRunner) -> tuple[int, int]:
    """Compute ops whose input tensor is int8 vs. those computing in float."""
    runner = path_or_runner if isinstance(path_or_runner, TFLiteRunner) else TFLiteRunner(path_or_runner)
    tensors = {t["index"]: t for t in runner.interp.get_tensor_details()}
    quantized = floats = 0
    for op in runner.interp._get_ops_details():  # LiteRT's op listing (no public equivalent)
        if op["op_name"] not in TFLITE_COMPUTE:
            continue
        dtype = tensors[op["inputs"][0]]["dtype"]
        if dtype in (np.int8, np.uint8, np.int16):
            quantized += 1
        else:
            floats += 1
    return quantized, floats


def tflite_int8_mac_share(path_or_runner: Path | TFLiteRunner) -> float:
    """Share of the compute operators' multiply-accumulates that LiteRT runs on integer tensors."""
    int8_macs, total = tflite_macs(path_or_runner)
    return int8_macs / total if total else 0.0


def tflite_macs(path_or_runner: Path | TFLiteRunner) -> tuple[int, int]:
    """(MACs on integer tensors, all MACs) of the compute operators the loaded interpreter holds (after its
    default XNNPACK delegation), each weighed as output elements x reduction size (kernel area x input
    channels; kernel area for depthwise)."""
    runner = path_or_runner if isinstance(path_or_runner, TFLiteRunner) else TFLiteRunner(path_or_runner)
    tensors = {t["index"]: t for t in runner.interp.get_tensor_details()}
    int8_macs = total = 0
    for op in runner.interp._get_ops_details():  # LiteRT's op listing (no public equivalent)
        name = op["op_name"]
        if name not in TFLITE_COMPUTE:
            continue
        activation = tensors[op["inputs"][2 if name == "TRANSPOSE_CONV" else 0]]
        weights = [int(v) for v in tensors[op["inputs"][1]]["shape"]]
        out = int(np.prod(tensors[op["outputs"][0]]["shape"]))
        if name == "TRANSPOSE_CONV":  # every input element meets every kernel tap of every output channel
            macs = int(np.prod(activation["shape"])) * int(np.prod(weights[:3]))
        elif name == "DEPTHWISE_CONV_2D":
            macs = out * weights[1] * weights[2]
        else:  # CONV_2D (O, kh, kw, I) and FULLY_CONNECTED (O, I)
            macs = out * int(np.prod(weights[1:]))
        total += macs
        if activation["dtype"] in (np.int8, np.uint8, np.int16):
            int8_macs += macs
    return int8_macs, total


@dataclass
class Loaded:
    """A model ready to run: ``predict`` on NCHW [0, 1] float32 batches, plus what it is."""

    format: str
    runtime: str
    precision: str
    channels: int
    input_size: tuple[int, int]
    classes: tuple[str, ...] | None  # None when the file does not say
    predict: Callable[[np.ndarray], np.ndarray]  # (B, C, H, W) -> (B, K) scores
    single: Callable[[np.ndarray], Callable[[], object]]  # (1, C, H, W) -> a zero-argument timed call
    batched: Callable[[np.ndarray], Callable[[], object]]  # (B, C, H, W) -> a zero-argument timed call
    source: Path | None = None  # the edgekd checkpoint a file was exported from
    params: int | None = None
    macs: int | None = None


def latency_fn(path: str | Path, x_nchw: np.ndarray, threads: int = 1) -> Callable[[], object]:
    """A zero-argument call running one image through the file's runtime (.pt, .onnx, .tflite)."""
    path = Path(path)
    return load_runtime(path, threads).single(x_nchw)


def load_runtime(path: Path, threads: int = 1) -> Loaded:
    fmt = SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise EdgeKDError(f"unknown model format {path.suffix or path.name!r}: give an edgekd checkpoint (.pt), "
                          "an .onnx or a .tflite file, or a run directory")
    if not path.is_file():
        raise EdgeKDError(f"model not found: {path}")
    return RUNTIMES.get(fmt)(path, threads)


@RUNTIMES.register("pytorch")
def _load_pytorch(path: Path, threads: int) -> Loaded:
    import torch


    torch.set_num_threads(threads)
    model, meta = load_model(path)
    net = Deployable(model, meta["mean"], meta["std"]).eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([net(torch.from_numpy(x[i:i + 256])).numpy() for i in range(0, len(x), 256)])

    def call(x: np.ndarray):
        xt = torch.from_numpy(x)

        def forward():
            with torch.inference_mode():
                return net(xt)

        return forward

    params, macs = model_cost(model, int(meta["in_channels"]), tuple(meta["input_size"]))
    return Loaded("pytorch", f"torch {torch.__version__}", "fp32", int(meta["in_channels"]), tuple(meta["input_size"]),
                  tuple(meta["classes"]), predict, call, call, path, params, macs)


@RUNTIMES.register("onnx")
def _load_onnx(path: Path, threads: int) -> Loaded:
    import onnxruntime as ort


    sess = onnx_session(path, threads)
    inp = sess.get_inputs()[0]
    if len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
        raise EdgeKDError(f"{path.name}: input shape {inp.shape} is not (batch, channels, height, width)")
    name = inp.name
    side = read_sidecar(path)

    def call(x: np.ndarray):
        return lambda: sess.run(None, {name: x})

    precision = "int8" if any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in _onnx_nodes(path)) else "fp32"
    return Loaded("onnx", f"onnxruntime {ort.__version__}", precision, int(inp.shape[1]), (int(inp.shape[2]), int(inp.shape[3])),
                  _classes(side), lambda x: run_onnx(sess, x), call, call, source_checkpoint(path, side))


def _onnx_nodes(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).graph.node
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged file
        raise EdgeKDError(f"onnx could not parse {path.name} ({first_line(exc)}); export it again") from None


@RUNTIMES.register("tflite")
def _load_tflite(path: Path, threads: int) -> Loaded:

    runner = TFLiteRunner(path, threads)
    shape = runner.inp["shape"]  # (1, H, W, C)
    if len(shape) != 4:
        raise EdgeKDError(f"{path.name}: input shape {[int(d) for d in shape]} is not (batch, height, width, channels)")
    side = read_sidecar(path)
    precision = "int8" if _tflite_is_int8(runner) else ("fp16" if "fp16" in path.stem else "fp32")

    def call(x: np.ndarray):
        return _invoke(runner, nhwc_array(x))

    def batched(x: np.ndarray):
        # A second interpreter resized to the batch; files with a fixed batch of 1 loop instead.
        try:
            big = TFLiteRunner(path, threads)
            big.interp.resize_tensor_input(big.inp["index"], [len(x), *shape[1:]])
            big.interp.allocate_tensors()
            big.inp = big.interp.get_input_details()[0]
            big.out = big.interp.get_output_details()[0]
        except Exception:  # noqa: BLE001 - not resizable: fall back to one image at a time
            return lambda: runner(nhwc_array(x))
        return _invoke(big, nhwc_array(x))

    from importlib.metadata import version

    return Loaded("tflite", f"litert {version('ai-edge-litert')}", precision, int(shape[3]), (int(shape[1]), int(shape[2])),
                  _classes(side), lambda x: runner(nhwc_array(x)), call, batched, source_checkpoint(path, side))


def _invoke(runner, x_nhwc: np.ndarray) -> Callable[[], np.ndarray]:
    """One timed LiteRT call on a prepared input: set, invoke, read (what an app does per frame)."""

    def invoke():
        runner.set_input(x_nhwc)
        runner.interp.invoke()
        return runner.get_output()

    return invoke


def _tflite_is_int8(runner) -> bool:

    return count_tflite_ops(runner)[0] > 0


def read_sidecar(path: Path) -> dict:
    """The ``.json`` beside an exported file (what export and quantize recorded), or {}."""
    return read_json(path.with_name(path.name + ".json"))


def _classes(side: dict) -> tuple[str, ...] | None:
    classes = side.get("preprocessing", {}).get("classes")
    return tuple(classes) if classes else None


def source_checkpoint(path: Path, side: dict) -> Path | None:
    """The edgekd checkpoint the file was exported from, when its sidecar names one that exists."""
    src = side.get("source_checkpoint")
    if not src:
        return None
    full = (path.parent / src).resolve()
    return full if full.is_file() else None


# onnxruntime's CPU kernels that multiply in int8 (QDQ groups fused at load) and those that multiply in float.
ORT_INT8_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul", "QLinearConvTranspose"}
ORT_FLOAT_KERNELS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose", "NhwcFusedConv"}


def onnx_int8_mac_share(path: Path, x_nchw: np.ndarray, workdir: Path) -> float:
    """The share of multiply-accumulates that onnxruntime executed in int8 kernels on ``x_nchw``.

    Proof from the runtime, not the file: the profiler names every kernel that ran (after
    onnxruntime fused each DequantizeLinear -> Conv -> QuantizeLinear group, or did not), and the
    optimized graph it ran gives each kernel's weight shape; a kernel's MACs are its output
    elements times the weight's reduction size (input channels per group x kernel area, or K).
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = 1, True
    # Every fusion that decides int8 or float (the QDQ groups) but not the NCHWc layout pass, which
    # reorders float conv weights into blocks whose shape would misstate their MACs.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.profile_file_prefix = str(workdir / "ort-profile")
    opts.optimized_model_filepath = str(workdir / "ort-optimized.onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x_nchw.astype(np.float32)})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    graph = onnx.load(opts.optimized_model_filepath).graph
    Path(opts.optimized_model_filepath).unlink()
    weights = {t.name: list(t.dims) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    macs = {"int8": 0, "float": 0}
    for e in events:
        op = e.get("args", {}).get("op_name")
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or op not in ORT_INT8_KERNELS | ORT_FLOAT_KERNELS:
            continue
        node = nodes.get(e["name"][: -len("_kernel_time")])
        outputs = e["args"].get("output_type_shape") or []
        if node is None or not outputs:
            continue
        out_elems = int(np.prod(next(iter(outputs[0].values()))))
        macs["int8" if op in ORT_INT8_KERNELS else "float"] += out_elems * _reduction_size(node, op, weights)
    total = macs["int8"] + macs["float"]
    return macs["int8"] / total if total else 0.0


# Where each kernel's weight sits among its inputs.
_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearConvTranspose": 3, "QGemm": 3, "QLinearMatMul": 3}


def _reduction_size(node, op: str, weights: dict[str, list[int]]) -> int:
    """Multiply-accumulates per output element: a conv weight's size over its output-channel axis
    ``(Cout, Cin / groups, kH, kW)``, or a matrix weight's K (``(K, N)``, or ``(N, K)`` under transB)."""
    index = _WEIGHT_INPUT.get(op, 1)
    shape = weights.get(node.input[index]) if len(node.input) > index else None
    if not shape:
        return 0
    if "Conv" in op:
        return int(np.prod(shape[1:]))
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return int(shape[1] if trans_b else shape[0])
