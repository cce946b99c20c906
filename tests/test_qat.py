"""Quantization-aware fine-tuning: the simulation matches the converters' int8 grid, and `quantize --qat`
ends in int8 ONNX and TFLite files that are proven int8 and gated like post-training ones."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from edgekd import qat
from edgekd.errors import EdgeKDError


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # batch-norm statistics far from the identity, so the fold matters
        net[1].running_var.uniform_(0.2, 4.0)
        net[1].running_mean.uniform_(-1, 1)
        net[1].weight.uniform_(-2, 2)
    return net.eval()


def _folded_weight(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The weight torch.onnx writes for ``conv`` once the batch norm after it is folded in."""
    w = conv.weight.detach()
    if bn is None:
        return w
    return w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)


def _off_grid(w: torch.Tensor, qmax: int = 127) -> float:
    """Largest distance from the symmetric per-output-channel grid, in grid steps."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
    r = w / scale
    return float((r - r.round()).abs().max())


def test_baked_weights_lie_on_the_int8_grid_also_once_batch_norm_is_folded():
    net = _net()
    assert _off_grid(_folded_weight(net[0], net[1])) > 0.1  # a trained float weight is not on the grid
    qmodel, handles = qat.prepare(net)
    baked = qat.bake(qmodel, handles)
    assert not any(isinstance(m, qat.FakeQuantWeight) for m in baked.modules())
    for w in (baked[0].weight, baked[3].weight, baked[7].weight):
        assert _off_grid(w.detach()) < 1e-3
    # folding multiplies each output channel by one factor (negative gammas included): still on the grid
    assert (net[1].weight < 0).any() and _off_grid(_folded_weight(baked[0], baked[1])) < 1e-3
    # ... and only rounded: no weight moved by more than half a grid step
    step = net[0].weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert float(((baked[0].weight - net[0].weight).detach().abs() / step).max()) <= 0.5 + 1e-3


def test_first_convolution_rounded_with_the_input_normalization_export_folds_in():
    from edgekd.deployable import fold_input_normalization

    net = _net()
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    baked = qat.bake(*qat.prepare(net, first_conv_in_scale=tuple(1 / s for s in std)))
    deployed = fold_input_normalization(baked, mean, std, 3, (8, 8))
    first = next(m for m in deployed.modules() if isinstance(m, nn.Conv2d))
    assert _off_grid(first.weight.detach()) < 1e-3  # what the converter rounds
    assert _off_grid(baked[0].weight.detach()) > 0.05  # not the weight before folding
    reduced = qat.bake(*qat.prepare(net, weight_qmax=64))  # onnxruntime's reduced range (--target x86)
    assert _off_grid(reduced[3].weight.detach(), 64) < 1e-3


def test_layer_inputs_are_rounded_to_256_levels_once_observed():
    net = _net()
    qmodel, handles = qat.prepare(net)
    seen = []
    qmodel[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))  # after the fake-quant hook
    qmodel.train()
    qmodel(torch.randn(16, 3, 8, 8))
    assert torch.unique(seen[-1]).numel() <= 256
    qmodel.eval()
    qmodel(torch.randn(16, 3, 8, 8) * 10)  # eval: the range stays what training saw
    assert torch.unique(seen[-1]).numel() <= 256


def test_zero_epochs_refused():
    with pytest.raises(EdgeKDError, match="at least 1 epoch"):
        qat.finetune(_net(), {}, None, lambda x: x, "t", qat.QATSettings(epochs=0))


@pytest.fixture(scope="module")
def qat_quantized(digits_model, tmp_path_factory):
    from edgekd.quantize import quantize

    return quantize(digits_model, calib_size=100, qat_epochs=1, max_drop=-100.0,
                    out_dir=tmp_path_factory.mktemp("qat"))


def test_quantize_with_qat_writes_proven_int8_files(qat_quantized, quantized):
    res = qat_quantized
    assert {m.format for m in res.models} == {"onnx", "tflite"}
    for m in res.models:
        assert m.int8.precision == "int8" and m.quantized_ops > 0 and m.int8_mac_share >= 0.5
        assert m.choice["qat"]["epochs"] == 1 and m.choice["qat"]["teacher"] == "the float model itself"
        assert m.choice["qat"]["weight_range"] == 127  # the default target, arm: full 8-bit weights
    # the fp32 files and their accuracy are the original model's, not the fine-tuned copy's
    by_format = {m.format: m for m in quantized.models}
    for m in res.models:
        assert m.fp32_test_acc == pytest.approx(by_format[m.format].fp32_test_acc)
    out = res.models[0].int8.path.parent
    assert (out / "model_qat.pt").is_file()
    assert json.loads((out / "quantize.json").read_text())["qat"]["epochs"] == 1


def test_qat_files_go_through_the_accuracy_gate(qat_quantized):
    assert not qat_quantized.passed  # max_drop -100: nothing can pass
    for m in qat_quantized.models:
        side = json.loads(m.int8.path.with_name(m.int8.path.name + ".json").read_text())
        assert side["status"] == "failed" and side["quantization_choice"]["qat"]["epochs"] == 1


def test_qat_checkpoint_is_an_ordinary_checkpoint_on_the_grid(qat_quantized):
    from edgekd.checkpoint import load_model

    out = qat_quantized.models[0].int8.path.parent
    model, meta = load_model(out / "model_qat.pt")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1:]  # the first is rounded with the normalization
    assert convs and max(_off_grid(c.weight.detach()) for c in convs) < 1e-3


def test_quantize_without_qat_removes_an_earlier_qat_checkpoint(digits_model, tmp_path):
    from edgekd.quantize import quantize

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "model_qat.pt").write_bytes(b"from an earlier --qat")
    quantize(digits_model, formats=("onnx",), calib_size=50, out_dir=tmp_path / "q")
    assert not (tmp_path / "q" / "model_qat.pt").exists()


def test_qat_teacher_with_other_classes_refused(digits_model, teacher_run, tmp_path):
    from edgekd.quantize import quantize

    with pytest.raises(EdgeKDError, match="same classes"):
        quantize(digits_model, qat_epochs=1, teacher=teacher_run.out_dir / "best.pt", out_dir=tmp_path / "q")
    assert not (tmp_path / "q").exists()
