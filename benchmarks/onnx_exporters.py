"""Which ONNX exporter edgekd uses: torch.export-based (``dynamo=True``) against TorchScript-based (``dynamo=False``).

For each model, both exporters write the deployable network (normalization folded in) with edgekd's
settings (named input/output, opset 17, dynamic batch); each file is checked by onnx's full checker,
run by onnxruntime on the same 64 random inputs and compared with PyTorch (max |logit diff|, top-1
agreement). The export wall time (median of ``--runs``), the file size and whether the int8 path
(onnxruntime's quant_pre_process) accepts the file are recorded. Exporters alternate (A B A B) so
machine drift reaches both alike.

The torch.export-based exporter needs onnxscript (in edgekd's `onnx` extra):
    python benchmarks/onnx_exporters.py
Results: benchmarks/results/onnx_exporters.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_exporters"
MODELS = [("seed002_student", 3, 32), ("edge_resnet_s", 3, 32), ("torchvision:mobilenet_v3_small", 3, 32)]


def export_once(net, x, path: Path, dynamo: bool) -> tuple[float, str | None]:
    import onnx

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # one self-contained file, as edgekd ships (the torch.export-based exporter otherwise
            # writes the weights to a separate .onnx.data file)
            extra = {"external_data": False} if dynamo else {}
            torch.onnx.export(net, (x[:1],), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=dynamo, **extra)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return time.perf_counter() - t0, None


def check(path: Path, x: torch.Tensor, ref: np.ndarray) -> dict:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekd.runtime import run_onnx

    import onnx

    out = run_onnx(path, x.numpy())
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    row = {"opset": opset, "files": sorted(p.name.split("-", 1)[1] for p in path.parent.glob(path.name + "*")),"max_abs_diff": float(np.abs(out - ref).max()), "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean() * 100),
           "size_bytes": path.stat().st_size}
    try:
        quant_pre_process(str(path), str(path.with_suffix(".pre.onnx")))
        row["quant_pre_process"] = "ok"
    except Exception as exc:  # noqa: BLE001
        row["quant_pre_process"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def main() -> None:
    from edgekd.deployable import deploy_net, rgb
    from edgekd.zoo import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for arch, channels, size in MODELS:
        model = build_model(arch, 10, channels, (size, size)).eval()
        meta = {"in_channels": channels, "input_size": [size, size], "mean": [0.5] * channels, "std": [0.25] * channels}
        net, _ = deploy_net(model, meta)
        x = rgb(torch.rand(64, channels, size, size))
        with torch.no_grad():
            ref = net(x).numpy()
        times: dict[str, list[float]] = {"torchscript": [], "torch.export": []}
        result: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.runs):
                for name, dynamo in (("torchscript", False), ("torch.export", True)):
                    path = Path(tmp) / f"{name}-{r}.onnx"
                    seconds, error = export_once(net, x, path, dynamo)
                    times[name].append(seconds)
                    if r == 0:
                        result[name] = {"error": error} if error else check(path, x, ref)
        for name in times:
            rows.append({"model": arch, "exporter": name, "export_s_median": statistics.median(times[name]),
                         "export_s_all": [round(t, 2) for t in times[name]], **result[name]})
            print(json.dumps(rows[-1]), flush=True)
    env = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "recorded": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import onnxscript
        env["onnxscript"] = onnxscript.__version__
    except ImportError:
        env["onnxscript"] = None
    RESULTS.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = ["# ONNX exporters: torch.export-based against TorchScript-based", "",
             f"Command: `python benchmarks/onnx_exporters.py`. torch {env['torch']}, onnxscript {env['onnxscript']}, {env['recorded']}. Exporters alternated, "
             f"{args.runs} exports each; the deployable network of an untrained model, 64 random inputs.", "",
             "| model | exporter | export s (median) | runs | opset | max abs diff | top-1 agreement | size | quant_pre_process |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['exporter']} | {r['export_s_median']:.2f} | {r['export_s_all']} | failed: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['exporter']} | {r['export_s_median']:.2f} | {r['export_s_all']} | "
                         f"{r['opset']} | {r['max_abs_diff']:.1e} | {r['top1_agreement']:.1f}% | {r['size_bytes'] / 1024:,.0f} KiB | {r['quant_pre_process']} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
