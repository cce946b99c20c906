"""Distillation from several different teachers with unequal weights."""

from __future__ import annotations

import pytest
import torch

from edgekd import DistillConfig, KDConfig, ModelConfig, RecipeConfig, train


@pytest.fixture(scope="module")
def second_teacher(synth, tmp_path_factory):
    """A teacher of another architecture and recipe than ``teacher_run``: its outputs differ."""
    out = tmp_path_factory.mktemp("teacher_b")
    cfg = DistillConfig(model=ModelConfig(arch="seed002_teacher"),
                        recipe=RecipeConfig(epochs=2, batch_size=32, optimizer="adam", lr=0.002, augment_pad=0,
                                            augment_flip=False, seed=3))
    return train(cfg, out, data=synth)


def _distill(synth, out, teachers, weights=()):
    kd = KDConfig(teachers=tuple(str(t) for t in teachers), teacher_weights=tuple(weights), cache_views=2)
    cfg = DistillConfig(model=ModelConfig(arch="seed003_student"),
                        recipe=RecipeConfig(epochs=2, batch_size=32, optimizer="adam", lr=0.003, augment_pad=2,
                                            augment_flip=True), kd=kd)
    train(cfg, out, data=synth)
    return torch.load(out / "last.pt", weights_only=True)["state_dict"]


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_weights_choose_between_two_different_teachers(synth, tmp_path, teacher_run, second_teacher):
    a, b = teacher_run.out_dir / "best.pt", second_teacher.out_dir / "best.pt"
    only_a = _distill(synth, tmp_path / "a", [a])
    only_b = _distill(synth, tmp_path / "b", [b])
    assert not _same(only_a, only_b)  # the two teachers teach differently
    assert _same(_distill(synth, tmp_path / "w10", [a, b], (1.0, 0.0)), only_a)
    assert _same(_distill(synth, tmp_path / "w01", [a, b], (0.0, 1.0)), only_b)
    mixed = _distill(synth, tmp_path / "w31", [a, b], (3.0, 1.0))
    assert not _same(mixed, only_a) and not _same(mixed, only_b)
    assert not _same(mixed, _distill(synth, tmp_path / "w13", [a, b], (1.0, 3.0)))
