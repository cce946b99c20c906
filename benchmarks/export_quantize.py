"""Size, top-1 and batch-1 latency (1 thread) of PyTorch, ONNX fp32/int8 and TFLite fp32/int8.

For each checkpoint: `edgekd.quantize` exports and quantizes it (ONNX via onnxruntime QDQ,
TFLite via onnx2tf full-integer with float I/O), evaluates every file on the full test split
through its own runtime, then each file's latency is timed here, one image at a time, with
warm-up, at least 200 runs and 2 s, median (p50) reported, repeated 3 times (median of medians).

Usage:
    python benchmarks/export_quantize.py NAME=CHECKPOINT [NAME=CHECKPOINT ...]
Results are merged into benchmarks/results/export_quantize.json and printed as Markdown.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "export_quantize.json"


def measure(name: str, checkpoint: Path) -> dict:
    import numpy as np
    import torch

    from edgekd.runtime import latency_fn
    from edgekd.timing import time_calls
    from edgekd.checkpoint import load_model
    from edgekd.deployable import Deployable, model_input
    from edgekd.export import resolve_data
    from edgekd.quantize import quantize

    out = checkpoint.parent / "bench-export"
    res = quantize(checkpoint, calib_size=300, out_dir=out)
    model, meta = load_model(checkpoint)
    data = resolve_data(checkpoint, None)
    test_x = model_input(meta, data.test_x)
    with torch.no_grad():
        net = Deployable(model, meta["mean"], meta["std"]).eval()
        torch_acc = float((torch.cat([net(test_x[i:i + 512]) for i in range(0, len(test_x), 512)]).argmax(1)
                           == data.test_y).float().mean() * 100)
    x1 = test_x[:1].numpy()
    rows = {"pytorch": {"file": str(checkpoint), "size_bytes": checkpoint.stat().st_size, "test_acc": torch_acc}}
    for m in res.models:
        rows[f"{m.format}-fp32"] = {"file": str(m.fp32.path), "size_bytes": m.fp32.size_bytes, "test_acc": m.fp32_test_acc}
        rows[f"{m.format}-int8"] = {"file": str(m.int8.path), "size_bytes": m.int8.size_bytes, "test_acc": m.int8_test_acc,
                                    "quantized_ops": m.quantized_ops, "float_compute_ops": m.float_compute_ops,
                                    "choice": m.choice}
    for key, row in rows.items():
        p50s = []
        for _ in range(3):
            fn = latency_fn(row["file"], x1, threads=1)
            p50s.append(time_calls(fn, warmup=20, min_runs=200, min_seconds=2.0).p50_ms)
        row["latency_p50_ms"] = statistics.median(p50s)
        row["latency_p50_ms_repeats"] = p50s
    for fmt in ("onnx", "tflite"):
        fp32, int8 = rows[f"{fmt}-fp32"], rows[f"{fmt}-int8"]
        int8["size_ratio_vs_fp32"] = int8["size_bytes"] / fp32["size_bytes"]
        int8["latency_ratio_vs_fp32"] = int8["latency_p50_ms"] / fp32["latency_p50_ms"]
        int8["drop_pts_vs_fp32"] = fp32["test_acc"] - int8["test_acc"]
    return {"checkpoint": str(checkpoint), "params": sum(p.numel() for p in model.parameters()),
            "test_images": len(data.test_y), "variants": rows, "recorded": time.strftime("%Y-%m-%d %H:%M")}


def markdown(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines += [f"### {name} ({r['params']:,} params, {r['test_images']:,} test images)", "",
                  "| variant | size | top-1 | p50 latency (1 thread) | int8 vs fp32: size | latency | top-1 drop |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, v in r["variants"].items():
            ratios = ("| {:.2f}x | {:.2f}x | {:+.2f} pts".format(v["size_ratio_vs_fp32"], v["latency_ratio_vs_fp32"],
                                                              v["drop_pts_vs_fp32"]) if "size_ratio_vs_fp32" in v else "| | |")
            lines.append(f"| {key} | {v['size_bytes'] / 1024:,.1f} KiB | {v['test_acc']:.2f}% | {v['latency_p50_ms']:.3f} ms {ratios} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("=")
        results[name] = measure(name, Path(path))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
