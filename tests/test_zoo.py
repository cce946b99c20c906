import pytest
import torch

from edgekd.errors import EdgeKDError
from edgekd.teachers import OutputsAsLogits, guess_layout
from edgekd.zoo import build_model, count_params, list_architectures, pool_before_activation

SEED_COUNTS = [  # published parameter counts at each seed's input size
    ("seed002_teacher", 10, 3, 32, 1_186_986), ("seed002_student", 10, 3, 32, 267_738),
    ("seed001_teacher", 10, 3, 32, 3_249_098), ("seed001_student", 10, 3, 32, 545_098),
    ("seed003_teacher", 10, 1, 28, 693_962), ("seed003_student", 10, 1, 28, 173_930),
    ("seed004_teacher", 2, 3, 224, 9_568_898), ("seed004_student", 2, 3, 224, 789_442),
]


@pytest.mark.parametrize("arch, classes, channels, size, params", SEED_COUNTS)
def test_seed_architectures_match_published_counts(arch, classes, channels, size, params):
    assert count_params(build_model(arch, classes, channels, (size, size))) == params


def test_default_student_is_compact_and_runs():
    model = build_model("edge_resnet_s", 10, 3, (32, 32))
    assert count_params(model) <= 270_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_architecture_lists_choices():
    with pytest.raises(EdgeKDError, match="choose one of: .*edge_resnet_s"):
        build_model("resnet9000", 10, 3, (32, 32))
    with pytest.raises(EdgeKDError, match="unknown torchvision"):
        build_model("torchvision:nope", 10, 3, (32, 32))


def test_torchvision_head_and_trainable_layers():
    model = build_model("torchvision:mobilenet_v2", 7, 3, (48, 48), trainable_layers=2)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 7)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("features.18") or n.startswith("classifier") for n in trainable)
    assert "torchvision:resnet18" in list_architectures("torchvision:resnet*")
    assert list_architectures("seed00?_student") == ["seed001_student", "seed002_student", "seed003_student", "seed004_student"]


def test_keras_style_head_matches_seed000_teachers(tmp_path):
    # seed 000: include_top=False backbone, GAP, Dense(256, relu), Dropout(0.5), Dense(10); Keras
    # counts VGG16 at 14,714,688 + 131,328 + 2,570 parameters
    vgg = build_model("torchvision:vgg16", 10, 3, (48, 48), trainable_layers=2, head_hidden=256)
    assert count_params(vgg) == 14_714_688 + 131_328 + 2_570
    assert vgg(torch.zeros(2, 3, 48, 48)).shape == (2, 10)
    trainable = {n.rsplit(".", 1)[0] for n, p in vgg.named_parameters() if p.requires_grad}
    assert trainable == {"features.26", "features.28", "classifier.0", "classifier.3"}  # block5_conv2/3 + head
    with pytest.raises(EdgeKDError, match="torchvision:\\* architectures only"):
        build_model("seed002_student", 10, 3, (32, 32), head_hidden=256)
    # the head travels with the checkpoint
    from edgekd.checkpoint import load_model, save_checkpoint

    mnv2 = build_model("torchvision:mobilenet_v2", 10, 3, (48, 48), head_hidden=64)
    meta = {"arch": "torchvision:mobilenet_v2", "arch_kwargs": {"head_hidden": 64}, "classes": [str(i) for i in range(10)],
            "in_channels": 3, "input_size": [48, 48], "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "m.pt", mnv2, meta, epoch=1, val_acc=0.0)
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.rand(1, 3, 48, 48)
    assert torch.allclose(loaded(x), mnv2.eval()(x))


def test_layout_guessing():
    assert guess_layout([None, 3, 32, 32]) == ("NCHW", (32, 32), 3)
    assert guess_layout([1, 28, 28, 1]) == ("NHWC", (28, 28), 1)
    assert guess_layout(["batch", None, None, 3]) == ("NHWC", None, 3)
    with pytest.raises(EdgeKDError):
        guess_layout([1, 10])


def test_probability_outputs_are_detected_and_logged():
    conv = OutputsAsLogits()
    p = torch.softmax(torch.randn(4, 5), 1)
    logits = conv(p)
    assert conv.probabilities is True
    assert torch.allclose(torch.softmax(logits, 1), p, atol=1e-5)
    conv2 = OutputsAsLogits()
    z = torch.randn(4, 5) * 3
    assert torch.equal(conv2(z), z) and conv2.probabilities is False


def test_timm_architectures_train_and_export(synth, tmp_path):
    """timm:NAME (an optional extra) builds with a new head, trains on grayscale-or-RGB data, and exports."""
    pytest.importorskip("timm")
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train
    from edgekd.export import export

    assert "timm:mobilenetv4_conv_small" in list_architectures("timm:mobilenetv4*")
    assert "timm:efficientnet_lite0" in list_architectures("timm:efficientnet_lite*")
    model = build_model("timm:mobilenetv4_conv_small", 7, 3, (32, 32))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(EdgeKDError, match="unknown timm architecture 'nope'"):
        build_model("timm:nope", 7, 3, (32, 32))
    cfg = DistillConfig(model=ModelConfig(arch="timm:mobilenetv4_conv_small", input_size=32),
                        recipe=RecipeConfig(epochs=4, batch_size=32, optimizer="adam", lr=0.003, augment_pad=0))
    res = train(cfg, tmp_path / "mnv4", data=synth)
    assert res.best_val_acc > 50  # 4 classes: chance is 25
    [onnx] = export(tmp_path / "mnv4" / "best.pt", formats=("onnx",), data=synth).artifacts
    assert onnx.top1_agreement == 100.0


@pytest.mark.parametrize("arch", ["seed002_student", "seed002_teacher", "seed003_student", "edge_resnet_s"])
def test_pool_before_activation_trains_the_same_network(arch):
    channels, size = (1, 28) if arch.startswith("seed003") else (3, 32)
    torch.manual_seed(0)
    model = build_model(arch, 10, channels, (size, size))
    order = [type(m).__name__ for m in model.modules()]
    fast = pool_before_activation(model)
    assert [type(m).__name__ for m in model.modules()] == order  # the original keeps its order
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))
    x = torch.randn(4, channels, size, size)
    y = fast(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    assert torch.allclose(y, model(x), atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, model.parameters()))
    moved = [type(m).__name__ for m in fast.modules()] != order
    assert moved == arch.startswith(("seed002", "seed003"))  # the seeds' CNNs pool after a ReLU; the ResNet never


def test_pool_before_activation_leaves_other_pairs_alone():
    import torch.nn as nn

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.MaxPool2d(2), nn.ReLU(), nn.AvgPool2d(2))
    assert pool_before_activation(m) is m  # only piecewise-linear activations move; avg pool is no max
