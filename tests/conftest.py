"""Shared fixtures: tiny learnable synthetic data, and expensive artifacts built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Decoded-ImageFolder caches of the tests go to a folder of this session, not the user's ~/.cache.
import tempfile  # noqa: E402

import atexit  # noqa: E402
import shutil  # noqa: E402

os.environ["EDGEKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgekd-test-cache-")
atexit.register(shutil.rmtree, os.environ["EDGEKD_CACHE_DIR"], ignore_errors=True)  # leave no litter in /tmp

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
    return _finish("synthetic", classes, (split(per_class), split(per_class // 3), split(per_class // 3)))


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


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """resnet8 trained briefly on the embedded digits (a real dataset recorded in config.json)."""
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train

    out = tmp_path_factory.mktemp("digits")
    train(DistillConfig(model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=6)), out)
    return out / "best.pt"


@pytest.fixture(scope="session")
def quantized(digits_model, tmp_path_factory):
    """fp32 and int8 ONNX and TFLite files of ``digits_model`` (float32 TFLite I/O)."""
    from edgekd.quantize import quantize

    return quantize(digits_model, calib_size=100, out_dir=tmp_path_factory.mktemp("q"))


def write_image_folder(root, num_classes=3, per_class=24, size=20, seed=0):
    """RGB class prototypes plus noise saved as PNG files in ImageFolder layout (``root/<class>/*.png``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(num_classes, size, size, 3))
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(protos[c] + rng.normal(0, 40, size=protos[c].shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory):
    """A model trained on an RGB ImageFolder, with int8 ONNX and TFLite files in ``<run>/export``."""
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train
    from edgekd.config import DataConfig
    from edgekd.quantize import quantize

    root = write_image_folder(tmp_path_factory.mktemp("folder") / "images")
    out = tmp_path_factory.mktemp("folder_run")
    cfg = DistillConfig(data=DataConfig(dataset=str(root), val_fraction=0.2, test_fraction=0.25),
                        model=ModelConfig(arch="resnet8"), recipe=RecipeConfig(epochs=4, batch_size=16, lr=0.05))
    train(cfg, out)
    quantize(out / "best.pt", calib_size=30)
    return out


class Stop(Exception):
    """Raised by ``stop_after_epoch``'s callback: an interruption at a known moment."""


def stop_after_epoch(n: int):
    """An ``on_step`` callback that interrupts training right after epoch ``n`` was saved."""

    def on_step(stage, done, total, info):
        if stage == "epoch" and done == n:
            raise Stop

    return on_step
