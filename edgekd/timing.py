"""Ground floor: latency statistics and the timing loop every stage uses (bench, quantize's choice of
activation type, the benchmarks). Imports nothing of edgekd's."""

from __future__ import annotations

import time
from dataclasses import dataclass
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
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])  # linear interpolation, as numpy's default
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
