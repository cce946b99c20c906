import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path

import pytest

from edgekd.errors import EdgeKDError
from edgekd.pipeline import load_pipeline_config, pipeline_config_from_dict, run_pipeline

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml"))


def test_embedded_default_validates():
    cfg = load_pipeline_config()
    assert cfg.data.dataset == "digits" and len(cfg.teachers) == 2
    assert {t.model.arch for t in cfg.teachers} == {"resnet_m", "seed002_teacher"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    from edgekd.config import distill_config_from_dict

    from edgekd.zoo import ARCHS, list_architectures

    values = tomllib.loads(path.read_text())
    cfg = (pipeline_config_from_dict if "teachers" in values else distill_config_from_dict)(values)
    archs = [t.model.arch for t in cfg.teachers] + [cfg.student.arch] if "teachers" in values else [cfg.model.arch]
    known = set(list_architectures())
    assert all(a in known for a in archs), archs
    assert all(a in ARCHS or a.startswith("torchvision:") for a in archs)


def test_shipped_seed_configs_cover_every_seed():
    names = {p.name.split("_")[0] for p in CONFIGS}
    assert {"seed000", "seed001", "seed002", "seed003", "seed004"} <= names


def test_command_line_overrides_of_single_keys():
    cfg = load_pipeline_config(None, ("student_recipe.epochs=3", "teachers.1.recipe.lr=0.01", "data.dataset=digits"))
    assert cfg.student_recipe.epochs == 3 and cfg.teachers[1].recipe.lr == 0.01
    with pytest.raises(EdgeKDError, match="student_recipe.epohcs"):
        load_pipeline_config(None, ("student_recipe.epohcs=3",))
    with pytest.raises(EdgeKDError, match="KEY=VALUE"):
        load_pipeline_config(None, ("student_recipe.epochs",))


@pytest.mark.parametrize("values, message", [
    ({"teachers": [{"name": "a"}], "studnet": {}}, "unknown section"),
    ({"teachers": [{"name": "a", "model": {"arhc": "x"}}]}, "teachers\\[0\\].model.arhc"),
    ({}, "no teachers"),
    ({"teachers": [{"name": "a"}], "students": ["kd_worst"]}, "unknown student run"),
    ({"teachers": [{"name": "a"}], "student_recipe": {"cutmix_alpha": 1.0}}, "student_recipe.cutmix_alpha needs the teacher"),
])
def test_bad_pipeline_configs(values, message):
    with pytest.raises(EdgeKDError, match=message):
        pipeline_config_from_dict(values)


def test_pipeline_runs_and_skips_finished_work(tmp_path):
    recipe = {"epochs": 1, "batch_size": 128}
    cfg = pipeline_config_from_dict({
        "teachers": [{"name": "t1", "model": {"arch": "resnet8"}, "recipe": recipe},
                     {"name": "t2", "model": {"arch": "seed003_teacher"}, "recipe": recipe}],
        "student": {"arch": "seed003_student"}, "student_recipe": recipe,
        "deploy": {"formats": ["onnx"], "calib_size": 40},
    })
    result = run_pipeline(cfg, tmp_path)
    assert [r.name for r in result.rows] == ["t1", "t2", "scratch", "scratch_matched", "kd_best", "kd_all"]
    test = {r.name: r.test_acc for r in result.rows}
    assert result.kd_gain["kd_best"]["per_seed"] == [test["kd_best"] - test["scratch_matched"]]
    assert result.kd_gain["kd_all"]["per_seed"] == [test["kd_all"] - test["scratch_matched"]]
    passes = {n: json.loads((tmp_path / "students" / n / "history.json").read_text())[0]["student_passes"]
              for n in ("scratch", "scratch_matched", "kd_best")}
    assert passes["scratch_matched"] == passes["kd_best"] == 2 * passes["scratch"]
    [onnx] = result.deployed["models"]
    assert onnx["format"] == "onnx" and onnx["quantized_ops"] > 0 and (tmp_path / "deploy" / "model_int8.onnx").is_file()
    assert len(list((tmp_path / "teacher_cache").glob("teacher-*.pt"))) == 2  # kd_best reuses kd_all's teacher outputs
    with pytest.raises(EdgeKDError, match="already holds a run; pass --resume"):
        run_pipeline(cfg, tmp_path)
    stages = []
    again = run_pipeline(cfg, tmp_path, resume=True, on_stage=stages.append)
    work = [s for s in stages if not s.startswith("bench")]
    assert len(work) == 7 and all("skipped" in s for s in work) and again.rows == result.rows
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "bench" / "report.html").is_file()
    assert not (tmp_path / "bundle").exists()  # no TFLite file: nothing to package
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["data"]["fingerprint"] and manifest["calibration_sha256"]
    assert manifest["seeds"]["split_seed"] == 0 and "torch" in manifest["environment"]["versions"]
    ckpt = "students/kd_all/best.pt"
    assert manifest["artifacts"][ckpt] == hashlib.sha256((tmp_path / ckpt).read_bytes()).hexdigest()
    # a run killed during kd_all's training: its result.json was never written, last.pt was
    (tmp_path / "students" / "kd_all" / "result.json").unlink()
    stages = []
    run_pipeline(cfg, tmp_path, resume=True, on_stage=stages.append)
    assert [s for s in stages if s.startswith("student kd_all")] == ["student kd_all: training seed003_student"]
    assert sum("skipped" in s for s in stages) == 6  # the other 5 runs and the deploy step
    # a run saved by an edgekd that had no kd.hint_weight yet is still the same run (it did what 0 does)
    saved_file = tmp_path / "teachers" / "t1" / "config.json"
    saved = json.loads(saved_file.read_text())
    del saved["kd"]["hint_weight"]
    saved_file.write_text(json.dumps(saved))
    stages = []
    run_pipeline(cfg, tmp_path, resume=True, on_stage=stages.append)
    assert "teacher t1: done before, skipped" in stages


def test_student_runs_over_several_seeds_report_the_kd_gain(tmp_path):
    recipe = {"epochs": 1, "batch_size": 128}
    cfg = pipeline_config_from_dict({
        "teachers": [{"name": "t1", "model": {"arch": "resnet8"}, "recipe": recipe}],
        "student": {"arch": "seed003_student"}, "student_recipe": recipe, "seeds": 3,
        "students": ["scratch_matched", "kd_best"], "deploy": {"quantize": False}, "bench": {"enabled": False},
        "package": {"enabled": False},
    })
    result = run_pipeline(cfg, tmp_path)
    assert [r.name for r in result.rows] == ["t1", "scratch_matched", "kd_best"]  # the first seed's models
    per_seed = []
    for k in range(3):
        root = tmp_path if k == 0 else tmp_path / "seeds" / f"seed{k}"
        res = {n: json.loads((root / "students" / n / "result.json").read_text()) for n in ("scratch_matched", "kd_best")}
        assert json.loads((root / "students" / "kd_best" / "config.json").read_text())["recipe"]["seed"] == k
        per_seed.append(res["kd_best"]["test_acc"] - res["scratch_matched"]["test_acc"])
    gain = result.kd_gain["kd_best"]
    assert gain["per_seed"] == per_seed and gain["sd"] is not None and list(result.kd_gain) == ["kd_best"]
    weighted = run_pipeline(dataclasses.replace(cfg, seeds=1, kd=dataclasses.replace(cfg.kd, teacher_weights=(2.0,))),
                            tmp_path / "weighted")  # one teacher: kd_best takes no weights (it broke before)
    assert [r.name for r in weighted.rows] == ["t1", "scratch_matched", "kd_best"]
    with pytest.raises(EdgeKDError, match="seeds must be an integer of at least 1"):
        pipeline_config_from_dict({"teachers": [{"name": "t"}], "seeds": 0})


@pytest.mark.slow
def test_readme_main_command_runs_the_embedded_default(tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app

    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "kd_all" in result.output and "seed002_teacher" in result.output
    assert "model_int8.tflite" in result.output and "model_int8.onnx" in result.output
    deployed = tmp_path / "run" / "deploy"
    for name in ("model.onnx", "model_int8.onnx", "model_fp32.tflite", "model_int8.tflite", "quantize.json"):
        assert (deployed / name).is_file(), name
    run = tmp_path / "run"
    assert (run / "bench" / "report.html").is_file() and (run / "manifest.json").is_file()
    assert json.loads((run / "bundle" / "model.json").read_text())["status"] == "ok"
    assert "bundle:" in result.output and "verified" in result.output


def test_run_cli_errors_are_one_line_with_the_key(tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app

    result = CliRunner().invoke(app, ["run", "--set", "studnet.arch=x", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "unknown section [studnet]" in result.output  # brackets survive Rich
    result = CliRunner().invoke(app, ["run", "--set", "teachers.0.file=/nope.onnx", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "teacher file not found: /nope.onnx" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r" / "students").exists()


def test_teacher_from_a_file_is_the_bench_reference(digits_model, tmp_path):
    cfg = pipeline_config_from_dict({
        "teachers": [{"name": "ready", "file": str(digits_model)}],
        "student": {"arch": "seed003_student"}, "student_recipe": {"epochs": 1, "batch_size": 128},
        "students": ["kd_best"], "deploy": {"quantize": False}, "bench": {"min_runs": 3, "min_seconds": 0.0},
    })
    result = run_pipeline(cfg, tmp_path)
    assert [r.name for r in result.rows] == ["kd_best"]
    rows = {r.name: r for r in result.bench.rows}
    teacher = rows[result.bench.teacher]
    assert teacher.role == "teacher" and teacher.path == str(digits_model) and teacher.status == "ok"
    assert rows["kd_best"].vs_teacher.against == teacher.name


def test_pipeline_fine_tunes_for_int8_when_post_training_misses_the_gate(tmp_path, monkeypatch):
    import edgekd.pipeline as pipeline

    real, calls = pipeline.quantize, []

    def gate_misses_first(ckpt, **kwargs):  # post-training int8 made to fail the gate, whatever its drop
        calls.append(kwargs.get("qat_epochs", 0))
        return real(ckpt, **{**kwargs, "max_drop": kwargs["max_drop"] if kwargs.get("qat_epochs") else -100.0})

    monkeypatch.setattr(pipeline, "quantize", gate_misses_first)
    recipe = {"epochs": 1, "batch_size": 128}
    cfg = pipeline_config_from_dict({
        "teachers": [{"name": "t1", "model": {"arch": "seed003_teacher"}, "recipe": recipe}],
        "student": {"arch": "seed003_student"}, "student_recipe": recipe, "students": ["kd_best"],
        "deploy": {"formats": ["onnx"], "calib_size": 40, "max_drop": 100.0, "qat_epochs": 1},
        "bench": {"enabled": False},
    })
    result = run_pipeline(cfg, tmp_path)
    assert calls == [0, 1]
    assert result.deployed["post_training"]["passed"] is False and result.deployed["passed"]
    assert result.deployed["qat"]["epochs"] == 1 and result.deployed["qat"]["teacher"].endswith("t1/best.pt")
    assert (tmp_path / "deploy" / "model_qat.pt").is_file()
    again = run_pipeline(cfg, tmp_path, resume=True)  # skipped, and still says what happened
    assert calls == [0, 1] and again.deployed["post_training"]["passed"] is False
