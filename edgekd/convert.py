"""The converters: PyTorch -> ONNX (torch.onnx) -> TFLite (onnx2tf offline, or litert-torch).

ONNX keeps PyTorch's NCHW layout with a dynamic batch; TFLite takes NHWC with batch 1, the
mobile convention (onnx2tf does the transposition). The checks that each finished file agrees with
PyTorch on real images are export's; this module only converts, running the export sample through
a fresh ONNX file once to choose between PyTorch's two exporters.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgekd.errors import EdgeKDError, first_line
from edgekd.native import captured_output, quiet_native_logs
from edgekd.runtime import run_onnx

ONNX_OPSET = 17


def to_onnx(net: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool = True, internal: bool = False) -> Path:
    """Named input/output, dynamic or fixed batch 1, one self-contained checker-clean file.

    PyTorch's torch.export-based exporter first, kept where its file gives PyTorch's logits on ``x``
    (onnxruntime, eval mode); otherwise the TorchScript-based exporter, with the reason recorded in the
    file's metadata (export's sidecar shows it). The torch.export-based exporter takes 1-7 s where the
    TorchScript one takes 0.03-0.3 s (benchmarks/results/onnx_exporters.md): seconds a user pays once
    per file they ship. ``internal`` files never leave edgekd (the teacher's onnxruntime copy, made on every
    distillation run and checked by its caller): the TorchScript-based exporter first for them.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise EdgeKDError("ONNX export needs onnx and onnxruntime: pip install 'edgekd[onnx]'") from None
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    if internal and _torchscript_refusal(net, x, path, axes) is None:
        return _record_exporter(path, "torchscript", "a file edgekd only reads itself: the faster exporter")
    was_training = net.training
    try:
        reason = _torch_export_refusal(net.eval(), x, path, axes)  # torch.export traces the mode it finds
    finally:
        net.train(was_training)
    if reason is None:
        return _record_exporter(path, "torch.export", TORCH_EXPORT_WHY)
    other = _torchscript_refusal(net, x, path, axes)
    if other is not None:
        Path(path).unlink(missing_ok=True)  # neither exporter's file is one to keep
    if other == reason:
        raise EdgeKDError(f"ONNX export failed (both PyTorch exporters): {reason.removeprefix('failed: ')}")
    if other is not None:
        raise EdgeKDError(f"ONNX export failed: the torch.export-based exporter {reason}; "
                          f"the TorchScript-based one: {other.removeprefix('failed: ')}")
    return _record_exporter(path, "torchscript", f"the torch.export-based exporter {reason}")


def _torchscript_refusal(net: nn.Module, x: torch.Tensor, path: Path, axes) -> str | None:
    """None when the TorchScript-based exporter wrote a checker-clean file; else "failed: why"."""
    import onnx

    try:
        _export(net, x, path, axes, dynamo=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - report which step failed, not a traceback
        return f"failed: {first_line(exc)}"
    return None


TORCH_EXPORT_WHY = "PyTorch's current exporter; its file gave PyTorch's logits"
EXPORTER_KEYS = ("edgekd.exporter", "edgekd.exporter_why")  # metadata_props of every exported file
PARITY_TOLERANCE = 1e-4  # of the largest |logit|: float reassociation, not a different function


def _torch_export_refusal(net: nn.Module, x: torch.Tensor, path: Path, axes) -> str | None:
    """None when the torch.export-based exporter wrote a checker-clean file that agrees with ``net`` on
    ``x``; else why not, as a phrase ("needs onnxscript ...", "failed: ...", "gave logits ...")."""
    import onnx

    if importlib.util.find_spec("onnxscript") is None:
        return "needs onnxscript (pip install 'edgekd[onnx]')"
    try:
        _export(net, x, path, axes, dynamo=True)
        onnx.checker.check_model(str(path), full_check=True)
        diff, scale = _logit_difference(net, x, path)
    except Exception as exc:  # noqa: BLE001 - the reason is recorded; the other exporter is tried
        return f"failed: {first_line(exc)}"
    if diff > PARITY_TOLERANCE * scale:
        return f"gave logits {diff:.2g} away from PyTorch's (largest |logit| {scale:.2g})"
    return None


def _logit_difference(net: nn.Module, x: torch.Tensor, path: Path) -> tuple[float, float]:
    """Largest |ONNX - PyTorch| logit on ``x`` and on its first image alone (the batch an app runs; the
    torch.export-based exporter traced a batch of 2), and the scale it is judged against. The reference runs
    on the CPU, in fp32 as onnxruntime does. export checks the finished file against PyTorch properly; this
    only picks the exporter."""
    ref = net if next(net.parameters(), torch.empty(0)).device.type == "cpu" else copy.deepcopy(net).cpu()
    batches = [x, x[:1]] if _dynamic_batch(path) else [x[:1]]
    diff, scale = 0.0, 1.0
    for xb in batches:
        xb = xb.detach().cpu()
        got = run_onnx(path, xb.numpy())
        with torch.no_grad():
            want = ref(xb).detach().numpy()
        diff, scale = max(diff, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
    return diff, scale


def _record_exporter(path: Path, exporter: str, why: str) -> Path:
    """Write which exporter made the file, and why that one, into its metadata (export's sidecar shows it)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        EXPORTER_KEYS[0]: exporter, EXPORTER_KEYS[1]: why})
    onnx.save(model, str(path))
    return path


def recorded_exporter(path: Path) -> dict:
    """``{"exporter": ..., "exporter_why": ..., "opset": N}`` from a file ``to_onnx`` wrote; empty for other files.
    The opset is the file's own: the torch.export-based exporter keeps 18 where its conversion down to
    ``ONNX_OPSET`` fails (global average pooling: ReduceMean's axes became an input in 18)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    record = {k.split(".", 1)[1]: props[k] for k in EXPORTER_KEYS if k in props}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {**record, "opset": opset} if record else {}


def _export(net: nn.Module, x: torch.Tensor, path: Path, axes, dynamo: bool) -> None:
    example, extra = (x[:1],), {"dynamic_axes": axes}
    if dynamo:  # weights inside the .onnx file; a batch of 2 so that torch.export does not specialize it to 1
        example = (x[:1].expand(2, *x.shape[1:]).contiguous(),) if axes else example
        extra = {"external_data": False, "dynamic_shapes": ({0: torch.export.Dim("batch")},) if axes else None}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as log_dir, \
            captured_output(Path(log_dir) / "export.log") if dynamo else nullcontext():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(net, example, str(path), input_names=["input"], output_names=["logits"],
                          opset_version=ONNX_OPSET, dynamo=dynamo, **extra)
    if dynamo:
        _name_nodes_by_module(path)


def _name_nodes_by_module(path: Path) -> None:
    """Name each node by the module path that made it, as the TorchScript-based exporter does
    ("/layers/layers.0/layers.0.bn1/Conv" rather than "node_conv2d_3"; a convolution with its batch norm folded in
    takes the batch norm's name): the float fallback and its report name layers by node. Then drop the nodes'
    metadata, which holds this machine's source paths and stack traces."""
    import onnx

    model, seen = onnx.load(str(path)), {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        try:  # PyTorch's own metadata format: where it changes, names stay as they are
            scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        if len(scopes) > 1:
            name = "/" + "/".join([*(s for s in scopes[1:-1] if s), node.op_type])
            seen[name] = seen.get(name, -1) + 1
            node.name = f"{name}_{seen[name]}" if seen[name] else name
        del node.metadata_props[:]
    onnx.save(model, str(path))


def onnx_to_tflite(onnx_path: Path, folder: Path, calibration: np.ndarray | None = None,
                   io_dtype: str = "int8", batch_size: int | None = 1) -> dict[str, Path]:
    """Convert with onnx2tf; with ``calibration`` (NHWC, [0, 1]) also write the int8 variants.

    A dynamic batch dimension is fixed to ``batch_size`` (an app's TFLite file takes one image);
    None keeps it dynamic."""
    try:
        with quiet_native_logs():
            import onnx2tf
    except ImportError:
        raise EdgeKDError("TFLite conversion needs onnx2tf, tf_keras and TensorFlow: pip install 'edgekd[tf]'") from None
    onnx_path, folder = Path(onnx_path).resolve(), Path(folder).resolve()  # onnx2tf runs in its own cwd
    # onnx2tf writes its simplified graph over the file it is given: it gets a copy of its own
    private = folder.parent / "onnx2tf-input" / onnx_path.name
    private.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, private)
    kwargs = {}
    if calibration is not None:
        npy = folder.parent / "calibration.npy"
        np.save(npy, calibration.astype(np.float32))
        c = calibration.shape[-1]
        # Calibration pixels are already the model's [0, 1] input: onnx2tf must not renormalize them.
        kwargs = dict(output_integer_quantized_tflite=True, quant_type="per-channel",
                      custom_input_op_name_np_data_path=[["input", str(npy), np.zeros((1, 1, 1, c)), np.ones((1, 1, 1, c))]],
                      input_quant_dtype=io_dtype, output_quant_dtype=io_dtype)
    if batch_size and _dynamic_batch(private):
        kwargs["batch_size"] = batch_size
    try:
        _run_onnx2tf(onnx2tf, private, folder, kwargs)
    except EdgeKDError as exc:
        # onnx2tf fails to save some graphs (torchvision's ShuffleNetV2 at 32 px) and says to convert again with
        # signature defs, a path on which it also renames the graph's ops. That retry, once.
        if "--output_signaturedefs" not in str(exc):
            raise
        shutil.copyfile(onnx_path, private)
        shutil.rmtree(folder, ignore_errors=True)
        _run_onnx2tf(onnx2tf, private, folder, {**kwargs, "output_signaturedefs": True})
    files = {kind: folder / f"{private.stem}_{kind}.tflite"
             for kind in ("float32", "float16", "integer_quant", "full_integer_quant")}
    return {k: v for k, v in files.items() if v.is_file()}


def _run_onnx2tf(onnx2tf, onnx_path: Path, folder: Path, kwargs: dict) -> None:
    log = folder.parent / "onnx2tf.log"
    start = log.stat().st_size if log.is_file() else 0  # the log is shared: a failure is read from this run's part
    try:
        with captured_output(log), _offline_sample_data(folder.parent / "onnx2tf-cwd"), warnings.catch_warnings():
            # TensorFlow's int8 converter builds the interpreter it deprecated itself; not the user's concern
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated", category=UserWarning)
            # No onnxsim: torch's exporter has folded the graph already. On edge_resnet_s, MobileNetV3-Small and
            # ShuffleNetV2 the TFLite files kept their ops and sizes without it, and each conversion took seconds
            # less; with it, the graph converted depended on whether onnxsim happened to be on PATH.
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(folder), non_verbose=True,
                            copy_onnx_input_output_names_to_tflite=True, not_use_onnxsim=True, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - onnx2tf exits via sys.exit on unsupported ops
        if isinstance(exc, KeyboardInterrupt):
            raise
        with open(log, "rb") as f:
            f.seek(start)
            errors = [ln for ln in f.read().decode(errors="replace").splitlines() if "ERROR" in ln][-1:]
        reason = errors[0].strip() if errors else _tensorflow_reason(exc)
        raise EdgeKDError(f"TFLite conversion (onnx2tf) failed: {reason}") from None


def torch_to_tflite(net: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """The second TFLite path: Google's litert-torch converts the PyTorch network itself (fp32, batch 1),
    wrapped so that the file takes NHWC pixels like onnx2tf's. export uses it where onnx2tf fails on an
    architecture (an operator or a layout onnx2tf cannot place)."""
    litert_torch = _import_litert()
    sample = _nhwc(x[:1])
    try:
        with captured_output(path.with_suffix(".litert.log")), quiet_native_logs():
            wrapped = litert_torch.to_channel_last_io(net, args=[0]).eval()
            litert_torch.convert(wrapped, (sample,)).export(str(path))
    except Exception as exc:  # noqa: BLE001 - report which converter failed, not a traceback
        raise EdgeKDError(f"TFLite conversion (litert-torch) failed: {first_line(exc)}") from None
    return path


def torch_to_tflite_int8(net: nn.Module, calibration: torch.Tensor, path: Path, float_io: bool = False,
                        percentile: float | None = None) -> Path:
    """litert-torch's static int8 path (PT2E: symmetric per-channel int8 weights, int8 activations
    calibrated on ``calibration``, NCHW [0, 1] pixels, one image at a time), NHWC input like
    ``torch_to_tflite``'s. Where the first layer is quantized, the converter folds the input's
    quantization into the input tensor: int8 input, and likewise int8 output. ``float_io`` keeps both
    float32, what MediaPipe and the TFLite Task Library load (``_FloatBoundary``). Activation ranges come from
    PT2E's histogram observer (the range that minimises the L2 rounding error), or with ``percentile`` from that
    histogram's ``percentile``-th and ``100 - percentile``-th values (``percentile_range``)."""
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise EdgeKDError(f"a percentile calibration keeps more than half the values: 50 < percentile <= 100, got {percentile:g}")
    net = _FloatBoundary(net) if float_io else net
    litert_torch = _import_litert()
    calibration_nhwc = _nhwc(calibration)
    sample = calibration_nhwc[:1]
    try:
        with captured_output(path.with_suffix(".litert.log")), quiet_native_logs():
            from litert_torch.quantize import pt2e_quantizer, quant_config
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
            if percentile is not None:
                config = _percentile_activations(config, percentile)
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(config)
            graph = torch.export.export(litert_torch.to_channel_last_io(net, args=[0]).eval(), (sample,)).module()
            graph = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i in range(len(calibration_nhwc)):
                    graph(calibration_nhwc[i:i + 1])
            graph = convert_pt2e(graph, fold_quantize=False)
            litert_torch.convert(graph, (sample,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
                                 ).export(str(path))
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"int8 TFLite conversion (litert-torch) failed: {first_line(exc)}") from None
    return path


def percentile_range(histogram: np.ndarray, low: float, high: float, percentile: float) -> tuple[float, float]:
    """The ``100 - percentile``-th and ``percentile``-th values of a histogram of equal bins over ``[low, high]``:
    the range a percentile calibration gives, read from the counts an observer has kept (each bound at the
    edge of the bin where the cumulative share crosses it)."""
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.sum() <= 0 or not high > low:
        return low, high
    cdf = np.cumsum(counts) / counts.sum()
    tail = 1.0 - percentile / 100.0
    edges = np.linspace(low, high, len(counts) + 1)
    first = int(np.searchsorted(cdf, tail, side="right"))  # the first bin whose cumulative share passes the tail
    last = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return float(edges[min(first, len(counts) - 1)]), float(edges[min(last, len(counts) - 1) + 1])


def _percentile_activations(config, percentile: float):
    """``config`` with its activations observed by a histogram and ranged by percentile: PT2E has no percentile
    observer, so this one keeps the histogram observer's counts and replaces only its choice of range (edgekd's
    own: what recovers networks whose activations have rare outliers, such as EfficientNet's SiLU)."""
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        def calculate_qparams(self):
            if self.min_val == float("inf") and self.max_val == float("-inf"):
                return super().calculate_qparams()  # nothing observed: the base class warns and falls back
            low, high = percentile_range(self.histogram.cpu().numpy(), float(self.min_val), float(self.max_val),
                                         percentile)
            return self._calculate_qparams(torch.tensor(low), torch.tensor(high))

    activations = dataclasses.replace(config.input_activation,
                                      observer_or_fake_quant_ctr=PercentileObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=activations, output_activation=activations)


class _FloatBoundary(nn.Module):
    """``net`` between two operators the PT2E quantizer leaves in float, so litert-torch keeps a QUANTIZE after
    the input and a DEQUANTIZE before the output instead of folding them into int8 tensors: a clamp of the
    input to the [0, 1] pixels the network takes, and a double negation of the logits (two float multiplies
    of 10-odd numbers). Measured on ShuffleNetV2: float32 input and output, int8 in between."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.neg(torch.neg(self.net(torch.clamp(x, 0.0, 1.0))))


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()  # (B, C, H, W) -> (B, H, W, C)


def _import_litert():
    try:
        with quiet_native_logs():
            import litert_torch
    except ImportError:
        raise EdgeKDError("the second TFLite converter needs litert-torch: pip install 'edgekd[litert]'") from None
    except Exception as exc:  # noqa: BLE001 - a broken install says so in one line
        raise EdgeKDError(f"litert-torch is installed but does not load: {first_line(exc)}") from None
    return litert_torch


def litert_torch_installed() -> bool:
    return importlib.util.find_spec("litert_torch") is not None


def _dynamic_batch(onnx_path: Path) -> bool:
    """Whether the file's first input has a symbolic (or unset) batch dimension."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _tensorflow_reason(exc: BaseException) -> str:
    """The line that says what went wrong in a TensorFlow error: its message opens with "in user code:"
    and a traceback; the cause is the ``SomethingError: ...`` line inside and the line after it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if re.match(r"^\w+(Error|Exception): ", line):
            detail = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("Call arguments") else ""
            return f"{line} {detail}".strip()[:300]
    return first_line(exc)


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
