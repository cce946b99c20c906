"""The `edgekd` command: each command parses options, builds a config, calls the library, renders.

Heavy modules (torch, the library) are imported inside commands so `edgekd --help` stays fast.
Human output goes to stderr; `--json` puts machine output alone on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="edgekd",
    help="Distill a small image classifier from big teachers and get it ready for phones and edge devices.\n\n"
    "Start with `edgekd run` (the embedded default: digits, two teachers, three students, a few minutes on a CPU), "
    "then `edgekd distill --teacher T.pt --data DIR` on your own data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

# Options shared by `train` and `distill` (declared once; None means "not given, keep the config's value").
Data = Annotated[Optional[str], typer.Option("--data", help="digits (embedded), cifar10, mnist, fashion-mnist, or an ImageFolder DIR")]
DataDir = Annotated[Optional[str], typer.Option(help="Root of torchvision's files for cifar10/mnist/fashion-mnist")]
Download = Annotated[Optional[bool], typer.Option("--download", help="Download torchvision datasets when missing (needs network)")]
ValFraction = Annotated[Optional[float], typer.Option(help="Validation share carved from train when there is no val split")]
TestFraction = Annotated[Optional[float], typer.Option(help="Test share for a single-folder dataset")]
ImageSize = Annotated[Optional[int], typer.Option(help="Decode ImageFolder images at this size (pixels)")]
InputSize = Annotated[Optional[int], typer.Option(help="Model input size in pixels (resized on the fly), e.g. 48 for ImageNet backbones")]
Pretrained = Annotated[Optional[bool], typer.Option("--pretrained", help="torchvision:* only: start from ImageNet weights")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="torchvision:* only: local ImageNet state dict (no network needed)")]
TrainableLayers = Annotated[Optional[int], typer.Option(help="torchvision:* only: fine-tune only the last N layers and the new head")]
Epochs = Annotated[Optional[int], typer.Option(help="Training epochs [default: 30]")]
BatchSize = Annotated[Optional[int], typer.Option(help="Batch size [default: 256]")]
Optim = Annotated[Optional[str], typer.Option("--optimizer", help="sgd (Nesterov), adam or adamw [default: sgd]")]
LR = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate [default: 0.1]")]
WD = Annotated[Optional[float], typer.Option(help="Weight decay on conv/linear weights [default: 5e-4]")]
Schedule = Annotated[Optional[str], typer.Option(help="onecycle, cosine or constant [default: onecycle]")]
Smoothing = Annotated[Optional[float], typer.Option(help="Label smoothing of the hard-label loss")]
Pad = Annotated[Optional[int], typer.Option("--pad", help="Random-crop padding in pixels; 0 turns cropping off [default: height/8]")]
Flip = Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips [default: on for RGB]")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for init, batch order and augmentation [default: 0]")]
Device = Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N [default: auto]")]
Config = Annotated[Optional[Path], typer.Option("--config", help="TOML with [data] [model] [recipe] [kd] sections; options override it")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Run directory [default: runs/<command>-<arch>]")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")]


def main() -> None:
    app()


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)


class _Bars:
    """Adapts the library's ``on_step(stage, done, total, info)`` callback to Rich progress bars."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.last_epoch = ""

    def __call__(self, stage: str, done: int, total: int, info: dict) -> None:
        if stage == "epoch":
            self.last_epoch = f"val {info['val_acc']:.2f}%  loss {info['train_loss']:.3f}"
        label = {"step": "  batches", "epoch": "epochs", "teacher cache": "teacher outputs"}.get(stage, stage)
        if label not in self.tasks or (stage == "step" and done == 1):
            if label in self.tasks:
                self.progress.remove_task(self.tasks[label])
            self.tasks[label] = self.progress.add_task(label, total=total, info="")
        self.progress.update(self.tasks[label], completed=done, total=total, info=self.last_epoch if stage == "epoch" else "")

    def reset(self) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()
        self.last_epoch = ""


def _guarded(fn):
    """Run ``fn`` turning user errors into one red line and a non-zero exit."""
    from edgekd.errors import EdgeKDError

    try:
        return fn()
    except EdgeKDError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command with --resume to continue from the last completed epoch")


def _build_config(config, section_overrides):
    from edgekd.config import DistillConfig, distill_config_from_dict, load_toml, override

    base = distill_config_from_dict(load_toml(config)) if config else DistillConfig()
    return DistillConfig(**{name: override(getattr(base, name), **values) for name, values in section_overrides.items()})


def _train(cfg, out: Optional[Path], command: str, resume: bool, as_json: bool) -> None:
    from edgekd.distill import train
    from edgekd.report import teacher_table, train_table

    out = out or Path("runs") / f"{command}-{cfg.model.arch.replace(':', '_')}"
    with _progress() as progress:
        result = _guarded(lambda: train(cfg, out, resume=resume, on_step=_Bars(progress)))
    if result.teachers:
        err.print(teacher_table(result.teachers))
    err.print(train_table(result))
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
    flip: Flip = None, seed: Seed = None, device: Device = None, config: Config = None, out: Out = None,
    resume: Resume = False, as_json: AsJson = False,
) -> None:
    """Train one model with cross-entropy: a teacher, or the scratch baseline a student is compared with.

    Example: edgekd train --arch seed002_teacher --data ../shared/datasets/cifar10-jpeg --epochs 10
    """
    cfg = _guarded(lambda: _build_config(config, {
        "data": dict(dataset=data, data_dir=data_dir, download=download, val_fraction=val_fraction,
                     test_fraction=test_fraction, image_size=image_size),
        "model": dict(arch=arch, input_size=input_size, pretrained=pretrained, weights_path=weights,
                      trainable_layers=trainable_layers),
        "recipe": dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                       schedule=schedule, label_smoothing=label_smoothing, augment_pad=pad, augment_flip=flip,
                       seed=seed, device=device),
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
    cache_views: Annotated[Optional[int], typer.Option(help="Augmented views per image whose teacher outputs are cached; 0 runs teachers on every batch [default: 4]")] = None,
    teacher_mean: Annotated[Optional[list[float]], typer.Option(help="Normalization mean non-edgekd teachers expect on [0,1] pixels (repeat per channel) [default: 0]")] = None,
    teacher_std: Annotated[Optional[list[float]], typer.Option(help="Normalization std for non-edgekd teachers [default: 1]")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, val_fraction: ValFraction = None,
    test_fraction: TestFraction = None, image_size: ImageSize = None, input_size: InputSize = None,
    epochs: Epochs = None, batch_size: BatchSize = None, optimizer: Optim = None, lr: LR = None,
    weight_decay: WD = None, schedule: Schedule = None, label_smoothing: Smoothing = None, pad: Pad = None,
    flip: Flip = None, seed: Seed = None, device: Device = None, config: Config = None, out: Out = None,
    resume: Resume = False, as_json: AsJson = False,
) -> None:
    """Distill a student from one or more frozen teachers.

    Loss: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(mean_i softmax(teacher_i / T) || softmax(student / T)).
    Teachers that output probabilities (Keras models ending in softmax) are detected and handled.

    Example: edgekd distill -t runs/train-resnet_m/best.pt --student resnet8 --data digits
    """
    cfg = _guarded(lambda: _build_config(config, {
        "data": dict(dataset=data, data_dir=data_dir, download=download, val_fraction=val_fraction,
                     test_fraction=test_fraction, image_size=image_size),
        "model": dict(arch=student, input_size=input_size),
        "recipe": dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                       schedule=schedule, label_smoothing=label_smoothing, augment_pad=pad, augment_flip=flip,
                       seed=seed, device=device),
        "kd": dict(teachers=tuple(teacher) if teacher else None,
                   teacher_weights=tuple(teacher_weight) if teacher_weight else None, alpha=alpha,
                   temperature=temperature, cache_views=cache_views,
                   teacher_mean=tuple(teacher_mean) if teacher_mean else None,
                   teacher_std=tuple(teacher_std) if teacher_std else None),
    }))
    if not cfg.kd.teachers:
        _fail("distill needs at least one --teacher FILE (or kd.teachers in --config); use `edgekd train` for a scratch model")
    _train(cfg, out, "distill", resume, as_json)


@app.command("run")
def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="Pipeline TOML; the embedded default (digits) when omitted")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory; rerunning skips finished models and resumes the rest")] = Path("runs/default"),
    as_json: AsJson = False,
) -> None:
    """Run the whole experiment from one config: teachers, scratch student, KD from the best teacher and from all.

    Interrupted runs continue where they stopped when the same command is run again.
    """
    from edgekd.pipeline import load_pipeline_config, run_pipeline
    from edgekd.report import pipeline_table

    cfg = _guarded(lambda: load_pipeline_config(config))
    with _progress() as progress:
        bars = _Bars(progress)

        def stage(msg: str) -> None:
            bars.reset()
            progress.console.print(f"[bold]{msg}[/]")

        rows = _guarded(lambda: run_pipeline(cfg, out, on_stage=stage, on_step=bars))
    err.print(pipeline_table(rows))
    if as_json:
        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")


@app.command("models")
def models_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob filter, e.g. 'seed*' or 'torchvision:mobilenet*'")] = "*",
) -> None:
    """List the architectures edgekd can build (its own, the seeds', and torchvision's)."""
    from edgekd.zoo import ARCHS, list_architectures

    for name in list_architectures(pattern):
        doc = (ARCHS.get(name).__doc__ or "").strip().splitlines()[0] if name in ARCHS else "torchvision, new head"
        typer.echo(f"{name:32s} {doc}")


if __name__ == "__main__":
    main()
