"""Peak memory of loading an ImageFolder and running one epoch of batch indexing: decoded into RAM
(``cache=False``, edgekd's old path) against the memory-mapped decoded-image cache.

Datasets, generated once under /tmp/edgekd-bench-data (random images, 10 classes):
- 32 px: 20,000 RGB PNGs in one folder (edgekd draws train/val/test), CIFAR-10-sized images;
- 224 px: 3,000 RGB JPEGs in train/ and test/ folders (edgekd draws val from train).
Cases, each in fresh processes (``--child``), 1 thread each: the in-memory path, the cache when
cold (the process decodes it; with two processes one decodes and the other waits and maps it) and
when warm (already decoded), with one process and with two started together, as two DDP ranks
(each indexes its half of the epoch's permutation in batches of 256, as distill's ``_train_epoch``).

Measured per process: peak RSS (``ru_maxrss``: includes the cache file's pages a process touched,
which live once in the page cache and are shared by every process mapping the file) and peak
private memory (RssAnon sampled from /proc every 10 ms by the parent: what each process holds on
its own); with two processes, the peak of their summed private memory. Median of 3 runs.

Usage: python benchmarks/data_memory.py   (writes benchmarks/results/data_memory.{json,md}; ~6 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/edgekd-bench-data")
DATASETS = {"32px": (32, 20_000, "png", False), "224px": (224, 3_000, "jpg", True)}  # size, images, format, train/test
CASES = [("in-memory", 1), ("in-memory", 2), ("cache cold", 1), ("cache cold", 2), ("cache warm", 1)]
RUNS, BATCH, CLASSES = 3, 256, 10
MIB = 1 << 20


def generate(name: str) -> Path:
    """Random images with some spatial structure (upsampled noise), generated once and reused."""
    from PIL import Image

    size, n, fmt, split = DATASETS[name]
    root = WORK / name
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / (("test" if i % 5 == 0 else "train") if split else "") / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8))
        small.resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.{fmt}", quality=90)
    (root / "done").write_text("")
    return root


def child(root: str, cache: str, rank: int, world: int) -> None:
    """One process: load the dataset, hash it, index one epoch of its share in batches; print JSON.
    ``cache`` "-" only imports (the baseline every process pays before it reads any data)."""
    import torch

    from edgekd.data import load_data

    torch.set_num_threads(1)
    if cache == "-":
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_rss_mib": peak_kib / 1024, "load_s": 0.0, "fingerprint_s": 0.0, "epoch_s": 0.0,
                          "images": 0, "pixels_mib": 0.0}))
        return
    t0 = time.perf_counter()
    data = load_data(root, cache=cache == "1")
    t1 = time.perf_counter()
    data.fingerprint()
    t2 = time.perf_counter()
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    share = len(perm) // world
    perm = perm[rank * share:(rank + 1) * share]
    checksum = 0
    for i in range(0, len(perm), BATCH):
        checksum += int(data.train_x[perm[i:i + BATCH]][:, :, 0, 0].sum())
    t3 = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "load_s": t1 - t0, "fingerprint_s": t2 - t1,
                      "epoch_s": t3 - t2, "images": len(data.train_y) + len(data.val_y) + len(data.test_y),
                      "pixels_mib": sum(t.nbytes for t in (data.train_x, data.val_x, data.test_x)) / MIB}))


def anon_mib(pid: int) -> float:
    """The private (anonymous) resident memory of ``pid`` in MiB, 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((ln for ln in status.splitlines() if ln.startswith("RssAnon:")), "RssAnon: 0 kB")
    return int(line.split()[1]) / 1024


def run_case(root: Path, mode: str, procs: int, cache_dir: Path) -> dict:
    """Start ``procs`` children together, sample their private memory until they exit."""
    if mode == "cache cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    env = {**os.environ, "EDGEKD_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cache = {"in-memory": "0", "imports only": "-"}.get(mode, "1")
    children = [subprocess.Popen([sys.executable, __file__, "--child", str(root), cache, str(r), str(procs)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in range(procs)]
    peak_each, peak_sum = [0.0] * procs, 0.0
    while any(c.poll() is None for c in children):
        now = [anon_mib(c.pid) for c in children]
        peak_each = [max(a, b) for a, b in zip(peak_each, now)]
        peak_sum = max(peak_sum, sum(now))
        time.sleep(0.01)
    outs = [c.communicate() for c in children]
    for c, (out, err) in zip(children, outs):
        if c.returncode != 0:
            raise SystemExit(f"child failed ({mode}, {procs}):\n{err}")
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {"peak_rss_mib": max(r["peak_rss_mib"] for r in rows), "peak_private_mib": max(peak_each),
            "peak_private_all_mib": peak_sum, "load_s": max(r["load_s"] for r in rows),
            "epoch_s": max(r["epoch_s"] for r in rows), "fingerprint_s": max(r["fingerprint_s"] for r in rows),
            "images": rows[0]["images"], "pixels_mib": rows[0]["pixels_mib"]}


def median_case(root: Path, mode: str, procs: int, cache_dir: Path) -> dict:
    if mode == "cache warm" and not any(cache_dir.rglob("meta.json")):
        run_case(root, "cache cold", 1, cache_dir)
    runs = [run_case(root, mode, procs, cache_dir) for _ in range(RUNS)]
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}


def render(results: list[dict], command: str) -> str:
    lines = ["# ImageFolder loading: peak memory, in-memory decode vs memory-mapped cache", "",
             f"Command: `{command}`. Median of {RUNS} runs, fresh processes, 1 thread each; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.", "",
             "Peak RSS counts the cache file's pages a process touched: they sit once in the page cache, "
             "shared by every process mapping the file. Private memory is what each process holds alone.", "",
             "Above imports: peak private memory per process less that of a process that only imported "
             "torch and edgekd (first row).", "",
             "| dataset | path | processes | images | pixels (MiB) | peak RSS / process (MiB) | "
             "peak private / process (MiB) | above imports (MiB) | peak private, all processes (MiB) | "
             "load (s) | epoch (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = results[0]["peak_private_mib"]
    for r in results:
        lines.append(f"| {r['dataset']} | {r['path']} | {r['processes']} | {r['images']:,} | {r['pixels_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_private_mib']:.0f} | {r['peak_private_mib'] - base:.0f} | "
                     f"{r['peak_private_all_mib']:.0f} | {r['load_s']:.1f} | {r['epoch_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    command = "python benchmarks/data_memory.py"
    base = median_case(generate("32px"), "imports only", 1, WORK / "cache-none")
    results = [{"dataset": "-", "path": "imports only", "processes": 1, **base}]
    for name in DATASETS:
        root = generate(name)
        cache_dir = WORK / f"cache-{name}"
        for mode, procs in CASES:
            row = median_case(root, mode, procs, cache_dir)
            results.append({"dataset": name, "path": mode, "processes": procs, **row})
            print(json.dumps(results[-1]), file=sys.stderr)
    out = ROOT / "benchmarks" / "results"
    (out / "data_memory.json").write_text(json.dumps({"command": command, "runs": RUNS, "batch": BATCH,
                                                      "cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")
    (out / "data_memory.md").write_text(render(results, command))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
