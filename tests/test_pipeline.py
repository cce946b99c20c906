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

    values = tomllib.loads(path.read_text())
    (pipeline_config_from_dict if "teachers" in values else distill_config_from_dict)(values)


@pytest.mark.parametrize("values, message", [
    ({"teachers": [{"name": "a"}], "studnet": {}}, "unknown section"),
    ({"teachers": [{"name": "a", "model": {"arhc": "x"}}]}, "teachers\\[0\\].model.arhc"),
    ({}, "no teachers"),
    ({"teachers": [{"name": "a"}], "students": ["kd_worst"]}, "unknown student run"),
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
    assert [r.name for r in result.rows] == ["t1", "t2", "scratch", "kd_best", "kd_all"]
    [onnx] = result.deployed["models"]
    assert onnx["format"] == "onnx" and onnx["quantized_ops"] > 0 and (tmp_path / "deploy" / "model_int8.onnx").is_file()
    stages = []
    again = run_pipeline(cfg, tmp_path, on_stage=stages.append)
    assert len(stages) == 6 and all("skipped" in s for s in stages) and again.rows == result.rows
    assert (tmp_path / "summary.json").is_file()


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
