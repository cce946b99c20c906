"""The run directory: the one module that knows where a run keeps its files.

A training run (``edgekd train`` / ``distill``)::

    RUN/best.pt  last.pt  config.json  result.json  history.json  history.csv
    RUN/export/            model.onnx, model_fp32.tflite, ... with a .json sidecar each (stage 2 and 3)

A pipeline run (``edgekd run``) holds training runs and the later stages::

    OUT/teachers/NAME/     a training run per teacher
    OUT/students/NAME/     scratch, scratch_matched, kd_best, kd_all
    OUT/seeds/seedK/       the students again for each further seed
    OUT/deploy/            the best student's ONNX/TFLite files, fp32 and int8 (quantize.json, stamp.json)
    OUT/bench/  OUT/bundle/  summary.json  manifest.json

Everything else asks here instead of joining names itself.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.files import read_json

BEST, LAST = "best.pt", "last.pt"
CHECKPOINT_NAMES = (BEST, LAST)


# ---------------------------------------------------------------------------------------------
# A training run


def _entry(name: str):
    """``f(folder) -> folder / name``: one fixed entry of a run directory."""

    def path(folder: str | Path) -> Path:
        return Path(folder) / name

    path.__name__ = path.__qualname__ = name.replace(".", "_")
    path.__doc__ = f"``FOLDER/{name}``"
    return path


best, last = _entry(BEST), _entry(LAST)
config_file, result_file = _entry("config.json"), _entry("result.json")
history_file, history_csv = _entry("history.json"), _entry("history.csv")


def run_of(checkpoint: str | Path) -> Path:
    """The training run a checkpoint belongs to (its folder)."""
    return Path(checkpoint).parent


def export_dir(checkpoint: str | Path) -> Path:
    """Where export and quantize put a checkpoint's files unless told otherwise."""
    return run_of(checkpoint) / "export"


def is_training_run(folder: str | Path) -> bool:
    return best(folder).is_file()


# ---------------------------------------------------------------------------------------------
# A pipeline run


def teacher_run(out: str | Path, name: str) -> Path:
    return Path(out) / "teachers" / name


def student_run(out: str | Path, name: str) -> Path:
    return Path(out) / "students" / name


def seed_root(out: str | Path, offset: int) -> Path:
    """Where the students of the ``offset``-th extra seed live (the first seed's are in ``out`` itself)."""
    return Path(out) if offset == 0 else Path(out) / "seeds" / f"seed{offset}"


deploy_dir, bench_dir, bundle_dir = _entry("deploy"), _entry("bench"), _entry("bundle")
summary_file, manifest_file = _entry("summary.json"), _entry("manifest.json")
teacher_cache = _entry("teacher_cache")  # cached teacher outputs a pipeline's students (or one training run) share


def report_html(out: str | Path) -> Path:
    """The pipeline's HTML bench report."""
    return bench_dir(out) / "report.html"


def default_run(command: str, arch: str) -> Path:
    """Where `edgekd train` / `distill` write when no --out is given: ``runs/COMMAND-ARCH``."""
    return Path("runs") / f"{command}-{arch.replace(':', '_')}"


# A deploy folder: quantize's summary, and in a pipeline run what decides whether its deploy is done
quantize_summary, deploy_stamp = _entry("quantize.json"), _entry("stamp.json")
post_training_file = _entry("post_training.json")  # post-training int8's verdict when quantization-aware training followed


def is_pipeline_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "teachers").is_dir() or (folder / "students").is_dir()


def teacher_checkpoints(out: str | Path) -> list[Path]:
    """The best checkpoint of every teacher a pipeline run trained, by name."""
    return sorted((Path(out) / "teachers").glob(f"*/{BEST}"))


def best_val_acc(run: str | Path) -> float:
    """A finished training run's best validation accuracy (-1 when it recorded none)."""
    return float(read_json(result_file(run)).get("best_val_acc", -1.0))


def best_teacher(out: str | Path) -> Path | None:
    """The checkpoint of the pipeline run's teacher with the best validation accuracy."""
    return max(teacher_checkpoints(out), key=lambda c: best_val_acc(run_of(c)), default=None)


def recorded_config(checkpoint: str | Path) -> dict:
    """The config.json of the run a checkpoint belongs to ({} when there is none)."""
    return read_json(config_file(run_of(checkpoint)))


def student_checkpoints(out: str | Path) -> list[Path]:
    return sorted((Path(out) / "students").glob(f"*/{BEST}"))
