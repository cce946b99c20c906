"""Model architectures by name (edgekd's own, the seeds', torchvision's), and ``fit_input``.

Architectures take ``num_classes``, ``in_channels`` and ``input_size`` so the seeds' models
keep their published parameter counts at their own input sizes. Teachers loaded from files live
in ``edgekd.teachers``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"  # timm is an optional extra: pip install edgekd[timm]
EXTERNAL_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)  # 3-channel backbones with a new head


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    **kwargs,
) -> nn.Module:
    """Build an architecture by registry name, ``torchvision:NAME`` or ``timm:NAME``.

    Example:
        >>> m = build_model("seed002_student", 10, 3, (32, 32))
        >>> sum(p.numel() for p in m.parameters())
        267738
    """
    if arch.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(arch[len(TORCHVISION_PREFIX):], num_classes, **kwargs)
    if arch.startswith(TIMM_PREFIX):
        return _timm_model(arch[len(TIMM_PREFIX):], num_classes, **kwargs)
    if kwargs.get("pretrained") or kwargs.get("weights_path"):
        raise EdgeKDError(f"pretrained weights are only available for torchvision:* and timm:* architectures, not {arch!r}")
    if kwargs.get("head_hidden"):
        raise EdgeKDError(f"head_hidden applies to torchvision:* architectures only, not {arch!r}")
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("pretrained", "weights_path", "trainable_layers", "head_hidden") or v}
    return ARCHS.get(arch)(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **kwargs)


def list_architectures(pattern: str = "*") -> list[str]:
    """Registered architectures plus torchvision's classification models (and timm's, when installed),
    filtered by a glob."""
    import fnmatch

    names = ARCHS.names(pattern)
    try:
        import torchvision

        tv = [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    except ImportError:  # pragma: no cover - torchvision is a core dependency
        tv = []
    try:
        import timm

        tm = [TIMM_PREFIX + n for n in timm.list_models()]
    except ImportError:
        tm = []
    return names + [n for n in tv + tm if fnmatch.fnmatch(n, pattern)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grouped_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has grouped (e.g. depthwise) convolutions: MobileNets, EfficientNets, ShuffleNets. On the
    CPU their bf16 kernels do not run on AMX tiles, and bf16 autocast trained MobileNetV2 slower than fp32."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


# ---------------------------------------------------------------------------------------------
# The seeds' architectures, rebuilt in PyTorch with their published parameter counts.


class FlatCNN(nn.Module):
    """Convolutional features, flatten, then a dense head: the seeds' plain CNN shape."""

    def __init__(self, features: nn.Sequential, head: list[int | float], num_classes: int, in_channels: int, input_size):
        super().__init__()
        self.features = features
        with torch.no_grad():
            flat = features(torch.zeros(1, in_channels, *input_size)).numel()
        layers: list[nn.Module] = [nn.Flatten()]
        width = flat
        for item in head:  # ints are hidden Linear widths, floats are dropout rates
            if isinstance(item, float):
                layers.append(nn.Dropout(item))
            else:
                layers += [nn.Linear(width, item), nn.ReLU(inplace=True)]
                width = item
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv(cin: int, cout: int, same: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1 if same else 0), nn.ReLU(inplace=True)]


@ARCHS.register("seed002_teacher")
def seed002_teacher(num_classes, in_channels, input_size):
    """Seed 002's teacher: 4 conv, 2 max-pool, 2 linear (1,186,986 params at 32x32x3)."""
    f = nn.Sequential(*_conv(in_channels, 128), *_conv(128, 64), nn.MaxPool2d(2),
                      *_conv(64, 64), *_conv(64, 32), nn.MaxPool2d(2))
    return FlatCNN(f, [512], num_classes, in_channels, input_size)


@ARCHS.register("seed001_teacher")
def seed001_teacher(num_classes, in_channels, input_size):
    """Seed 001's BN+dropout teacher: 3 blocks of 2 conv (64, 128, 256), dense 512 (3,249,098 params)."""
    blocks, cin = [], in_channels
    for width, drop in ((64, 0.2), (128, 0.3), (256, 0.4)):
        blocks += [*_conv(cin, width), nn.BatchNorm2d(width), *_conv(width, width), nn.MaxPool2d(2), nn.Dropout(drop)]
        cin = width
    return FlatCNN(nn.Sequential(*blocks), [512, 0.5], num_classes, in_channels, input_size)


@ARCHS.register("seed004_teacher")
def seed004_teacher(num_classes, in_channels, input_size):
    """Seed 004's dropout teacher: 4 valid conv + max-pool, dense 512 (9,568,898 params at 224x224x3, 2 classes)."""
    f = nn.Sequential(*_conv(in_channels, 32, False), nn.MaxPool2d(2), *_conv(32, 64, False), nn.MaxPool2d(2),
                      nn.Dropout(0.2), *_conv(64, 64, False), nn.MaxPool2d(2), *_conv(64, 128, False),
                      nn.MaxPool2d(2), nn.Dropout(0.5))
    return FlatCNN(f, [512], num_classes, in_channels, input_size)


# Plain CNNs, name: (a conv + ReLU + 2x2 max-pool per width, "same" padding, hidden dense widths, what it is)
PLAIN_CNNS = {
    "seed002_student": ((16, 16), True, [256], "Seed 002's student: 2 conv, 2 max-pool, 2 linear (267,738 params at 32x32x3)."),
    "seed001_student": ((32, 64), True, [128], "Seed 001's student: 2 conv blocks (32, 64), dense 128 (545,098 params)."),
    "seed003_teacher": ((32,), False, [128], "Seed 003's MNIST teacher: conv 32 (valid), max-pool, dense 128 (693,962 params at 28x28x1)."),
    "seed003_student": ((16,), False, [64], "Seed 003's MNIST student: conv 16 (valid), max-pool, dense 64 (173,930 params at 28x28x1)."),
    "seed004_student": ((32,), False, [], "Seed 004's plain student: one valid conv 32, max-pool, dense out (789,442 params at 224x224x3, 2 classes)."),
}


def _register_plain_cnn(name: str, widths: tuple[int, ...], same: bool, dense: list, about: str) -> None:
    def build(num_classes, in_channels, input_size):
        layers, cin = [], in_channels
        for width in widths:
            layers += [*_conv(cin, width, same), nn.MaxPool2d(2)]
            cin = width
        return FlatCNN(nn.Sequential(*layers), dense, num_classes, in_channels, input_size)

    build.__name__, build.__doc__ = name, about
    ARCHS.register(name)(build)


for _name, _spec in PLAIN_CNNS.items():
    _register_plain_cnn(_name, *_spec)


@ARCHS.register("seed000_small_cnn")
def seed000_small_cnn(num_classes, in_channels, input_size):
    """Seed 000's small CNN: conv 32 + BN, max-pool, dropout, dense 128 (1,050,954 params at 32x32x3)."""
    f = nn.Sequential(*_conv(in_channels, 32), nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.Dropout(0.25))
    return FlatCNN(f, [128, 0.5], num_classes, in_channels, input_size)


# ---------------------------------------------------------------------------------------------
# edgekd's own compact residual networks: accuracy per parameter and CPU-friendly 3x3 convs.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages (stride 1, 2, 2), global pooling, linear."""

    def __init__(self, widths, blocks, num_classes, in_channels, input_size=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# name: (widths a stage, blocks a stage, what it is)
RESNETS = {
    "edge_resnet_s": ((32, 64, 112), 1, "edgekd's default student: ResNet with widths 32-64-112, one block a stage (~264k params)."),
    "resnet8": ((16, 32, 64), 1, "ResNet-8 (widths 16-32-64, MLPerf Tiny's image classifier, ~78k params)."),
    "resnet20": ((16, 32, 64), 3, "ResNet-20 (He et al. 2016, widths 16-32-64, three blocks a stage, ~0.27M params)."),
    "resnet_m": ((48, 96, 192), 2, "A mid-size teacher: widths 48-96-192, two blocks a stage (~1.56M params)."),
}


def _register_resnet(name: str, widths: tuple[int, ...], blocks: int, about: str) -> None:
    def build(num_classes, in_channels, input_size):
        return ResNet(widths, blocks, num_classes, in_channels)

    build.__name__, build.__doc__ = name, about
    ARCHS.register(name)(build)


for _name, _spec in RESNETS.items():
    _register_resnet(_name, *_spec)


def _pool_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@ARCHS.register("fastcnn")
def fastcnn(num_classes, in_channels, input_size):
    """A fast-training CIFAR teacher (~2M params): a 2x2 stem, then three blocks of conv -> max-pool ->
    BN -> ReLU -> conv -> BN -> ReLU (widths 64-256-256), global max-pool, linear. The shape of Keller
    Jordan's airbench94 (pooling inside each block keeps most convolutions small), with ReLU for
    speed on the CPU and for int8."""
    f = nn.Sequential(nn.Conv2d(in_channels, 24, 2, bias=True), nn.ReLU(inplace=True), *_pool_block(24, 64),
                      *_pool_block(64, 256), *_pool_block(256, 256), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return nn.Sequential(f, nn.Linear(256, num_classes))


# ---------------------------------------------------------------------------------------------
# torchvision backbones with a new head.


def _torchvision_model(name, num_classes, pretrained=False, weights_path=None, trainable_layers=None,
                       head_hidden=None, **_):
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise EdgeKDError(f"unknown torchvision architecture {name!r}; see `edgekd models 'torchvision:*'`")
    weights = None
    if pretrained and not weights_path:
        weights = "DEFAULT"
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # noqa: BLE001 - hub download failures come in many types
        raise EdgeKDError(
            f"could not fetch pretrained weights for {name} ({exc.__class__.__name__}); "
            "pass --weights FILE with a torchvision state dict, or train without --pretrained"
        ) from None
    if weights_path:
        state = _load_weights_only(Path(weights_path))
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    head = _pooled_mlp_head(model, name, num_classes, head_hidden) if head_hidden else _replace_head(model, num_classes)
    if trainable_layers is not None:
        _freeze_all_but_last(model, trainable_layers, head)
    return model


def _timm_model(name, num_classes, pretrained=False, weights_path=None, trainable_layers=None, head_hidden=None, **_):
    """A timm classifier with a new ``num_classes`` head: ImageNet weights from the hub (``pretrained``) or
    from a local state dict (``weights_path``, no network needed)."""
    try:
        import timm
    except ImportError:
        raise EdgeKDError(f"timm:{name} needs timm: pip install 'edgekd[timm]'") from None
    if head_hidden:
        raise EdgeKDError(f"head_hidden applies to torchvision:* architectures only, not timm:{name}")
    if not timm.is_model(name):
        raise EdgeKDError(f"unknown timm architecture {name!r}; see `edgekd models 'timm:*'`")
    try:
        model = timm.create_model(name, pretrained=bool(pretrained and not weights_path))
    except Exception as exc:  # noqa: BLE001 - hub download failures come in many types
        raise EdgeKDError(f"could not fetch pretrained weights for timm:{name} ({exc.__class__.__name__}); "
                          "pass --weights FILE with a timm state dict, or train without --pretrained") from None
    if weights_path:
        state = _load_weights_only(Path(weights_path))
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    model.reset_classifier(num_classes)
    if trainable_layers is not None:
        _freeze_all_but_last(model, trainable_layers, model.get_classifier())
    return model


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (``fc``, ``classifier[-1]``, ``heads.head``) for a new one; returns it."""
    last_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return getattr(parent, attr)


def _pooled_mlp_head(model: nn.Module, name: str, num_classes: int, hidden: int) -> nn.Module:
    """Replace the whole classifier by global average pooling, Dense(hidden, ReLU), Dropout(0.5) and
    the class layer: the head Keras transfer-learning notebooks put on an ``include_top=False``
    backbone (seed 000: 256 units). VGG's 7x7 pooling becomes global pooling, so VGG16 keeps 14.8M
    parameters instead of 134M. Returns the new head."""
    attr = next((a for a in ("fc", "classifier", "heads") if isinstance(getattr(model, a, None), nn.Module)), None)
    if attr is None:
        raise EdgeKDError(f"torchvision:{name} has no fc/classifier/heads module; drop head_hidden for it")
    if isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
    setattr(model, attr, nn.Identity())
    try:
        with torch.no_grad():
            features = model.eval()(torch.zeros(1, 3, 64, 64)).shape[-1]
    except RuntimeError as exc:
        raise EdgeKDError(f"head_hidden is not supported for torchvision:{name} ({exc})") from None
    head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(hidden, num_classes))
    setattr(model, attr, head)
    model.train()
    return head


def _freeze_all_but_last(model: nn.Module, n: int, head: nn.Module) -> None:
    """Fine-tune only the last ``n`` parameterised layers of the backbone plus the new head."""
    in_head = {id(p) for p in head.parameters()}
    layers = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(False))
              and not any(id(p) in in_head for p in m.parameters(False))]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers[-n:] if n > 0 else []:
        for p in m.parameters():
            p.requires_grad_(True)
    for p in head.parameters():
        p.requires_grad_(True)


def _load_weights_only(path: Path):
    import pickle

    if not path.is_file():
        raise EdgeKDError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EdgeKDError(
            f"{path} needs arbitrary unpickling, which edgekd refuses (it can run code); "
            "re-save it as a state dict with torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors all mean an unreadable file
        raise EdgeKDError(f"{path} is not a readable PyTorch file ({exc.__class__.__name__}: {exc})") from None


def fit_input(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Match a batch to a model's channel count (1 <-> 3) and spatial size (bilinear resize)."""
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise EdgeKDError(f"model expects {channels} input channels, the data has {x.shape[1]}")
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


# Activations f with f(max(a, b)) == max(f(a), f(b)): monotone non-decreasing and elementwise.
_MONOTONE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)


def pool_before_activation(model: nn.Module) -> nn.Module:
    """The same network with every ``activation -> MaxPool2d`` pair inside an ``nn.Sequential`` run
    as ``MaxPool2d -> activation``: for a monotone elementwise activation both orders give the same
    values and gradients, and pooling first runs the activation and its backward on a quarter of
    the elements. The result shares every parameter and buffer with ``model`` (training it trains
    ``model``) and has the same state-dict keys; ``model`` itself is left as it was, so exports and
    checkpoints keep the conventional order, which converters fuse (conv + ReLU) for inference.

    Our own: a graph compiler would find this fusion, but ``torch.compile`` made these CPU training
    steps slower (benchmarks/results/step_profile.md); the reorder is what pays on seed 002's
    student (the training step about 1.5x faster in channels-last).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> fast = pool_before_activation(m)
        >>> [type(x).__name__ for x in fast], fast[0] is m[0]
        (['Conv2d', 'MaxPool2d', 'ReLU'], True)
        >>> x = torch.randn(2, 3, 10, 10)
        >>> torch.equal(fast(x), m(x))
        True
    """
    children = {name: pool_before_activation(child) for name, child in model.named_children()}
    if isinstance(model, nn.Sequential):
        order = list(children)
        for i in range(len(order) - 1):
            a, b = children[order[i]], children[order[i + 1]]
            if isinstance(a, _MONOTONE) and isinstance(b, nn.MaxPool2d):
                children[order[i]], children[order[i + 1]] = b, a
    if all(children[n] is c for n, c in model.named_children()):
        return model
    view = copy.copy(model)  # a new module object; parameters and buffers are the same tensors
    view._modules = dict(children)
    return view


def model_cost(model, channels: int, size: tuple[int, int]) -> tuple[int, int]:
    """Parameters and multiply-accumulates for one image (torch's FLOP counter, FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, channels, *size))
    model.train(was_training)
    return count_params(model), int(counter.get_total_flops() // 2)
