import json

import pytest
from typer.testing import CliRunner

from edgekd.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", ["train", "distill", "run", "models"])
def test_help_of_every_command(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_models_lists_with_a_filter():
    result = runner.invoke(app, ["models", "seed002*"])
    assert result.exit_code == 0
    assert result.output.split()[0] == "seed002_student" and "1,186,986" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--arch", "nope", "--epochs", "1"], "unknown architecture 'nope'"),
    (["train", "--data", "/no/such/dir"], "neither a built-in name"),
    (["distill", "--epochs", "1"], "needs at least one --teacher"),
    (["distill", "-t", "/no/teacher.pt"], "teacher file not found"),
    (["train", "--optimizer", "lion"], "recipe.optimizer must be one of sgd, adam, adamw, got 'lion'"),
])
def test_errors_are_one_line_and_non_zero(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "best.pt").exists()


def test_config_with_a_typo_names_the_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[recipe]\nepocs = 3\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 1 and "unknown key recipe.epocs" in result.output


def test_train_then_distill_end_to_end(tmp_path):
    teacher_out = tmp_path / "teacher"
    result = runner.invoke(app, ["train", "--arch", "resnet8", "--epochs", "3", "--out", str(teacher_out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["arch"] == "resnet8" and summary["test_acc"] > 50
    result = runner.invoke(app, ["distill", "-t", str(teacher_out / "best.pt"), "--student", "seed002_student",
                                 "--epochs", "2", "--optimizer", "adam", "--lr", "0.003",
                                 "--out", str(tmp_path / "student"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["teachers"][0]["kind"].startswith("edgekd") and summary["params"] == 21690
    again = runner.invoke(app, ["distill", "-t", str(teacher_out / "best.pt"), "--out", str(tmp_path / "student")])
    assert again.exit_code == 1 and "--resume" in again.output
