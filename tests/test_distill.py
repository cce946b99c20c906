import json
import os
import subprocess
import sys

import pytest
import torch

from edgekd import DistillConfig, KDConfig, ModelConfig, RecipeConfig, train
from edgekd.checkpoint import load_checkpoint
from edgekd.errors import EdgeKDError
from tests.conftest import Stop, stop_after_epoch

PLAIN = dict(augment_pad=0, augment_flip=False, batch_size=32)


def test_student_beats_chance_after_one_epoch(synth, tmp_path):
    cfg = DistillConfig(model=ModelConfig(arch="seed002_student"), recipe=RecipeConfig(epochs=1, optimizer="adam", lr=3e-3, **PLAIN))
    result = train(cfg, tmp_path, data=synth)
    assert result.test_acc > 50  # chance is 25%
    for name in ("best.pt", "last.pt", "config.json", "history.json", "history.csv", "result.json"):
        assert (tmp_path / name).is_file()
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and {"train_loss", "val_acc", "val_loss", "train_acc"} <= set(history[0])
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["classes"] == list(synth.classes) and ckpt["input_size"] == [16, 16] and len(ckpt["mean"]) == 3


@pytest.mark.parametrize("cache_views, fresh_share", [(0, 0.0), (2, 0.0), (2, 1.0)])
def test_distillation_from_two_teachers(synth, teacher_run, tmp_path, cache_views, fresh_share):
    teacher = str(teacher_run.out_dir / "best.pt")
    cfg = DistillConfig(model=ModelConfig(arch="seed002_student"),
                        recipe=RecipeConfig(epochs=2, optimizer="adam", lr=3e-3, augment_pad=1, augment_flip=True, batch_size=32),
                        kd=KDConfig(teachers=(teacher, teacher), teacher_weights=(1.0, 2.0), cache_views=cache_views,
                                    fresh_share=fresh_share))
    result = train(cfg, tmp_path, data=synth)
    assert len(result.teachers) == 2 and result.test_acc > 50
    files = sorted((tmp_path / "teacher_cache").glob("teacher-*.pt"))
    assert len(files) == (1 if cache_views else 0)  # the teacher given twice is cached once
    if cache_views:
        cache = torch.load(files[0], weights_only=True)
        assert cache["logits"].shape == (1, 2, len(synth.train_x), 4)  # (teachers, views, images, classes)


def test_resume_after_interruption_matches_an_uninterrupted_run(synth, tmp_path):
    cfg = DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=3, lr=0.05, **PLAIN))
    full = train(cfg, tmp_path / "full", data=synth)

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", data=synth, on_step=stop_after_epoch(2))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    with pytest.raises(EdgeKDError, match="--resume"):
        train(cfg, tmp_path / "cut", data=synth)
    resumed = train(cfg, tmp_path / "cut", data=synth, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    changed = DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=3, lr=0.01, **PLAIN))
    with pytest.raises(EdgeKDError, match="different config"):
        train(changed, tmp_path / "cut", data=synth, resume=True)


def test_a_resumed_run_goes_on_in_the_precision_it_started_in(synth, tmp_path, monkeypatch):
    """precision auto is resolved by the machine (bf16 on a CPU with AMX tiles): a run resumed on another machine,
    or after this one's answer changed, trains on in what it started in, as last.pt records; a run saved before
    that was recorded started in fp32."""
    import importlib

    distill = importlib.import_module("edgekd.distill")  # the module; edgekd.distill is also a function
    cfg = DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=2, lr=0.05, **PLAIN))
    monkeypatch.setattr(distill, "cpu_has_amx", lambda: False)
    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", data=synth, on_step=stop_after_epoch(1))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["precision"] == "fp32"
    monkeypatch.setattr(distill, "cpu_has_amx", lambda: True)
    assert train(cfg, tmp_path / "fresh", data=synth).precision == "bf16"  # a new run on an AMX CPU
    assert train(cfg, tmp_path / "cut", data=synth, resume=True).precision == "fp32"
    last = load_checkpoint(tmp_path / "fresh" / "last.pt")
    last.pop("precision")  # as a run saved before the precision was recorded
    torch.save(last, tmp_path / "fresh" / "last.pt")
    assert distill._resumed_precision(tmp_path / "fresh" / "last.pt", True, torch.device("cpu")).name == "fp32"


def test_auto_precision_keeps_networks_with_grouped_convolutions_in_fp32(synth, tmp_path, monkeypatch):
    """On an AMX CPU precision auto trains in bf16, except networks with depthwise or grouped convolutions,
    whose bf16 kernels were slower than fp32 (MobileNetV2 in benchmarks/results/keras_peer.md)."""
    import importlib

    from edgekd.zoo import build_model, grouped_convolutions

    distill = importlib.import_module("edgekd.distill")
    monkeypatch.setattr(distill, "cpu_has_amx", lambda: True)
    assert grouped_convolutions(build_model("torchvision:shufflenet_v2_x0_5", 4, 3, (16, 16)))
    assert not grouped_convolutions(build_model("resnet8", 4, 3, (16, 16)))
    cfg = DistillConfig(model=ModelConfig(arch="torchvision:shufflenet_v2_x0_5"), recipe=RecipeConfig(epochs=1, lr=0.01, **PLAIN))
    assert train(cfg, tmp_path / "grouped", data=synth).precision == "fp32"


def test_nan_loss_stops_with_a_clear_error(synth, tmp_path):
    cfg = DistillConfig(model=ModelConfig(arch="seed002_student"),
                        recipe=RecipeConfig(epochs=2, lr=1e12, optimizer="sgd", schedule="constant", **PLAIN))
    with pytest.raises(EdgeKDError, match="lower the learning rate"):
        train(cfg, tmp_path, data=synth)
    assert not (tmp_path / "best.pt").exists() and not list(tmp_path.glob(".edgekd-tmp-*"))


@pytest.mark.parametrize("recipe, kd, message", [
    (dict(optimizer="lion"), {}, "optimizer must be one of sgd, adam, adamw, got 'lion'"),
    (dict(epochs=0), {}, "epochs must be at least 1, got 0"),
    (dict(epochs="three"), {}, "epochs must be an integer, got 'three'"),
    (dict(lr="fast"), {}, "lr must be a finite number, got 'fast'"),
    (dict(augment_pad=-1), {}, "augment_pad must be at least 0"),
    ({}, dict(alpha=2.0), "alpha must be between 0.0 and 1.0, got 2.0"),
    ({}, dict(fresh_share=1.5), "fresh_share must be between 0.0 and 1.0"),
    ({}, dict(cache_views=-1), "cache_views must be at least 0, got -1"),
])
def test_bad_settings_fail_when_the_config_is_made(recipe, kd, message):
    with pytest.raises(EdgeKDError, match=message):
        DistillConfig(recipe=RecipeConfig(**recipe), kd=KDConfig(**kd))


def test_teacher_weights_must_match_the_teachers(synth, tmp_path):
    cfg = DistillConfig(kd=KDConfig(teachers=("a.pt",), teacher_weights=(1.0, 2.0)))
    with pytest.raises(EdgeKDError, match="one per teacher"):
        train(cfg, tmp_path, data=synth)
    assert not any(tmp_path.iterdir())


def test_torchrun_two_processes_gloo(tmp_path):
    """DistributedDataParallel on the CPU: the same command under torchrun with two processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "edgekd.cli", "train", "--arch", "resnet8", "--epochs", "6", "--batch-size", "64", "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["test_acc"] > 50 and len(json.loads((tmp_path / "ddp" / "history.json").read_text())) == 6


def test_a_run_that_diverged_and_recovered_is_named():
    from edgekd.distill import divergence_warning

    diverged = [{"epoch": 1, "val_acc": 42.0}, {"epoch": 2, "val_acc": 10.3}, {"epoch": 10, "val_acc": 60.0}]
    [warning] = divergence_warning(diverged, 10, distilled=True)
    assert "fell from 42.0% (epoch 1) to 10.3% (epoch 2)" in warning and "kd.temperature" in warning
    assert "temperature" not in divergence_warning(diverged, 10, distilled=False)[0]
    steady = [{"epoch": 1, "val_acc": 15.0}, {"epoch": 2, "val_acc": 9.0}, {"epoch": 3, "val_acc": 50.0}]
    assert divergence_warning(steady, 10, True) == ()  # near chance at the start is no divergence
    assert divergence_warning([{"epoch": 1, "val_acc": 80.0}, {"epoch": 2, "val_acc": 70.0}], 10, True) == ()
