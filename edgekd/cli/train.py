"""`edgekd train` and `edgekd distill`."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import typer

from edgekd.cli.common import AsJson, Config, Out, Resume, _Bars, _build_config, _fail, _guarded, _progress, err
import edgekd.rundir as rundir
from edgekd.distill import train
from edgekd.report import teacher_table, train_table


class _Shared(NamedTuple):
    """An option `train` and `distill` share, and the config field its value overrides (None: not given)."""

    section: str
    field: str
    kind: type
    help: str
    flags: tuple[str, ...] = ()


_SHARED = {
    "data": _Shared("data", "dataset", str, "digits (embedded), cifar10, mnist, fashion-mnist, or an ImageFolder DIR", ("--data",)),
    "data_dir": _Shared("data", "data_dir", str, "Root of torchvision's files for cifar10/mnist/fashion-mnist"),
    "download": _Shared("data", "download", bool, "Download torchvision datasets when missing (needs network)", ("--download",)),
    "val_fraction": _Shared("data", "val_fraction", float, "Validation share carved from train when there is no val split"),
    "test_fraction": _Shared("data", "test_fraction", float, "Test share for a single-folder dataset"),
    "image_size": _Shared("data", "image_size", int, "Decode ImageFolder images at this size (pixels)"),
    "input_size": _Shared("model", "input_size", int, "Model input size in pixels (resized on the fly), e.g. 48 for ImageNet backbones"),
    "epochs": _Shared("recipe", "epochs", int, "Training epochs \\[default: 30]"),
    "batch_size": _Shared("recipe", "batch_size", int, "Batch size \\[default: 256]"),
    "optimizer": _Shared("recipe", "optimizer", str, "sgd (Nesterov), adam or adamw \\[default: sgd]", ("--optimizer",)),
    "lr": _Shared("recipe", "lr", float, "Peak learning rate \\[default: 0.1]", ("--lr",)),
    "weight_decay": _Shared("recipe", "weight_decay", float, "Weight decay on conv/linear weights \\[default: 5e-4]"),
    "schedule": _Shared("recipe", "schedule", str, "onecycle, cosine or constant \\[default: onecycle]"),
    "label_smoothing": _Shared("recipe", "label_smoothing", float, "Label smoothing of the hard-label loss"),
    "pad": _Shared("recipe", "augment_pad", int, "Random-crop padding in pixels; 0 turns cropping off \\[default: height/8]", ("--pad",)),
    "flip": _Shared("recipe", "augment_flip", bool, "Random horizontal flips \\[default: on for RGB]", ("--flip/--no-flip",)),
    "mixup": _Shared("recipe", "mixup_alpha", float,
                     "Mixup: blend each batch with a shuffled copy by a Beta(a, a) weight, labels alike; 0 = off. With "
                     "teachers it needs --cache-views 0, so the teacher answers for the blended images \\[default: 0]"),
    "cutmix": _Shared("recipe", "cutmix_alpha", float,
                      "CutMix: paste a box of a shuffled copy into each image, labels weighted by the area kept, box share "
                      "from Beta(a, a) before clipping; 0 = off; with --mixup too, one or the other per batch. With "
                      "teachers it needs them on every batch (--cache-views 0) "
                      "\\[default: 0]"),
    "seed": _Shared("recipe", "seed", int, "Seed for init, batch order and augmentation \\[default: 0]"),
    "device": _Shared("recipe", "device", str, "auto (CUDA when present), cpu, cuda, cuda:N \\[default: auto]"),
    "precision": _Shared("recipe", "precision", str, "auto (fp16 autocast + loss scaling on CUDA, bf16 on a CPU with AMX, else fp32), "
                         "fp32, bf16 (CPU or CUDA) or fp16 (CUDA only) \\[default: auto]"),
}
_LAST = ("config", "out", "resume", "as_json")  # listed after the shared options in --help


def _with_shared_options(command):
    """Give ``command`` the shared options as keyword parameters in place of its ``**shared``: Typer builds the
    command line from the signature, so both commands declare each option once, here."""
    sig = inspect.signature(command, eval_str=True)  # the module defers annotations; Typer needs them resolved
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=Annotated[Optional[o.kind], typer.Option(*o.flags, help=o.help)])
              for name, o in _SHARED.items()]
    first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name not in _LAST]
    last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name in _LAST]
    command.__signature__ = sig.replace(parameters=first + shared + last)
    return command


def _sections(shared: dict, **model) -> dict:
    """The config sections the shared options override, with the command's own model fields."""
    sections = {"data": {}, "model": dict(model), "recipe": {}}
    for name, option in _SHARED.items():
        sections[option.section][option.field] = shared[name]
    return sections


def _train(cfg, out: Optional[Path], command: str, resume: bool, as_json: bool) -> None:

    out = out or rundir.default_run(command, cfg.model.arch)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 talks
        _guarded(lambda: train(cfg, out, resume=resume))
        return
    with _progress() as progress:
        result = _guarded(lambda: train(cfg, out, resume=resume, on_step=_Bars(progress)))
    if result.teachers:
        err.print(teacher_table(result.teachers))
    err.print(train_table(result))
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")


@_with_shared_options
def train_cmd(
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, see `edgekd models` \\[default: edge_resnet_s]")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained", help="torchvision:* only: start from ImageNet weights")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="torchvision:* only: local ImageNet state dict (no network needed)")] = None,
    trainable_layers: Annotated[Optional[int], typer.Option(help="torchvision:* only: fine-tune only the last N layers and the new head")] = None,
    config: Config = None, out: Out = None, resume: Resume = False, as_json: AsJson = False, **shared,
) -> None:
    """Train one model with cross-entropy: a teacher, or the scratch baseline a student is compared with.

    Example: edgekd train --arch seed002_teacher --data path/to/cifar10-imagefolder --epochs 10
    """
    sections = _sections(shared, arch=arch, pretrained=pretrained, weights_path=weights, trainable_layers=trainable_layers)
    cfg = _guarded(lambda: _build_config(config, {**sections, "kd": {}}))
    if cfg.kd.teachers:
        _fail("the config lists teachers; use `edgekd distill` for distillation")
    _train(cfg, out, "train", resume, as_json)


@_with_shared_options
def distill_cmd(
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", help="Teacher file, repeat for several: edgekd .pt, TorchScript, .onnx, .keras/.h5, .tflite")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="Student architecture \\[default: edge_resnet_s]")] = None,
    teacher_weight: Annotated[Optional[list[float]], typer.Option("--teacher-weight", help="Weight per teacher in the averaged soft targets \\[default: equal]")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Weight of the hard-label CE; 1-alpha weights T^2 KL \\[default: 0.5]")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-T", help="Softening temperature \\[default: 4]")] = None,
    cache_views: Annotated[Optional[int], typer.Option(help="Augmented views per image whose teacher outputs are cached; 0 runs teachers on every batch \\[default: 2]")] = None,
    fresh_share: Annotated[Optional[float], typer.Option(help="Share of each batch also shown as a fresh augmentation trained on its labels alone (cached views carry the teacher's targets); 1 = every image, at twice the student's compute \\[default: 1]")] = None,
    hint_weight: Annotated[Optional[float], typer.Option(help="Feature (hint) distillation: weight of the loss pulling the student's last feature map, through a learned 1x1 adapter, to the teacher's; needs one edgekd .pt teacher and --cache-views 0 \\[default: 0 = off]")] = None,
    teacher_mean: Annotated[Optional[list[float]], typer.Option(help="Normalization mean non-edgekd teachers expect on [0,1] pixels (repeat per channel) \\[default: 0]")] = None,
    teacher_std: Annotated[Optional[list[float]], typer.Option(help="Normalization std for non-edgekd teachers \\[default: 1]")] = None,
    config: Config = None, out: Out = None, resume: Resume = False, as_json: AsJson = False, **shared,
) -> None:
    """Distill a student from one or more frozen teachers.

    Loss: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T)).
    Teachers that output probabilities (Keras models ending in softmax) are detected and handled.
    Teacher outputs are cached for --cache-views augmented views per image; with --fresh-share 1 (the default) every image is also shown freshly augmented with the label loss alone, so the student keeps a scratch run's augmentation diversity.

    Example: edgekd distill -t runs/train-resnet_m/best.pt --student resnet8 --data digits
    """
    kd = dict(teachers=tuple(teacher) if teacher else None,
              teacher_weights=tuple(teacher_weight) if teacher_weight else None, alpha=alpha,
              temperature=temperature, cache_views=cache_views, fresh_share=fresh_share, hint_weight=hint_weight,
              teacher_mean=tuple(teacher_mean) if teacher_mean else None,
              teacher_std=tuple(teacher_std) if teacher_std else None)
    cfg = _guarded(lambda: _build_config(config, {**_sections(shared, arch=student), "kd": kd}))
    if not cfg.kd.teachers:
        _fail("distill needs at least one --teacher FILE (or kd.teachers in --config); use `edgekd train` for a scratch model")
    _train(cfg, out, "distill", resume, as_json)


COMMANDS = {"train": train_cmd, "distill": distill_cmd}  # name -> command, registered by edgekd.cli
