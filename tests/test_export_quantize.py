"""Export and quantization on a small trained model: parity, int8 proof, accuracy gate, integer I/O, errors."""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgeKDError

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(digits_model):
    from edgekd.export import export

    return export(digits_model, ("onnx", "tflite"), fp16=True)


def test_onnx_and_tflite_match_pytorch(exported, digits_model):
    by_name = {a.path.name: a for a in exported.artifacts}
    assert set(by_name) == {"model.onnx", "model_fp32.tflite", "model_fp16.tflite"}
    onnx_art = by_name["model.onnx"]
    assert onnx_art.max_abs_diff < 1e-4 and onnx_art.top1_agreement == 100.0 and onnx_art.layout == "NCHW"
    tfl = by_name["model_fp32.tflite"]
    assert tfl.max_abs_diff < 1e-3 and tfl.top1_agreement == 100.0 and tfl.layout == "NHWC"
    sidecar = json.loads((digits_model.parent / "export" / "model_fp32.tflite.json").read_text())
    assert sidecar["preprocessing"]["shape"] == [1, 8, 8, 3] and sidecar["status"] == "ok"
    assert sidecar["preprocessing"]["classes"][:2] == ["0", "1"]
    assert not list((digits_model.parent / "export").glob(".*"))  # no temporary leftovers


def test_onnx_sidecar_names_the_exporter_and_why(exported, digits_model):
    sidecar = json.loads((digits_model.parent / "export" / "model.onnx.json").read_text())
    assert sidecar["exporter"] == "torch.export" and sidecar["exporter_why"].startswith("PyTorch's current exporter")
    assert sidecar["opset"] in (17, 18)  # 18 where the exporter could not convert the network down


def test_onnx_has_dynamic_batch_and_named_io(exported):
    import onnx

    model = onnx.load(str(exported.artifacts[0].path))
    inp, out = model.graph.input[0], model.graph.output[0]
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_is_really_int8_and_accurate(quantized):
    by_format = {m.format: m for m in quantized.models}
    for fmt in ("onnx", "tflite"):
        m = by_format[fmt]
        assert m.quantized_ops > 0, fmt
        assert m.int8.size_bytes < m.fp32.size_bytes
        assert m.fp32_test_acc > 80 and m.drop_pts < 5, (fmt, m.fp32_test_acc, m.int8_test_acc)
        assert m.int8.top1_agreement > 90
    assert by_format["onnx"].choice["activation_type"] in ("uint8", "int8")
    assert set(by_format["onnx"].choice["p50_ms_by_activation_type"]) == {"uint8", "int8"}
    assert by_format["tflite"].int8.input_dtype == "float32"  # MediaPipe-loadable by default
    for m in quantized.models:  # phones by default: full 8-bit weights, recorded beside each file
        assert m.choice["target"] == "arm" and m.choice["reduce_range"] is False
        side = json.loads(m.int8.path.with_name(m.int8.path.name + ".json").read_text())
        assert side["quantization_choice"]["target"] == "arm"
    assert _max_int8_weight(by_format["onnx"].int8.path) == 127
    # LiteRT's side of the proof: every multiply-accumulate on int8 tensors, none in the fp32 file, and the
    # MACs it weighs by are the ones torch counts for the checkpoint
    from edgekd.zoo import model_cost
    from edgekd.checkpoint import load_model
    from edgekd.runtime import tflite_macs

    lite = by_format["tflite"]
    assert lite.int8_mac_share == 1.0 and tflite_macs(lite.fp32.path)[0] == 0
    from edgekd.deployable import deploy_net

    model, meta = load_model(quantized.checkpoint)
    net, _ = deploy_net(model, meta)  # what was exported: RGB input, the luma conversion folded into the first conv
    assert tflite_macs(lite.int8.path)[1] == model_cost(net, 3, tuple(meta["input_size"]))[1]
    assert len(quantized.calibration.indices) == 100 and max(quantized.calibration.per_class) - min(quantized.calibration.per_class) <= 1


def test_calibration_sample_is_stratified_and_reproducible():
    from edgekd.data import load_data
    from edgekd.data import calibration_sample

    data = load_data("digits")
    a, b = calibration_sample(data, 50), calibration_sample(data, 50)
    assert a == b and sum(a.per_class) == 50 and set(a.per_class) == {5}


def test_integer_io_records_scale_and_zero_point(digits_model, tmp_path):
    from edgekd.runtime import TFLiteRunner
    from edgekd.quantize import quantize

    res = quantize(digits_model, formats=("tflite",), calib_size=60, io="uint8", out_dir=tmp_path)
    [m] = res.models
    q = m.int8.extra["quantization"]
    assert q["input"]["dtype"] == "uint8" and q["input"]["scale"] > 0
    # the [0, 1] input range maps onto uint8's 0..255: pixel 0 near code 0, pixel 1 near code 255
    assert 0 <= q["input"]["zero_point"] <= 2
    assert abs(1.0 / q["input"]["scale"] + q["input"]["zero_point"] - 255) <= 2
    r = TFLiteRunner(m.int8.path)
    assert r.input_dtype == "uint8" and m.drop_pts < 5


def test_accuracy_gate_exit_code_keeps_files_marked_failed(digits_model, tmp_path):
    result = runner.invoke(app, ["quantize", str(digits_model), "-f", "onnx", "--calib-size", "50",
                                 "--max-drop", "-100", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "more than --max-drop" in result.output
    sidecar = json.loads((tmp_path / "model_int8.onnx.json").read_text())
    assert sidecar["status"] == "failed"
    assert json.loads((tmp_path / "quantize.json").read_text())["passed"] is False


def _max_int8_weight(path) -> int:
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights if w.size > 1)


def test_target_without_vnni_gets_7_bit_onnx_weights_and_says_so(digits_model, tmp_path):
    result = runner.invoke(app, ["quantize", str(digits_model), "-f", "onnx", "--calib-size", "50",
                                 "--activation-type", "uint8", "--target", "x86", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    side = json.loads((tmp_path / "model_int8.onnx.json").read_text())
    assert side["quantization_choice"]["target"] == "x86" and side["quantization_choice"]["reduce_range"] is True
    assert _max_int8_weight(tmp_path / "model_int8.onnx") <= 64
    result = runner.invoke(app, ["quantize", str(digits_model), "--target", "riscv", "--out", str(tmp_path / "no")])
    assert result.exit_code == 1 and "unknown --target 'riscv'; choose from arm, x86-vnni, x86" in result.output
    assert not (tmp_path / "no").exists()


def test_full_range_weights_measured_without_vnni_carry_a_caveat(digits_model, tmp_path, monkeypatch):
    mod = importlib.import_module("edgekd.quantize")
    monkeypatch.setattr(mod, "host_target", lambda: "x86")
    result = runner.invoke(app, ["quantize", str(digits_model), "-f", "onnx", "--calib-size", "50",
                                 "--activation-type", "uint8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    choice = json.loads((tmp_path / "model_int8.onnx.json").read_text())["quantization_choice"]
    assert choice["measured_on"] == "x86" and "may be lower than on the target" in choice["caveat"]
    assert "warning: onnx: measured on an x86 CPU without VNNI" in " ".join(result.output.split())


def test_export_errors(digits_model, tmp_path):
    result = runner.invoke(app, ["export", str(digits_model), "-f", "coreml"])
    assert result.exit_code == 1 and "unknown format 'coreml'" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    result = runner.invoke(app, ["export", str(bad), "--data", "digits"])
    assert result.exit_code == 1 and "corrupt" in result.output
    result = runner.invoke(app, ["quantize", str(tmp_path / "model.tflite")])
    assert result.exit_code == 1 and "not found" in result.output


def test_missing_converter_extra_is_named(digits_model, monkeypatch):
    import builtins

    from edgekd.export import export

    real_import = builtins.__import__

    def no_onnx2tf(name, *args, **kwargs):
        if name == "onnx2tf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx2tf)
    monkeypatch.setattr(importlib.import_module("edgekd.export"), "litert_torch_installed", lambda: False)  # no fallback
    with pytest.raises(EdgeKDError, match=r"pip install 'edgekd\[tf\]'"):
        export(digits_model, ("tflite",))


def test_conversion_failure_leaves_no_file(digits_model, tmp_path, monkeypatch):
    ex = importlib.import_module("edgekd.export")

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator: FancyOp")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(EdgeKDError, match=r"ONNX export failed \(both PyTorch exporters\): Unsupported operator: FancyOp"):
        ex.export(digits_model, ("onnx",), out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_json_stdout_stays_clean_through_the_converter(digits_model, tmp_path):
    """TensorFlow's converter prints to fd 1 from C++; --json output must still parse."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edgekd.cli", "quantize", str(digits_model), "-f", "tflite",
                           "--calib-size", "30", "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["models"][0]["format"] == "tflite" and report["calibration"]["size"] == 30


@pytest.mark.parametrize("arch,channels", [("resnet8", 3), ("resnet8", 1), ("seed002_student", 3)])
def test_folded_normalization_matches_the_unfolded_model(arch, channels):
    """Per-channel mean/std (and gray -> RGB luma) folded into the first conv, exact up to float rounding."""
    from edgekd.deployable import Deployable, FoldedConv, deploy_net, rgb
    from edgekd.zoo import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, channels, (16, 16)).eval()
    mean, std = [0.49, 0.48, 0.45][:channels], [0.25, 0.24, 0.26][:channels]
    meta = {"in_channels": channels, "input_size": [16, 16], "mean": mean, "std": std}
    net, how = deploy_net(model, meta)
    assert how == "folded into the first convolution"
    assert any(isinstance(m, FoldedConv) for m in net.modules())
    x = torch.rand(32, channels, 16, 16)
    with torch.no_grad():
        want = Deployable(model, mean, std).eval()(x)
        got = net(rgb(x))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def _random_bn_statistics(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class _StemReadTwice(torch.nn.Module):
    """The stem convolution's output goes to its batch norm and, unnormalized, to a second reader."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


class _StemWeightsReadElsewhere(_StemReadTwice):
    """The stem's batch norm is called once, but its weight and size are read outside that call too."""

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.bn.weight.abs().view(1, -1, 1, 1) / self.bn.num_features
        return self.fc(y.mean((2, 3)))


class _HookedStem(_StemReadTwice):
    """A forward hook on the stem's batch norm (invisible to torch.fx)."""

    def __init__(self):
        super().__init__()
        self.bn.register_forward_hook(lambda module, args, out: out * 2.0)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("arch,fused", [("resnet8", True), ("read_twice", False), ("read_elsewhere", False),
                                        ("hooked", False)])
def test_stem_batch_norm_is_folded_into_the_first_convolution(arch, fused):
    """The batch norm that alone reads the stem convolution is folded into it (the border constant would
    otherwise keep it a separate operator); one with another reader stays. Both stay exact."""
    from edgekd.deployable import Deployable, deploy_net, fold_input_normalization, rgb
    from edgekd.zoo import build_model

    torch.manual_seed(0)
    own = {"read_twice": _StemReadTwice, "read_elsewhere": _StemWeightsReadElsewhere, "hooked": _HookedStem}
    model = _random_bn_statistics(own[arch]() if arch in own else build_model(arch, 10, 3, (16, 16)))
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    net, how = deploy_net(model, {"in_channels": 3, "input_size": [16, 16], "mean": mean, "std": std})
    assert how == "folded into the first convolution"
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == count - fused
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == count  # the caller's model is untouched
    # the fold itself (not only deploy_net's check against the unfolded model) leaves such a batch norm alone
    alone = fold_input_normalization(model, mean, std, 3, (16, 16), fuse_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in alone.modules()) == count - fused
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        want, got = Deployable(model, mean, std).eval()(x), net(rgb(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


class _StemEpsRead(_StemReadTwice):
    """The stem's batch norm is read for a plain attribute at call time: torch.fx records a constant, so the
    fold goes ahead, and the folded copy fails when it runs (an Identity has no ``eps``)."""

    def forward(self, x):
        return self.fc((self.bn(self.conv(x)) * (1.0 + self.bn.eps)).mean((2, 3)))


def test_deploy_net_retries_without_the_stem_fold_where_the_folded_copy_fails():
    from edgekd.deployable import Deployable, deploy_net, fold_input_normalization, rgb

    torch.manual_seed(0)
    model = _random_bn_statistics(_StemEpsRead())
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    folded = fold_input_normalization(model, mean, std, 3, (16, 16), fuse_bn=True)
    with pytest.raises(AttributeError):
        folded(torch.rand(2, 3, 16, 16))  # what the retry is for
    net, how = deploy_net(model, {"in_channels": 3, "input_size": [16, 16], "mean": mean, "std": std})
    assert how == "folded into the first convolution"  # the normalization still folded, the batch norm kept
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 1
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        want, got = Deployable(model, mean, std).eval()(x), net(rgb(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_tflite_files_have_batch_one_and_rgb_input(quantized):
    from edgekd.runtime import TFLiteRunner

    for m in quantized.models:
        if m.format == "tflite":
            for art in (m.fp32, m.int8):
                inp = TFLiteRunner(art.path).inp
                assert list(inp["shape"]) == [1, 8, 8, 3] and list(inp["shape_signature"]) == [1, 8, 8, 3]


def test_runtime_proof_counts_the_macs_onnxruntime_ran_in_int8(tmp_path):
    """An fp32 file runs 0% of its multiply-accumulates in int8 kernels, its int8 file all of them."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgekd.convert import to_onnx
    from edgekd.runtime import onnx_int8_mac_share

    class Reader(CalibrationDataReader):
        def __init__(self, x):
            self.items = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.rand(16, 3, 8, 8)
    fp32 = to_onnx(net, x, tmp_path / "model.onnx")
    int8 = tmp_path / "model_int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(x.numpy()), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert onnx_int8_mac_share(fp32, x[:1].numpy(), tmp_path) == 0.0
    assert onnx_int8_mac_share(int8, x[:1].numpy(), tmp_path) == 1.0
    # the linear layer left in float: the conv's 8x8x8 outputs x 27 MACs in int8, the linear's 10 x 512 in float
    mixed = tmp_path / "model_mixed.onnx"
    gemm = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
    quantize_static(str(fp32), str(mixed), Reader(x.numpy()), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=gemm)
    assert onnx_int8_mac_share(mixed, x[:1].numpy(), tmp_path) == pytest.approx(13824 / (13824 + 5120))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model_int8.onnx", "model_mixed.onnx"]


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()


def test_onnx_export_uses_the_torch_export_based_exporter_and_passes_on_no_warning(tmp_path):
    import warnings

    import onnx
    import onnxruntime as ort

    from edgekd.convert import recorded_exporter, to_onnx

    net, x = _tiny_net(), torch.rand(5, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = to_onnx(net.train(), x, tmp_path / "m.onnx")
    assert [str(w.message)[:80] for w in caught] == []
    assert net.training, "the caller's module keeps its mode"
    assert recorded_exporter(path)["exporter"] == "torch.export"
    onnx.checker.check_model(str(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert got.shape == (5, 3)  # the batch stays dynamic
    np.testing.assert_allclose(got, net.eval()(x).detach().numpy(), atol=1e-5)


def _exporter_stand_in(monkeypatch, torch_export_result):
    """torch.onnx.export whose torch.export-based branch raises or writes a different network."""
    real, calls = torch.onnx.export, []

    def export(net, *args, dynamo=True, external_data=True, verbose=None, **kwargs):
        calls.append(dynamo)
        if dynamo and isinstance(torch_export_result, Exception):
            raise torch_export_result
        if dynamo:  # the other network, through the TorchScript-based exporter
            net, kwargs = torch_export_result, {**kwargs, "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
            kwargs.pop("dynamic_shapes")
        return real(net, *args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


@pytest.mark.parametrize("case, why", [
    ("fails", "the torch.export-based exporter failed: unsupported operator aten::foo"),
    ("differs", r"the torch.export-based exporter gave logits .* away from PyTorch's \(largest \|logit\| .*\)"),
    ("no onnxscript", r"the torch.export-based exporter needs onnxscript \(pip install 'edgekd\[onnx\]'\)"),
])
def test_onnx_export_falls_back_to_the_torchscript_exporter_with_the_reason(tmp_path, monkeypatch, case, why):
    import importlib.util
    import re

    from edgekd.convert import recorded_exporter, to_onnx

    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    calls = _exporter_stand_in(monkeypatch, RuntimeError("unsupported operator aten::foo") if case == "fails" else other)
    if case == "no onnxscript":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = to_onnx(_tiny_net(), torch.rand(2, 3, 8, 8), tmp_path / "m.onnx")
    assert [str(w.message)[:80] for w in caught] == []  # PyTorch's deprecation notice is edgekd's business, not the user's
    assert calls == ([False] if case == "no onnxscript" else [True, False])
    record = recorded_exporter(path)
    assert record["exporter"] == "torchscript" and re.fullmatch(why, record["exporter_why"]), record


def test_internal_onnx_files_take_the_faster_exporter_first(tmp_path, monkeypatch):
    """The teacher's onnxruntime copy is made on every distillation run and never shipped."""
    from edgekd.convert import recorded_exporter, to_onnx

    calls = _exporter_stand_in(monkeypatch, RuntimeError("not reached"))
    path = to_onnx(_tiny_net(), torch.rand(2, 3, 8, 8), tmp_path / "t.onnx", internal=True)
    assert calls == [False] and recorded_exporter(path)["exporter"] == "torchscript"


def test_onnx_export_failing_in_both_exporters_says_both_reasons(tmp_path, monkeypatch):
    from edgekd.convert import to_onnx

    def export(*args, dynamo=True, **kwargs):
        raise RuntimeError("torch.export says no" if dynamo else "TorchScript says no")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(EdgeKDError, match="^ONNX export failed: the torch.export-based exporter failed: torch.export "
                                          "says no; the TorchScript-based one: TorchScript says no$"):
        to_onnx(_tiny_net(), torch.rand(2, 3, 8, 8), tmp_path / "n.onnx")


def test_accuracy_aware_fallback_keeps_the_fewest_layers_in_float(tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekd.convert import to_onnx
    from edgekd.quantize import _Inputs, _float_fallback, _ort_int8, count_onnx_ops
    from edgekd.runtime import run_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():  # class = the strongest of R, G, B, or "dark" (class 3) when none reaches 0.5
        for layer in (net[0], net[2], net[6]):
            layer.weight.zero_()
            layer.bias.zero_()
        for c in range(3):
            net[0].weight[c + 1, c] = 1.0  # channels 1-3 carry R, G, B
            net[2].weight[c + 1, c + 1] = 1.0
            net[6].weight[c, c + 1] = 1.0
        net[0].bias[0] = 5000.0  # a huge constant channel the float model ignores; one 8-bit range cannot hold both
        net[6].bias[3] = 0.5
    torch.manual_seed(0)
    x = torch.rand(200, 3, 1, 1) + 0.05 * torch.rand(200, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1).numpy()  # the float model is right by construction
    assert len(set(y[150:].tolist())) > 2
    fp32 = to_onnx(net, x, tmp_path / "model.onnx")
    pre = tmp_path / "model.pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    inputs = _Inputs(x[:8], None, x[:100], x[100:150], y[100:150], x[150:], y[150:])
    full = _ort_int8(pre, tmp_path / "model_int8.onnx", inputs, "uint8", False)
    assert (run_onnx(full, x[150:].numpy()).argmax(1) == y[150:]).mean() < 0.9  # post-training int8 is badly hurt
    path, report = _float_fallback(pre, full, fp32, tmp_path, inputs, "uint8", False, max_drop=1.0, min_int8_share=0.0)
    assert report["val_drop_before"] > 10 and report["val_drop_after"] <= 1.0
    # the constant channel ruins the range of the first conv's output and of the second conv's input: neither
    # alone in float is enough (tried first), both are; the linear layer stays int8
    assert report["probed_layers"] == 3 and sorted(report["float_layers"]) == ["/0/Conv", "/2/Conv"]
    assert max(report["sensitivity_pts"].values()) == report["sensitivity_pts"][report["float_layers"][0]]
    assert count_onnx_ops(path) == (1, 2)
    assert report["p50_ms_all_int8"] > 0 and report["p50_ms_with_float_layers"] > 0
    # the constant channel is an eighth of the tensor, not a rare value: percentiles were tried first and missed
    assert set(report["val_drop_by_percentile"]) == {99.99, 99.9}
    assert min(report["val_drop_by_percentile"].values()) > 1.0
    # the same layers would leave too few multiply-accumulates in int8: the all-int8 file that lost least is kept
    path, report = _float_fallback(pre, full, fp32, tmp_path, inputs, "uint8", False, max_drop=1.0)
    assert report["float_layers"] == [] and "multiply-accumulates in int8" in report["why"]
    assert count_onnx_ops(path) == (3, 0) and report["val_drop_after"] == min(
        report["val_drop_before"], *report["val_drop_by_percentile"].values())
    # nothing to do when the drop already fits, or without a gate
    assert _float_fallback(pre, full, fp32, tmp_path, inputs, "uint8", False, max_drop=100.0) == (full, None)
    assert _float_fallback(pre, full, fp32, tmp_path, inputs, "uint8", False, max_drop=None) == (full, None)


def test_rare_extreme_activations_are_calibrated_to_a_percentile_before_any_layer_goes_float(tmp_path):
    """A few extreme values in the calibration images stretch min/max until the usual values round to zero;
    a percentile range ignores them and every layer stays int8."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekd.convert import to_onnx
    from edgekd.quantize import _Inputs, _float_fallback, _ort_int8, count_onnx_ops
    from edgekd.runtime import run_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    with torch.no_grad():  # class = the strongest of R, G, B
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[0].bias.zero_()
    torch.manual_seed(0)
    x = torch.rand(300, 3, 1, 1) + 0.05 * torch.rand(300, 3, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1).numpy()
    calib = x[:100].clone()
    calib[0, 0, 0, 0] = 2000.0  # one extreme pixel among 4,800 calibration values
    fp32 = to_onnx(net, x, tmp_path / "model.onnx")
    pre = tmp_path / "model.pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    inputs = _Inputs(x[:8], None, calib, x[100:200], y[100:200], x[200:], y[200:])
    full = _ort_int8(pre, tmp_path / "model_int8.onnx", inputs, "uint8", False)
    assert (run_onnx(full, x[100:200].numpy()).argmax(1) == y[100:200]).mean() < 0.7  # min/max: badly hurt
    path, report = _float_fallback(pre, full, fp32, tmp_path, inputs, "uint8", False, max_drop=1.0)
    tried = report["val_drop_by_percentile"]
    least = min(tried, key=tried.get)  # every percentile is tried; the one that loses least on validation is kept
    assert set(tried) == {99.99, 99.9} and report["calibration"] == f"percentile {least:g}"
    assert report["val_drop_before"] > 30 and report["val_drop_after"] == tried[least] <= 1.0
    assert report["float_layers"] == [] and count_onnx_ops(path) == (1, 0)  # every compute layer int8
    assert (run_onnx(path, x[100:200].numpy()).argmax(1) == y[100:200]).mean() > 0.95  # the test split


def test_a_tensorflow_error_is_reported_by_its_cause_not_its_banner():
    from edgekd.convert import _tensorflow_reason

    exc = ValueError("in user code:\n\n    File \"x.py\", line 1, in None  *\n        lambda: model(inputs)\n\n"
                     "    ValueError: Exception encountered when calling layer 'conv_11'.\n    \n"
                     "    Number of groups must not be 0\n\n    Call arguments received by layer 'conv_11':\n")
    assert _tensorflow_reason(exc) == "ValueError: Exception encountered when calling layer 'conv_11'. Number of groups must not be 0"
    assert _tensorflow_reason(RuntimeError("plain message")) == "plain message"


def test_quantize_takes_exports_onnx_file_and_leaves_it_untouched(exported, digits_model, tmp_path):
    """Stage 3 quantizes the file stage 2 wrote (dynamic batch; onnx2tf fixes batch 1 for TFLite)."""
    from edgekd.quantize import quantize

    src = digits_model.parent / "export" / "model.onnx"
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    res = quantize(src, calib_size=40, out_dir=tmp_path)
    assert [m.format for m in res.models] == ["onnx", "tflite"] and res.checkpoint == digits_model.resolve()
    assert (tmp_path / "model.onnx").read_bytes() == before[0]  # the fp32 file is export's, byte for byte
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    tfl = {m.format: m for m in res.models}["tflite"]
    assert tfl.fp32.top1_agreement == 100.0 and tfl.int8.path.name == "model_int8.tflite"
    # into export's own folder (the default): export's file and its sidecar stay exactly as export wrote them
    side = src.with_name("model.onnx.json")
    side_before = (side.read_bytes(), side.stat().st_mtime_ns)
    res = quantize(src, formats=("onnx",), calib_size=40)
    assert res.models[0].fp32.path == src and (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert (side.read_bytes(), side.stat().st_mtime_ns) == side_before
    with pytest.raises(EdgeKDError, match="already int8; give the fp32 model.onnx"):
        quantize(res.models[0].int8.path, formats=("onnx",), calib_size=40, out_dir=tmp_path / "again")


def test_quantize_refuses_an_onnx_file_that_its_checkpoint_does_not_compute(digits_model, tmp_path):
    import shutil

    import torch

    from edgekd.checkpoint import load_model, save_checkpoint
    from edgekd.export import export
    from edgekd.quantize import quantize

    model, meta = load_model(digits_model)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(digits_model.parent / "config.json", run / "config.json")
    save_checkpoint(run / "best.pt", model, meta)
    onnx_file = export(run / "best.pt", ("onnx",)).artifacts[0].path
    with torch.no_grad():  # the checkpoint moves on (trained further, say) after the export
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    save_checkpoint(run / "best.pt", model, meta)
    with pytest.raises(EdgeKDError, match="does not compute what its checkpoint does.*export it again"):
        quantize(onnx_file, formats=("onnx",), calib_size=20, out_dir=tmp_path / "q")
    assert not (tmp_path / "q" / "model_int8.onnx").exists()


def test_tflite_export_falls_back_to_litert_torch_where_onnx2tf_fails(digits_model, tmp_path, monkeypatch):
    """The fallback's choice and record; the conversion itself is stood in for by onnx2tf's fp32 file."""
    export_mod = importlib.import_module("edgekd.export")  # the package's `export` attribute is the function
    from edgekd.convert import onnx_to_tflite, to_onnx

    def onnx2tf_fails(*args, **kwargs):
        raise EdgeKDError("TFLite conversion (onnx2tf) failed: ValueError: channel shuffle")

    def litert_stand_in(net, x, path):
        onnx_file = to_onnx(net, x, path.with_suffix(".onnx"), dynamic_batch=False)
        return onnx_to_tflite(onnx_file, path.parent / "stand-in")["float32"]

    monkeypatch.setattr(export_mod, "onnx_to_tflite", onnx2tf_fails)
    monkeypatch.setattr(export_mod, "torch_to_tflite", litert_stand_in)
    monkeypatch.setattr(export_mod, "litert_torch_installed", lambda: False)
    with pytest.raises(EdgeKDError, match="onnx2tf.*channel shuffle"):  # without litert-torch: onnx2tf's error
        export_mod.export(digits_model, ("tflite",), out_dir=tmp_path / "a")
    monkeypatch.setattr(export_mod, "litert_torch_installed", lambda: True)
    res = export_mod.export(digits_model, ("tflite",), fp16=True, out_dir=tmp_path / "b")
    assert [a.path.name for a in res.artifacts] == ["model_fp32.tflite"] and res.artifacts[0].top1_agreement == 100.0
    sidecar = json.loads((tmp_path / "b" / "model_fp32.tflite.json").read_text())
    assert sidecar["converter"] == "litert-torch"
    assert sidecar["converter_why"] == ("onnx2tf failed: TFLite conversion (onnx2tf) failed: ValueError: channel shuffle; "
                                       "litert-torch makes no fp16 file")


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None, reason="litert-torch is an optional extra")
def test_litert_torch_converts_with_nhwc_input_and_parity(tmp_path):
    from edgekd.convert import torch_to_tflite, torch_to_tflite_int8
    from edgekd.deployable import Deployable
    from edgekd.export import check_tflite
    from edgekd.runtime import TFLiteRunner, count_tflite_ops, tflite_int8_mac_share
    from edgekd.zoo import build_model

    net = Deployable(build_model("torchvision:shufflenet_v2_x0_5", 4, 3, (32, 32)), [0.5] * 3, [0.25] * 3).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = net(x).numpy()
    art = check_tflite(torch_to_tflite(net, x, tmp_path / "m.tflite"), x, reference, "fp32")
    assert art.layout == "NHWC" and art.top1_agreement == 100.0 and art.max_abs_diff < 1e-4
    int8 = TFLiteRunner(torch_to_tflite_int8(net, x, tmp_path / "q.tflite"))
    # the input type follows the first layer (here the unfolded normalization stays float): quantize checks it
    assert int8.input_dtype in ("float32", "int8") and count_tflite_ops(int8)[0] > 0
    assert tflite_int8_mac_share(int8) >= 0.9
    float_io = TFLiteRunner(torch_to_tflite_int8(net, x, tmp_path / "f.tflite", float_io=True))
    assert (float_io.input_dtype, float_io.output_dtype) == ("float32", "float32")  # what MediaPipe loads
    assert tflite_int8_mac_share(float_io) >= 0.9
    assert check_tflite(tmp_path / "f.tflite", x, reference, "int8").top1_agreement >= 75.0


def test_percentile_range_reads_both_tails_of_a_histogram():
    from edgekd.convert import percentile_range

    counts = np.zeros(100)
    counts[0], counts[10:20], counts[99] = 1, 99_998 / 10, 1  # one value at each end, the rest in [1, 2)
    assert percentile_range(counts, 0.0, 10.0, 99.9) == pytest.approx((1.0, 2.0))  # both outliers cut
    assert percentile_range(counts, 0.0, 10.0, 100.0) == pytest.approx((0.0, 10.0))  # the whole range
    assert percentile_range(np.zeros(4), -1.0, 3.0, 99.9) == (-1.0, 3.0)  # nothing counted: the range as it is
    from edgekd.convert import torch_to_tflite_int8

    with pytest.raises(EdgeKDError, match="50 < percentile <= 100, got 40"):  # refused before any conversion
        torch_to_tflite_int8(_tiny_net(), torch.rand(2, 3, 8, 8), Path("never-written.tflite"), percentile=40.0)


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None, reason="litert-torch is an optional extra")
def test_litert_torch_percentile_calibration_ignores_a_rare_extreme_activation(tmp_path):
    from edgekd.convert import torch_to_tflite_int8
    from edgekd.runtime import TFLiteRunner, nhwc

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    with torch.no_grad():  # class = the strongest of R, G, B
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[0].bias.zero_()
    torch.manual_seed(0)
    y = torch.arange(200) % 3
    x = 0.001 * torch.rand(200, 3, 4, 4) + 0.0012 * torch.nn.functional.one_hot(y, 3).view(200, 3, 1, 1)  # dark pixels
    y = y.numpy()
    calib = x[:100].clone()
    calib[0, 0, 0, 0] = 1.0  # one white pixel among 4,800 calibration values: min/max steps 1/255, twice the darks
    accuracy = {p: (TFLiteRunner(torch_to_tflite_int8(net, calib, tmp_path / f"{p}.tflite", float_io=True, percentile=p))(
        nhwc(x[100:])).argmax(1) == y[100:]).mean() for p in (100.0, 99.9)}
    assert accuracy[100.0] < 0.7 and accuracy[99.9] > 0.95  # min/max (the 100th) badly hurt; the 99.9th not


def test_int8_tflite_falls_back_to_litert_torch_where_onnx2tf_fails(digits_model, tmp_path, monkeypatch):
    """quantize's choice and record; litert-torch's two conversions are stood in for by onnx2tf's files."""
    quantize_mod = importlib.import_module("edgekd.quantize")
    from edgekd.convert import onnx_to_tflite, to_onnx
    from edgekd.runtime import nhwc

    def onnx2tf_fails(*args, **kwargs):
        raise EdgeKDError("TFLite conversion (onnx2tf) failed: ValueError: channel shuffle")

    def fp32_stand_in(net, x, path):
        return onnx_to_tflite(to_onnx(net, x, path.with_suffix(".onnx"), dynamic_batch=False), path.parent / "f")["float32"]

    def int8_stand_in(net, calibration, path, float_io=False, percentile=None):  # float32 or int8 at the boundary
        onnx_file = to_onnx(net, calibration, path.with_suffix(".onnx"), dynamic_batch=False)
        files = onnx_to_tflite(onnx_file, path.parent / path.stem, calibration=nhwc(calibration))
        return files["integer_quant" if float_io else "full_integer_quant"].rename(path)

    monkeypatch.setattr(quantize_mod, "_onnx2tf_files", onnx2tf_fails)
    monkeypatch.setattr(quantize_mod, "torch_to_tflite", fp32_stand_in)
    monkeypatch.setattr(quantize_mod, "torch_to_tflite_int8", int8_stand_in)
    monkeypatch.setattr(quantize_mod, "litert_torch_installed", lambda: False)
    with pytest.raises(EdgeKDError, match="channel shuffle"):
        quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, out_dir=tmp_path / "a")
    monkeypatch.setattr(quantize_mod, "litert_torch_installed", lambda: True)
    with pytest.raises(EdgeKDError, match="channel shuffle; litert-torch made this int8 file with int8 input, not uint8: "
                                          "quantize with --io int8"):  # litert-torch has no uint8: the types are checked
        quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, io="uint8", out_dir=tmp_path / "b")
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, out_dir=tmp_path / "d").models
    assert m.choice["converter"].startswith("litert-torch") and m.choice["io"] == "float32"  # float I/O by default
    res = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, io="int8", out_dir=tmp_path / "c")
    [m] = res.models
    assert m.choice["converter"].startswith("litert-torch") and "channel shuffle" in m.choice["converter_why"]
    assert m.int8_mac_share >= 0.5 and m.fp32.top1_agreement == 100.0
    assert json.loads((tmp_path / "c" / "model_fp32.tflite.json").read_text())["converter"].startswith("litert-torch")
    # with a gate to meet, each activation calibration is tried and the one that loses least on validation kept
    drops = {"model_litert_int8_histogram": 2.0, "model_litert_int8_p99.99": 0.4, "model_litert_int8_p99.9": 0.8}
    monkeypatch.setattr(quantize_mod, "_val_acc", lambda file, inputs: 90.0 - drops.get(file.stem, 0.0))
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, max_drop=1.0, out_dir=tmp_path / "e").models
    assert m.choice["calibration"] == "percentiles 0.01-99.99" and m.choice["converter"].startswith("litert-torch")
    assert m.choice["converter_why"].startswith("onnx2tf failed: TFLite conversion (onnx2tf) failed: ValueError: channel shuffle")
    assert m.choice["converter_why"].endswith("histogram lost 2.00, percentiles 0.01-99.99 lost 0.40, "
                                              "percentiles 0.1-99.9 lost 0.80: the percentiles 0.01-99.99 kept")


def test_quantize_names_its_backends_and_refuses_an_unknown_format_before_any_work(digits_model, tmp_path):
    quantize_mod = importlib.import_module("edgekd.quantize")
    assert list(quantize_mod.BACKENDS) == ["onnx", "tflite"]
    with pytest.raises(EdgeKDError, match="^unknown int8 format 'coreml'; choose one of: onnx, tflite$"):
        quantize_mod.quantize(digits_model, formats=("onnx", "coreml"), out_dir=tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the batch-size branch is the point of the test
def test_onnx_export_checks_the_single_image_batch_an_app_runs(tmp_path):
    """torch.export traces a batch of 2; a network that differs at batch 1 must not pass as agreeing."""
    from edgekd.convert import recorded_exporter, to_onnx

    class OddAtOne(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny_net()

        def forward(self, x):
            y = self.net(x)
            return y * 0 if x.shape[0] == 1 else y

    path = to_onnx(OddAtOne().eval(), torch.rand(4, 3, 8, 8), tmp_path / "m.onnx")
    assert recorded_exporter(path)["exporter"] == "torchscript", recorded_exporter(path)
    assert "gave logits" in recorded_exporter(path)["exporter_why"]


def test_tflite_converter_is_chosen_by_validation_drop_when_onnx2tf_misses_the_gate(digits_model, tmp_path, monkeypatch):
    """Where onnx2tf works but its int8 file loses more than --max-drop on validation, litert-torch's files are
    made too and the pair that loses less on validation is kept (litert-torch stood in for by onnx2tf's files)."""
    quantize_mod = importlib.import_module("edgekd.quantize")
    from edgekd.convert import onnx_to_tflite, to_onnx
    from edgekd.runtime import nhwc

    def fp32_stand_in(net, x, path):
        return onnx_to_tflite(to_onnx(net, x, path.with_suffix(".onnx"), dynamic_batch=False), path.parent / "f")["float32"]

    def int8_stand_in(net, calibration, path, float_io=False, percentile=None):
        onnx_file = to_onnx(net, calibration, path.with_suffix(".onnx"), dynamic_batch=False)
        files = onnx_to_tflite(onnx_file, path.parent / path.stem, calibration=nhwc(calibration))
        return files["integer_quant" if float_io else "full_integer_quant"].rename(path)

    drops, measured, fp32_scored = {"onnx2tf": 3.0, "histogram": 0.5, "p99.99": 0.7, "p99.9": 0.9}, [], []

    def val_acc(file, inputs):  # litert-torch's int8 files are named by their activation calibration
        if "int8" not in file.name and "quant" not in file.name:
            fp32_scored.append(file.name)
            return 90.0
        measured.append(file.stem.removeprefix("model_litert_int8_") if "litert" in file.name else "onnx2tf")
        return 90.0 - drops[measured[-1]]

    monkeypatch.setattr(quantize_mod, "torch_to_tflite", fp32_stand_in)
    monkeypatch.setattr(quantize_mod, "torch_to_tflite_int8", int8_stand_in)
    monkeypatch.setattr(quantize_mod, "litert_torch_installed", lambda: True)
    monkeypatch.setattr(quantize_mod, "_val_acc", val_acc)
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, out_dir=tmp_path / "a").models
    assert measured == [] and m.choice["converter"] == "onnx2tf"  # no --max-drop: nothing to choose between
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, max_drop=1.0, out_dir=tmp_path / "b").models
    assert measured == ["onnx2tf", "histogram", "p99.99", "p99.9"] and m.choice["converter"].startswith("litert-torch")
    assert len(fp32_scored) == 2  # each converter's fp32 file is scored once, not once per int8 file
    assert m.choice["converter_why"] == ("onnx2tf's int8 file lost 3.00 validation points, more than --max-drop; "
                                         "litert-torch's with activations ranged by histogram lost 0.50, "
                                         "percentiles 0.01-99.99 lost 0.70, percentiles 0.1-99.9 lost 0.90: the histogram kept")
    drops.update({"histogram": 2.0, "p99.9": 0.2})  # the calibration that loses least is kept, not the first
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, max_drop=1.0, out_dir=tmp_path / "c").models
    assert m.choice["calibration"] == "percentiles 0.1-99.9" and m.choice["converter"].startswith("litert-torch")
    sidecar = json.loads((tmp_path / "c" / "model_int8.tflite.json").read_text())["quantization_choice"]
    assert sidecar["calibration"] == "percentiles 0.1-99.9" and "the percentiles 0.1-99.9 kept" in sidecar["converter_why"]
    drops.update({"histogram": 4.0, "p99.99": 4.0, "p99.9": 4.0})
    [m] = quantize_mod.quantize(digits_model, formats=("tflite",), calib_size=40, max_drop=1.0, out_dir=tmp_path / "d").models
    assert m.choice["converter"] == "onnx2tf" and m.choice["converter_why"].endswith("lost 4.00: onnx2tf's kept")
    assert m.choice["calibration"] == "min/max"


def test_onnx2tf_is_retried_with_a_signature_when_it_asks_for_one(tmp_path, monkeypatch):
    """onnx2tf fails on some layouts without a signature and says so; the conversion is retried once with
    one, from a fresh copy of the ONNX file; onnxsim is never asked for, so PATH cannot change the graph."""
    import sys
    import types

    from edgekd.convert import onnx_to_tflite

    calls = []

    def convert(input_onnx_file_path, output_folder_path, **kwargs):
        calls.append(kwargs)
        assert Path(input_onnx_file_path).read_bytes() == b"not really onnx"  # a fresh copy for each attempt
        Path(output_folder_path).mkdir(parents=True, exist_ok=True)
        if not kwargs.get("output_signaturedefs"):  # a failed attempt that leaves its debris behind
            Path(input_onnx_file_path).write_bytes(b"simplified by the failed attempt")
            (Path(output_folder_path) / "partial.pb").write_bytes(b"debris")
            print("\x1b[31mERROR:\x1b[0m Please convert again with the `-osd` or `--output_signaturedefs` option.")
            raise SystemExit(1)
        assert not (Path(output_folder_path) / "partial.pb").exists()
        (Path(output_folder_path) / (Path(input_onnx_file_path).stem + "_float32.tflite")).write_bytes(b"tflite")

    monkeypatch.setitem(sys.modules, "onnx2tf", types.SimpleNamespace(convert=convert))
    src = tmp_path / "m.onnx"
    src.write_bytes(b"not really onnx")
    monkeypatch.setattr("edgekd.convert._dynamic_batch", lambda path: False)
    files = onnx_to_tflite(src, tmp_path / "work" / "tf")
    assert [c.get("output_signaturedefs", False) for c in calls] == [False, True]
    assert all(c["not_use_onnxsim"] for c in calls)
    assert files["float32"].read_bytes() == b"tflite"

    calls.clear()  # any other failure is reported as it is, without a retry, even after one that asked for it
    def other_failure(*args, **kwargs):
        calls.append(kwargs)
        print("\x1b[31mERROR:\x1b[0m Unsupported op: Foo")
        sys.exit(1)

    monkeypatch.setitem(sys.modules, "onnx2tf", types.SimpleNamespace(convert=other_failure))
    with pytest.raises(EdgeKDError, match="Unsupported op: Foo"):
        onnx_to_tflite(src, tmp_path / "work" / "tf-qat")  # the same parent folder, so the same log
    assert len(calls) == 1

    calls.clear()  # a failure that logs no ERROR line of its own is not read from the earlier attempts' lines
    def silent_failure(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "onnx2tf", types.SimpleNamespace(convert=silent_failure))
    with pytest.raises(EdgeKDError) as failed:
        onnx_to_tflite(src, tmp_path / "work" / "tf-again")
    assert len(calls) == 1 and "output_signaturedefs" not in str(failed.value) and "Foo" not in str(failed.value)


@pytest.mark.slow
def test_shufflenet_converts_to_tflite_through_onnx2tf(tmp_path):
    """torchvision's ShuffleNetV2 at 32 px: onnx2tf needs its signature retry to place the channel shuffle."""
    from edgekd.convert import onnx_to_tflite, to_onnx
    from edgekd.deployable import deploy_net
    from edgekd.runtime import TFLiteRunner
    from edgekd.zoo import build_model

    torch.manual_seed(0)
    model = build_model("torchvision:shufflenet_v2_x0_5", 10, 3, (32, 32)).eval()
    net, _ = deploy_net(model, {"in_channels": 3, "input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    x = torch.rand(4, 3, 32, 32)
    files = onnx_to_tflite(to_onnx(net, x, tmp_path / "m.onnx", dynamic_batch=False), tmp_path / "tf")
    runner = TFLiteRunner(files["float32"])
    with torch.no_grad():
        want = net(x).numpy()
    got = runner(x.permute(0, 2, 3, 1).numpy())
    assert np.abs(got - want).max() < 1e-3
