"""What glibc's allocator costs a CPU training step, and what ``edgekd.native.retained_heap`` wins back.

Each measurement is its own process (the allocator setting is process-wide), A and B interleaved
(off, on, on, off, ...) so machine drift falls on both; the ratio is taken within a round and the
table gives the median over rounds. A process trains ``--steps`` steps of edgekd's training order
(channels-last, pool before activation, fused SGD; random pixels, since speed does not depend on
their values) after 3 warm-up steps, then runs the same network in eval mode over 4,096 images at
edgekd's evaluation batch (1,024). Page faults are the process's minor faults during the timed steps.

Usage:
    python benchmarks/heap.py [--arch seed002_teacher seed002_student edge_resnet_s] [--batch 256]
        [--rounds 5] [--steps 12] [--out NAME]
Results: benchmarks/results/NAME.json (raw, every round) and NAME.md (default heap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "heap"


def job(arch: str, batch: int, steps: int, retained: bool) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    from edgekd.native import retained_heap
    from edgekd.zoo import build_model, pool_before_activation

    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (32, 32)).to(memory_format=torch.channels_last)
    trained = pool_before_activation(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    images = torch.randn(4096, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step():
        loss = F.cross_entropy(trained(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with retained_heap() if retained else contextlib.nullcontext():
        for _ in range(3):
            step()
        faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(steps):
            step()
        train_s = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        model.eval()
        with torch.no_grad():
            model(images[:1024])
            t0 = time.perf_counter()
            for i in range(0, len(images), 1024):
                model(images[i:i + 1024])
            eval_s = time.perf_counter() - t0
    return {"train_images_per_s": steps * batch / train_s, "faults_per_step": faults / steps,
            "eval_images_per_s": len(images) / eval_s,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(arch: str, batch: int, steps: int, retained: bool) -> dict:
    cmd = [sys.executable, __file__, "job", arch, str(batch), str(steps), "on" if retained else "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{arch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def render(raw: dict) -> str:
    lines = ["# glibc's allocator and the CPU training step (`edgekd.native.retained_heap`)", "",
             f"Command: `{raw['command']}`. {raw['machine']['cores']} cores, batch {raw['batch']}, "
             f"{raw['steps']} timed steps per process ({20 * raw['steps']} for students, whose steps take milliseconds), {raw['rounds']} rounds, off/on interleaved. "
             "Ratio: on / off within a round, then the median (min-max).", "",
             "| arch | train img/s off | train img/s on | train on/off | page faults/step off | on | "
             "eval img/s off | eval img/s on | eval on/off | max RSS MB off | on |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, rounds in raw["results"].items():
        def med(side, key):
            return statistics.median(r[side][key] for r in rounds)

        def ratio(key):
            rs = [r["on"][key] / r["off"][key] for r in rounds]
            return f"**{statistics.median(rs):.2f}x** ({min(rs):.2f}-{max(rs):.2f})"

        lines.append(f"| {arch} | {med('off', 'train_images_per_s'):,.0f} | {med('on', 'train_images_per_s'):,.0f} | "
                     f"{ratio('train_images_per_s')} | {med('off', 'faults_per_step'):,.0f} | "
                     f"{med('on', 'faults_per_step'):,.0f} | {med('off', 'eval_images_per_s'):,.0f} | "
                     f"{med('on', 'eval_images_per_s'):,.0f} | {ratio('eval_images_per_s')} | "
                     f"{med('off', 'max_rss_mb'):,.0f} | {med('on', 'max_rss_mb'):,.0f} |")
    if raw.get("note"):
        lines += ["", raw["note"]]
    lines += ["", "off: glibc's defaults (every freed buffer above the mmap threshold goes back to the kernel, and "
              "comes back as fresh zeroed pages on the next step); on: `retained_heap`, which edgekd's training "
              "and QAT loops run inside."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        _, _, arch, batch, steps, flag = sys.argv
        print("RESULT " + json.dumps(job(arch, int(batch), int(steps), flag == "on")), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["seed002_teacher", "seed002_student", "edge_resnet_s"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="heap", help="results name in benchmarks/results (default heap)")
    args = ap.parse_args()
    global RESULTS
    RESULTS = RESULTS.with_name(args.out)
    raw = {"command": "python benchmarks/heap.py " + " ".join(sys.argv[1:]), "batch": args.batch,
           "steps": args.steps, "rounds": args.rounds,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()}, "results": {}}
    for arch in args.arch:
        steps = args.steps * (20 if "student" in arch else 1)  # a small student's steps take milliseconds
        rounds = raw["results"].setdefault(arch, [])
        for rnd in range(args.rounds):
            order = [False, True] if rnd % 2 == 0 else [True, False]
            row = {("on" if r else "off"): measure(arch, args.batch, steps, r) for r in order}
            rounds.append(row)
            print(f"{arch} round {rnd}: train {row['off']['train_images_per_s']:.0f} -> {row['on']['train_images_per_s']:.0f} "
                  f"img/s, faults/step {row['off']['faults_per_step']:.0f} -> {row['on']['faults_per_step']:.0f}", flush=True)
            RESULTS.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(render(raw))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
