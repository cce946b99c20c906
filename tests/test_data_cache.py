"""The memory-mapped ImageFolder cache: the same data as decoding into memory, reused, invalidated,
never half-written, and decoded once by concurrent loads."""

import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import edgekd.data as data_mod
from edgekd.data import cache_root, load_data
from edgekd.files import TEMP_PREFIX


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEKD_DATA_CACHE", raising=False)
    return tmp_path / "cache"


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _mixed_class(folder, rng, n, size):
    """RGB, grayscale, 16-bit, palette, RGBA, 1-bit and JPEG images of two sizes, plus broken files."""
    w, h = size
    for i in range(n):
        kind = i % 7
        if kind == 0:
            _save(folder / f"{i}.png", rng.integers(0, 65535, (h, w), dtype=np.uint16))  # 16-bit PNG
        elif kind == 1:
            _save(folder / f"{i}.png", rng.integers(0, 255, (h, w), dtype=np.uint8), "L")
        elif kind == 2:
            Image.fromarray(rng.integers(0, 255, (h + 3, w + 5, 3), dtype=np.uint8)).convert("P").save(folder / f"{i}.png")
        elif kind == 3:
            _save(folder / f"{i}.png", rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
        elif kind == 4:
            Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1").save(folder / f"{i}.bmp")
        elif kind == 5:
            _save(folder / f"{i}.jpg", rng.integers(0, 255, (h + 3, w + 5, 3), dtype=np.uint8))
        else:
            _save(folder / f"{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = folder / f"{n - 1}.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # opens, fails to decode


def _mixed_folder(root, layout):
    rng = np.random.default_rng(0)
    splits = {"single": [""], "train_test": ["train", "test"], "train_val_test": ["train", "val", "test"]}[layout]
    for s in splits:
        for c in ("cat", "dog", "eel"):
            _mixed_class(root / s / c if s else root / c, rng, 16 if s != "val" else 8, (12, 10))
    return root


def _assert_same(a, b):
    assert a.classes == b.classes and a.name == b.name
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert np.allclose(a.mean, b.mean, atol=1e-6) and np.allclose(a.std, b.std, atol=1e-6)
    assert json.dumps(a.summary) == json.dumps(b.summary)  # same content and the same order
    assert a.fingerprint() == b.fingerprint()


def _assert_mapped(data):
    """The splits are consecutive slices of one buffer, and that buffer is a mapping of the cache file."""
    xs = (data.train_x, data.val_x, data.test_x)
    for a, b in zip(xs, xs[1:]):
        assert b.data_ptr() == a.data_ptr() + a.nbytes
    files = set()
    for m in (line.split() for line in open("/proc/self/maps").read().splitlines()):
        lo, hi = (int(a, 16) for a in m[0].split("-"))
        if len(m) > 5 and lo <= data.train_x.data_ptr() < hi:
            files.add(m[5])
    assert len(files) == 1 and files.pop().endswith("pixels.npy")


@pytest.mark.parametrize("layout, image_size", [("single", None), ("train_test", 16), ("train_val_test", None)])
def test_cache_gives_the_same_data_as_decoding_into_memory(tmp_path, layout, image_size):
    root = _mixed_folder(tmp_path / "images", layout)
    old = load_data(str(root), image_size=image_size, cache=False)
    new = load_data(str(root), image_size=image_size)
    _assert_same(old, new)
    assert new.summary["skipped"] and new.summary["resized"] and set(new.summary["bit_depths"]) == {"1", "8", "16"}
    _assert_mapped(new)
    assert not list(root.rglob(".edgekd*"))  # nothing written into the user's folder
    _assert_same(old, load_data(str(root), image_size=image_size))  # a cache hit too


def test_a_file_that_opens_but_does_not_decode_is_replanned(tmp_path):
    """The only RGB file is truncated: decoding all at once would have chosen grayscale."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(12):
            _save(root / c / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8), "L")
    _save(root / "a" / "rgb.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full = (root / "a" / "rgb.png").read_bytes()
    (root / "a" / "rgb.png").write_bytes(full[: len(full) // 2])
    old, new = load_data(str(root), val_fraction=0.2, test_fraction=0.25, cache=False), load_data(
        str(root), val_fraction=0.2, test_fraction=0.25)
    _assert_same(old, new)
    assert new.channels == 1 and [s["file"] for s in new.summary["skipped"]] == [str(root / "a" / "rgb.png")]


def test_second_load_maps_the_cache_without_decoding(tmp_path, monkeypatch):
    root = _mixed_folder(tmp_path / "images", "single")
    first = load_data(str(root))

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_mod, "_read_image", fail)
    monkeypatch.setattr(data_mod, "_scan_headers", fail)
    _assert_same(first, load_data(str(root)))


def test_a_changed_file_invalidates_the_cache(tmp_path, cache_dir):
    root = _mixed_folder(tmp_path / "images", "train_test")
    before = load_data(str(root))
    target = root / "train" / "cat" / "6.png"
    _save(target, np.full((10, 12, 3), 7, np.uint8))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    after = load_data(str(root))
    _assert_same(load_data(str(root), cache=False), after)
    assert after.fingerprint() != before.fingerprint()
    assert len([d for d in cache_dir.iterdir() if (d / "meta.json").exists()]) == 2


def test_a_failure_mid_decode_leaves_no_temporary(tmp_path, monkeypatch, cache_dir):
    root = _mixed_folder(tmp_path / "images", "single")
    real, calls = data_mod._pixels, []

    def dies(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(data_mod, "_pixels", dies)
    with pytest.raises(KeyboardInterrupt):
        load_data(str(root))
    assert not [p for p in cache_dir.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not list(cache_dir.rglob("meta.json")) and not list(cache_dir.rglob("pixels.npy"))
    monkeypatch.setattr(data_mod, "_pixels", real)
    _assert_same(load_data(str(root), cache=False), load_data(str(root)))


def test_an_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    from edgekd.errors import EdgeKDError

    root = _mixed_folder(tmp_path / "images", "single")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(EdgeKDError, match="EDGEKD_CACHE_DIR"):
        load_data(str(root))
    monkeypatch.setenv("EDGEKD_DATA_CACHE", "0")
    assert len(load_data(str(root)).train_y) > 0


def _load_in_child(root, cache, log):
    """A worker process, as one DDP rank: records when it decodes, returns the data's fingerprint."""
    os.environ["EDGEKD_CACHE_DIR"] = cache
    real = data_mod._build_cache

    def build(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock long enough for the other process to wait on it
        return real(*args, **kwargs)

    data_mod._build_cache = build
    return load_data(root).fingerprint()


def test_concurrent_loads_decode_once_and_share_one_cache(tmp_path, cache_dir):
    root = _mixed_folder(tmp_path / "images", "single")
    log = tmp_path / "decoded.log"
    with mp.get_context("fork").Pool(2) as pool:
        prints = pool.starmap(_load_in_child, [(str(root), str(cache_dir), str(log))] * 2)
    assert prints[0] == prints[1] == load_data(str(root), cache=False).fingerprint()
    assert len(log.read_text().split()) == 1
    assert len(list(cache_dir.rglob("pixels.npy"))) == 1
    assert cache_root() == cache_dir
