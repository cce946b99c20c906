"""Does distillation beat its matched scratch twin? KD modes against their fair controls, over seeds.

For every seed and mode, trains a distilled student and its matched scratch twin
(``edgekd.distill.matched_scratch``: no teacher, the same student passes, augmentation and mixup),
and records validation top-1 (what a choice between modes may read), test top-1 (reported once per
run), whole-run time with the teacher's share, and training accuracy per epoch. Modes:

  cached        the default recipe: 2 cached teacher views per image + a fresh view of every image
  cached-T1/T2  the same at temperature 1 or 2
  cached1       1 cached view + a fresh view (the faster cache)
  online        the teacher answers for every batch the student sees (``kd.cache_views 0``)
  online-T1     online at temperature 1
  online-mixup  online, with mixup between images (Beta(1, 1)); the teacher sees the blended images
  online-hint   online, plus feature (hint) distillation of the last feature map (``kd.hint_weight`` 1)
  online-T1-hint  both

Modes whose twins are the same run share it (``TWIN_OF``).

Resumable: a finished run's ``outcome.json`` is read back, an interrupted one resumes from ``last.pt``.

    python benchmarks/kd_vs_twin.py ../shared/datasets/cifar10-jpeg runs/c10-teacher/best.pt \\
        --student seed002_student --epochs 10 --seeds 0 1 2 --modes cached online-mixup --name kd_vs_twin_cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from edgekd import DistillConfig, KDConfig, ModelConfig, RecipeConfig, load_data, train
from edgekd.distill import matched_scratch
from edgekd.errors import EdgeKDError

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "cached": ({}, {}),
    "cached-T1": ({"temperature": 1.0}, {}),
    "cached-T2": ({"temperature": 2.0}, {}),
    "cached1": ({"cache_views": 1}, {}),
    "online": ({"cache_views": 0}, {}),
    "online-T1": ({"cache_views": 0, "temperature": 1.0}, {}),
    "online-mixup": ({"cache_views": 0}, {"mixup_alpha": 1.0}),
    "online-hint": ({"cache_views": 0, "hint_weight": 1.0}, {}),
    "online-T1-hint": ({"cache_views": 0, "temperature": 1.0, "hint_weight": 1.0}, {}),
}
# matched_scratch gives these the same twin config as the mode named
TWIN_OF = {"cached-T1": "cached", "cached-T2": "cached", "online-T1": "online", "online-hint": "online",
           "online-T1-hint": "online"}


def kd_config(dataset: str, teacher: str, student: str, epochs: int, seed: int, mode: str) -> DistillConfig:
    kd_over, recipe_over = MODES[mode]
    base = DistillConfig(model=ModelConfig(arch=student),
                         recipe=RecipeConfig(epochs=epochs, seed=seed, **recipe_over),
                         kd=KDConfig(teachers=(teacher,), **kd_over))
    return dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=dataset))


def run_one(cfg: DistillConfig, out: Path, data, cache_dir: Path | None = None) -> dict:
    """Train ``cfg`` into ``out`` (resuming) unless it finished before; a collapse is an outcome, not an error."""
    if (out / "outcome.json").is_file():
        return json.loads((out / "outcome.json").read_text())
    t0 = time.perf_counter()
    try:
        res = train(cfg, out, data=data, resume=(out / "last.pt").is_file(), cache_dir=cache_dir)
        outcome = {"collapsed": None, "test_acc": res.test_acc, "val_acc": res.best_val_acc,
                   "train_s": round(res.train_s, 1), "teacher_cache_s": round(res.teacher_cache_s, 1)}
        if res.teachers:  # is the teacher ahead of the student at all?
            outcome["teacher_val_acc"] = res.teachers[0].val_acc
    except EdgeKDError as exc:
        outcome = {"collapsed": str(exc), "test_acc": None, "val_acc": None}
    outcome["wall_s_this_process"] = round(time.perf_counter() - t0, 1)
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else []
    outcome["train_acc"] = [round(h["train_acc"], 2) for h in history]
    (out / "outcome.json").write_text(json.dumps(outcome, indent=2))
    return outcome


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(rows: dict) -> list[str]:
    lines = ["| mode | seeds | KD val | KD test | twin val | twin test | KD - twin, test (per seed) | KD run s | twin run s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for mode, by_seed in rows.items():
        done = {s: r for s, r in by_seed.items() if r["kd"]["test_acc"] is not None and r["twin"]["test_acc"] is not None}
        gains = [r["kd"]["test_acc"] - r["twin"]["test_acc"] for r in done.values()]
        col = lambda who, key: _ms([r[who][key] for r in done.values()])  # noqa: E731
        per_seed = ", ".join(f"s{s} {g:+.2f}" for s, g in zip(done, gains))
        lines.append(f"| {mode} | {len(done)} | {col('kd', 'val_acc')} | {col('kd', 'test_acc')} | {col('twin', 'val_acc')} | "
                     f"{col('twin', 'test_acc')} | **{_ms(gains)}** ({per_seed}) | {col('kd', 'train_s')} | {col('twin', 'train_s')} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="an ImageFolder or a built-in dataset name")
    ap.add_argument("teacher", help="the teacher file")
    ap.add_argument("--student", default="seed002_student")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["cached"])
    ap.add_argument("--out", type=Path, default=Path("runs/kd_vs_twin"))
    ap.add_argument("--name", default="kd_vs_twin", help="results/NAME.json and .md")
    args = ap.parse_args()
    data = load_data(args.dataset)
    rows: dict[str, dict] = {}
    for seed in args.seeds:
        for mode in args.modes:
            kd = kd_config(args.dataset, args.teacher, args.student, args.epochs, seed, mode)
            pair = {"kd": run_one(kd, args.out / f"{mode}-kd-s{seed}", data, args.out / "teacher_cache"),
                    "twin": run_one(matched_scratch(kd), args.out / f"{TWIN_OF.get(mode, mode)}-twin-s{seed}", data)}
            rows.setdefault(mode, {})[seed] = pair
            print(mode, seed, json.dumps({k: (v["val_acc"], v["test_acc"]) for k, v in pair.items()}), flush=True)
            write(args, rows)


def write(args, rows: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    teacher = next((r["kd"]["teacher_val_acc"] for m in rows.values() for r in m.values() if "teacher_val_acc" in r["kd"]), None)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "teacher_val_acc": teacher, "runs": rows}, indent=2) + "\n")
    cmd = (f"python benchmarks/kd_vs_twin.py {args.dataset} {args.teacher} --student {args.student} --epochs {args.epochs} "
           f"--seeds {' '.join(map(str, args.seeds))} --modes {' '.join(args.modes)} --name {args.name}")
    text = ["# Distillation against its matched scratch twin", "", f"`{cmd}`", "",
            "Accuracies are top-1 in percent (mean +- sd over seeds); run times are whole runs in seconds, the teacher's "
            "cache or online calls included. The twin makes the same student passes on the same augmentation."
            + (f" The teacher's validation top-1: {teacher:.2f}%." if teacher is not None else ""), "",
            *table(rows), ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
