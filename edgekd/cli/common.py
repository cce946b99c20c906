"""The Typer app, shared options and rendering helpers used by every command module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from edgekd.config import ConfigValueError, DistillConfig, distill_config_from_dict, load_toml, override
from edgekd.data import describe
from edgekd.errors import EdgeKDError

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

Config = Annotated[Optional[Path], typer.Option("--config", help="TOML with \\[data] \\[model] \\[recipe] \\[kd] sections; options override it")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Run directory \\[default: runs/<command>-<arch>]")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")]


def _fail(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
        if stage == "data":

            self.progress.console.print(f"data {info['name']}: {describe(info['summary'])}", highlight=False, soft_wrap=True)
            return
        if stage == "warning":
            from rich.markup import escape

            self.progress.console.print(f"[yellow]warning:[/] {escape(info['message'])}", highlight=False, soft_wrap=True)
            return
        if stage == "resumed":
            self.progress.console.print(f"resuming after epoch {done} of {total} "
                                        f"(best validation accuracy so far {info['best_val_acc']:.2f}%)", highlight=False)
            return
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

    try:
        return fn()
    except EdgeKDError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command with --resume to continue from the last completed epoch")
    except OSError as exc:  # full disk, permissions: files are written atomically, so nothing is half-written
        _fail(f"{exc.strerror or exc} ({exc.filename or 'file system'}); free space or fix permissions, then rerun")


def _build_config(config, section_overrides):

    base = distill_config_from_dict(load_toml(config)) if config else DistillConfig()
    sections = {}
    for name, values in section_overrides.items():
        try:
            sections[name] = override(getattr(base, name), **values)
        except ConfigValueError as exc:
            raise EdgeKDError(f"{name}.{exc.key} {exc.problem}; fix the option or the --config value") from None
    return DistillConfig(**sections)
