import time

import numpy as np

from edgekd.bench import LatencyStats, time_calls


def test_percentile_arithmetic():
    s = LatencyStats.from_seconds([i / 1000 for i in range(1, 101)], threads=1)  # 1..100 ms
    assert s.runs == 100 and s.threads == 1
    assert np.isclose(s.p50_ms, 50.5) and np.isclose(s.p90_ms, 90.1) and np.isclose(s.p99_ms, 99.01)
    assert np.isclose(s.mean_ms, 50.5) and np.isclose(s.std_ms, np.std(np.arange(1, 101)))
    assert s.p50_ms <= s.p90_ms <= s.p99_ms


def test_time_calls_meets_both_run_count_and_duration():
    calls = []
    stats = time_calls(lambda: calls.append(time.sleep(0.001)), warmup=3, min_runs=5, min_seconds=0.05)
    assert stats.runs >= 5 and len(calls) == stats.runs + 3
    assert stats.runs * stats.mean_ms >= 50 * 0.9  # at least ~min_seconds were timed
    assert 0.9 <= stats.p50_ms < 50
    quick = time_calls(lambda: None, warmup=0, min_runs=60, min_seconds=0.0)
    assert quick.runs == 60
