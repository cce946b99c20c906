"""How much a teacher's soft targets say: entropy and wrong-class structure at each temperature.

For each teacher (an edgekd checkpoint), on the validation split of its data: top-1, the mean
probability of the true class at T = 1, and per temperature the mean entropy of softmax(z / T)
(ln 10 = 2.30 nats is uniform over 10 classes) and the mean entropy of the wrong classes'
renormalized distribution relative to uniform (1.0: the wrong classes are told apart no better
than by chance, the "dark knowledge" a student could learn is absent).

    python benchmarks/teacher_targets.py NAME=CHECKPOINT [NAME=CHECKPOINT ...] --name teacher_targets
Results: benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TEMPERATURES = (1.0, 2.0, 4.0)


def measure(ckpt: Path) -> dict:
    import torch

    from edgekd.distill import InputSpec, predict_logits
    from edgekd.checkpoint import load_model
    from edgekd.export import resolve_data

    model, meta = load_model(ckpt)
    data = resolve_data(ckpt, None)
    spec = InputSpec(int(meta["in_channels"]), tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    z = predict_logits(model, data.val_x, spec, "cpu")
    y = data.val_y
    k = z.shape[1]
    row = {"checkpoint": str(ckpt), "val_images": len(y), "val_acc": float((z.argmax(1) == y).float().mean() * 100),
           "p_true_T1": float(torch.softmax(z, 1).gather(1, y[:, None]).mean())}
    wrong = torch.ones_like(z, dtype=torch.bool).scatter_(1, y[:, None], False)
    for t in TEMPERATURES:
        p = torch.softmax(z / t, 1)
        row[f"entropy_T{t:g}"] = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
        q = p[wrong].view(len(y), k - 1)
        q = q / q.sum(1, keepdim=True)
        row[f"wrong_class_entropy_ratio_T{t:g}"] = float((-(q * q.clamp_min(1e-12).log()).sum(1) / math.log(k - 1)).mean())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teachers", nargs="+", help="NAME=CHECKPOINT")
    ap.add_argument("--name", default="teacher_targets")
    args = ap.parse_args()
    rows = {}
    for spec in args.teachers:
        name, ckpt = spec.split("=", 1)
        rows[name] = measure(Path(ckpt))
        print(name, json.dumps(rows[name]), flush=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = "".join(f" entropy T{t:g} |" for t in TEMPERATURES) + "".join(f" wrong-class entropy / uniform, T{t:g} |" for t in TEMPERATURES)
    lines = ["# How much each teacher's soft targets say", "",
             f"`python benchmarks/teacher_targets.py {' '.join(args.teachers)} --name {args.name}`", "",
             "On the validation split. Entropy in nats (ln 10 = 2.30 is uniform over 10 classes). Wrong-class entropy / "
             "uniform: 1.0 means the teacher tells the wrong classes apart no better than chance.", "",
             f"| teacher | val top-1 | p(true), T1 |{cols}", "|---|---:|---:|" + "---:|" * (2 * len(TEMPERATURES))]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['val_acc']:.2f} | {r['p_true_T1']:.3f} |"
                     + "".join(f" {r[f'entropy_T{t:g}']:.3f} |" for t in TEMPERATURES)
                     + "".join(f" {r[f'wrong_class_entropy_ratio_T{t:g}']:.3f} |" for t in TEMPERATURES))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
