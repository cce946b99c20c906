"""Distillation speed and accuracy on the shared CIFAR-10 JPEG copy: edgekd vs the seeds' loops.

Peers, rebuilt from the seed notebooks (their code is re-typed here only to be timed):
  * seed 002's PyTorch loop: torchvision ImageFolder + PIL transforms through a DataLoader,
    batch 128, Adam 1e-3, CE + T^2 KL with T=10, the teacher run on every batch;
  * seed 004's Keras ``Distiller`` (tf_keras, the Keras 2 API the seed uses), with the T^2
    factor the seed forgot, on the same two architectures.
edgekd runs the same architectures, batch size and epochs through ``edgekd.train``.

Usage:
    python benchmarks/distill_cifar10.py PHASE [PHASE ...] [--epochs N] [--seeds 0 1 2]
Phases: seed002 keras edgekd edgekd-seeds edgekd-kd-v2 edgekd-ort edgekd-kd-v3 edgekd-kd default-student. Results are merged into
benchmarks/results/distill_cifar10.json; `report` renders the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
RESULTS = ROOT / "benchmarks" / "results" / "distill_cifar10.json"
RUNS = ROOT / "runs" / "bench-cifar10"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # seed 002's normalization


def record(key: str, value: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = {**value, "recorded": time.strftime("%Y-%m-%d %H:%M")}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(key, json.dumps(value), flush=True)


# ------------------------------------------------------------------------------------------
# Seed 002's loop, as published (per-image PIL transforms through a DataLoader).


def seed002(epochs: int) -> None:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from edgekd.zoo import build_model

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train_ds = datasets.ImageFolder(str(DATA / "train"), transform=tf)
    test_ds = datasets.ImageFolder(str(DATA / "test"), transform=tf)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=128, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=128, shuffle=False)

    def test(model):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        return 100.0 * correct / len(test_ds)

    def fit(model, teacher=None, T=10.0):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if teacher is not None:
            teacher.eval()
        t0 = time.perf_counter()
        for _ in range(epochs):
            model.train()
            for x, y in train_loader:
                opt.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = loss + F.kl_div(F.log_softmax(out / T, -1), F.softmax(t_logits / T, -1),
                                           reduction="batchmean") * T * T
                loss.backward()
                opt.step()
        return time.perf_counter() - t0

    torch.manual_seed(42)
    teacher = build_model("seed002_teacher", 10, 3, (32, 32))
    student = build_model("seed002_student", 10, 3, (32, 32))
    n = len(train_ds) * epochs
    s = fit(teacher)
    record(f"seed002/teacher/{epochs}ep", {"images_per_s": n / s, "seconds": s, "test_acc": test(teacher)})
    s = fit(student)
    record(f"seed002/scratch/{epochs}ep", {"images_per_s": n / s, "seconds": s, "test_acc": test(student)})
    torch.manual_seed(42)
    student = build_model("seed002_student", 10, 3, (32, 32))
    s = fit(student, teacher)
    record(f"seed002/distill/{epochs}ep", {"images_per_s": n / s, "seconds": s, "test_acc": test(student)})


# ------------------------------------------------------------------------------------------
# Seed 004's Keras Distiller (tf_keras), on seed 002's two architectures, T^2 added.


def keras_peer(epochs: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from edgekd.data import load_data

    data = load_data(str(DATA), val_fraction=0.1)
    x_train = np.concatenate([data.train_x, data.val_x]).transpose(0, 2, 3, 1).astype("float32") / 255.0
    y_train = np.concatenate([data.train_y, data.val_y])
    x_test = data.test_x.numpy().transpose(0, 2, 3, 1).astype("float32") / 255.0
    y_test = data.test_y.numpy()
    from keras_peer import _distiller, keras_models  # the same networks and Distiller as the Keras 3 benchmark

    nets = keras_models(keras)
    teacher_net, student_net = nets["seed002_teacher"], nets["seed002_student"]
    Distiller = _distiller(keras, tf)

    def evaluate(model):
        return 100.0 * float((model.predict(x_test, batch_size=512, verbose=0).argmax(1) == y_test).mean())

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    n = len(x_train) * epochs

    def timed_fit(key, trainer, evaluated):
        t0 = time.perf_counter()
        trainer.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)
        s = time.perf_counter() - t0
        record(f"keras/{key}/{epochs}ep", {"images_per_s": n / s, "seconds": s, "test_acc": evaluate(evaluated)})

    keras.utils.set_random_seed(42)
    teacher = teacher_net()
    teacher.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ce)
    timed_fit("teacher", teacher, teacher)
    student = student_net()
    student.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ce)
    timed_fit("scratch", student, student)
    keras.utils.set_random_seed(42)
    student = student_net()
    distiller = Distiller(student, teacher)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=[keras.metrics.SparseCategoricalAccuracy()],
                      student_loss_fn=ce, distillation_loss_fn=keras.losses.KLDivergence(), alpha=0.5, temperature=10)
    timed_fit("distill", distiller, student)


# ------------------------------------------------------------------------------------------
# edgekd on the same pair, batch size and epochs.


def _edgekd_cfg(arch: str, epochs: int, seed: int, teachers=(), lr=1e-3, views=2, temperature=10.0, alpha=0.5,
                fresh_share=0.0, **recipe):
    from edgekd import DataConfig, DistillConfig, KDConfig, ModelConfig, RecipeConfig

    return DistillConfig(
        data=DataConfig(dataset=str(DATA), val_fraction=0.1),
        model=ModelConfig(arch=arch),
        recipe=RecipeConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=lr, seed=seed, **recipe),
        kd=KDConfig(teachers=tuple(teachers), temperature=temperature, alpha=alpha, cache_views=views,
                    fresh_share=fresh_share),
    )


def _reuse_cache(old: Path, cfg, data, cache_dir: Path) -> None:
    """A one-teacher cache file of an earlier edgekd version, in today's per-teacher layout."""
    import torch

    from edgekd.distill import teacher_cache_key

    saved = torch.load(old, weights_only=True)
    [teacher] = cfg.kd.teachers
    key = teacher_cache_key(cfg, data, teacher, cfg.recipe.augment_pad, cfg.recipe.augment_flip)
    cache_dir.mkdir(parents=True)
    torch.save({"key": key, "params": saved["params"], "logits": saved["logits"]}, cache_dir / f"teacher-{key}.pt")


def _run(key: str, cfg, out: Path, data, cache_from: Path | None = None) -> dict:
    import shutil

    from edgekd import train

    # an interrupted run (last.pt, no result.json) is continued; anything else starts afresh
    resume = (out / "last.pt").exists() and not (out / "result.json").exists()
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
        if cache_from is not None:  # screening runs only
            _reuse_cache(cache_from / "teacher_cache.pt", cfg, data, out / "teacher_cache")
    res = train(cfg, out, data=data, resume=resume)
    value = {"images_per_s": res.images_per_s, "seconds": res.train_s, "teacher_cache_s": res.teacher_cache_s,
             "test_acc": res.test_acc, "best_val_acc": res.best_val_acc, "params": res.params}
    record(key, value)
    return value


def edgekd_runs(epochs: int, seeds: list[int], phases: set[str], kd_args=None) -> None:
    from edgekd.data import load_data

    t0 = time.perf_counter()
    data = load_data(str(DATA), val_fraction=0.1)
    record("edgekd/decode", {"seconds": time.perf_counter() - t0, "train": len(data.train_y), "val": len(data.val_y),
                             "test": len(data.test_y)})
    # seed 002 uses no augmentation; edgekd's recipe adds crops and flips (replayed from the cache)
    aug = dict(augment_pad=4, augment_flip=True)
    teacher_dir = RUNS / "edgekd-teacher"
    if "edgekd" in phases:
        _run(f"edgekd/teacher/{epochs}ep", _edgekd_cfg("seed002_teacher", epochs, 0, lr=2e-3, **aug), teacher_dir, data)
    teacher = str(teacher_dir / "best.pt")
    if "edgekd-seeds" in phases:
        for seed in seeds:
            _run(f"edgekd/scratch/{epochs}ep/seed{seed}", _edgekd_cfg("seed002_student", epochs, seed, lr=3e-3, **aug),
                 RUNS / f"scratch-{seed}", data)
            _run(f"edgekd/distill/{epochs}ep/seed{seed}",
                 _edgekd_cfg("seed002_student", epochs, seed, (teacher,), lr=3e-3, **aug), RUNS / f"distill-{seed}", data)
    if "edgekd-kd-v2" in phases:  # more cached views (augmentation diversity), T = 4
        for seed in seeds:
            _run(f"edgekd/distill-v2-views4-T4/{epochs}ep/seed{seed}",
                 _edgekd_cfg("seed002_student", epochs, seed, (teacher,), lr=3e-3, views=4, temperature=4.0, **aug),
                 RUNS / f"distill-v2-{seed}", data)
    if "edgekd-ort" in phases:  # the T=10, 2-view run again, teacher cache through onnxruntime
        for seed in seeds[:1]:
            _run(f"edgekd/distill-ort/{epochs}ep/seed{seed}",
                 _edgekd_cfg("seed002_student", epochs, seed, (teacher,), lr=3e-3, **aug), RUNS / f"distill-ort-{seed}", data)
    if "edgekd-kd-v3" in phases:  # mostly soft targets: alpha 0.1, T = 4, 4 views (cache through onnxruntime)
        for seed in seeds:
            _run(f"edgekd/distill-v3-alpha0.1-views4-T4/{epochs}ep/seed{seed}",
                 _edgekd_cfg("seed002_student", epochs, seed, (teacher,), lr=3e-3, views=4, temperature=4.0, alpha=0.1,
                             **aug), RUNS / f"distill-v3-{seed}", data)
    if "edgekd-kd" in phases:  # any KD recipe on seed 002's pair: --alpha --temperature --views --fresh-share
        for seed in seeds:
            name = f"T{kd_args.temperature:g}-alpha{kd_args.alpha:g}-views{kd_args.views}-fresh{kd_args.fresh_share:g}"
            earlier = {4: RUNS / f"distill-v2-{seed}", 2: RUNS / f"distill-ort-{seed}"}  # caches of earlier phases
            cache_from = earlier.get(kd_args.views) if kd_args.reuse_cache else None
            cache_from = cache_from if cache_from and (cache_from / "teacher_cache.pt").is_file() else None
            _run(f"edgekd/distill-{name}{'-cache-reused' if cache_from else ''}/{epochs}ep/seed{seed}",
                 _edgekd_cfg("seed002_student", epochs, seed, (teacher,), lr=3e-3, views=kd_args.views,
                             temperature=kd_args.temperature, alpha=kd_args.alpha, fresh_share=kd_args.fresh_share, **aug),
                 RUNS / f"distill-{name}-{seed}", data, cache_from=cache_from)
    if "default-student" in phases:
        from edgekd import DataConfig, DistillConfig, KDConfig, ModelConfig, RecipeConfig

        for seed in seeds[:1]:
            cfg = DistillConfig(data=DataConfig(dataset=str(DATA), val_fraction=0.1), model=ModelConfig(arch="edge_resnet_s"),
                                recipe=RecipeConfig(epochs=epochs, batch_size=256, lr=0.2, seed=seed),
                                kd=KDConfig(teachers=(teacher,), temperature=4.0, alpha=0.5, cache_views=2,
                                            fresh_share=0.0))  # as measured, before fresh_share existed
            _run(f"edgekd/default-student-kd/{epochs}ep/seed{seed}", cfg, RUNS / f"default-kd-{seed}", data)


# ------------------------------------------------------------------------------------------


def report() -> str:
    res = json.loads(RESULTS.read_text())
    rows = ["| run | images/s | seconds | test top-1 |", "|---|---:|---:|---:|"]
    for key, v in res.items():
        if isinstance(v, dict) and "images_per_s" in v:
            rows.append(f"| {key} | {v['images_per_s']:,.0f} | {v['seconds']:,.0f} | {v.get('test_acc', float('nan')):.2f}% |")
    groups: dict[str, list[float]] = {}
    for key, v in res.items():
        if key.startswith("edgekd/") and "/seed" in key:
            groups.setdefault(key.rsplit("/seed", 1)[0], []).append(v["test_acc"])
    rows += ["", "| edgekd run over seeds | n | mean test top-1 | stdev |", "|---|---:|---:|---:|"]
    for key, accs in groups.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        rows.append(f"| {key} | {len(accs)} | {statistics.mean(accs):.2f}% | {sd:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phases", nargs="+", choices=["seed002", "keras", "edgekd", "edgekd-seeds", "edgekd-kd-v2",
                                                          "edgekd-ort", "edgekd-kd-v3", "edgekd-kd", "default-student", "report"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5, help="edgekd-kd: weight of the hard-label CE")
    parser.add_argument("--temperature", type=float, default=4.0, help="edgekd-kd: softening temperature")
    parser.add_argument("--views", type=int, default=4, help="edgekd-kd: cached teacher views per image")
    parser.add_argument("--fresh-share", type=float, default=0.0, help="edgekd-kd: share of each batch also shown fresh")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="edgekd-kd screening: copy the cache of the edgekd-kd-v2 (4 views) or edgekd-ort (2 views) run; its time is then not counted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"this benchmark needs the shared CIFAR-10 copy at {DATA}")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    phases = set(args.phases)
    if "seed002" in phases:
        seed002(args.epochs)
    if "keras" in phases:
        keras_peer(args.epochs)
    if phases & {"edgekd", "edgekd-seeds", "edgekd-kd-v2", "edgekd-ort", "edgekd-kd-v3", "edgekd-kd", "default-student"}:
        edgekd_runs(args.epochs, args.seeds, phases, args)
    if "report" in phases:
        print(report())


if __name__ == "__main__":
    main()
