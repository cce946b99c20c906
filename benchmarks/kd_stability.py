"""Does the default KD recipe diverge on a student without batch norm? And does KD beat its matched twin?

For seeds 0..N-1, on an ImageFolder the recipe was not tuned on, trains seed 003's student (plain
conv + dense, no batch norm) four ways for the same epochs and seed:
  kd_unprotected  the default KD recipe without its guards: KD weight at full strength from step 1
                  (kd.warmup_epochs 0) and no gradient clipping (recipe.clip_grad none)
  kd            the default KD recipe (KD weight ramped in over the first epoch, relative clipping)
  scratch       labels only, one view of every image per step
  scratch_matched  labels only, with the same student passes and augmentation as the KD runs
                   (every batch shown twice, freshly augmented: edgekd.distill.matched_scratch)
and records every epoch's training accuracy, whether a run collapsed, and test accuracy. Resumable:
finished runs are read back.

    python benchmarks/make_variant.py ../shared/datasets/cifar10-jpeg /tmp/cifar-gray28 --size 28 --gray \
        --train-per-class 800 --test-per-class 200
    edgekd train --arch resnet_m --data /tmp/cifar-gray28 --epochs 5 --out /tmp/stab/teacher
    python benchmarks/kd_stability.py /tmp/cifar-gray28 /tmp/stab/teacher/best.pt --out /tmp/stab --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from edgekd import DistillConfig, KDConfig, ModelConfig, RecipeConfig, load_data, train
from edgekd.distill import matched_scratch
from edgekd.errors import EdgeKDError

RESULTS = Path(__file__).resolve().parent / "results"


def configs(dataset: str, teacher: str, seed: int, epochs: int, student: str) -> dict[str, DistillConfig]:
    base = DistillConfig(model=ModelConfig(arch=student), recipe=RecipeConfig(epochs=epochs, seed=seed))
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=dataset))
    kd = dataclasses.replace(base, kd=KDConfig(teachers=(teacher,)))
    unprotected = dataclasses.replace(kd, recipe=dataclasses.replace(kd.recipe, clip_grad=None),
                                      kd=dataclasses.replace(kd.kd, warmup_epochs=0.0))
    return {"kd_unprotected": unprotected, "kd": kd, "scratch": base, "scratch_matched": matched_scratch(kd)}


def run_one(cfg: DistillConfig, out: Path, data, cache_dir: Path) -> dict:
    if (out / "outcome.json").is_file():
        return json.loads((out / "outcome.json").read_text())
    try:
        res = train(cfg, out, data=data, resume=(out / "last.pt").is_file(), cache_dir=cache_dir)
        outcome = {"collapsed": None, "test_acc": res.test_acc, "val_acc": res.best_val_acc}
    except EdgeKDError as exc:
        outcome = {"collapsed": str(exc), "test_acc": None, "val_acc": None}
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else []
    outcome["train_acc"] = [round(h["train_acc"], 2) for h in history]
    (out / "outcome.json").write_text(json.dumps(outcome, indent=2))
    return outcome


def summary(rows: dict) -> list[str]:
    lines = ["| run | seeds collapsed | test top-1 (mean +- sd over finished seeds) | training accuracy per epoch, by seed |",
             "|---|---:|---:|---|"]
    for name, by_seed in rows.items():
        accs = [o["test_acc"] for o in by_seed.values() if o["test_acc"] is not None]
        mean = f"{statistics.mean(accs):.2f}% +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        curves = "; ".join(f"s{s}: " + " ".join(f"{a:.0f}" for a in o["train_acc"]) for s, o in by_seed.items())
        collapsed = sum(o["collapsed"] is not None for o in by_seed.values())
        lines.append(f"| {name} | {collapsed} of {len(by_seed)} | {mean} | {curves} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("teacher")
    ap.add_argument("--out", type=Path, default=Path("runs/kd_stability"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--student", default="seed003_student")
    ap.add_argument("--name", default="kd_stability", help="results/NAME.json and .md")
    args = ap.parse_args()
    data = load_data(args.dataset)
    rows: dict[str, dict] = {}
    for seed in range(args.seeds):
        for name, cfg in configs(args.dataset, args.teacher, seed, args.epochs, args.student).items():
            rows.setdefault(name, {})[seed] = run_one(cfg, args.out / f"{name}-s{seed}", data, args.out / "teacher_cache")
            print(name, seed, rows[name][seed], flush=True)
    gains = [rows["kd"][s]["test_acc"] - rows["scratch_matched"][s]["test_acc"] for s in range(args.seeds)
             if rows["kd"][s]["test_acc"] is not None and rows["scratch_matched"][s]["test_acc"] is not None]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "runs": rows, "kd_minus_matched_scratch": gains}, indent=2))
    gain = f"{statistics.mean(gains):+.2f} +- {statistics.stdev(gains):.2f}" if len(gains) > 1 else "-"
    text = ["# KD stability and matched scratch on data the recipe was not tuned on", "",
            f"`python benchmarks/kd_stability.py {args.dataset} {args.teacher} --out {args.out} --seeds {args.seeds} "
            f"--epochs {args.epochs} --student {args.student} --name {args.name}` (teacher and data: see the script's docstring)", "",
            *summary(rows), "", f"KD minus matched scratch, test top-1 points, per seed: "
            + ", ".join(f"{g:+.2f}" for g in gains) + f" (mean {gain})", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
