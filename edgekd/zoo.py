"""Model architectures by name, and teachers loaded from any file format a user has.

Architectures take ``num_classes``, ``in_channels`` and ``input_size`` so the seeds' models
keep their published parameter counts at their own input sizes. Teachers only need to produce
outputs: every loader returns a callable from ``(B, C, H, W)`` float images in [0, 1] to
``(B, K)`` logits, whatever framework runs it underneath.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.errors import EdgeKDError
from edgekd.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")
TEACHER_LOADERS: Registry[Callable[..., "Teacher"]] = Registry("teacher format")
TORCHVISION_PREFIX = "torchvision:"


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    **kwargs,
) -> nn.Module:
    """Build an architecture by registry name or ``torchvision:NAME``.

    Example:
        >>> m = build_model("seed002_student", 10, 3, (32, 32))
        >>> sum(p.numel() for p in m.parameters())
        267738
    """
    if arch.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(arch[len(TORCHVISION_PREFIX):], num_classes, **kwargs)
    if kwargs.get("pretrained") or kwargs.get("weights_path"):
        raise EdgeKDError(f"pretrained weights are only available for torchvision:* architectures, not {arch!r}")
    if kwargs.get("head_hidden"):
        raise EdgeKDError(f"head_hidden applies to torchvision:* architectures only, not {arch!r}")
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("pretrained", "weights_path", "trainable_layers", "head_hidden") or v}
    return ARCHS.get(arch)(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **kwargs)


def list_architectures(pattern: str = "*") -> list[str]:
    """Registered architectures plus torchvision's classification models, filtered by a glob."""
    import fnmatch

    names = ARCHS.names(pattern)
    try:
        import torchvision

        tv = [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    except ImportError:  # pragma: no cover - torchvision is a core dependency
        tv = []
    return names + [n for n in tv if fnmatch.fnmatch(n, pattern)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


@ARCHS.register("seed002_student")
def seed002_student(num_classes, in_channels, input_size):
    """Seed 002's student: 2 conv, 2 max-pool, 2 linear (267,738 params at 32x32x3)."""
    f = nn.Sequential(*_conv(in_channels, 16), nn.MaxPool2d(2), *_conv(16, 16), nn.MaxPool2d(2))
    return FlatCNN(f, [256], num_classes, in_channels, input_size)


@ARCHS.register("seed001_teacher")
def seed001_teacher(num_classes, in_channels, input_size):
    """Seed 001's BN+dropout teacher: 3 blocks of 2 conv (64, 128, 256), dense 512 (3,249,098 params)."""
    blocks, cin = [], in_channels
    for width, drop in ((64, 0.2), (128, 0.3), (256, 0.4)):
        blocks += [*_conv(cin, width), nn.BatchNorm2d(width), *_conv(width, width), nn.MaxPool2d(2), nn.Dropout(drop)]
        cin = width
    return FlatCNN(nn.Sequential(*blocks), [512, 0.5], num_classes, in_channels, input_size)


@ARCHS.register("seed001_student")
def seed001_student(num_classes, in_channels, input_size):
    """Seed 001's student: 2 conv blocks (32, 64), dense 128 (545,098 params)."""
    f = nn.Sequential(*_conv(in_channels, 32), nn.MaxPool2d(2), *_conv(32, 64), nn.MaxPool2d(2))
    return FlatCNN(f, [128], num_classes, in_channels, input_size)


@ARCHS.register("seed003_teacher")
def seed003_teacher(num_classes, in_channels, input_size):
    """Seed 003's MNIST teacher: conv 32 (valid), max-pool, dense 128 (693,962 params at 28x28x1)."""
    f = nn.Sequential(*_conv(in_channels, 32, same=False), nn.MaxPool2d(2))
    return FlatCNN(f, [128], num_classes, in_channels, input_size)


@ARCHS.register("seed003_student")
def seed003_student(num_classes, in_channels, input_size):
    """Seed 003's MNIST student: conv 16 (valid), max-pool, dense 64 (173,930 params at 28x28x1)."""
    f = nn.Sequential(*_conv(in_channels, 16, same=False), nn.MaxPool2d(2))
    return FlatCNN(f, [64], num_classes, in_channels, input_size)


@ARCHS.register("seed004_teacher")
def seed004_teacher(num_classes, in_channels, input_size):
    """Seed 004's dropout teacher: 4 valid conv + max-pool, dense 512 (9,568,898 params at 224x224x3, 2 classes)."""
    f = nn.Sequential(*_conv(in_channels, 32, False), nn.MaxPool2d(2), *_conv(32, 64, False), nn.MaxPool2d(2),
                      nn.Dropout(0.2), *_conv(64, 64, False), nn.MaxPool2d(2), *_conv(64, 128, False),
                      nn.MaxPool2d(2), nn.Dropout(0.5))
    return FlatCNN(f, [512], num_classes, in_channels, input_size)


@ARCHS.register("seed004_student")
def seed004_student(num_classes, in_channels, input_size):
    """Seed 004's plain student: one valid conv 32, max-pool, dense out (789,442 params at 224x224x3, 2 classes)."""
    f = nn.Sequential(*_conv(in_channels, 32, False), nn.MaxPool2d(2))
    return FlatCNN(f, [], num_classes, in_channels, input_size)


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


@ARCHS.register("edge_resnet_s")
def edge_resnet_s(num_classes, in_channels, input_size):
    """edgekd's default student: ResNet with widths 32-64-112, one block a stage (~264k params)."""
    return ResNet((32, 64, 112), 1, num_classes, in_channels)


@ARCHS.register("resnet8")
def resnet8(num_classes, in_channels, input_size):
    """ResNet-8 (widths 16-32-64, MLPerf Tiny's image classifier, ~78k params)."""
    return ResNet((16, 32, 64), 1, num_classes, in_channels)


@ARCHS.register("resnet20")
def resnet20(num_classes, in_channels, input_size):
    """ResNet-20 (He et al. 2016, widths 16-32-64, three blocks a stage, ~0.27M params)."""
    return ResNet((16, 32, 64), 3, num_classes, in_channels)


@ARCHS.register("resnet_m")
def resnet_m(num_classes, in_channels, input_size):
    """A mid-size teacher: widths 48-96-192, two blocks a stage (~1.56M params)."""
    return ResNet((48, 96, 192), 2, num_classes, in_channels)


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


# ---------------------------------------------------------------------------------------------
# Teachers from any format.


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
        raise EdgeKDError(f"teacher input has shape {list(shape)}; edgekd needs a 4-D image input")
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
) -> FunctionTeacher:
    """Load a frozen teacher from an edgekd checkpoint, TorchScript, ONNX, Keras or TFLite file.

    ``input_mean``/``input_std`` describe the normalization that a model from another framework
    expects on [0, 1] pixels (edgekd checkpoints carry their own).

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
    return TEACHER_LOADERS.get(kind)(path, device=torch.device(device), **foreign)


@TEACHER_LOADERS.register("torch")
def _load_torch_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return _load_torchscript_teacher(path, device, mean, std)
    from edgekd.checkpoint import load_model

    model, meta = load_model(path, device=device)
    model.eval().requires_grad_(False)
    channels_last = device.type == "cpu"  # NHWC convolutions: 1.6x the eval throughput on this CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm_mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    norm_std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    size = tuple(meta["input_size"])
    channels = int(meta["in_channels"])

    @torch.no_grad()
    def run(x_unit: torch.Tensor) -> torch.Tensor:
        x = x_unit.to(device)
        x = (fit_input(x, channels, size) - norm_mean) / norm_std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x).float().cpu()

    fast = _onnxruntime_forward(model, meta, run) if device.type == "cpu" else None
    return FunctionTeacher(path.name, fast or run, tuple(meta["classes"]), kind="edgekd (onnxruntime)" if fast else "edgekd",
                           as_logits=OutputsAsLogits(probabilities=False), input_size=size)


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

    from edgekd.export import Deployable, onnx_session, to_onnx

    channels, size = int(meta["in_channels"]), tuple(meta["input_size"])
    net = Deployable(model, meta["mean"], meta["std"]).eval()
    probe = torch.rand(4, channels, *size, generator=torch.Generator().manual_seed(0))
    try:
        with tempfile.TemporaryDirectory(prefix="edgekd-teacher-") as tmp:
            path = to_onnx(net, probe, Path(tmp) / "teacher.onnx")
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


@TEACHER_LOADERS.register("torchscript")
def _load_torchscript_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"could not load TorchScript teacher {path}: {exc}") from None
    spec = ForeignInput("NCHW", None, None, mean, std)

    @torch.no_grad()
    def run(x_unit):
        return module(torch.from_numpy(spec.prepare(x_unit)).to(device)).float().cpu()

    return FunctionTeacher(path.name, run, kind="torchscript")


@TEACHER_LOADERS.register("onnx")
def _load_onnx_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeKDError("ONNX teachers need onnxruntime: pip install 'edgekd[onnx]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"could not load ONNX teacher {path}: {str(exc).splitlines()[0]}") from None
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
    try:
        import tensorflow as tf  # noqa: F401 - keras needs its backend
        import keras
    except ImportError:
        raise EdgeKDError("Keras teachers need TensorFlow: pip install 'edgekd[tf]'") from None
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        raise EdgeKDError(f"could not load Keras teacher {path}: {str(exc).splitlines()[0]}") from None
    layout, size, channels = guess_layout(model.input_shape)
    spec = ForeignInput(layout, size, channels, mean, std)

    def run(x_unit):
        return np.asarray(model(spec.prepare(x_unit), training=False))

    return FunctionTeacher(path.name, run, kind="keras", input_size=spec.size)


@TEACHER_LOADERS.register("tflite")
def _load_tflite_teacher(path: Path, device, mean, std) -> FunctionTeacher:
    from edgekd.export import TFLiteRunner  # quantizes/dequantizes integer I/O with the file's own parameters

    runner = TFLiteRunner(path)
    layout, size, channels = guess_layout(runner.inp["shape"])
    spec = ForeignInput(layout, size, channels, mean, std)
    quant = runner.quantization()["output"]  # None for float outputs
    return FunctionTeacher(path.name, lambda x_unit: runner(spec.prepare(x_unit)), kind="tflite", input_size=spec.size,
                           as_logits=OutputsAsLogits(output_scale=quant["scale"] if quant else None))
