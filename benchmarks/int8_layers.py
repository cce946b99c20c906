"""Where int8 ONNX gains and where it does not: fp32 against int8, by output size, at several input sizes.

The architecture matrix (results/arch_matrix.md) measured torchvision's ResNet-18 at 32x32 pixels with int8 at
0.67x of fp32 in onnxruntime, where edge_resnet_s got 0.43x. This benchmark asks why: it exports the network at
several input sizes with edgekd's exporter, quantizes it as edgekd does (onnxruntime static QDQ, per-channel int8
weights, uint8 activations, no reduced range: `edgekd quantize`'s default target), and times both files in
onnxruntime at 1 thread, alternating fp32 and int8 for several rounds. onnxruntime's profiler then splits each
file's kernel time by the spatial size of each kernel's output (ResNet-18's stages run at 1/2, 1/4 ... 1/32 of the
input), so the sizes where int8 kernels gain nothing show.

Random weights and pixels: the kernels' speed does not depend on the values.

    python benchmarks/int8_layers.py                      # resnet18 at 32, 64 and 128 pixels
    python benchmarks/int8_layers.py --arch edge_resnet_s --sizes 32
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.convert import to_onnx
from edgekd.runtime import onnx_session
from edgekd.zoo import build_model, model_cost

RESULTS = Path(__file__).resolve().parent / "results"


def make_files(arch: str, size: int, folder: Path) -> tuple[Path, Path, int]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    torch.manual_seed(0)
    net = build_model(arch, 10, 3, (size, size)).eval()
    macs = model_cost(net, 3, (size, size))[1]
    x = torch.rand(16, 3, size, size)
    fp32 = to_onnx(net, x, folder / f"{size}.onnx")
    pre = folder / f"{size}.pre.onnx"
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 1].numpy()} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    int8 = folder / f"{size}_int8.onnx"
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=False)
    return fp32, int8, macs


def p50_ms(session, x: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(20):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def group_of(event: dict) -> str:
    """A kernel's group: the spatial size of its output (square inputs, so the two equal dimensions of a 4-D or
    NCHWc 5-D shape, whatever the layout onnxruntime chose), or "head" for what has no image left."""
    shapes = event["args"].get("output_type_shape") or [{}]
    dims = next(iter(shapes[0].values()), [])
    pairs = [dims[i] for i in range(1, len(dims) - 1) if dims[i] == dims[i + 1]] if len(dims) >= 4 else []
    return f"{pairs[0]}x{pairs[0]}" if pairs else "head"


def profile_by_group(path: Path, x: np.ndarray, runs: int) -> dict[str, float]:
    """Mean microseconds per inference spent in the kernels of each output size (onnxruntime's node profile)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[group_of(e)] += e["dur"]
    return {g: t / runs for g, t in totals.items()}


def measure(arch: str, size: int, rounds: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8, macs = make_files(arch, size, Path(tmp))
        sessions = {"fp32": onnx_session(fp32, threads=1), "int8": onnx_session(int8, threads=1)}
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        p50 = {"fp32": [], "int8": []}
        for _ in range(rounds):  # alternating, so that drift on a shared machine hits both
            for kind, session in sessions.items():
                p50[kind].append(p50_ms(session, x, runs))
        groups = {kind: profile_by_group(path, x, runs) for kind, path in (("fp32", fp32), ("int8", int8))}
    ratios = [i / f for f, i in zip(p50["fp32"], p50["int8"])]
    return {"arch": arch, "size": size, "macs": macs, "p50_ms": p50, "ratio_median": statistics.median(ratios),
            "ratios": ratios, "groups_us": groups}


def render(rows: list[dict], command: str) -> str:
    lines = ["# int8 against fp32 in onnxruntime, by output size", "",
             f"Command: `{command}`. 1 thread, batch 1, onnxruntime's CPU provider on this 2-core x86 CPU (AVX512-VNNI); "
             "fp32 and int8 alternate, each round a median over its runs; the ratio is the median of the rounds' ratios. "
             "Per-group times come from onnxruntime's node profiler (kernel time only, so they sum to less than p50).", "",
             "| network | input | MACs | fp32 p50 ms | int8 p50 ms | int8 / fp32 (rounds) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['size']} px | {r['macs'] / 1e6:.1f} M | {statistics.median(r['p50_ms']['fp32']):.3f} | "
                     f"{statistics.median(r['p50_ms']['int8']):.3f} | **{r['ratio_median']:.2f}x** "
                     f"({', '.join(f'{q:.2f}' for q in r['ratios'])}) |")
    lines += ["", "| network | input | kernels whose output is | fp32 us | int8 us | int8 / fp32 |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        g = r["groups_us"]
        for name in sorted(set(g["fp32"]) | set(g["int8"]), key=lambda n: (n == "head", -int(n.split("x")[0]) if "x" in n else 0)):
            f, i = g["fp32"].get(name, 0.0), g["int8"].get(name, 0.0)
            lines.append(f"| {r['arch']} | {r['size']} px | {name} | {f:.0f} | {i:.0f} | {i / f:.2f}x |" if f else
                         f"| {r['arch']} | {r['size']} px | {name} | 0 | {i:.0f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200, help="inferences a round, per file")
    ap.add_argument("--name", default="int8_layers")
    args = ap.parse_args()
    rows = [measure(args.arch, size, args.rounds, args.runs) for size in args.sizes]
    command = (f"python benchmarks/int8_layers.py --arch {args.arch} --sizes {' '.join(map(str, args.sizes))} "
               f"--rounds {args.rounds} --runs {args.runs}")
    import onnxruntime

    env = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "machine": platform.machine(),
           "recorded": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(rows, command))
    print(render(rows, command))


if __name__ == "__main__":
    main()
