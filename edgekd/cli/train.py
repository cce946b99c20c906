"""`edgekd train` and `edgekd distill`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd.cli.common import (
    AsJson, BatchSize, Config, Data, DataDir, Device, Download, Epochs, Flip, ImageSize, InputSize, LR, Optim, Out,
    Pad, Pretrained, Resume, Schedule, Seed, Smoothing, TestFraction, TrainableLayers, ValFraction, WD, Weights,
    _Bars, _build_config, _fail, _guarded, _progress, app, err,
)


Precision = Annotated[Optional[str], typer.Option(
    help="auto (fp16 autocast + loss scaling on CUDA, fp32 on the CPU), fp32, bf16 (CPU or CUDA) or fp16 (CUDA only) [default: auto]")]

Mixup = Annotated[Optional[float], typer.Option(
    help="Mixup: blend each batch with a shuffled copy by a Beta(a, a) weight, labels alike; 0 = off. With "
         "teachers it needs --cache-views 0, so the teacher answers for the blended images [default: 0]")]

# CLI option name -> config field, for the options `train` and `distill` share.
_DATA_OPTS = {"data": "dataset", "data_dir": "data_dir", "download": "download", "val_fraction": "val_fraction",
              "test_fraction": "test_fraction", "image_size": "image_size"}
_RECIPE_OPTS = {"epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
                "weight_decay": "weight_decay", "schedule": "schedule", "label_smoothing": "label_smoothing",
                "pad": "augment_pad", "flip": "augment_flip", "seed": "seed", "device": "device",
                "precision": "precision", "mixup": "mixup_alpha"}


def _data_section(options: dict) -> dict:
    return {field: options[opt] for opt, field in _DATA_OPTS.items()}


def _recipe_section(options: dict) -> dict:
    return {field: options[opt] for opt, field in _RECIPE_OPTS.items()}


def _train(cfg, out: Optional[Path], command: str, resume: bool, as_json: bool) -> None:
    from edgekd.distill import train
    from edgekd.report import teacher_table, train_table

    out = out or Path("runs") / f"{command}-{cfg.model.arch.replace(':', '_')}"
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


@app.command("train")
def train_cmd(
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, see `edgekd models` [default: edge_resnet_s]")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, val_fraction: ValFraction = None,
    test_fraction: TestFraction = None, image_size: ImageSize = None, input_size: InputSize = None,
    pretrained: Pretrained = None, weights: Weights = None, trainable_layers: TrainableLayers = None,
    epochs: Epochs = None, batch_size: BatchSize = None, optimizer: Optim = None, lr: LR = None,
    weight_decay: WD = None, schedule: Schedule = None, label_smoothing: Smoothing = None, pad: Pad = None,
    flip: Flip = None, mixup: Mixup = None, seed: Seed = None, device: Device = None, precision: Precision = None,
    config: Config = None,
    out: Out = None, resume: Resume = False, as_json: AsJson = False,
) -> None:
    """Train one model with cross-entropy: a teacher, or the scratch baseline a student is compared with.

    Example: edgekd train --arch seed002_teacher --data path/to/cifar10-imagefolder --epochs 10
    """
    opts = dict(locals())
    cfg = _guarded(lambda: _build_config(config, {
        "data": _data_section(opts),
        "model": dict(arch=arch, input_size=input_size, pretrained=pretrained, weights_path=weights,
                      trainable_layers=trainable_layers),
        "recipe": _recipe_section(opts),
        "kd": {},
    }))
    if cfg.kd.teachers:
        _fail("the config lists teachers; use `edgekd distill` for distillation")
    _train(cfg, out, "train", resume, as_json)


@app.command("distill")
def distill_cmd(
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", help="Teacher file, repeat for several: edgekd .pt, TorchScript, .onnx, .keras/.h5, .tflite")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="Student architecture [default: edge_resnet_s]")] = None,
    teacher_weight: Annotated[Optional[list[float]], typer.Option("--teacher-weight", help="Weight per teacher in the averaged soft targets [default: equal]")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Weight of the hard-label CE; 1-alpha weights T^2 KL [default: 0.5]")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-T", help="Softening temperature [default: 4]")] = None,
    cache_views: Annotated[Optional[int], typer.Option(help="Augmented views per image whose teacher outputs are cached; 0 runs teachers on every batch [default: 2]")] = None,
    fresh_share: Annotated[Optional[float], typer.Option(help="Share of each batch also shown as a fresh augmentation trained on its labels alone (cached views carry the teacher's targets); 1 = every image, at twice the student's compute [default: 1]")] = None,
    hint_weight: Annotated[Optional[float], typer.Option(help="Feature (hint) distillation: weight of the loss pulling the student's last feature map, through a learned 1x1 adapter, to the teacher's; needs one edgekd .pt teacher and --cache-views 0 [default: 0 = off]")] = None,
    teacher_mean: Annotated[Optional[list[float]], typer.Option(help="Normalization mean non-edgekd teachers expect on [0,1] pixels (repeat per channel) [default: 0]")] = None,
    teacher_std: Annotated[Optional[list[float]], typer.Option(help="Normalization std for non-edgekd teachers [default: 1]")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, val_fraction: ValFraction = None,
    test_fraction: TestFraction = None, image_size: ImageSize = None, input_size: InputSize = None,
    epochs: Epochs = None, batch_size: BatchSize = None, optimizer: Optim = None, lr: LR = None,
    weight_decay: WD = None, schedule: Schedule = None, label_smoothing: Smoothing = None, pad: Pad = None,
    flip: Flip = None, mixup: Mixup = None, seed: Seed = None, device: Device = None, precision: Precision = None,
    config: Config = None,
    out: Out = None, resume: Resume = False, as_json: AsJson = False,
) -> None:
    """Distill a student from one or more frozen teachers.

    Loss: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T)).
    Teachers that output probabilities (Keras models ending in softmax) are detected and handled.
    Teacher outputs are cached for --cache-views augmented views per image; with --fresh-share 1 (the default) every image is also shown freshly augmented with the label loss alone, so the student keeps a scratch run's augmentation diversity.

    Example: edgekd distill -t runs/train-resnet_m/best.pt --student resnet8 --data digits
    """
    opts = dict(locals())
    cfg = _guarded(lambda: _build_config(config, {
        "data": _data_section(opts),
        "model": dict(arch=student, input_size=input_size),
        "recipe": _recipe_section(opts),
        "kd": dict(teachers=tuple(teacher) if teacher else None,
                   teacher_weights=tuple(teacher_weight) if teacher_weight else None, alpha=alpha,
                   temperature=temperature, cache_views=cache_views, fresh_share=fresh_share, hint_weight=hint_weight,
                   teacher_mean=tuple(teacher_mean) if teacher_mean else None,
                   teacher_std=tuple(teacher_std) if teacher_std else None),
    }))
    if not cfg.kd.teachers:
        _fail("distill needs at least one --teacher FILE (or kd.teachers in --config); use `edgekd train` for a scratch model")
    _train(cfg, out, "distill", resume, as_json)
