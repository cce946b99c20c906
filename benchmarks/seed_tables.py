"""Markdown tables of the seed-config runs made by benchmarks/seed_configs.sh.

Reads runs/<seed>/summary.json (training) and runs/<seed>/bench/bench.json (every model and file
through its own runtime) and writes benchmarks/results/seed_configs.md, which the README quotes.
    python benchmarks/seed_tables.py seed002 seed001 seed000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables(name: str) -> str:
    run = ROOT / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    bench = json.loads((run / "bench" / "bench.json").read_text())
    timing = [ln for ln in (ROOT / "benchmarks" / "results" / "seed_configs.txt").read_text().splitlines()
              if ln.startswith(f"{name}:")]
    out = [f"### {name}", "", f"Command and wall-clock time: `{timing[0].split(': ', 2)[2]}` ({timing[0].split(': ')[1]})"
           if timing else "", "",
           "| model | role | arch | params | epochs | best val | train acc at best val (gap) | test top-1 | train time |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(summary["models"], key=lambda m: -m["test_acc"]):
        cfg = json.loads((Path(m["out_dir"]) / "config.json").read_text())
        best = max(json.loads((Path(m["out_dir"]) / "history.json").read_text()), key=lambda h: h["val_acc"])
        out.append(f"| {m['name']} | {m['role']} | {m['arch']} | {m['params']:,} | {cfg['recipe']['epochs']} | "
                   f"{m['val_acc']:.2f}% | {best['train_acc']:.2f}% ({best['train_acc'] - best['val_acc']:+.2f}) | "
                   f"{m['test_acc']:.2f}% | {m['train_s']:.0f} s |")
    t = bench["teacher"]
    out += ["", f"Every model and file on the {bench['data']['test_images']:,} test images through its own runtime; "
            f"latency batch 1, {bench['settings']['threads']} thread; reference teacher {t}:", "",
            "| model | runtime | size | top-1 | agreement with teacher | p50 ms | size reduction | compression | speed-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ok = sorted((m for m in bench["models"] if m["status"] == "ok"), key=lambda m: -m["top1"])
    for m in ok:
        d = m["vs_teacher"]
        out.append(f"| {m['name']} | {m['format']} {m['precision']} | {m['size_bytes'] / 1024:,.1f} KiB | {m['top1']:.2f}% | "
                   f"{m['agreement']:.1f}% | {m['latency']['p50_ms']:.3f} | "
                   + (f"{d['size_reduction_pct']:.1f}% | {d['compression']:.2f}x | {d['speedup']:.1f}x |" if d else "- | - | - |"))
    inits = [f"- {m['name']}: {m['init']}" for m in bench["models"] if m.get("init")]
    out += ["", *inits] if inits else []
    bundle = json.loads((run / "bundle" / "model.json").read_text()) if (run / "bundle" / "model.json").is_file() else None
    if bundle:
        checks = ", ".join(f"{c['check']} {'ok' if c['ok'] else 'FAILED'}" for c in bundle["verification"])
        out += ["", f"Bundle `runs/{name}/bundle/` ({bundle['status']}): {checks}."]
    return "\n".join(out) + "\n"


def main() -> None:
    names = sys.argv[1:] or ["seed002", "seed001", "seed000"]
    text = "# The shipped seed configs on the shared CIFAR-10 copy\n\nMade by `bash benchmarks/seed_configs.sh`, " \
           "tables by `python benchmarks/seed_tables.py`.\n\n" + "\n".join(tables(n) for n in names if (ROOT / "runs" / n / "bench").is_dir())
    (ROOT / "benchmarks" / "results" / "seed_configs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
