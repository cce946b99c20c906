"""Hostile input to train, distill and run: one clear line, a non-zero exit, nothing half-written.

Each case asserts the exit code, that the output holds exactly one ``error:`` line with the
expected words and no traceback, and that no file was left behind (no run directory for an
error caught before work starts, no ``.edgekd-tmp-*`` temporary ever).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekd.cli import app

runner = CliRunner()


def _one_error_line(result, message: str, code: int = 1) -> None:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert result.exit_code == code, result.output
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def _no_temps(root: Path) -> None:
    assert not list(Path(root).rglob(".edgekd-tmp-*"))


def _folder(root: Path, counts: dict[str, int], size=(10, 10), mode="L", bits=8) -> Path:
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if bits == 16:
                arr = rng.integers(0, 65535, size, dtype=np.uint16)
                Image.fromarray(arr).save(root / c / f"{i}.png")
            else:
                arr = rng.integers(0, 255, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
                Image.fromarray(arr, mode).save(root / c / f"{i}.png")
    return root


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


# --- values of the wrong type or range: refused before any work, from every entry point --------

@pytest.mark.parametrize("args, message", [
    (["train", "--image-size", "-5"], "data.image_size must be at least 1, got -5"),
    (["train", "--image-size", "0"], "data.image_size must be at least 1, got 0"),
    (["train", "--input-size", "-1"], "model.input_size must be at least 1, got -1"),
    (["train", "--epochs", "0"], "recipe.epochs must be at least 1, got 0"),
    (["train", "--batch-size", "0"], "recipe.batch_size must be at least 1"),
    (["train", "--lr", "-0.1"], "recipe.lr must be greater than 0.0"),
    (["train", "--val-fraction", "1.5"], "data.val_fraction must be strictly between 0.0 and 1.0"),
    (["train", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["train", "--schedule", "step"], "recipe.schedule must be one of onecycle, cosine, constant"),
    (["train", "--pad", "-2"], "recipe.augment_pad must be at least 0, got -2"),
    (["train", "--label-smoothing", "1.5"], "recipe.label_smoothing must be between 0.0 and 0.99"),
    (["distill", "-t", "x.pt", "--cache-views", "-1"], "kd.cache_views must be at least 0, got -1"),
    (["distill", "-t", "x.pt", "--alpha", "1.2"], "kd.alpha must be between 0.0 and 1.0, got 1.2"),
    (["distill", "-t", "x.pt", "-T", "0"], "kd.temperature must be greater than 0.0"),
    (["distill", "-t", "x.pt", "--fresh-share", "-0.5"], "kd.fresh_share must be between 0.0 and 1.0"),
    (["distill", "-t", "x.pt", "--teacher-weight", "-1"], "kd.teacher_weights must be a list whose items"),
    (["distill", "-t", "a.pt", "-t", "b.pt", "--teacher-weight", "1"], "1 teacher weights for 2 teachers"),
])
def test_bad_options_are_refused_before_work(tmp_path, args, message):
    out = tmp_path / "o"
    _one_error_line(runner.invoke(app, [*args, "--out", str(out)]), message)
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ('[recipe]\nepochs = "three"\n', "recipe.epochs must be an integer, got 'three'"),
    ('[recipe]\nlr = "fast"\n', "recipe.lr must be a finite number, got 'fast'"),
    ("[recipe]\nepochs = 2.5\n", "recipe.epochs must be an integer, got 2.5"),
    ("[recipe]\naugment_flip = 1\n", "recipe.augment_flip must be true or false or empty, got 1"),
    ("[data]\nimage_size = -3\n", "data.image_size must be at least 1, got -3"),
    ("[kd]\nteacher_mean = [\"a\"]\n", "kd.teacher_mean must be a list of numbers"),
    ("recipe = 3\n", "recipe must be a table of keys, got 3"),
    ("[recipe\n", "is not valid TOML"),
])
def test_bad_toml_values_name_the_key(tmp_path, text, message):
    out = tmp_path / "o"
    _one_error_line(runner.invoke(app, ["train", "--config", str(_toml(tmp_path, text)), "--out", str(out)]), message)
    assert not out.exists()


@pytest.mark.parametrize("setting, message", [
    ("student_recipe.epochs=abc", "student_recipe.epochs must be an integer, got 'abc'"),
    ('student_recipe.lr="fast"', "student_recipe.lr must be a finite number, got 'fast'"),
    ("teachers.0.recipe.epochs=0", "teachers[0].recipe.epochs must be at least 1, got 0"),
    ("kd.cache_views=-1", "kd.cache_views must be at least 0, got -1"),
    ("data.image_size=0", "data.image_size must be at least 1, got 0"),
    ("kd.teacher_weights=[1.0]", "kd.teacher_weights has 1 weights for 2 teachers"),
    ("deploy.max_drop=-1", "deploy.max_drop must be at least 0.0"),
    ("deploy.formats=['coreml']", "deploy.formats must be a list whose items are each one of onnx, tflite"),
    ("bench.threads=0", "bench.threads must be at least 1"),
    ("package.precision='int4'", "package.precision must be one of int8, fp32"),
    ("nope.key=1", "unknown section [nope]"),
    ("student_recipe", "write KEY=VALUE"),
    ("student_recipe.epochs.x=1", "student_recipe.epochs is a value, not a table of keys"),
    ("teachers.0.name='..'", "teachers[0].name must be letters, digits"),
    ("kd.teacher_mean=[0.1, 0.2]", "kd.teacher_mean must have 1 value or 3"),
])
def test_run_overrides_are_checked_before_any_training(tmp_path, setting, message):
    out = tmp_path / "run"
    _one_error_line(runner.invoke(app, ["run", "--out", str(out), "--set", setting]), message)
    assert not out.exists()


def test_run_config_file_problems(tmp_path):
    _one_error_line(runner.invoke(app, ["run", str(tmp_path / "none.toml")]), "config file not found")
    cfg = _toml(tmp_path, "[[teachers]]\nmodel = { arch = 'resnet8' }\n")
    _one_error_line(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")]), "teachers[0] needs a name")


# --- data problems: reported, not hidden ----------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda p: (_folder(p, {"a": 5, "b": 5}), (p / "empty").mkdir()), "class folder 'empty'"),
    (lambda p: _folder(p, {"a": 5, "b": 5, "lonely": 1}), "class 'lonely' has a single readable image"),
    (lambda p: (_folder(p, {"a": 5, "b": 5}), (p / "bad").mkdir(), (p / "bad" / "x.png").write_bytes(b"nope"),
                (p / "bad" / "y.jpg").write_bytes(b"")), "all 2 files of class 'bad' are unreadable"),
    (lambda p: _folder(p, {"only": 6}), "a classifier needs at least 2"),
    (lambda p: None, "no images found"),
])
def test_bad_class_folders_are_refused_with_the_class_named(tmp_path, make, message):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "o"
    _one_error_line(runner.invoke(app, ["train", "--data", str(data), "--epochs", "1", "--out", str(out)]), message)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # the user's folder is untouched
    assert not (out / "best.pt").exists()


def test_a_file_given_as_dataset(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    _one_error_line(runner.invoke(app, ["train", "--data", str(f), "--out", str(tmp_path / "o")]), "neither a built-in name")


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    from edgekd.data import load_data

    root = _folder(tmp_path / "d16", {"a": 6, "b": 6}, bits=16)
    data = load_data(str(root))
    raw = np.asarray(Image.open(sorted((root / "a").iterdir())[0]), dtype=np.float64)
    assert data.summary["bit_depths"] == {"16": 12}
    x = np.concatenate([data.train_x.numpy(), data.val_x.numpy(), data.test_x.numpy()]).astype(np.float64)
    assert 100 < x.mean() < 155  # uniform 16-bit noise scaled to 0..255; clipping gave ~255 everywhere
    assert abs(x.mean() - raw.mean() / 257) < 15


def test_unreadable_files_are_counted_and_stored(tmp_path):
    root = _folder(tmp_path / "d", {"a": 6, "b": 6})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "o"
    result = runner.invoke(app, ["train", "--data", str(root), "--arch", "seed003_student", "--epochs", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 unreadable files skipped" in result.output and "broken.png" in result.output
    summary = json.loads((out / "result.json").read_text())["data_summary"]
    assert [s["file"] for s in summary["skipped"]] == [str(root / "a" / "broken.png")]
    assert summary["per_class"]["a"]["train"] + summary["per_class"]["a"]["val"] + summary["per_class"]["a"]["test"] == 6


def test_a_tiny_dataset_trains_with_any_number_of_steps(tmp_path):
    """90 images, default batch size, 4 epochs: one-cycle over 4 steps (was a ZeroDivisionError)."""
    root = _folder(tmp_path / "d", {"a": 30, "b": 30, "c": 30}, size=(8, 8))
    out = tmp_path / "o"
    result = runner.invoke(app, ["train", "--data", str(root), "--arch", "seed003_student", "--epochs", "4",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "history.json").read_text())) == 4


# --- runs, resume, temporaries and a full disk -----------------------------------------------------

def test_resume_without_a_finished_epoch_says_to_drop_resume(tmp_path):
    out = tmp_path / "o"
    _one_error_line(runner.invoke(app, ["train", "--epochs", "1", "--resume", "--out", str(out)]),
                    "run the same command without --resume")


def test_resume_says_where_it_continues_and_refuses_another_config(tmp_path):
    out = tmp_path / "o"
    base = ["train", "--arch", "seed003_student", "--batch-size", "512", "--out", str(out)]
    assert runner.invoke(app, [*base, "--epochs", "1"]).exit_code == 0
    _one_error_line(runner.invoke(app, [*base, "--epochs", "2"]), "already holds a run; pass --resume")
    _one_error_line(runner.invoke(app, [*base, "--epochs", "2", "--lr", "0.05", "--resume"]), "different config")
    # the config records epochs, so resuming a longer run is a different config too: resume the same one
    result = runner.invoke(app, [*base, "--epochs", "1", "--resume"])
    assert result.exit_code == 0 and "resuming after epoch 1 of 1" in result.output, result.output


def test_stale_temporaries_are_cleaned_and_user_files_kept(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".edgekd-tmp-best.pt-abc123").write_bytes(b"orphan of a killed run")
    (out / ".edgekd-tmp-export-xyz").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".edgekd-tmp-last.pt-pid{dead.pid}-q1").write_bytes(b"orphan of a dead process")
    live = out / f".edgekd-tmp-model.onnx-pid{os.getppid()}-q2"  # a live process (pytest's parent) still writing
    live.write_bytes(b"another command's work in progress")
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["train", "--arch", "seed003_student", "--epochs", "1", "--batch-size", "512",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob(".edgekd-tmp-*")] == [live.name]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "best.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()  # the user's usual mode, not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    import edgekd.files as files

    real = files.os.replace

    def full(src, dst):  # the rename is the last step of every atomic write: fail there, after the data
        if str(dst).endswith("best.pt"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    out = tmp_path / "o"
    result = runner.invoke(app, ["train", "--arch", "seed003_student", "--epochs", "1", "--batch-size", "512",
                                 "--out", str(out)])
    _one_error_line(result, "No space left on device")
    assert str(out / "best.pt") in result.output
    assert not (out / "best.pt").exists()
    _no_temps(out)


# --- teachers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.pt", "teacher file not found"),
    (lambda p: (p / "t.txt").write_text("x") and p / "t.txt", "unknown teacher format '.txt'"),
    (lambda p: (p / "t.pt").write_bytes(b"PK\x03\x04 truncated") and p / "t.pt", "corrupt or not a PyTorch file"),
    (lambda p: (p / "t.onnx").write_bytes(b"\x08\x07 not a model") and p / "t.onnx", "could not load ONNX teacher"),
])
def test_bad_teacher_files(tmp_path, make, message):
    teacher = make(tmp_path)
    out = tmp_path / "o"
    _one_error_line(runner.invoke(app, ["distill", "-t", str(teacher), "--epochs", "1", "--out", str(out)]), message)
    assert not (out / "best.pt").exists()
    _no_temps(tmp_path)


def test_teacher_of_other_classes(tmp_path, teacher_run):
    out = tmp_path / "o"
    result = runner.invoke(app, ["distill", "-t", str(teacher_run.out_dir / "best.pt"), "--epochs", "1",
                                 "--out", str(out)])
    _one_error_line(result, "was trained on classes")
    assert not (out / "best.pt").exists()


# --- kill -9 at several moments of a pipeline run, then --resume ---------------------------------

PIPELINE = """
[data]
dataset = "digits"
[[teachers]]
name = "t"
model = { arch = "seed002_teacher" }
recipe = { epochs = 4, optimizer = "adam", lr = 0.002, batch_size = 128 }
[student]
arch = "seed003_student"
[student_recipe]
epochs = 4
optimizer = "adam"
lr = 0.003
batch_size = 128
[deploy]
quantize = false
[bench]
enabled = false
[package]
enabled = false
"""


def _edgekd(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "edgekd.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _kill_when(proc, path: Path, timeout_s: float = 240) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout_s and proc.poll() is None:
        if path.exists():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_kill_and_resume_at_several_moments_gives_the_same_models(tmp_path):
    import torch

    cfg = tmp_path / "p.toml"
    cfg.write_text(PIPELINE)
    ref = tmp_path / "ref"
    assert _edgekd("run", str(cfg), "--out", str(ref)).wait() == 0
    run = tmp_path / "run"
    moments = [run / "teachers" / "t" / "history.json",                  # teacher mid-training
               run / "teachers" / "t" / "result.json",                   # between teacher and students
               run / "teacher_cache",                                     # while the teacher cache is built
               run / "students" / "kd_best" / "history.json"]            # a distilled student mid-training
    for moment in moments:
        proc = _edgekd("run", str(cfg), "--out", str(run), *(["--resume"] if run.exists() else []))
        if not _kill_when(proc, moment):
            assert proc.wait() == 0, proc.stderr.read()
    final = _edgekd("run", str(cfg), "--out", str(run), "--resume")
    assert final.wait() == 0, final.stderr.read()
    _no_temps(run)
    for model in ("teachers/t", "students/scratch", "students/scratch_matched", "students/kd_best"):
        a = torch.load(ref / model / "best.pt", weights_only=True)["state_dict"]
        b = torch.load(run / model / "best.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), model


def test_a_teacher_of_another_input_size_is_warned_about_with_the_numbers(tmp_path):
    teacher = tmp_path / "t28"
    root = _folder(tmp_path / "d28", {str(i): 12 for i in range(10)}, size=(28, 28))
    assert runner.invoke(app, ["train", "--arch", "seed003_student", "--data", str(root), "--epochs", "1",
                               "--out", str(teacher)]).exit_code == 0
    # digits' class names are 0..9 too, but its images are 8x8
    result = runner.invoke(app, ["distill", "-t", str(teacher / "best.pt"), "--student", "seed003_student",
                                 "--epochs", "1", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "warning: teacher best.pt was built for 28x28 inputs and the data is 8x8" in result.output
    assert json.loads((tmp_path / "s" / "result.json").read_text())["teachers"][0]["warnings"]


def test_a_run_saved_before_a_field_existed_resumes_only_under_its_old_recipe():
    from edgekd import DistillConfig, RecipeConfig
    from edgekd.distill import same_config

    old = DistillConfig().to_dict()
    del old["recipe"]["clip_grad"], old["kd"]["warmup_epochs"]  # saved before gradient clipping and the KD warm-up
    assert not same_config(old, DistillConfig())  # today's defaults would change what the run was doing
    legacy = DistillConfig(recipe=RecipeConfig(clip_grad=None))
    legacy = dataclasses.replace(legacy, kd=dataclasses.replace(legacy.kd, warmup_epochs=0.0))
    assert same_config(old, legacy)
