"""Datasets as in-memory uint8 tensors, and the batch pipeline that augments them.

Every dataset edgekd reads is decoded once into ``(N, C, H, W)`` uint8 tensors. Training then
augments whole batches with tensor ops (random crop with zero padding, horizontal flip), which
on a 2-core CPU delivers several times the images per second of a per-sample PIL DataLoader.
Augmentations are described by integer parameters ``(dy, dx, flip)`` so that a cached
teacher output can be replayed to the student on exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.errors import EdgeKDError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TORCHVISION_SETS = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
BUILTIN_SETS = ("digits", *TORCHVISION_SETS)


@dataclass(frozen=True)
class ImageData:
    """A dataset split into train/val/test, as uint8 ``(N, C, H, W)`` tensors.

    ``mean``/``std`` are per-channel statistics of the training split on the [0, 1] scale.
    """

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # What was read: images per split and class, skipped files with reasons, sizes, modes and bit
    # depths seen (see ``summarize``); stored in every run's result.json.
    summary: dict = field(default_factory=dict, compare=False)

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return tuple(s["file"] for s in self.summary.get("skipped", ()))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def fingerprint(self) -> str:
        """A short hash of every split's pixels and labels (for manifests and cache keys)."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(t.numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


def load_data(
    spec: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> ImageData:
    """Load a dataset by name (``digits``, ``cifar10``, ``mnist``, ``fashion-mnist``) or path.

    A path is an ImageFolder: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (optionally
    ``DIR/val/<class>/*``), or a single ``DIR/<class>/*`` split stratified by
    ``test_fraction`` and ``val_fraction``. A validation split is carved from train when the
    source has none.

    Example:
        >>> data = load_data("digits")
        >>> data.classes[:3], data.train_x.dtype
        (('0', '1', '2'), torch.uint8)
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 < test_fraction < 1.0:
        raise EdgeKDError("--val-fraction and --test-fraction must be between 0 and 1")
    if spec == "digits":
        splits, classes = _digits(seed, val_fraction, test_fraction), tuple(str(i) for i in range(10))
        decode = _uniform_decode(splits, bits=4)  # 0..16 values, stored scaled to 0..255
    elif spec in TORCHVISION_SETS:
        splits, classes = _torchvision(spec, data_dir, download, val_fraction, seed)
        decode = _uniform_decode(splits, bits=8)
    else:
        splits, classes, decode = _image_folder(Path(spec), image_size, val_fraction, test_fraction, seed, on_step)
    return _finish(str(spec), classes, splits, decode)


def _finish(name, classes, splits, decode: dict | None = None) -> ImageData:
    (trx, try_), (vax, vay), (tex, tey) = splits
    if len(classes) < 2:
        raise EdgeKDError(f"dataset {name!r} has {len(classes)} class; a classifier needs at least 2")
    for split, y in (("train", try_), ("val", vay), ("test", tey)):
        if len(y) == 0:
            raise EdgeKDError(f"dataset {name!r} has an empty {split} split; add images or change the fractions")
    unit = trx.float().div_(255.0)
    mean = tuple(float(m) for m in unit.mean(dim=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in unit.std(dim=(0, 2, 3)))
    summary = summarize(classes, {"train": try_, "val": vay, "test": tey}, decode or _uniform_decode(splits, bits=8))
    return ImageData(name, tuple(classes), trx, try_, vax, vay, tex, tey, mean, std, summary)


def summarize(classes, labels: dict[str, torch.Tensor], decode: dict) -> dict:
    """Images per split and class, plus what decoding saw (``decode``: skipped, sizes, modes, bits)."""
    per_class = {c: {split: int((y == i).sum()) for split, y in labels.items()} for i, c in enumerate(classes)}
    return {"images": {split: len(y) for split, y in labels.items()}, "per_class": per_class, **decode}


def describe(summary: dict) -> str:
    """One line for people: counts per split, sizes, modes, bit depths, skipped and resized files."""
    n = summary["images"]
    parts = [f"train {n['train']:,} / val {n['val']:,} / test {n['test']:,} images, {len(summary['per_class'])} classes",
             "sizes " + ", ".join(list(summary["sizes"])[:3]) + (" ..." if len(summary["sizes"]) > 3 else ""),
             "modes " + ", ".join(summary["modes"]), "bit depths " + ", ".join(summary["bit_depths"])]
    if summary["resized"]:
        parts.append(f"{summary['resized']:,} resized")
    if summary["skipped"]:
        first = summary["skipped"][0]
        parts.append(f"{len(summary['skipped'])} unreadable files skipped (e.g. {first['file']}: {first['reason']})")
    smallest = min(summary["per_class"].items(), key=lambda kv: sum(kv[1].values()))
    parts.append(f"smallest class {smallest[0]!r} ({sum(smallest[1].values())} images)")
    return "; ".join(parts)


def _uniform_decode(splits, bits: int) -> dict:
    x = splits[0][0]
    n = sum(len(y) for _, y in splits)
    mode = "L" if x.shape[1] == 1 else "RGB"
    return {"skipped": [], "sizes": {f"{x.shape[3]}x{x.shape[2]}": n}, "modes": {mode: n}, "bit_depths": {str(bits): n},
            "resized": 0}


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def _to_tensors(x: np.ndarray, y: np.ndarray, idx: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx].astype(np.int64))


def _digits(seed: int, val_fraction: float, test_fraction: float):
    """scikit-learn's 1,797 real 8x8 handwritten digits: shipped with the package, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
    y = bunch.target.astype(np.int64)
    rest, test = _stratified_split(y, test_fraction, seed)
    train_rel, val_rel = _stratified_split(y[rest], val_fraction / (1 - test_fraction), seed)
    train, val = rest[train_rel], rest[val_rel]
    return _to_tensors(x, y, train), _to_tensors(x, y, val), _to_tensors(x, y, test)


def _torchvision(spec: str, data_dir, download: bool, val_fraction: float, seed: int):
    from torchvision import datasets

    root = Path(data_dir or "data")
    cls = getattr(datasets, TORCHVISION_SETS[spec])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise EdgeKDError(
            f"{spec} not found under {root}: torchvision expects its own files there "
            f"(e.g. {root}/cifar-10-batches-py or {root}/MNIST/raw); pass --data-dir DIR, "
            f"or --download on a machine with network ({exc})"
        ) from None
    except OSError as exc:
        raise EdgeKDError(f"could not download {spec} into {root}: {exc}; copy the files there instead") from None

    def arrays(ds):
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, H, W[, C]) -> (N, C, H, W)
        return x, np.asarray(ds.targets, dtype=np.int64)

    trx, try_ = arrays(train)
    tex, tey = arrays(test)
    tr, va = _stratified_split(try_, val_fraction, seed)
    return (
        (_to_tensors(trx, try_, tr), _to_tensors(trx, try_, va), _to_tensors(tex, tey, np.arange(len(tey)))),
        tuple(train.classes),
    )


def _list_images(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {
        c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes
    }


def _image_folder(root: Path, image_size, val_fraction, test_fraction, seed, on_step):
    if not root.is_dir():
        raise EdgeKDError(
            f"dataset {str(root)!r} is neither a built-in name ({', '.join(BUILTIN_SETS)}) nor a directory"
        )
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()] if has_splits else [""]
    listings = {s: _list_images(root / s if s else root) for s in split_dirs}
    classes = sorted(set().union(*(set(k) for k in listings.values())))
    if sum(len(v) for lst in listings.values() for v in lst.values()) == 0:
        raise EdgeKDError(
            f"no images found in {root}: expected DIR/<class>/*.jpg|png or DIR/train/<class>/* and DIR/test/<class>/*"
        )
    files = [(s, classes.index(c), p) for s, lst in listings.items() for c, ps in lst.items() for p in ps]
    pixels, kept, decode = _decode_all([p for _, _, p in files], image_size, on_step)
    _check_classes(root, classes, listings, [files[i][1] for i in kept], decode["skipped"])
    x = np.stack(pixels)
    y = np.array([files[i][1] for i in kept], dtype=np.int64)
    split_of = np.array([files[i][0] for i in kept])
    if not has_splits:
        rest, test = _stratified_split(y, test_fraction, seed)
    else:
        rest, test = np.flatnonzero(split_of != "test"), np.flatnonzero(split_of == "test")
    if has_splits and "val" in split_dirs:
        train, val = np.flatnonzero(split_of == "train"), np.flatnonzero(split_of == "val")
    else:
        frac = val_fraction if has_splits else val_fraction / (1 - test_fraction)
        tr_rel, va_rel = _stratified_split(y[rest], frac, seed)
        train, val = rest[tr_rel], rest[va_rel]
    splits = _to_tensors(x, y, train), _to_tensors(x, y, val), _to_tensors(x, y, test)
    return splits, tuple(classes), decode


def _check_classes(root: Path, classes, listings, kept_labels, skipped) -> None:
    """Refuse a class a model cannot learn: an empty folder, all files unreadable, or a single image."""
    listed = Counter(c for lst in listings.values() for c, ps in lst.items() for _ in ps)
    kept = Counter(kept_labels)
    for i, c in enumerate(classes):
        if listed[c] == 0:
            raise EdgeKDError(f"class folder {c!r} in {root} holds no images (.jpg/.png/.bmp/.webp); "
                              "add images or remove the folder")
        if kept[i] == 0:
            example = next((s for s in skipped if f"{os.sep}{c}{os.sep}" in s["file"]), {"file": c, "reason": "unreadable"})
            raise EdgeKDError(f"all {listed[c]} files of class {c!r} are unreadable (e.g. {example['file']}: "
                              f"{example['reason']}); replace them or remove the folder")
        if kept[i] == 1:
            raise EdgeKDError(f"class {c!r} has a single readable image; a class needs at least 2 "
                              "(one to train on, one to evaluate), so add images or remove the folder")


def _read_image(path: Path):
    """One image as a PIL image in L or RGB with 8-bit values, and its bit depth.

    16-bit PNGs (modes I;16*, and I as Pillow opens some) are scaled by 255/65535: Pillow's
    own ``convert("L")`` clips them instead, which turns most pixels white."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I;16") or im.mode == "I":
            arr = np.asarray(im, dtype=np.float64)
            bits = 16 if im.mode.startswith("I;16") or arr.max() > 255 else 8
            scale = 255.0 / 65535.0 if bits == 16 else 1.0
            return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L"), bits
        if im.mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA"):
            return (im.convert("L") if im.mode in ("L", "1", "LA") else im.convert("RGB")), 1 if im.mode == "1" else 8
        return im.convert("RGB"), 8


def _decode_all(paths: list[Path], image_size: int | None, on_step):
    """Decode images with Pillow; unreadable files are skipped with their reason, never raised."""
    from PIL import Image

    modes, bits, sizes = Counter(), Counter(), Counter()
    decoded: list[tuple[int, "Image.Image"]] = []
    skipped: list[dict] = []
    for i, path in enumerate(paths):
        try:
            img, depth = _read_image(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file: count it, go on
            skipped.append({"file": str(path), "reason": str(exc).splitlines()[0][:200] or type(exc).__name__})
            continue
        modes[img.mode] += 1
        bits[str(depth)] += 1
        sizes[img.size] += 1
        decoded.append((i, img))
        if on_step is not None and (i % 500 == 0 or i == len(paths) - 1):
            on_step(i + 1, len(paths))
    mode = "RGB" if modes.get("RGB", 0) else "L"
    size = (image_size, image_size) if image_size else (sizes.most_common(1)[0][0] if sizes else (1, 1))
    pixels = []
    for _, img in decoded:
        img = img.convert(mode)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        pixels.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
    decode = {"skipped": skipped, "sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common()},
              "modes": dict(modes), "bit_depths": dict(bits), "resized": sum(n for sz, n in sizes.items() if sz != size)}
    return pixels, [i for i, _ in decoded], decode


# ---------------------------------------------------------------------------------------------
# Batch pipeline: tensor-op augmentation described by replayable integer parameters.


def augment_params(n: int, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw ``(dy, dx, flip)`` for ``n`` images: crop offsets in ``[0, 2*pad]`` and a flip bit."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n, 1), generator=generator) if flip else torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([offsets, flips], dim=1).to(torch.int16)


def apply_augment(x: torch.Tensor, params: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Crop a zero-padded ``(B, C, H, W)`` batch at ``params[:, :2]`` and flip where ``params[:, 2]``."""
    if params is None:
        return x
    params = params.long().to(x.device)
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = params[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        cols = params[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    flip = params[:, 2].bool()[:, None, None, None]
    return torch.where(flip, x.flip(-1), x).contiguous()


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float in [0, 1]."""
    return x_u8.float().div_(255.0)
