"""Batch-1 latency of two export folders, file by file, interleaved: is B faster than A?

For each model file present in both folders (model.onnx, model_int8.onnx, model_fp32.tflite,
model_int8.tflite), rounds alternate A B then B A through edgekd's own runtimes (1 thread, p50 of
single-image runs after warm-up), and the B/A ratio is taken within each round; the table gives
the median p50 and the median ratio, so machine drift cancels.

    python benchmarks/latency_ab.py BEFORE/export AFTER/export --rounds 5 --name stem_bn \\
        --what "A: stem batch norm left unfused; B: folded into the stem convolution"

Results: benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("model.onnx", "model_int8.onnx", "model_fp32.tflite", "model_int8.tflite")


def p50_ms(path: Path, threads: int, runs: int) -> float:
    import numpy as np

    from edgekd.runtime import load_runtime
    from edgekd.timing import time_calls

    loaded = load_runtime(path, threads)
    x = np.random.default_rng(0).random((1, loaded.channels, *loaded.input_size), dtype=np.float32)
    return time_calls(loaded.single(x), warmup=20, min_runs=runs, min_seconds=0.5).p50_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="export folder A (the baseline)")
    ap.add_argument("b", type=Path, help="export folder B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per file per round (at least)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", required=True, help="results/NAME.json and .md")
    ap.add_argument("--what", default="", help="one line: what differs between A and B")
    args = ap.parse_args()
    files = [f for f in FILES if (args.a / f).is_file() and (args.b / f).is_file()]
    if not files:
        raise SystemExit(f"no model file of {', '.join(FILES)} is in both {args.a} and {args.b}")
    raw = {f: {"a": [], "b": []} for f in files}
    for r in range(args.rounds):
        for f in files:
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            for side in order:
                raw[f][side].append(p50_ms(getattr(args, side) / f, args.threads, args.runs))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    ratios = {f: [b / a for a, b in zip(v["a"], v["b"])] for f, v in raw.items()}
    rows = {f: {"a_p50_ms": statistics.median(v["a"]), "b_p50_ms": statistics.median(v["b"]),
                "b_over_a": statistics.median(ratios[f]), "b_over_a_range": [min(ratios[f]), max(ratios[f])],
                "raw": v} for f, v in raw.items()}
    cmd = (f"python benchmarks/latency_ab.py {args.a} {args.b} --rounds {args.rounds} --runs {args.runs} "
           f"--threads {args.threads} --name {args.name}")
    out = {"command": cmd, "what": args.what, "threads": args.threads, "rounds": args.rounds, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Batch-1 latency, A against B: {args.name}", "", f"`{cmd}`", ""]
    if args.what:
        lines += [args.what, ""]
    lines += [f"{args.threads} thread(s), p50 of single-image runs; {args.rounds} rounds alternating A B / B A; "
              "median over rounds, ratio taken within each round.", "",
              "| file | A p50 ms | B p50 ms | B / A (median, range) |", "|---|---:|---:|---:|"]
    for f, row in rows.items():
        lo, hi = row["b_over_a_range"]
        lines.append(f"| {f} | {row['a_p50_ms']:.3f} | {row['b_p50_ms']:.3f} | **{row['b_over_a']:.2f}x** ({lo:.2f}-{hi:.2f}) |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))


if __name__ == "__main__":
    main()
