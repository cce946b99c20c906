"""The strong CIFAR-10 teacher: ``configs/cifar10_teacher.toml`` trained by edgekd on the shared JPEG copy.

Runs what a user runs (``edgekd.train`` with the shipped config and ``--data`` the ImageFolder),
resumes an interrupted run (``--resume`` semantics: the same command continues from the last
finished epoch), and records the test accuracy of the best-validation epoch, the wall time
(training, validation every epoch and the test evaluation; data decoding not included) and the
per-epoch history.

Usage:
    python benchmarks/cifar10_teacher.py [--epochs N] [--out runs/c10-teacher]
        [--config configs/cifar10_teacher.toml] [--name cifar10_teacher]
Results: benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
CONFIG = ROOT / "configs" / "cifar10_teacher.toml"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    import torch

    from edgekd.config import distill_config_from_dict, load_toml
    from edgekd.data import load_data
    from edgekd.distill import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--out", default=str(ROOT / "runs" / "c10-teacher"))
    ap.add_argument("--config", type=Path, default=CONFIG, help="the teacher's training config")
    ap.add_argument("--name", default="cifar10_teacher", help="results file name in benchmarks/results/")
    args = ap.parse_args()
    config = args.config.resolve()
    cfg = distill_config_from_dict(load_toml(config))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(DATA)))
    if args.epochs:
        cfg = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, epochs=args.epochs))
    d = cfg.data
    data = load_data(d.dataset, val_fraction=d.val_fraction, seed=d.split_seed)
    out = Path(args.out)

    def progress(kind, i, n, info):
        if kind == "epoch":
            print(f"epoch {i}/{n}: train {info['train_acc']:.2f}% val {info['val_acc']:.2f}% "
                  f"({info['epoch_s']:.0f} s)", flush=True)

    rel_config = str(config.relative_to(ROOT))
    command = " ".join(["python benchmarks/cifar10_teacher.py"]
                       + ([f"--epochs {args.epochs}"] if args.epochs else [])
                       + ([f"--config {rel_config}"] if config != CONFIG else [])
                       + ([f"--out {args.out}", f"--name {args.name}"] if args.name != "cifar10_teacher" else []))
    t0 = time.perf_counter()
    result = train(cfg, out, resume=(out / "last.pt").exists(), data=data, on_step=progress)
    row = {"config": rel_config, "arch": result.arch, "params": result.params,
           "epochs": result.epochs, "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
           "test_acc": result.test_acc, "test_acc_flip_tta": result.test_acc_flip_tta, "train_s": result.train_s, "this_process_s": time.perf_counter() - t0,
           "images_per_s": result.images_per_s, "history": list(result.history),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
           "command": command,
           "recorded": time.strftime("%Y-%m-%d %H:%M")}
    results = RESULTS / args.name
    results.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")
    lines = [f"# A strong CIFAR-10 teacher on a {row['machine']['cores']}-core CPU", "",
             f"Command: `{row['command']}` (config `{row['config']}`, data: the shared CIFAR-10 JPEG copy, "
             "45,000 train / 5,000 val / 10,000 test).", "",
             f"**{row['arch']}** ({row['params']:,} params): test **{row['test_acc']:.2f}%**"
             + (f" ({row['test_acc_flip_tta']:.2f}% with flip test-time augmentation: the mean logits of each image and "
                "its mirror)" if row["test_acc_flip_tta"] is not None else "") + " (best validation "
             f"{row['val_acc']:.2f}% at epoch {row['best_epoch']} of {row['epochs']}), "
             f"**{row['train_s'] / 60:.1f} min** of training, validation and test evaluation "
             f"({row['images_per_s']:.0f} training images/s).", "",
             "| epoch | train acc | val acc | epoch s |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['epoch']} | {h['train_acc']:.2f} | {h['val_acc']:.2f} | {h['epoch_s']:.0f} |" for h in row["history"]]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
