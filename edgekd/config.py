"""Frozen configs per stage, loadable from TOML with unknown keys rejected.

Defaults are edgekd's documented recipe; the comments say why.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError


class ConfigValueError(EdgeKDError):
    """A config value of the wrong type or outside its range; ``key`` names the field."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURAL_WORDS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the type ``hint`` (None when it fits). bool is not an int here."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(value, h) for h in typing.get_args(hint)]
        return None if None in reasons else " or ".join(r for r in reasons if r)
    if hint is type(None):
        return None if value is None else "empty"
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, tuple) or any(_type_error(v, item) for v in value):
            return f"a list of {_PLURAL_WORDS.get(item, item)}"
        return None
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    return None if isinstance(value, hint) else _TYPE_WORDS.get(hint, str(hint))


def _range_error(value: Any, rule: tuple) -> str | None:
    kind, *args = rule
    if value is None:
        return None
    if kind == "min":
        return None if value >= args[0] else f"at least {args[0]}"
    if kind == "above":
        return None if value > args[0] else f"greater than {args[0]}"
    if kind == "between":
        return None if args[0] <= value <= args[1] else f"between {args[0]} and {args[1]}"
    if kind == "open":
        return None if args[0] < value < args[1] else f"strictly between {args[0]} and {args[1]}"
    if kind == "choice":
        return None if value in args[0] else f"one of {', '.join(map(str, args[0]))}"
    if kind == "each":
        bad = [v for v in value if _range_error(v, args[0])]
        return None if not bad else f"a list whose items are each {_range_error(bad[0], args[0])}"
    raise ValueError(kind)


def check_fields(cfg: Any, rules: dict[str, tuple]) -> None:
    """Validate every field of a frozen config by its type hint and ``rules``; ints become floats
    where a float is expected, lists become tuples. Raises ``ConfigValueError`` naming the key."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, list):
            value = tuple(value)
        if hints[f.name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        object.__setattr__(cfg, f.name, value)
        problem = _type_error(value, hints[f.name])
        if problem is None and f.name in rules:
            problem = _range_error(value, rules[f.name])
        if problem:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigValueError(f.name, f"must be {problem}, got {shown!r}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # built-in name (digits, cifar10, mnist, fashion-mnist) or an ImageFolder path
    data_dir: str | None = None  # root of torchvision's files for cifar10/mnist/fashion-mnist
    download: bool = False  # fetch torchvision datasets when missing (needs network)
    val_fraction: float = 0.1  # carved from train, stratified, when the source has no val split
    test_fraction: float = 0.2  # only for a single-folder ImageFolder or digits, which have no test split
    image_size: int | None = None  # decode size (pixels) for ImageFolder images; None = their most common size
    split_seed: int = 0  # fixed so every model of a run sees the same split

    def __post_init__(self) -> None:
        check_fields(self, {"val_fraction": ("open", 0.0, 1.0), "test_fraction": ("open", 0.0, 1.0),
                            "image_size": ("min", 1), "split_seed": ("min", 0)})


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "edge_resnet_s"  # registry name or torchvision:NAME (see `edgekd models`)
    input_size: int | None = None  # model input in pixels, resized on the fly; None = data size (seed 000 uses 48)
    pretrained: bool = False  # torchvision:* only: ImageNet weights (needs network or weights_path)
    weights_path: str | None = None  # local torchvision state dict for pretrained use without network
    trainable_layers: int | None = None  # torchvision:* only: fine-tune just the last N layers and the head
    head_hidden: int | None = None  # torchvision:* only: GAP -> Dense(N, ReLU) -> Dropout 0.5 -> classes (seed 000's Keras head); None = torchvision's classifier, new last layer

    def __post_init__(self) -> None:
        check_fields(self, {"input_size": ("min", 1), "trainable_layers": ("min", 1), "head_hidden": ("min", 1)})


@dataclass(frozen=True)
class RecipeConfig:
    epochs: int = 30
    batch_size: int = 256  # batch is the largest CPU throughput lever; 256 keeps BN statistics stable
    optimizer: str = "sgd"  # sgd (Nesterov momentum), adam or adamw
    lr: float = 0.1  # peak learning rate of the schedule, for batch_size
    momentum: float = 0.9
    weight_decay: float = 5e-4  # applied to conv/linear weights only, not to BN or biases
    schedule: str = "onecycle"  # onecycle (warm-up then cosine down), cosine, or constant
    label_smoothing: float = 0.0
    augment_pad: int | None = None  # random-crop padding in pixels; None = image height // 8, 0 = off
    augment_flip: bool | None = None  # horizontal flips; None = on for RGB data, off for grayscale (digits)
    channels_last: bool = True  # NHWC memory format: 0-24% faster convolutions on this CPU
    seed: int = 0  # model init, batch order and augmentation; the same seed repeats a CPU run
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    amp: bool = True  # mixed precision where it pays: CUDA, and CPUs with AMX tiles (distill.resolve_precision)
    # auto: fp16 autocast + GradScaler on CUDA, bf16 autocast on a CPU with AMX, fp32 on other CPUs (fp32
    # everywhere when amp = false); fp32; bf16: bf16 autocast on CPU or CUDA, no scaler (bf16 has fp32's
    # range); fp16: CUDA only
    precision: str = "auto"
    eval_batch_size: int = 1024
    # A step's gradient norm is clipped to this multiple of its running average (after 20 steps), for
    # scratch and KD runs alike; None turns it off. One spiking step killed a student without batch
    # norm under KD (benchmarks/results/kd_stability_digits28.md); 4x leaves ordinary steps alone.
    clip_grad: float | None = 4.0
    # Share of each batch shown a second time, freshly augmented, with the label loss (batch
    # augmentation). 0 for an ordinary run; a distilled student's matched scratch twin sets it to the
    # KD run's fresh_share, so both make the same number of student passes on the same augmentation.
    repeat_share: float = 0.0
    # Mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself by a weight drawn
    # from Beta(a, a), labels alike; 0 turns it off. With teachers it needs kd.cache_views = 0: the
    # teacher then answers for the blended images the student sees (consistent "function matching",
    # Beyer et al. 2022), and a matched scratch twin mixes the same way.
    mixup_alpha: float = 0.0
    # CutMix (Yun et al. 2019): a box of the shuffled copy is pasted into each image, the labels weighted by the
    # area each image keeps; the box's share is drawn from Beta(a, a), then clipped at the border; 0 turns it off.
    # With mixup_alpha too, each batch is one or the other at even odds. The same teacher rule as mixup
    # (kd.cache_views = 0).
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, {
            "epochs": ("min", 1), "batch_size": ("min", 1), "optimizer": ("choice", ("sgd", "adam", "adamw")),
            "lr": ("above", 0.0), "momentum": ("between", 0.0, 1.0), "weight_decay": ("min", 0.0),
            "schedule": ("choice", ("onecycle", "cosine", "constant")), "label_smoothing": ("between", 0.0, 0.99),
            "augment_pad": ("min", 0), "seed": ("min", 0), "eval_batch_size": ("min", 1),
            "precision": ("choice", ("auto", "fp32", "bf16", "fp16")), "repeat_share": ("between", 0.0, 1.0),
            "mixup_alpha": ("min", 0.0), "cutmix_alpha": ("min", 0.0),
            "clip_grad": ("above", 1.0)})
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ConfigValueError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class KDConfig:
    teachers: tuple[str, ...] = ()  # files: edgekd .pt, TorchScript, .onnx, .keras/.h5, .tflite
    teacher_weights: tuple[float, ...] = ()  # per teacher; equal when empty
    alpha: float = 0.5  # weight of the hard-label CE; 1 - alpha goes to the T^2-scaled KL term
    temperature: float = 4.0  # softening temperature T (Hinton et al.; 2-5 is typical for CIFAR)
    cache_views: int = 2  # teacher outputs cached for this many augmented views per image; 0 = teacher on every batch
    # With a cache, this share of each batch is shown again as a fresh augmentation trained on the
    # labels alone: the student keeps a scratch run's augmentation diversity while the cached views
    # carry the teacher's soft targets. On seed 002's CIFAR-10 pair (10 epochs, 2 views) it turned
    # KD from below scratch into above it (benchmarks/results/distill_cifar10.md); costs up to 2x
    # the student's compute, not the teacher's.
    fresh_share: float = 1.0
    # The KD term's weight ramps linearly from 0 to (1 - alpha) over this many epochs (the label loss
    # takes the rest). Its gradient is T * (p_student - p_teacher), up to T times the label loss's
    # while an untrained student is far from its teacher (benchmarks/results/kd_stability_digits28.md).
    warmup_epochs: float = 1.0
    # Feature (hint) distillation, FitNets-style: this weight times the mean squared error (relative to
    # the teacher map's scale) between the student's last spatial feature map, through a learned 1x1
    # adapter, and the teacher's (edgekd.hints). 0 = off; needs one edgekd .pt teacher and cache_views 0.
    # It ramps in with the KD term over warmup_epochs.
    hint_weight: float = 0.0
    teacher_mean: tuple[float, ...] = (0.0,)  # normalization foreign-format teachers expect on [0, 1] pixels
    teacher_std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        check_fields(self, {"teacher_weights": ("each", ("min", 0.0)), "alpha": ("between", 0.0, 1.0),
                            "temperature": ("above", 0.0), "cache_views": ("min", 0), "fresh_share": ("between", 0.0, 1.0),
                            "warmup_epochs": ("min", 0.0), "hint_weight": ("min", 0.0),
                            "teacher_std": ("each", ("above", 0.0))})
        for name in ("teacher_mean", "teacher_std"):
            if len(getattr(self, name)) not in (1, 3):
                raise ConfigValueError(name, f"must have 1 value or 3 (one per RGB channel), got {list(getattr(self, name))}")
        if self.teacher_weights and sum(self.teacher_weights) <= 0:
            raise ConfigValueError("teacher_weights", f"must have a positive sum, got {list(self.teacher_weights)}")


@dataclass(frozen=True)
class DistillConfig:
    """One training run: a scratch model when ``kd.teachers`` is empty, a distilled student otherwise."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "recipe": RecipeConfig, "kd": KDConfig}


def build(cls, values: dict[str, Any], where: str):
    """Build a frozen config from a dict, naming any unknown key or ill-typed value."""
    if not isinstance(values, dict):
        raise EdgeKDError(f"{where} must be a table of keys, got {values!r}")
    names = {f.name: f for f in fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise EdgeKDError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(names)}")
    try:
        return cls(**values)
    except ConfigValueError as exc:
        raise EdgeKDError(f"{where}.{exc.key} {exc.problem}") from None


def distill_config_from_dict(values: dict[str, Any]) -> DistillConfig:
    unknown = [k for k in values if k not in SECTIONS]
    if unknown:
        raise EdgeKDError(f"unknown section [{unknown[0]}]; valid sections: {', '.join(SECTIONS)}")
    return DistillConfig(**{k: build(cls, values.get(k, {}), k) for k, cls in SECTIONS.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EdgeKDError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise EdgeKDError(f"{path} is not valid TOML: {exc}") from None


def override(cfg, **changes):
    """``dataclasses.replace`` that ignores ``None`` (options the user did not give)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
