"""Stage 4 building blocks: batch-1 latency of a model through its own runtime.

Timing follows LiteRT's benchmark_model and onnxruntime_perf_test: warm-up runs first, then
at least ``min_runs`` timed runs and at least ``min_seconds`` of them, one image at a time,
with the runtime's thread count fixed and reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float

    @classmethod
    def from_seconds(cls, seconds: list[float], threads: int) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(len(ms), threads, float(p50), float(p90), float(p99), float(ms.mean()), float(ms.std()))


def time_calls(fn: Callable[[], object], *, warmup: int = 10, min_runs: int = 50, min_seconds: float = 1.0,
               threads: int = 1) -> LatencyStats:
    """Call ``fn`` ``warmup`` times, then time calls until both ``min_runs`` and ``min_seconds`` are met."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return LatencyStats.from_seconds(times, threads)


def latency_fn(path: str | Path, x_nchw: np.ndarray, threads: int = 1) -> Callable[[], object]:
    """A zero-argument call running one image through the file's runtime (.pt, .onnx, .tflite)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from edgekd.export import onnx_session

        sess = onnx_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: x_nchw})
    if path.suffix == ".tflite":
        from edgekd.export import TFLiteRunner, nhwc_array

        runner = TFLiteRunner(path, threads)
        x = nhwc_array(x_nchw)

        def invoke():
            runner.set_input(x)
            runner.interp.invoke()
            return runner.get_output()

        return invoke
    import torch

    from edgekd.checkpoint import load_model
    from edgekd.export import Deployable

    torch.set_num_threads(threads)
    model, meta = load_model(path)
    net = Deployable(model, meta["mean"], meta["std"]).eval()
    xt = torch.from_numpy(x_nchw)

    def forward():
        with torch.inference_mode():
            return net(xt)

    return forward
