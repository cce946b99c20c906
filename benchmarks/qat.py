"""Post-training int8 against quantization-aware fine-tuning (``edgekd quantize --qat``), model by model.

For each checkpoint: ``edgekd.quantize`` without and with ``--qat EPOCHS`` (same calibration, same
target), and per format (ONNX via onnxruntime, TFLite via onnx2tf) the fp32 and int8 test accuracy,
the drop, what QAT's validation said before and after fine-tuning (fake-quantized), and the time
QAT took. Test accuracy is read once per file; QAT chose its epoch on validation. Resumable: a
model already in the results file is not run again.

    python benchmarks/qat.py NAME=CHECKPOINT [NAME=CHECKPOINT ...] [--epochs 3] [--name qat]
Results: benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_model(ckpt: Path, epochs: int) -> dict:
    from edgekd.quantize import quantize

    row: dict = {"checkpoint": str(ckpt)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ptq = quantize(ckpt, out_dir=Path(tmp) / "ptq")
        row["ptq_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        qat = quantize(ckpt, qat_epochs=epochs, out_dir=Path(tmp) / "qat")
        row["qat_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        control = float_finetune_control(ckpt, epochs, Path(tmp) / "control")
        row["control_s"] = round(time.perf_counter() - t0, 1)
    row["qat"] = qat.qat
    row["control"] = {m.format: m.int8_test_acc for m in control.models}
    row["control_fp32"] = {m.format: m.fp32_test_acc for m in control.models}
    row["formats"] = {m.format: {"fp32": m.fp32_test_acc, "ptq_int8": m.int8_test_acc, "ptq_drop": m.drop_pts}
                      for m in ptq.models}
    for m in qat.models:
        row["formats"][m.format].update({"qat_int8": m.int8_test_acc, "qat_drop": m.drop_pts,
                                         "control_int8": row["control"][m.format]})
    return row


def float_finetune_control(ckpt: Path, epochs: int, folder: Path):
    """The same fine-tune (epochs, teacher, optimizer, augmentation) without fake quantization, then
    post-training int8: what QAT's extra epochs would give without simulating int8."""
    import shutil

    import edgekd.qat as qat
    from edgekd import rundir
    from edgekd.checkpoint import load_model, save_checkpoint
    from edgekd.export import resolve_data
    from edgekd.quantize import qat_teacher, recorded_augmentation, quantize

    model, meta = load_model(ckpt)
    data = resolve_data(ckpt, None)
    teacher, name = qat_teacher(ckpt, data, None)
    settings = qat.QATSettings(epochs=epochs, fake_quant=False, **recorded_augmentation(ckpt, data))
    tuned, _ = qat.finetune(model, meta, data, teacher, name, settings)
    folder.mkdir(parents=True)
    shutil.copyfile(rundir.config_file(rundir.run_of(ckpt)), rundir.config_file(folder))
    save_checkpoint(rundir.best(folder), tuned, meta)
    return quantize(rundir.best(folder), data=data, out_dir=folder / "q")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--name", default="qat")
    args = ap.parse_args()
    path = RESULTS / f"{args.name}.json"
    done = json.loads(path.read_text())["models"] if path.is_file() else {}
    for spec in args.models:
        name, ckpt = spec.split("=", 1)
        if name in done:
            continue
        done[name] = run_model(Path(ckpt), args.epochs)
        print(name, json.dumps(done[name]["formats"]), flush=True)
        path.write_text(json.dumps({"epochs": args.epochs, "models": done}, indent=2) + "\n")
        write_md(args, done)


def write_md(args, done: dict) -> None:
    cmd = f"python benchmarks/qat.py {' '.join(args.models)} --epochs {args.epochs} --name {args.name}"
    lines = ["# Post-training int8 against quantization-aware fine-tuning", "", f"`{cmd}`", "",
             "Top-1 on the test split in percent; drop = fp32 - int8 in points, against the original fp32 model. "
             "Control: the same fine-tune (epochs, teacher, optimizer, augmentation) without fake quantization, then "
             "post-training int8: the part of QAT's result that extra epochs alone give. QAT: validation accuracy with "
             "fake quantization before and after fine-tuning, the epoch kept (0 = none beat the rounded start), seconds.", "",
             "| model | format | fp32 | PTQ int8 | PTQ drop | control int8 | QAT int8 | QAT drop | QAT - control | QAT val before -> after (epoch kept) | QAT s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, row in done.items():
        q = row["qat"]
        for fmt, f in row["formats"].items():
            lines.append(f"| {name} | {fmt} | {f['fp32']:.2f} | {f['ptq_int8']:.2f} | {f['ptq_drop']:+.2f} | "
                         f"{f['control_int8']:.2f} | {f['qat_int8']:.2f} | {f['qat_drop']:+.2f} | {f['qat_int8'] - f['control_int8']:+.2f} | "
                         f"{q['val_acc_before']:.2f} -> {q['val_acc_after']:.2f} "
                         f"({q['best_epoch']}) | {q['seconds']:.0f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
