"""Every teacher format gives the same logits as the model it came from, and bad teachers fail early."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.checkpoint import load_model
from edgekd.data import to_unit
from edgekd.distill import check_teachers
from edgekd.errors import EdgeKDError
from edgekd.teachers import load_teacher


class Normalized(torch.nn.Module):
    """The checkpoint's model with its normalization and an optional output permutation."""

    def __init__(self, model, mean, std, perm=None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.perm = perm

    def forward(self, x):
        out = self.model((x - self.mean) / self.std)
        return out[:, self.perm] if self.perm is not None else out


@pytest.fixture(scope="module")
def reference(teacher_run, synth):
    model, meta = load_model(teacher_run.out_dir / "best.pt")
    x = to_unit(synth.val_x[:16])
    return model, meta, x, Normalized(model, meta["mean"], meta["std"])(x).detach()


def test_edgekd_checkpoint_teacher(teacher_run, synth, reference):
    _, _, x, expected = reference
    t = load_teacher(teacher_run.out_dir / "best.pt")
    assert t.classes == synth.classes
    assert torch.allclose(t(x), expected, atol=1e-5)
    [report] = check_teachers([t], synth)
    assert report.val_acc > 90 and not report.outputs_probabilities


def test_torchscript_teacher(tmp_path, reference):
    model, meta, x, expected = reference
    path = tmp_path / "teacher.pt"
    torch.jit.trace(Normalized(model, meta["mean"], meta["std"]), x).save(str(path))
    t = load_teacher(path)
    assert t.kind == "torchscript"
    assert torch.allclose(t(x), expected, atol=1e-5)


def _export_onnx(module, x, path, exporter="torch.export"):
    """A foreign ONNX file, as a user's own torch.onnx.export writes it (PyTorch's default exporter, or the older one)."""
    import warnings

    if exporter == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PyTorch deprecates it; users' files from it are common
            torch.onnx.export(module.eval(), x[:1], str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        return
    torch.onnx.export(module.eval(), (x[:2],), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)


@pytest.mark.parametrize("exporter", ["torch.export", "torchscript"])
def test_onnx_teacher_with_foreign_normalization(tmp_path, reference, exporter):
    model, meta, x, expected = reference
    path = tmp_path / "teacher.onnx"
    _export_onnx(model, (x - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1),
                 path, exporter)
    t = load_teacher(path, input_mean=tuple(meta["mean"]), input_std=tuple(meta["std"]))
    assert t.kind == "onnx"
    assert torch.allclose(t(x), expected, atol=1e-4)


def test_onnx_teacher_in_another_class_order_is_refused(tmp_path, reference, synth):
    model, meta, x, _ = reference
    path = tmp_path / "permuted.onnx"
    _export_onnx(Normalized(model, meta["mean"], meta["std"], perm=[1, 2, 3, 0]), x, path)
    with pytest.raises(EdgeKDError, match="class order differs"):
        check_teachers([load_teacher(path)], synth)


@pytest.fixture(scope="module")
def keras_teacher(tmp_path_factory):
    """A Keras model ending in softmax, as the seeds' are, saved as .keras and converted to .tflite."""
    from edgekd.native import quiet_native_logs

    with quiet_native_logs():  # as edgekd loads TensorFlow: triton first, or importing it later crashes the process
        import tensorflow as tf
        import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softmax")])
    folder = tmp_path_factory.mktemp("keras")
    model.save(folder / "teacher.keras")
    tflite = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    (folder / "teacher.tflite").write_bytes(tflite)
    return model, folder


def test_keras_teacher_probabilities_become_logits(keras_teacher):
    model, folder = keras_teacher
    x = torch.rand(5, 3, 16, 16)
    probs = model(x.permute(0, 2, 3, 1).numpy()).numpy()  # (B, C, H, W) -> (B, H, W, C)
    t = load_teacher(folder / "teacher.keras")
    logits = t(x)
    assert t.outputs_probabilities is True
    assert np.allclose(torch.softmax(logits, 1).numpy(), probs, atol=1e-5)


def test_tflite_teacher(keras_teacher):
    model, folder = keras_teacher
    x = torch.rand(3, 3, 16, 16)
    probs = model(x.permute(0, 2, 3, 1).numpy()).numpy()
    t = load_teacher(folder / "teacher.tflite")
    assert t.kind == "tflite"
    assert np.allclose(torch.softmax(t(x), 1).numpy(), probs, atol=1e-5)
    assert t.outputs_probabilities is True


def test_teacher_errors(tmp_path, synth, teacher_run):
    with pytest.raises(EdgeKDError, match="not found"):
        load_teacher(tmp_path / "missing.pt")
    (tmp_path / "t.xyz").write_text("x")
    with pytest.raises(EdgeKDError, match="unknown teacher format"):
        load_teacher(tmp_path / "t.xyz")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(EdgeKDError, match="corrupt"):
        load_teacher(tmp_path / "corrupt.pt")
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"model": Normalized}, f)  # needs arbitrary unpickling
    with pytest.raises(EdgeKDError, match="arbitrary unpickling"):
        load_teacher(tmp_path / "pickled.pt")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(EdgeKDError, match="could not load ONNX"):
        load_teacher(tmp_path / "bad.onnx")


def test_class_mismatch_is_an_error_before_training(teacher_run, synth):
    from tests.conftest import prototype_data

    five = prototype_data(num_classes=5)
    with pytest.raises(EdgeKDError, match="trained on classes"):
        check_teachers([load_teacher(teacher_run.out_dir / "best.pt")], five)
    renamed = prototype_data()
    object.__setattr__(renamed, "classes", tuple(reversed(synth.classes)))
    with pytest.raises(EdgeKDError, match="another order"):
        check_teachers([load_teacher(teacher_run.out_dir / "best.pt")], renamed)


def test_cpu_teacher_runs_through_onnxruntime_and_matches_eager(teacher_run):
    """edgekd teachers on the CPU run via onnxruntime (faster cache); outputs equal PyTorch's."""
    from edgekd.checkpoint import load_model
    from edgekd.deployable import Deployable
    from edgekd.teachers import load_teacher

    path = Path(teacher_run.out_dir) / "best.pt"
    t = load_teacher(path)
    assert t.kind == "edgekd (onnxruntime)"
    model, meta = load_model(path)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        want = Deployable(model, meta["mean"], meta["std"]).eval()(x)
    assert torch.allclose(t(x), want, atol=1e-4, rtol=1e-4)


def test_cpu_teacher_in_bf16_runs_in_pytorch_under_autocast_and_has_its_own_cache_key(teacher_run, synth):
    """A run training in bf16 (precision auto on a CPU with AMX) asks its edgekd teachers for bf16 too: PyTorch
    under autocast instead of onnxruntime, answers within bf16's rounding of fp32's, and a teacher cache of its
    own (cached fp32 outputs are not bf16 ones)."""
    from edgekd.config import DistillConfig
    from edgekd.distill import teacher_cache_key
    from edgekd.teachers import load_teacher

    path = Path(teacher_run.out_dir) / "best.pt"
    fp32, bf16 = load_teacher(path), load_teacher(path, bf16=True)
    assert bf16.kind == "edgekd (bf16)"
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want, got = fp32(x), bf16(x)
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # bf16 arithmetic, fp32 logits
    assert torch.allclose(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    cfg = DistillConfig()
    keys = {teacher_cache_key(cfg, synth, str(path), 2, True, t.kind) for t in (fp32, bf16)}
    assert len(keys) == 2 and teacher_cache_key(cfg, synth, str(path), 2, True, "edgekd") in keys  # fp32 keys unchanged


def test_a_run_trained_on_mirrored_images_also_reports_flip_tta_test_accuracy(synth, teacher_run, tmp_path):
    """The mean of the logits over each test image and its mirror, from the best checkpoint; test_acc stays plain.
    A run without flips (teacher_run) reports none."""
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train
    from edgekd.checkpoint import load_model
    from edgekd.distill import InputSpec, accuracy, predict_logits

    assert teacher_run.test_acc_flip_tta is None and "test_acc_flip_tta" in teacher_run.summary()
    cfg = DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=2, batch_size=32, lr=0.05,
                                                                                augment_pad=0, augment_flip=True))
    result = train(cfg, tmp_path / "r", data=synth)
    model, meta = load_model(tmp_path / "r" / "best.pt")
    spec = InputSpec(meta["in_channels"], tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    plain = predict_logits(model, synth.test_x, spec, "cpu")
    mirror = predict_logits(model, synth.test_x.flip(-1), spec, "cpu")
    assert result.test_acc == pytest.approx(accuracy(plain, synth.test_y), abs=1e-6)
    assert result.test_acc_flip_tta == pytest.approx(accuracy(plain + mirror, synth.test_y), abs=1e-6)
    assert json.loads((tmp_path / "r" / "result.json").read_text())["test_acc_flip_tta"] == result.test_acc_flip_tta
