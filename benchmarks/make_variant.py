"""Write a smaller, grayscale and/or lower-resolution ImageFolder from an ImageFolder with train/ and test/.

Used to confirm on data a recipe was not tuned on, e.g. a 28x28 grayscale CIFAR-10 subset:

    python benchmarks/make_variant.py ../shared/datasets/cifar10-jpeg /tmp/cifar-gray28 --size 28 --gray \
        --train-per-class 800 --test-per-class 200

Files are taken in sorted order (deterministic) and written as PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (bilinear)")
    ap.add_argument("--gray", action="store_true", help="convert to 8-bit grayscale")
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--test-per-class", type=int, default=None)
    args = ap.parse_args()
    limits = {"train": args.train_per_class, "test": args.test_per_class}
    for split, limit in limits.items():
        for cls_dir in sorted(p for p in (args.src / split).iterdir() if p.is_dir()):
            out = args.dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:limit]:
                with Image.open(f) as im:
                    im = im.convert("L" if args.gray else "RGB")
                    if args.size:
                        im = im.resize((args.size, args.size), Image.BILINEAR)
                    im.save(out / (f.stem + ".png"))


if __name__ == "__main__":
    main()
