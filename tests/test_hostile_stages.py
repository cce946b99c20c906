"""Hostile inputs to export, quantize, bench and package: one red line, exit 1, nothing half-written.

Each test states the bug it guards against: a user's folder deleted, a zip overwritten, a corrupt
file turning into a traceback, a silently resized model, the wrong checkpoint quantized, a dense
constant in every exported graph, a quantized softmax taken for logits, temporaries left behind.
"""

import importlib
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgeKDError
from edgekd.files import TEMP_PREFIX

runner = CliRunner()
NO_SPACE = OSError(28, "No space left on device")


def _temps(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.rglob(f"{TEMP_PREFIX}*")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def _tiny_onnx(path: Path, size: int = 8) -> Path:
    """An untrained 1-channel, 10-class ONNX classifier (digits' shape, any input size), no sidecar."""
    from edgekd.deployable import Deployable
    from edgekd.convert import to_onnx
    from edgekd.zoo import build_model

    torch.manual_seed(0)
    net = Deployable(build_model("resnet8", 10, 1, (size, size)), [0.5], [0.25]).eval()
    return to_onnx(net, torch.rand(2, 1, size, size), path)


# ---------------------------------------------------------------------------------------------
# 1. package writes only into a new/empty folder or over its own bundle; --zip never over a foreign zip


@pytest.fixture(scope="module")
def int8_tflite(quantized):
    return next(m.int8.path for m in quantized.models if m.format == "tflite")


@pytest.fixture(scope="module")
def fast_bundle(monkeypatch_module):
    """package() with a short benchmark, so the CLI tests do not time 50 runs per model."""
    pkg = importlib.import_module("edgekd.package")

    real = pkg.write_bundle

    def quick(folder, sources, names, desc, data, precision, plan, step):
        return real(folder, sources, names, desc, data, precision, pkg.BenchPlan(3, 0.0, plan.report), step)

    monkeypatch_module.setattr(pkg, "write_bundle", quick)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_package_refuses_a_folder_that_is_not_its_bundle(int8_tflite, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.json").write_text("{}")  # a user's file that merely shares a bundle file name
    (out / "thesis.tex").write_text("years of work")
    before = _snapshot(out)
    result = runner.invoke(app, ["package", str(int8_tflite), "--out", str(out)])
    _one_line_error(result, "is not an edgekd bundle (no .edgekd-bundle marker); choose a new or empty --out")
    assert _snapshot(out) == before and not _temps(tmp_path)


def test_package_refuses_to_overwrite_a_zip_it_did_not_make(int8_tflite, tmp_path):
    user_zip = tmp_path / "b.zip"
    with zipfile.ZipFile(user_zip, "w") as z:
        z.writestr("holiday.jpg", b"\xff\xd8 not a bundle")
    before = user_zip.read_bytes()
    result = runner.invoke(app, ["package", str(int8_tflite), "--out", str(tmp_path / "b"), "--zip"])
    _one_line_error(result, "b.zip exists and is not a bundle zip edgekd made; move it away or choose another --out")
    assert user_zip.read_bytes() == before and not (tmp_path / "b").exists() and not _temps(tmp_path)


def test_package_replaces_only_the_files_its_marker_lists(int8_tflite, fast_bundle, tmp_path):
    from edgekd.package import MARKER

    out = tmp_path / "b"
    first = runner.invoke(app, ["package", str(int8_tflite), "--out", str(out), "--zip"])
    assert first.exit_code == 0, first.output
    marker = json.loads((out / MARKER).read_text())
    assert {"model.tflite", "model.json", "SHA256SUMS", MARKER} <= set(marker["files"])
    with zipfile.ZipFile(tmp_path / "b.zip") as z:
        assert MARKER in z.namelist()
    # a foreign file inside the bundle: refused, nothing touched
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    result = runner.invoke(app, ["package", str(int8_tflite), "--out", str(out), "--zip"])
    _one_line_error(result, "also holds files edgekd did not write (notes.txt); move them away")
    assert _snapshot(out) == before
    # without it, a rerun replaces the bundle and its zip, and drops a file only the old marker listed
    (out / "notes.txt").unlink()
    (out / "old_extra.txt").write_text("from an older edgekd")
    (out / MARKER).write_text(json.dumps({**marker, "files": marker["files"] + ["old_extra.txt"]}))
    again = runner.invoke(app, ["package", str(int8_tflite), "--out", str(out), "--zip"])
    assert again.exit_code == 0, again.output
    assert not (out / "old_extra.txt").exists() and json.loads((out / MARKER).read_text())["files"] == marker["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.zip"] and not _temps(tmp_path)


def test_package_zip_failure_restores_the_old_bundle_and_zip(int8_tflite, fast_bundle, tmp_path, monkeypatch):
    pkg = importlib.import_module("edgekd.package")

    out = tmp_path / "b"
    assert runner.invoke(app, ["package", str(int8_tflite), "--out", str(out), "--zip"]).exit_code == 0
    bundle, old_zip = _snapshot(out), (tmp_path / "b.zip").read_bytes()

    def disk_full(folder, dest):
        dest.write_bytes(b"PK half a zip")
        raise NO_SPACE

    monkeypatch.setattr(pkg, "_write_zip", disk_full)
    result = runner.invoke(app, ["package", str(int8_tflite), "--out", str(out), "--zip"])
    _one_line_error(result, "No space left on device")
    assert _snapshot(out) == bundle and (tmp_path / "b.zip").read_bytes() == old_zip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.zip"] and not _temps(tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. bench: a corrupt file is a failed row; 3. a resized model gets a warning


def test_bench_corrupt_files_become_failed_rows(quantized, tmp_path):
    folder = quantized.models[0].int8.path.parent
    good = folder / "model.onnx"
    files = {}
    for name, src in (("trunc.onnx", good), ("trunc.tflite", folder / "model_fp32.tflite")):
        data = src.read_bytes()
        files[name] = tmp_path / name
        files[name].write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["bench", str(good), *map(str, files.values()), "--data", "digits", "--runs", "3",
                                 "--min-seconds", "0", "--warmup", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "error: trunc.onnx: onnxruntime could not load trunc.onnx" in result.output
    assert "error: trunc.tflite: LiteRT could not load" in result.output
    rows = {m["name"]: m for m in json.loads((tmp_path / "b" / "bench.json").read_text())["models"]}
    assert rows["model.onnx"]["status"] == "ok" and rows["model.onnx"]["top1"] > 50
    assert rows["trunc.onnx"]["status"] == "failed" and "\n" not in rows["trunc.onnx"]["error"]


def test_bench_runtime_failure_and_nan_scores_are_row_errors():
    from edgekd.bench import ModelSpec, _scores

    spec = ModelSpec(Path("m.onnx"), "m.onnx", "variant")

    def loaded(predict):
        return SimpleNamespace(runtime="onnxruntime 1.x", predict=predict)

    def crash(x):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code\nstack ...")

    with pytest.raises(EdgeKDError, match=r"onnxruntime 1.x failed running m.onnx \(\[ONNXRuntimeError\].*\); "
                                          "the file may be damaged: export it again"):
        _scores(spec, loaded(crash), np.zeros((4, 1, 8, 8), np.float32), 10)
    nan = loaded(lambda x: np.full((len(x), 10), np.nan, np.float32))
    with pytest.raises(EdgeKDError, match="m.onnx outputs NaN or infinite scores"):
        _scores(spec, nan, np.zeros((4, 1, 8, 8), np.float32), 10)
    fine = loaded(lambda x: np.ones((len(x), 10), np.float32))
    assert _scores(spec, fine, np.zeros((4, 1, 8, 8), np.float32), 10).shape == (4, 10)


def test_bench_warns_when_a_model_is_resized_to_the_data(tmp_path):
    big = _tiny_onnx(tmp_path / "mnist28.onnx", size=28)
    same = _tiny_onnx(tmp_path / "digits8.onnx", size=8)
    result = runner.invoke(app, ["bench", str(big), str(same), "--data", "digits", "--runs", "3", "--min-seconds", "0",
                                 "--warmup", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    rows = {m["name"]: m for m in json.loads((tmp_path / "b" / "bench.json").read_text())["models"]}
    [warning] = rows["mnist28.onnx"]["warnings"]
    assert "model input is 28x28 pixels but the digits images are 8x8" in warning
    assert rows["digits8.onnx"]["warnings"] == []
    assert "warning: mnist28.onnx: model input is 28x28" in " ".join(result.output.split())


def test_bench_no_resize_warning_when_the_run_chose_the_input_size(tmp_path):
    from edgekd.bench import ModelSpec, _resize_warning

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"")
    data = SimpleNamespace(image_size=(32, 32), name="cifar10")
    spec = ModelSpec(tmp_path / "model.onnx", "model.onnx", "variant")
    loaded = SimpleNamespace(input_size=(48, 48), source=ckpt)
    assert "48x48" in _resize_warning(spec, loaded, data)  # no config: nobody said 48 was intended
    (tmp_path / "config.json").write_text(json.dumps({"model": {"input_size": 48}}))
    assert _resize_warning(spec, loaded, data) is None


# ---------------------------------------------------------------------------------------------
# 4. quantize model.onnx quantizes the checkpoint its sidecar names, or refuses


def test_quantize_onnx_without_sidecar_refuses_instead_of_taking_a_neighbour(digits_model, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copyfile(digits_model, tmp_path / "best.pt")  # a checkpoint one folder up: never picked silently
    onnx_file = _tiny_onnx(folder / "model.onnx")
    result = runner.invoke(app, ["quantize", str(onnx_file), "--out", str(tmp_path / "q")])
    _one_line_error(result, "has no edgekd sidecar (model.onnx.json) naming the checkpoint it was exported from; "
                            "pass that checkpoint instead")
    (folder / "model.onnx.json").write_text(json.dumps({"source_checkpoint": "../gone/best.pt"}))
    result = runner.invoke(app, ["quantize", str(onnx_file), "--out", str(tmp_path / "q")])
    _one_line_error(result, "which does not exist; pass the checkpoint instead")
    assert not (tmp_path / "q").exists() and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_quantize_onnx_uses_the_checkpoint_its_sidecar_names(digits_model, teacher_run, tmp_path):
    from edgekd.export import export

    [art] = export(digits_model, ("onnx",), out_dir=tmp_path / "export").artifacts
    shutil.copyfile(Path(teacher_run.out_dir) / "best.pt", tmp_path / "export" / "best.pt")  # a decoy beside it
    result = runner.invoke(app, ["quantize", str(art.path), "-f", "onnx", "--calib-size", "20",
                                 "--activation-type", "uint8", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert summary["checkpoint"] == str(digits_model.resolve())
    side = json.loads((tmp_path / "q" / "model_int8.onnx.json").read_text())
    assert (tmp_path / "q" / side["source_checkpoint"]).resolve() == digits_model.resolve()


# ---------------------------------------------------------------------------------------------
# 5. no border constant when the first convolution is not padded (or the mean is zero)


class _FirstConv(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=padding)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.conv(x))


def _fold(padding: int, mean: list[float]):
    from edgekd.deployable import Deployable, FoldedConv, deploy_net

    torch.manual_seed(0)
    model = _FirstConv(padding).eval()
    std = [0.25, 0.24, 0.26]
    net, how = deploy_net(model, {"in_channels": 3, "input_size": [16, 16], "mean": mean, "std": std})
    assert how == "folded into the first convolution"
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), Deployable(model, mean, std).eval()(x), atol=1e-5, rtol=1e-4)
    return net, next(m for m in net.modules() if isinstance(m, FoldedConv))


def _initializer_shapes(net, tmp_path: Path, name: str) -> list[list[int]]:
    import onnx

    from edgekd.convert import to_onnx

    path = to_onnx(net, torch.rand(1, 3, 16, 16), tmp_path / name)
    return [list(t.dims) for t in onnx.load(str(path)).graph.initializer]


def test_unpadded_first_conv_exports_no_border_constant(tmp_path):
    mean = [0.49, 0.48, 0.45]
    unpadded, fold = _fold(padding=0, mean=mean)
    assert not fold.has_border
    padded, padded_fold = _fold(padding=1, mean=mean)
    assert padded_fold.has_border and list(padded_fold.border.shape) == [1, 8, 16, 16]
    assert (padded_fold.border[..., 1:-1, 1:-1] == 0).all()  # only the padded rim differs
    assert [1, 8, 14, 14] not in _initializer_shapes(unpadded, tmp_path, "unpadded.onnx")
    assert [1, 8, 16, 16] in _initializer_shapes(padded, tmp_path, "padded.onnx")
    _, zero_mean = _fold(padding=1, mean=[0.0, 0.0, 0.0])
    assert not zero_mean.has_border


# ---------------------------------------------------------------------------------------------
# 6. an int8-quantized softmax output is still recognized as probabilities


def test_quantized_softmax_teacher_is_not_softmaxed_twice():
    from edgekd.teachers import FunctionTeacher, OutputsAsLogits, looks_like_probabilities

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen) * 3
    scale = 1 / 256  # TFLite's int8 softmax output: zero point -128, scale 1/256
    quantized = torch.round(torch.softmax(logits, 1) / scale) * scale
    assert (quantized.sum(1) - 1).abs().max() > 1e-3  # what the old exact check refused
    for as_logits in (OutputsAsLogits(), OutputsAsLogits(output_scale=scale)):
        teacher = FunctionTeacher("int8-softmax", lambda x: quantized.numpy(), as_logits=as_logits)
        out = teacher(torch.zeros(64, 1, 8, 8))
        assert teacher.outputs_probabilities is True
        assert (out.argmax(1) == logits.argmax(1)).float().mean() > 0.9
        assert torch.allclose(torch.softmax(out, 1), quantized / quantized.sum(1, keepdim=True), atol=1e-4)
    logits_teacher = FunctionTeacher("logits", lambda x: logits.numpy())
    assert torch.equal(logits_teacher(torch.zeros(64, 1, 8, 8)), logits) and logits_teacher.outputs_probabilities is False
    assert not looks_like_probabilities(torch.rand(64, 10, generator=gen))  # in [0, 1] but rows sum to ~5
    off_by_1pct = torch.full((4, 10), 0.101)  # rows sum to 1.01
    assert looks_like_probabilities(off_by_1pct) and not looks_like_probabilities(off_by_1pct, output_scale=scale / 10)


def test_onnx_teacher_with_a_quantized_softmax_output_uses_its_scale(tmp_path):
    """64 classes: rounding to 1/256 moves a row sum by up to 0.125, past any fixed tolerance."""
    import onnx
    from onnx import TensorProto, helper

    from edgekd.teachers import load_teacher

    consts = [helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 256]),
              helper.make_tensor("zero", TensorProto.UINT8, [], [0]), helper.make_tensor("sharp", TensorProto.FLOAT, [], [4.0])]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Mul", ["flat", "sharp"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=1),
             helper.make_node("QuantizeLinear", ["p", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["probs"])]  # (B, 64) on a 1/256 grid
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 1, 8, 8])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", 64])
    graph = helper.make_graph(nodes, "qsoftmax", [inp], [out], consts)
    path = tmp_path / "qsoftmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    teacher = load_teacher(path)
    x = torch.eye(64)[torch.arange(16) * 4].view(16, 1, 8, 8)  # one bright pixel: 63 small probabilities of ~2.2 steps
    raw = torch.from_numpy(teacher.fn(x))
    assert (raw.sum(1) - 1).abs().max() > 0.02  # beyond the tolerance for outputs of unknown quantization
    logits = teacher(x)
    assert teacher.as_logits.output_scale == 1 / 256 and teacher.outputs_probabilities is True
    assert (logits.argmax(1) == x.flatten(1).argmax(1)).all()


# ---------------------------------------------------------------------------------------------
# 7. a full disk mid-export or mid-quantize leaves the disk as it was


def test_export_full_disk_leaves_nothing_and_keeps_old_files(digits_model, tmp_path, monkeypatch):
    ex = importlib.import_module("edgekd.export")

    def disk_full(*args, **kwargs):
        raise NO_SPACE

    monkeypatch.setattr(ex, "onnx_to_tflite", disk_full)
    fresh = tmp_path / "new" / "export"
    result = runner.invoke(app, ["export", str(digits_model), "--out", str(fresh)])
    _one_line_error(result, "No space left on device")
    assert not (tmp_path / "new").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.onnx").write_bytes(b"yesterday's export")
    (used / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(digits_model), "--out", str(used)])
    _one_line_error(result, "No space left on device")
    assert _snapshot(used) == {"model.onnx": b"yesterday's export", "notes.txt": b"mine"}
    assert sorted(p.name for p in used.iterdir()) == ["model.onnx", "notes.txt"]


def test_quantize_full_disk_leaves_nothing(digits_model, tmp_path, monkeypatch):
    q = importlib.import_module("edgekd.quantize")

    def disk_full(*args, **kwargs):
        raise NO_SPACE

    monkeypatch.setattr(q, "onnx_to_tflite", disk_full)  # after the ONNX int8 file was made
    result = runner.invoke(app, ["quantize", str(digits_model), "--calib-size", "20", "--activation-type", "uint8",
                                 "--out", str(tmp_path / "new" / "q")])
    _one_line_error(result, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_placing_restores_every_file(tmp_path, monkeypatch):
    """The journal behind export/quantize: a failure after some files were placed undoes them all."""
    from edgekd.files import staged_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    with pytest.raises(OSError, match="No space"):
        with staged_output(out, "export") as (tmp, journal):
            (tmp / "new.onnx").write_bytes(b"new")
            journal.put(out / "model.onnx", lambda t: (tmp / "new.onnx").replace(t))
            journal.put(out / "model.onnx.json", lambda t: t.write_text("{}"))
            assert (out / "model.onnx").read_bytes() == b"new"
            raise NO_SPACE
    assert _snapshot(out) == {"model.onnx": b"old"} and sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_native_log_lines_are_held_back_unless_the_block_fails(capfd):
    import os

    from edgekd.native import quiet_native_logs

    with quiet_native_logs():
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")
    assert "oneDNN" not in capfd.readouterr().err
    with pytest.raises(RuntimeError), quiet_native_logs():
        os.write(2, b"E0000 the reason it failed\n")
        raise RuntimeError("boom")
    assert "the reason it failed" in capfd.readouterr().err
