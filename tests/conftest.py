"""Shared fixtures: tiny learnable synthetic data, and expensive artifacts built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def prototype_data(num_classes=4, per_class=60, channels=3, size=16, noise=40.0, seed=0):
    """Class prototypes plus Gaussian noise, as uint8 (N, C, H, W): learnable in one epoch."""
    from edgekd.data import ImageData, _finish

    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(num_classes, channels, size, size))

    def split(n):
        y = np.repeat(np.arange(num_classes), n)
        x = np.clip(protos[y] + rng.normal(0, noise, size=(len(y), channels, size, size)), 0, 255).astype(np.uint8)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    classes = tuple(f"c{i}" for i in range(num_classes))
    return _finish("synthetic", classes, (split(per_class), split(per_class // 3), split(per_class // 3)), ())


@pytest.fixture(scope="session")
def synth():
    return prototype_data()


@pytest.fixture(scope="session")
def teacher_run(synth, tmp_path_factory):
    """A trained edgekd teacher on the synthetic data (a few seconds)."""
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train

    out = tmp_path_factory.mktemp("teacher")
    cfg = DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=5, batch_size=32, lr=0.05, augment_pad=0, augment_flip=False))
    return train(cfg, out, data=synth)
