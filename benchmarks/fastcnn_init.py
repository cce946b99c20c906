"""Does fastcnn's data-dependent initialisation (a whitened stem, identity convolutions) pay? A screen on
validation only.

Trains fastcnn twice on the same data, seed and recipe (the teacher configs' batch 128, SGD one-cycle at
0.1, crops and flips), once with ``FastCNN.init_from_data`` and once with torch's default initialisation
(its stem trained, as fastcnn was before the data init), and records every epoch's validation accuracy. The test
split is not read: the screen decides whether the long CIFAR-10 teacher run uses the new init.
Resumable: a finished run is read back from its folder.

    python benchmarks/make_variant.py ../shared/datasets/cifar10-jpeg /tmp/c10sub --train-per-class 1000 --test-per-class 100
    python benchmarks/fastcnn_init.py /tmp/c10sub --epochs 5 --out runs/fastcnn_init
Results: benchmarks/results/NAME.json and .md (default NAME fastcnn_init).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(dataset: str, epochs: int, out: Path, with_init: bool) -> dict:
    from edgekd import DistillConfig, ModelConfig, RecipeConfig
    from edgekd.distill import train
    import edgekd.zoo as zoo

    done = out / "history.json"
    if not done.is_file() or not (out / "best.pt").is_file() or len(json.loads(done.read_text())) < epochs:
        original = zoo.FastCNN.init_from_data
        if not with_init:  # torch's default init, and the stem trains with the rest
            zoo.FastCNN.init_from_data = lambda self, x: self[0][0].weight.requires_grad_(True)
        try:
            recipe = RecipeConfig(epochs=epochs, batch_size=128, lr=0.1, weight_decay=5e-4, augment_pad=4, augment_flip=True)
            cfg = DistillConfig(model=ModelConfig(arch="fastcnn"), recipe=recipe)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=dataset))
            train(cfg, out, resume=(out / "last.pt").is_file())
        finally:
            zoo.FastCNN.init_from_data = original
    history = json.loads(done.read_text())
    return {"val_acc": [round(h["val_acc"], 2) for h in history], "train_loss": [round(h["train_loss"], 3) for h in history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="an ImageFolder (a CIFAR-10 subset, for a screen)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/fastcnn_init"))
    ap.add_argument("--name", default="fastcnn_init")
    args = ap.parse_args()
    rows = {label: run(args.dataset, args.epochs, args.out / f"{label}_{args.epochs}", label == "data_init")
            for label in ("data_init", "default_init")}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "runs": rows}, indent=2) + "\n")
    lines = ["# fastcnn: data-dependent initialisation against torch's default (validation only)", "",
             f"Command: `python benchmarks/fastcnn_init.py {args.dataset} --epochs {args.epochs} --out {args.out}`; "
             "one seed, batch 128, SGD one-cycle at 0.1, crops and flips.", "",
             "| init | " + " | ".join(f"val ep {i + 1}" for i in range(args.epochs)) + " | train loss, last epoch |",
             "|---|" + "---:|" * (args.epochs + 1)]
    for label, row in rows.items():
        lines.append(f"| {label.replace('_', ' ')} | " + " | ".join(f"{v:.2f}" for v in row["val_acc"])
                     + f" | {row['train_loss'][-1]:.3f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
