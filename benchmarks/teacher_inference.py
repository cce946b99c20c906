"""How fast an edgekd teacher answers on the CPU: onnxruntime fp32 (edgekd's default) against PyTorch under bf16
autocast (what a bf16 run on a CPU with AMX tiles uses), interleaved, median of rounds.

    python benchmarks/teacher_inference.py runs/c10-teacher-bf16/best.pt [--batch 512] [--rounds 5]
Results: benchmarks/results/teacher_inference.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from edgekd.distill import cpu_has_amx
    from edgekd.teachers import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teachers", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for path in args.teachers:
        fp32, bf16 = load_teacher(path), load_teacher(path, bf16=True)
        size = fp32.input_size or (32, 32)
        x = torch.rand(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
        speed = {fp32.kind: [], bf16.kind: []}
        for _ in range(args.rounds):
            for t in (fp32, bf16):
                t(x[:64])  # warm-up
                t0 = time.perf_counter()
                t(x)
                speed[t.kind].append(args.batch / (time.perf_counter() - t0))
        ratios = [b / a for a, b in zip(speed[fp32.kind], speed[bf16.kind])]
        rows.append({"teacher": str(path), "fp32": fp32.kind, "bf16": bf16.kind,
                     "fp32_images_per_s": statistics.median(speed[fp32.kind]),
                     "bf16_images_per_s": statistics.median(speed[bf16.kind]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    meta = {"command": "python benchmarks/teacher_inference.py " + " ".join(map(str, args.teachers))
            + f" --batch {args.batch} --rounds {args.rounds}", "amx": cpu_has_amx(), "threads": torch.get_num_threads()}
    (RESULTS / "teacher_inference.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Teacher inference on the CPU: onnxruntime fp32 against PyTorch bf16", "",
             f"Command: `{meta['command']}`. Batch {args.batch}, {meta['threads']} threads, random pixels, "
             f"{args.rounds} interleaved rounds, median; this CPU has {'AMX tiles' if meta['amx'] else 'no AMX'}.", "",
             "| teacher | onnxruntime fp32 img/s | PyTorch bf16 img/s | bf16 / fp32 (min-max) |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['teacher']}` | {r['fp32_images_per_s']:,.0f} | {r['bf16_images_per_s']:,.0f} | "
              f"**{r['ratio']:.2f}x** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |" for r in rows]
    (RESULTS / "teacher_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
