"""edgekd package: metadata MediaPipe reads, labels, checksums, verification, error paths."""

import dataclasses
import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgeKDError


def _classify_with_mediapipe(model, images_u8):
    import torch  # noqa: F401 - torch before mediapipe's native libraries (see edgekd.package)
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    opts = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=1)
    with vision.ImageClassifier.create_from_options(opts) as clf:
        return [clf.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
                .classifications[0].categories[0] for img in images_u8]


def _check_bundle(out, classes):
    from edgekd.runtime import TFLiteRunner
    from edgekd.package import read_metadata

    files = {p.name for p in out.iterdir()}
    assert {"model.tflite", "model.onnx", "model_int8.onnx", "labels.txt", "model.json", "MODEL_CARD.md",
            "README.md", "SHA256SUMS"} <= files
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == files - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["status"] == "ok" and manifest["classes"] == list(classes)
    assert manifest["input"]["shape"][0] == 1 and manifest["input"]["shape"][3] == 3
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["metadata_normalization"] == {"mean": [0.0], "std": [255.0]}
    assert manifest["input"]["training_normalization"]["how"] == "folded into the first convolution"
    assert manifest["measured"]["model.tflite"]["top1"] > 0 and manifest["int8_ops"] > 0
    assert all(c["ok"] for c in manifest["verification"])
    meta = read_metadata(out / "model.tflite")
    assert meta["mean"] == [0.0] and meta["std"] == [255.0] and meta["associated_files"] == ["labels.txt"]
    assert meta["packed_files"]["labels.txt"].split() == list(classes)
    runner = TFLiteRunner(out / "model.tflite")  # the metadata and zipped labels leave LiteRT loading it
    assert list(runner.inp["shape_signature"]) == manifest["input"]["shape"]
    readme = (out / "README.md").read_text()
    assert "```kotlin" in readme and "```swift" in readme and "model.tflite" in readme
    assert "## Known limits" in (out / "MODEL_CARD.md").read_text()
    return manifest


def test_package_digits_int8_bundle_runs_in_mediapipe(quantized, tmp_path):
    from edgekd.data import load_data
    from edgekd.runtime import TFLiteRunner, nhwc_array
    from edgekd.package import package

    int8 = next(m.int8.path for m in quantized.models if m.format == "tflite")
    res = package(int8, out_dir=tmp_path / "bundle", make_zip=True, bench_runs=5, bench_seconds=0.0)
    assert res.passed, [c for c in res.checks if not c.ok]
    data = load_data("digits")
    manifest = _check_bundle(res.out_dir, data.classes)
    assert "grayscale_model" in manifest["input"]  # 1-channel model, RGB input
    # an app's view: RGB bytes in, no preprocessing code; MediaPipe agrees with LiteRT and names the class
    gray = data.test_x[:12].numpy()  # (12, 1, 8, 8) uint8
    rgb_u8 = np.repeat(gray, 3, axis=1).transpose(0, 2, 3, 1)  # (12, 8, 8, 3)
    cats = _classify_with_mediapipe(res.out_dir / "model.tflite", rgb_u8)
    litert = TFLiteRunner(res.out_dir / "model.tflite")(nhwc_array(rgb_u8.transpose(0, 3, 1, 2).astype(np.float32) / 255))
    assert [c.index for c in cats] == list(litert.argmax(1))
    assert [c.category_name for c in cats] == [data.classes[i] for i in litert.argmax(1)]
    with zipfile.ZipFile(res.zip_path) as z:
        assert set(z.namelist()) == {p.name for p in res.out_dir.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_package_image_folder_run(folder_run, tmp_path):
    from edgekd.package import package

    res = package(folder_run, out_dir=tmp_path / "bundle", bench_runs=5, bench_seconds=0.0)
    assert res.passed, [c for c in res.checks if not c.ok]
    _check_bundle(res.out_dir, ["class_0", "class_1", "class_2"])
    names = {c.name for c in res.checks}
    assert {"litert", "mediapipe", "onnxruntime model.onnx", "onnxruntime model_int8.onnx", "metadata", "checksums"} <= names


def test_package_reuses_a_bench_of_its_source_files(folder_run, tmp_path):
    """What `edgekd run` does: bench measured the deploy files already; the bundle takes those rows, renamed,
    and its runtime checks still load every bundle file and compare with them."""
    from edgekd.bench import bench
    from edgekd.package import package

    export = folder_run / "export"
    report = bench([folder_run / "best.pt", export / "model_int8.tflite", export / "model.onnx", export / "model_int8.onnx"],
                   min_runs=5, min_seconds=0.0)
    steps = []
    res = package(folder_run, out_dir=tmp_path / "bundle", bench_report=report, on_step=steps.append)
    assert res.passed, [c for c in res.checks if not c.ok]
    assert any("reusing" in s for s in steps) and not any(s.startswith("benchmarking") for s in steps)
    manifest = json.loads((res.out_dir / "model.json").read_text())
    int8_row = next(r for r in report.rows if r.path.endswith("model_int8.tflite"))
    assert manifest["measured"]["model.tflite"]["top1"] == pytest.approx(int8_row.top1)
    assert manifest["measured"]["model.tflite"]["size_bytes"] == (res.out_dir / "model.tflite").stat().st_size
    # a report that lacks one of the bundle's sources is not used: the bundle's files are benchmarked
    partial = dataclasses.replace(report, rows=report.rows[:2])
    steps = []
    package(folder_run, out_dir=tmp_path / "bundle2", bench_report=partial, bench_runs=5, bench_seconds=0.0,
            on_step=steps.append)
    assert any(s.startswith("benchmarking") for s in steps)


def test_package_errors(teacher_run, quantized, tmp_path):
    from edgekd.package import package

    # a training run with no int8 model yet
    with pytest.raises(EdgeKDError, match="no int8 model yet.*edgekd quantize"):
        package(teacher_run.out_dir, out_dir=tmp_path / "b1")
    # a model with no labels: a bare .tflite without edgekd's sidecar
    int8 = next(m.int8.path for m in quantized.models if m.format == "tflite")
    bare = tmp_path / "bare.tflite"
    shutil.copyfile(int8, bare)
    with pytest.raises(EdgeKDError, match="no labels.*--labels"):
        package(bare, out_dir=tmp_path / "b2")
    # labels that do not fit the output
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(EdgeKDError, match="outputs 10 scores but there are 2 labels"):
        package(bare, out_dir=tmp_path / "b3", labels=labels, data="digits")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


def test_package_refuses_batch_other_than_one(tmp_path):
    import torch

    from edgekd.deployable import Deployable

    from edgekd.convert import onnx_to_tflite, to_onnx
    from edgekd.package import describe_tflite
    from edgekd.zoo import build_model

    net = Deployable(build_model("resnet8", 3, 3, (8, 8)), [0.5] * 3, [0.25] * 3).eval()
    onnx_path = to_onnx(net, torch.rand(2, 3, 8, 8), tmp_path / "dyn.onnx")  # dynamic batch
    tfl = onnx_to_tflite(onnx_path, tmp_path / "tf", batch_size=None)["float32"]
    with pytest.raises(EdgeKDError, match="needs batch 1"):
        describe_tflite(tfl)


def test_package_cli_error_line(tmp_path):
    result = CliRunner().invoke(app, ["package", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "not found" in result.output
    result = CliRunner().invoke(app, ["package", "--help"])
    assert result.exit_code == 0 and "MediaPipe" in result.output and "Example" in result.output


def test_package_uint8_input_model_needs_no_normalization(digits_model, tmp_path):
    """uint8 input (codes 0..255 = pixels) carries no normalization metadata and still runs in MediaPipe."""
    from edgekd.package import package, read_metadata
    from edgekd.quantize import quantize

    res = quantize(digits_model, formats=("tflite",), calib_size=60, io="uint8", out_dir=tmp_path / "q")
    [m] = res.models
    bundle = package(m.int8.path, out_dir=tmp_path / "bundle", bench_runs=5, bench_seconds=0.0)
    assert bundle.passed, [c for c in bundle.checks if not c.ok]
    manifest = json.loads((bundle.out_dir / "model.json").read_text())
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["metadata_normalization"] is None
    assert manifest["input"]["quantization"]["zero_point"] <= 2
    assert read_metadata(bundle.out_dir / "model.tflite")["mean"] is None
    assert "input.put(r.toByte())" in (bundle.out_dir / "README.md").read_text()
