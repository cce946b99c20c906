"""edgekd's training speed against Keras 3, the peer a user of seed 004 has, interleaved.

Seed 004 imports ``from tensorflow import keras``: on TensorFlow 2.21 that is Keras 3, whose
``compile`` turns on XLA by default. Its code is re-typed here only to be timed: ``fit`` with
batch 128, Adam 1e-3 and a validation split each epoch, then one test evaluation; for
distillation its ``Distiller`` (teacher on every batch, with the T^2 factor the seed forgot).
edgekd runs its library API (``edgekd.train``), on the same images and epochs: for seed 002's pair
the recipes of the config it ships for that pair (``configs/seed002_cifar10.toml``: Adam at batch
128 like the peer, crop and flip augmentation, its KD settings), for the other networks its
defaults (batch 256, SGD one-cycle, crop and flip); best-epoch checkpointing and batch-norm
checks on both. ``--legacy`` adds tf_keras (Keras 2) as an extra, named row; ``--bf16-peer`` adds
Keras 3 under its mixed_bfloat16 policy (seed 004 runs float32).

The `distill` phase runs edgekd's default recipe length (30 epochs, ``--long-epochs``) on half the
images, both sides the same epochs: edgekd's cached teacher views are computed once and pay off
over the run, where the peer's Distiller runs the teacher on every batch of every epoch.
`scratch-long` trains the student for as long, for accuracy at equal epochs at that length.

Each measurement is its own process (A, B, A, B, ...: one round is every system once per phase,
the order alternating between rounds) so that machine drift falls on both sides; the ratio is
taken within a round, and the table gives the median over rounds. Timed: from the start of
training to the test accuracy (validation every epoch, the teacher's cache for edgekd's
default distillation, XLA compilation for Keras, model building on both sides) - what a user
waits for. Process start, framework imports and data loading are not timed; both read the same
uint8 arrays.

Usage:
    python benchmarks/keras_peer.py [--rounds 3] [--images 10000] [--epochs 2] [--phases ...] [--legacy]
Results: benchmarks/results/keras_peer.json (raw, every round) and keras_peer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
RESULTS = ROOT / "benchmarks" / "results" / "keras_peer"
SEED002_CONFIG = ROOT / "configs" / "seed002_cifar10.toml"
RUNS = ROOT / "runs" / "keras-peer"
# phase: (edgekd arch, what is compared)
PHASES = {
    "teacher": ("seed002_teacher", "seed 002's teacher (1.19M params), from scratch"),
    "scratch": ("seed002_student", "seed 002's student (268k params), from scratch"),
    "scratch-long": ("seed002_student", "seed 002's student from scratch at edgekd's default length (30 epochs): "
                     "accuracy at equal epochs where edgekd's recipe is meant to run"),
    "distill": ("seed002_student", "distillation, whole run incl. the teacher: edgekd's default (cached teacher views) vs Keras's Distiller (teacher on every batch)"),
    "distill-online": ("seed002_student", "distillation with the teacher on every batch, both"),
    "edge_resnet_s": ("edge_resnet_s", "edgekd's default student (ResNet 32-64-112, BN), built the same in Keras"),
    "mobilenet_v2": ("torchvision:mobilenet_v2", "MobileNetV2 (torchvision's / keras.applications'), 32x32 input, "
                     "on half the images (Keras trains it at a few dozen images/s)"),
}
SHARE = {"mobilenet_v2": 0.5, "distill": 0.5}  # share of --images a phase uses
LONG = ("scratch-long", "distill")  # phases run for --long-epochs
ALL_SYSTEMS = ("edgekd", "keras", "keras_bf16", "tf_keras")


# ------------------------------------------------------------------------------------------
# One measurement (a child process).


def subset(n: int):
    from edgekd.data import load_data

    import torch

    d = load_data(str(DATA), val_fraction=0.1)
    g = torch.Generator().manual_seed(0)  # the same images for every system and round; folders are sorted by class

    def pick(x, y, k):
        idx = torch.randperm(len(x), generator=g)[:k].sort().values
        return x[idx].clone(), y[idx].clone()

    k = max(1, n // 5)
    return d.__class__(d.name, d.classes, *pick(d.train_x, d.train_y, n), *pick(d.val_x, d.val_y, k),
                       *pick(d.test_x, d.test_y, k), d.mean, d.std, d.summary)


def job_edgekd(phase: str, data, epochs: int, seed: int, teacher: Path | None, out: Path) -> dict:
    import dataclasses

    from edgekd.config import DistillConfig, KDConfig, ModelConfig, RecipeConfig
    from edgekd.distill import train

    arch = PHASES[phase][0]
    recipe, kd = RecipeConfig(epochs=epochs, seed=seed), KDConfig()
    if arch.startswith("seed002"):  # the recipes edgekd ships for this pair, as a user of seed 002 runs them
        shipped = tomllib.loads(SEED002_CONFIG.read_text())
        table = shipped["teachers"][0]["recipe"] if arch == "seed002_teacher" else shipped["student_recipe"]
        recipe = RecipeConfig(**{**table, "epochs": epochs, "seed": seed})
        kd = KDConfig(**{k: v for k, v in shipped["kd"].items() if k in ("temperature", "alpha", "cache_views")})
    if phase.startswith("distill"):
        kd = dataclasses.replace(kd, teachers=(str(teacher),), cache_views=0 if phase == "distill-online" else kd.cache_views)
    cfg = DistillConfig(model=ModelConfig(arch=arch), recipe=recipe, kd=kd)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(DATA)))
    # torch imports its compiler stack (torch._dynamo, ~2 s here) lazily, at the first optimizer: a
    # framework import, untimed here as TensorFlow's is on the peer's side.
    import torch._dynamo  # noqa: F401

    t0 = time.perf_counter()
    result = train(cfg, out, data=data)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "test_acc": result.test_acc, "val_acc": result.best_val_acc,
            "teacher_file": str(out / "best.pt"), "precision": result.precision}


def keras_models(keras):
    L = keras.layers

    def seed002_teacher():
        return keras.Sequential([keras.Input((32, 32, 3)), L.Conv2D(128, 3, padding="same", activation="relu"),
                                 L.Conv2D(64, 3, padding="same", activation="relu"), L.MaxPooling2D(),
                                 L.Conv2D(64, 3, padding="same", activation="relu"),
                                 L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(),
                                 L.Flatten(), L.Dense(512, activation="relu"), L.Dense(10)])

    def seed002_student():
        return keras.Sequential([keras.Input((32, 32, 3)), L.Conv2D(16, 3, padding="same", activation="relu"),
                                 L.MaxPooling2D(), L.Conv2D(16, 3, padding="same", activation="relu"),
                                 L.MaxPooling2D(), L.Flatten(), L.Dense(256, activation="relu"), L.Dense(10)])

    def bn(x):
        return L.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def edge_resnet_s():  # edgekd.zoo.edge_resnet_s, layer for layer
        inp = keras.Input((32, 32, 3))
        x = L.ReLU()(bn(L.Conv2D(32, 3, padding="same", use_bias=False)(inp)))
        cin = 32
        for width, stride in ((32, 1), (64, 2), (112, 2)):
            y = L.ReLU()(bn(L.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(x)))
            y = bn(L.Conv2D(width, 3, padding="same", use_bias=False)(y))
            short = x if (stride == 1 and cin == width) else bn(L.Conv2D(width, 1, strides=stride, use_bias=False)(x))
            x, cin = L.ReLU()(L.Add()([y, short])), width
        return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))

    def mobilenet_v2():
        return keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10,
                                              classifier_activation=None)

    return {"seed002_teacher": seed002_teacher, "seed002_student": seed002_student, "edge_resnet_s": edge_resnet_s,
            "torchvision:mobilenet_v2": mobilenet_v2}


def job_keras(phase: str, data, epochs: int, seed: int, teacher: Path | None, out: Path, legacy: bool,
              bf16: bool = False) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    if legacy:
        import tf_keras as keras
    else:
        from tensorflow import keras  # seed 004's import: Keras 3 on TensorFlow 2.21
    if bf16:  # not what seed 004 does: Keras's own mixed precision, the fair match for edgekd's bf16 on AMX
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    def nhwc(x):
        return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)).astype("float32") / 255.0

    x_train, y_train = nhwc(data.train_x), data.train_y.numpy()
    x_val, y_val = nhwc(data.val_x), data.val_y.numpy()
    x_test, y_test = nhwc(data.test_x), data.test_y.numpy()
    keras.utils.set_random_seed(seed)
    build = keras_models(keras)[PHASES[phase][0]]
    t0 = time.perf_counter()  # model building timed on both sides (edgekd's is inside train)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    acc = keras.metrics.SparseCategoricalAccuracy()
    if phase.startswith("distill"):
        teacher_net = keras.models.load_model(teacher)
        trainer = _distiller(keras, tf)(build(), teacher_net)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=[acc], student_loss_fn=ce,
                        distillation_loss_fn=keras.losses.KLDivergence(), alpha=0.5, temperature=4.0)
        evaluated = trainer.student
    else:
        trainer = evaluated = build()
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ce, metrics=[acc])
    hist = trainer.fit(x_train, y_train, batch_size=128, epochs=epochs, validation_data=(x_val, y_val), verbose=0)
    test_acc = 100.0 * float((evaluated.predict(x_test, batch_size=512, verbose=0).argmax(1) == y_test).mean())
    seconds = time.perf_counter() - t0
    row = {"seconds": seconds, "test_acc": test_acc,
           "val_acc": 100.0 * max(hist.history.get("val_sparse_categorical_accuracy", [0.0]))}
    if phase == "teacher":
        out.mkdir(parents=True, exist_ok=True)
        evaluated.save(out / "teacher.keras")
        row["teacher_file"] = str(out / "teacher.keras")
    return row


def _distiller(keras, tf):
    class Distiller(keras.Model):  # seed 004's class, with T**2 on the distillation term
        def __init__(self, student, teacher):
            super().__init__()
            self.student, self.teacher = student, teacher

        def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha, temperature):
            super().compile(optimizer=optimizer, metrics=metrics)
            self.student_loss_fn, self.distillation_loss_fn = student_loss_fn, distillation_loss_fn
            self.alpha, self.temperature = alpha, temperature

        def call(self, x):
            return self.student(x)

        def train_step(self, data):
            x, y = data
            teacher_predictions = self.teacher(x, training=False)
            with tf.GradientTape() as tape:
                student_predictions = self.student(x, training=True)
                student_loss = self.student_loss_fn(y, student_predictions)
                distillation_loss = self.distillation_loss_fn(
                    tf.nn.softmax(teacher_predictions / self.temperature, axis=1),
                    tf.nn.softmax(student_predictions / self.temperature, axis=1)) * self.temperature**2
                loss = self.alpha * student_loss + (1 - self.alpha) * distillation_loss
            grads = tape.gradient(loss, self.student.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables))
            for m in self.metrics:
                if m.name != "loss":
                    m.update_state(y, student_predictions)
            return {m.name: m.result() for m in self.metrics}

        def test_step(self, data):
            x, y = data
            predictions = self.student(x, training=False)
            for m in self.metrics:
                if m.name != "loss":
                    m.update_state(y, predictions)
            return {m.name: m.result() for m in self.metrics}

    return Distiller


def job(args) -> None:
    data = subset(int(args.images * SHARE.get(args.phase, 1.0)))
    out = RUNS / f"r{args.round}" / args.who / args.phase
    if out.exists():
        import shutil

        shutil.rmtree(out)
    teacher = Path(args.teacher) if args.teacher else None
    if args.who == "edgekd":
        row = job_edgekd(args.phase, data, args.epochs, args.round, teacher, out)
    else:
        row = job_keras(args.phase, data, args.epochs, args.round, teacher, out, legacy=args.who == "tf_keras",
                        bf16=args.who == "keras_bf16")
    row["images_per_s"] = len(data.train_x) * args.epochs / row["seconds"]
    row["epochs"], row["train_images"] = args.epochs, len(data.train_x)
    print("RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------
# The driver: interleaved rounds.


def measure(who: str, phase: str, rnd: int, args, teacher: str | None) -> dict:
    epochs = args.long_epochs if phase in LONG else args.epochs
    cmd = [sys.executable, __file__, "job", who, phase, "--round", str(rnd), "--images", str(args.images),
           "--epochs", str(epochs)] + (["--teacher", teacher] if teacher else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{who} {phase} round {rnd} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    print(f"round {rnd} {phase:15s} {who:8s} {row['images_per_s']:8.0f} img/s  {row['seconds']:7.1f} s  "
          f"test {row['test_acc']:.2f}%", flush=True)
    return row


def drive(args) -> None:
    systems = ["edgekd", "keras"] + (["tf_keras"] if args.legacy else []) + (["keras_bf16"] if args.bf16_peer else [])
    raw = json.loads(RESULTS.with_suffix(".json").read_text()) if args.resume and RESULTS.with_suffix(".json").exists() else {}
    command = "python benchmarks/keras_peer.py " + " ".join(sys.argv[1:])
    earlier = [c for c in raw.get("command", "").split("; ") if c and c != command]  # --resume adds phases
    raw.update({"command": "; ".join(earlier + [command]), "images": args.images,
                "epochs": args.epochs, "machine": {"cpu": platform.processor() or platform.machine(),
                                                    "cores": os.cpu_count(), "python": platform.python_version()}})
    raw.setdefault("rounds", {})
    for rnd in range(args.rounds):
        got = raw["rounds"].setdefault(str(rnd), {})
        for phase in args.phases:
            order = systems if rnd % 2 == 0 else systems[::-1]
            for who in order:
                key = f"{phase}/{who}"
                if key not in got:
                    needs = phase.startswith("distill")
                    teacher = got.get(f"teacher/{who}", {}).get("teacher_file") if needs else None
                    got[key] = measure(who, phase, rnd, args, teacher)
                    RESULTS.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    present = [p for p in PHASES if any(f"{p}/edgekd" in r for r in raw["rounds"].values())]  # --resume may add phases
    seen = [s for s in ALL_SYSTEMS if any(k.endswith("/" + s) for r in raw["rounds"].values() for k in r)]
    RESULTS.with_suffix(".md").write_text(render(raw, present, seen))
    print(RESULTS.with_suffix(".md").read_text())


def peer_pairs(raw: dict, phase: str, peer: str) -> list[tuple[dict, dict]]:
    """The (edgekd, peer) measurements of ``phase``, one pair for each round in which both ran."""
    return [(r[f"{phase}/edgekd"], r[f"{phase}/{peer}"]) for r in raw["rounds"].values()
            if f"{phase}/edgekd" in r and f"{phase}/{peer}" in r]


def render(raw: dict, phases: list[str], systems: list[str]) -> str:
    rounds = list(raw["rounds"].values())
    lines = ["# edgekd vs Keras 3 (seed 004's `from tensorflow import keras`), interleaved", "",
             f"Command: `{raw['command']}`. Up to {raw['images']:,} CIFAR-10 training images (validation and test: "
             f"{raw['images'] // 5:,} each), {len(rounds)} rounds, "
             f"{raw['machine']['cores']} cores. Speed: training images x epochs / seconds from the start of training "
             "to the test accuracy. Ratio: edgekd / peer within each round, then the median.", "",
             "| phase | peer | images x epochs | edgekd img/s | peer img/s | edgekd / peer (median, min-max) | test acc edgekd | test acc peer |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    peer_names = {"keras": "Keras 3 (XLA)", "tf_keras": "tf_keras (legacy Keras 2)",
                  "keras_bf16": "Keras 3 (XLA), mixed_bfloat16"}
    for phase in phases:
        for peer in systems[1:]:
            pairs = peer_pairs(raw, phase, peer)
            if not pairs:
                continue
            ratios = [a["images_per_s"] / b["images_per_s"] for a, b in pairs]

            def med(side, key):
                return statistics.median(p[side][key] for p in pairs)

            size = f"{pairs[0][0].get('train_images', raw['images']):,} x {pairs[0][0].get('epochs', raw['epochs'])}"
            lines.append(f"| {phase} | {peer_names[peer]} | {size} | {med(0, 'images_per_s'):,.0f} | {med(1, 'images_per_s'):,.0f} | "
                         f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | "
                         f"{statistics.mean(p[0]['test_acc'] for p in pairs):.2f} | "
                         f"{statistics.mean(p[1]['test_acc'] for p in pairs):.2f} |")
    precisions = sorted({r[k].get("precision", "fp32") for r in rounds for k in r if k.endswith("/edgekd")})
    lines += ["", f"edgekd trained in {' and '.join(precisions)} (its `precision = \"auto\"`: bf16 autocast on a CPU with "
              "AMX tiles, except networks with grouped convolutions; fp32 on others); Keras 3 in float32, as seed 004 runs it"
              + ("; the `mixed_bfloat16` row is Keras 3 under its own bf16 mixed-precision policy (one line a Keras user "
                 "can add; seed 004 does not), the like-for-like match for edgekd's bf16." if "keras_bf16" in systems else ".")]
    if raw.get("note"):
        lines += ["", raw["note"]]
    lines += ["", "Phases:"] + [f"- `{p}`: {PHASES[p][1]}" for p in phases]
    lines += ["", "Test accuracy: mean over rounds (round r uses seed r on both sides), on the test subset, "
              "at equal epochs. edgekd trains seed 002's pair with the recipes of `configs/seed002_cifar10.toml` "
              "(Adam at batch 128 as the peer, plus crop and flip augmentation, which the peer does not do), the other "
              "networks with its defaults (batch 256, SGD one-cycle, crop and flip); the peer with Adam 1e-3 at batch 128."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        ap = argparse.ArgumentParser()
        ap.add_argument("job")
        ap.add_argument("who", choices=["edgekd", "keras", "tf_keras", "keras_bf16"])
        ap.add_argument("phase", choices=list(PHASES))
        ap.add_argument("--round", type=int, default=0)
        ap.add_argument("--images", type=int, default=10000)
        ap.add_argument("--epochs", type=int, default=2)
        ap.add_argument("--teacher")
        job(ap.parse_args())
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--long-epochs", type=int, default=30,
                    help="epochs of the `scratch-long` and `distill` phases: edgekd's default recipe length (30), "
                         "over which its cached teacher views pay off; the peer trains as many")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--legacy", action="store_true", help="add tf_keras (Keras 2) as an extra row")
    ap.add_argument("--bf16-peer", action="store_true",
                    help="add Keras 3 under the mixed_bfloat16 policy as an extra row (seed 004 runs float32)")
    ap.add_argument("--out", help="results path without suffix (default benchmarks/results/keras_peer)")
    ap.add_argument("--resume", action="store_true", help="keep finished measurements in keras_peer.json")
    args = ap.parse_args()
    if any(p.startswith("distill") for p in args.phases) and "teacher" not in args.phases:
        args.phases = ["teacher"] + args.phases  # a distillation round uses the teacher that round trained
    args.phases = sorted(args.phases, key=list(PHASES).index)
    global RESULTS
    RESULTS = Path(args.out) if args.out else RESULTS
    drive(args)


if __name__ == "__main__":
    main()
