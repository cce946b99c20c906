import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import apply_augment, augment_params, load_data
from edgekd.errors import EdgeKDError


def test_digits_is_embedded_and_split_stratified():
    data = load_data("digits")
    assert data.classes == tuple(str(i) for i in range(10))
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (1, 8, 8)
    total = len(data.train_y) + len(data.val_y) + len(data.test_y)
    assert total == 1797
    assert abs(len(data.test_y) - 0.2 * total) <= 10
    for y in (data.train_y, data.val_y, data.test_y):
        assert len(torch.unique(y)) == 10
    assert data.fingerprint() == load_data("digits").fingerprint()  # same split every time


def _write_folder(root, classes, per_class, size=(12, 10), mode="RGB", fmt="png"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / c / f"{i}.{fmt}")


def test_image_folder_single_dir_skips_corrupt_files(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"], 15)
    _write_folder(tmp_path, ["cat"], 3, mode="L", fmt="jpg")  # grayscale JPEGs mixed in: converted to RGB
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    data = load_data(str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    assert data.classes == ("cat", "dog")
    assert len(data.skipped_files) == 2
    assert data.train_x.shape[1:] == (3, 10, 12)
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 33


def test_image_folder_train_test_layout_and_resize(tmp_path):
    _write_folder(tmp_path / "train", ["a", "b", "c"], 10, mode="L")
    _write_folder(tmp_path / "test", ["a", "b", "c"], 4, mode="L", size=(20, 20))
    data = load_data(str(tmp_path), image_size=16)
    assert data.channels == 1 and data.image_size == (16, 16)
    assert len(data.test_y) == 12 and len(data.train_y) + len(data.val_y) == 30


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no images found"),
    (lambda p: _write_folder(p, ["only"], 10), "at least 2"),
])
def test_bad_folders_fail_clearly(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(EdgeKDError, match=message):
        load_data(str(tmp_path))


def test_missing_dataset_names_the_choices(tmp_path):
    with pytest.raises(EdgeKDError, match="neither a built-in name"):
        load_data(str(tmp_path / "nope"))
    with pytest.raises(EdgeKDError, match="not found under"):
        load_data("cifar10", data_dir=str(tmp_path))


def test_augmentation_is_replayable_and_correct():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    params = torch.tensor([[1, 1, 0], [0, 2, 1]], dtype=torch.int16)  # pad 1: (1,1) is the identity crop
    out = apply_augment(x, params, pad=1)
    assert torch.equal(out[0], x[0])
    shifted = torch.nn.functional.pad(x[1:], (1, 1, 1, 1))[0, :, 0:4, 2:6]
    assert torch.equal(out[1], shifted.flip(-1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment_params(10, 4, True, g1), augment_params(10, 4, True, g2))
    assert apply_augment(x, None, 0) is x


def test_augmentation_crops_and_flips_every_channel_of_non_square_images():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    params = augment_params(6, 2, True, g)
    out = apply_augment(x, params, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (dy, dx, flip) in enumerate(params.tolist()):
        crop = padded[i, :, dy:dy + 5, dx:dx + 7]
        assert torch.equal(out[i], crop.flip(-1) if flip else crop)
