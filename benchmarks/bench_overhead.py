"""Does `edgekd bench` measure the model or itself? Its reported p50 against a bare runtime loop.

For the same file and the same input, two timers alternate, nine rounds each:
- bare: the runtime called directly in a Python loop (onnxruntime ``sess.run`` with a prebuilt
  feed; LiteRT ``set_tensor``/``invoke``/``get_tensor``), 10 warm-up calls, then at least 50
  calls and 1 s, p50 of ``perf_counter`` deltas;
- edgekd: ``edgekd.runtime.load_runtime(path).single(x)`` timed by ``edgekd.timing.time_calls`` with
  the same settings (what `edgekd bench` reports).
Reported: the median over rounds of each p50 and their ratio (edgekd / bare). Target: within 5%.

Models: untrained seed002_student (268k params) and edge_resnet_s (264k) at 32x32x3, exported
to ONNX and TFLite fp32 by edgekd (latency does not depend on the weights' values), 1 thread.

Usage: python benchmarks/bench_overhead.py   (writes benchmarks/results/bench_overhead.{json,md})
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROUNDS, WARMUP, MIN_RUNS, MIN_SECONDS = 9, 10, 50, 1.0


def bare_p50(fn) -> float:
    for _ in range(WARMUP):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < MIN_SECONDS:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.asarray(times) * 1e3, 50))


def bare_call(path: Path, x_nchw: np.ndarray):
    if path.suffix == ".onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x_nchw}
        return lambda: sess.run(None, feed)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))

    def run():
        interp.set_tensor(i, x)
        interp.invoke()
        return interp.get_tensor(o)

    return run


def build_files(arch: str, folder: Path) -> list[Path]:
    import torch

    from edgekd.deployable import Deployable

    from edgekd.convert import onnx_to_tflite, to_onnx
    from edgekd.zoo import build_model

    net = Deployable(build_model(arch, 10, 3, (32, 32)), [0.5] * 3, [0.25] * 3).eval()
    onnx_path = to_onnx(net, torch.rand(2, 3, 32, 32), folder / f"{arch}.onnx")
    tfl = onnx_to_tflite(onnx_path, folder / f"{arch}-tf")["float32"]
    return [onnx_path, tfl]


def main() -> None:
    from edgekd.bench import environment
    from edgekd.runtime import load_runtime
    from edgekd.timing import time_calls

    rows = []
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("seed002_student", "edge_resnet_s"):
            for path in build_files(arch, Path(tmp)):
                bare, edgekd = [], []
                for _ in range(ROUNDS):
                    bare.append(bare_p50(bare_call(path, x)))
                    loaded = load_runtime(path, threads=1)
                    edgekd.append(time_calls(loaded.single(x), warmup=WARMUP, min_runs=MIN_RUNS,
                                             min_seconds=MIN_SECONDS).p50_ms)
                b, e = statistics.median(bare), statistics.median(edgekd)
                rows.append({"model": arch, "format": path.suffix[1:], "bare_p50_ms": b, "edgekd_p50_ms": e,
                             "ratio": e / b, "bare_rounds_ms": bare, "edgekd_rounds_ms": edgekd})
                print(f"{arch:16s} {path.suffix[1:]:7s} bare {b:.4f} ms  edgekd {e:.4f} ms  ratio {e / b:.3f}", flush=True)
    env = environment()
    out = ROOT / "benchmarks" / "results"
    (out / "bench_overhead.json").write_text(json.dumps({"settings": {"rounds": ROUNDS, "warmup": WARMUP,
                                                        "min_runs": MIN_RUNS, "min_seconds": MIN_SECONDS,
                                                        "threads": 1}, "env": env, "rows": rows}, indent=2) + "\n")
    lines = ["# edgekd bench harness overhead", "",
             "Command: `python benchmarks/bench_overhead.py`. Batch 1, 1 thread, median over "
             f"{ROUNDS} alternating rounds of each timer's p50 (10 warm-up calls, >= 50 calls and >= 1 s per round).",
             f"CPU: {env['cpu']}.", "",
             "| model | format | bare loop p50 (ms) | edgekd bench p50 (ms) | edgekd / bare |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['format']} | {r['bare_p50_ms']:.4f} | {r['edgekd_p50_ms']:.4f} | {r['ratio']:.3f} |"
              for r in rows]
    (out / "bench_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
