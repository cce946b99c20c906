"""Why a network loses accuracy in post-training int8: weights or activations, and which activations.

    edgekd export runs/arch_matrix_cifar10/torchvision_efficientnet_b0/best.pt
    python benchmarks/int8_activations.py runs/arch_matrix_cifar10/torchvision_efficientnet_b0/best.pt \
        --name int8_activations_efficientnet_b0

Takes the fp32 ONNX file beside the checkpoint (``export/model.onnx``) and quantizes it with onnxruntime as
``edgekd quantize`` does (static QDQ, per-channel int8 weights, uint8 activations, 300 calibration images from
the training split), then changes one thing at a time: the activation calibration (min/max, percentiles) and the
activation width (16 bits, weights still int8). Accuracy is on the whole validation split: the test split is not
read. Then it lists the activation tensors whose min/max range is widest against their 99.9th percentile, with the
share of their values that a uint8 grid over the min/max range rounds to zero.
Results: benchmarks/results/NAME.json and .md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 300


def variants():
    from onnxruntime.quantization import CalibrationMethod, QuantType

    pct = CalibrationMethod.Percentile
    return {
        "int8 weights, uint8 activations, min/max (edgekd's default)": {},
        "activations calibrated to the 99.999th percentile": dict(calibrate_method=pct),
        "activations calibrated to the 99.99th percentile": dict(calibrate_method=pct, extra_options={"CalibPercentile": 99.99}),
        "activations calibrated to the 99.9th percentile": dict(calibrate_method=pct, extra_options={"CalibPercentile": 99.9}),
        "int8 weights, 16-bit activations (min/max)": dict(activation_type=QuantType.QUInt16),
    }


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    s = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    out = np.concatenate([s.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return float((out.argmax(1) == y).mean() * 100)


def widest_activations(pre: Path, calib: np.ndarray, top: int = 12) -> list[dict]:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(pre))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    names = list(producer)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = []
    for name, v in zip(names, s.run(None, {s.get_inputs()[0].name: calib})):
        v = np.asarray(v, dtype=np.float64).ravel()
        if v.size < 100:
            continue
        lo, hi, p999 = float(v.min()), float(v.max()), float(np.percentile(np.abs(v), 99.9))
        step = (hi - lo) / 255
        rows.append({"tensor": name, "op": producer[name], "min": lo, "max": hi, "abs_p99.9": p999,
                     "range_over_p99.9": (hi - lo) / max(p999, 1e-12), "rounded_to_zero": float(np.mean(np.abs(v) < step / 2))})
    return sorted(rows, key=lambda r: -r["range_over_p99.9"])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--name", required=True, help="results/NAME.json and .md")
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekd.export import resolve_data

    fp32 = args.checkpoint.parent / "export" / "model.onnx"
    if not fp32.is_file():
        raise SystemExit(f"{fp32} is missing: run `edgekd export {args.checkpoint}` first")
    data = resolve_data(args.checkpoint, None)
    pick = np.random.default_rng(0).choice(len(data.train_x), min(CALIB, len(data.train_x)), replace=False)
    calib = (data.train_x[np.sort(pick)].float() / 255).numpy()
    vx, vy = (data.val_x.float() / 255).numpy(), data.val_y.numpy()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 50]} for i in range(0, len(calib), 50)])

        def get_next(self):
            return next(self.batches, None)

    rows = {"fp32": accuracy(fp32, vx, vy)}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        for label, kw in variants().items():
            out = Path(tmp) / "q.onnx"
            settings = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8) | kw
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **settings)
            rows[label] = accuracy(out, vx, vy)
            print(f"{label}: {rows[label]:.2f}% (drop {rows['fp32'] - rows[label]:+.2f})", flush=True)
        wide = widest_activations(pre, calib)

    cmd = f"python benchmarks/int8_activations.py {args.checkpoint} --name {args.name}"
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "val_images": len(vy), "calibration_images": len(calib),
                                                           "val_acc": rows, "widest_activations": wide}, indent=1) + "\n")
    lines = [f"# Post-training int8: weights or activations? (`{args.checkpoint}`)", "", f"`{cmd}`", "",
             f"onnxruntime static QDQ, per-channel int8 weights, {len(calib)} calibration images from the training split; "
             f"top-1 on the whole validation split ({len(vy):,} images; the test split is not read).", "",
             "| quantization | val top-1 | drop |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {rows['fp32'] - v:+.2f} |" for k, v in rows.items()]
    lines += ["", "Activation tensors with the widest min/max range against their 99.9th percentile of |x| (on the "
              "calibration images); *rounded to zero*: the share of their values within half a uint8 step of zero "
              "when the grid spans min..max.", "",
              "| tensor | op | min | max | 99.9th pct of abs | range / pct | rounded to zero |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| `{r['tensor']}` | {r['op']} | {r['min']:.2f} | {r['max']:.2f} | {r['abs_p99.9']:.2f} | "
              f"{r['range_over_p99.9']:.1f} | {100 * r['rounded_to_zero']:.0f}% |" for r in wide]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
