"""Write a 28x28 grayscale handwritten-digits ImageFolder (about 9k PNGs) from scikit-learn's 1,797 8x8 digits.

Each digit is upsampled to 20x20 and placed on a 28x28 canvas (as MNIST is) with a random rotation
(+-12 degrees), scale (0.85-1.15) and shift (+-3 px), five times: a digits dataset of MNIST's shape
that needs no download. Every fifth source digit goes to test/, the rest to train/, so no copy of a
test digit is trained on. Deterministic (seeded).

    python benchmarks/make_digits28.py /tmp/digits28
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dst", type=Path)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        small = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), "L").resize((20, 20), Image.BICUBIC)
        out = args.dst / ("test" if i % 5 == 0 else "train") / str(label)
        out.mkdir(parents=True, exist_ok=True)
        for k in range(args.copies):
            size = int(round(20 * rng.uniform(0.85, 1.15)))
            glyph = small.resize((size, size), Image.BICUBIC).rotate(rng.uniform(-12, 12), Image.BILINEAR)
            canvas = Image.new("L", (28, 28))
            x, y = (28 - size) // 2 + rng.integers(-3, 4), (28 - size) // 2 + rng.integers(-3, 4)
            canvas.paste(glyph, (int(x), int(y)))
            canvas.save(out / f"{i:04d}_{k}.png")


if __name__ == "__main__":
    main()
